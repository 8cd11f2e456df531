"""Users: --api-key-file gives each user their keys, each conversation belongs to the user whose
key created it, and another user gets 404 for it; against real uvicorn servers on loopback."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from live_server import WAIT_S, live_server

from chatserve.config import EngineConfig, ServerConfig
from chatserve.server.app import create_app
from chatserve.server.streaming import Users

REPO = Path(__file__).resolve().parents[1]
KEYS = """\
# users of this server
alice  alice-key-1
alice  alice-key-2   # her second key: a user may have several

bob    bob-key
"""


def headers(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def call(url: str, key: str | None, method: str, path: str = "", **kwargs) -> requests.Response:
    return requests.request(method, f"{url}/v1/conversations{path}", headers=headers(key), timeout=WAIT_S, **kwargs)


def ok(response: requests.Response, status: int = 200) -> dict:
    assert response.status_code == status, response.text
    return response.json()


def listed(url: str, key: str) -> list[str]:
    return [c["title"] for c in ok(call(url, key, "GET"))["data"]]


def not_found(response: requests.Response) -> None:
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "conversation_not_found"


@pytest.fixture
def key_file(tmp_path) -> Path:
    path = tmp_path / "keys"
    path.write_text(KEYS)
    return path


def test_the_key_file_is_checked_at_start(tmp_path):
    cases = {"alice\n": "line 1: expected 'USER KEY'",
             "alice one two\n": "line 1: expected 'USER KEY'",
             "# fine\n\nalice k1\nbob k1\n": "line 4: this key is already given at",
             "# only comments\n\n": "holds no keys"}
    for text, words in cases.items():
        path = tmp_path / "keys"
        path.write_text(text)
        with pytest.raises(ValueError, match=words) as caught:
            create_app(EngineConfig(), ServerConfig(api_key_file=str(path), db_path=":memory:"))
        assert "k1" not in str(caught.value)  # a key never appears in a message
    path.write_text("bob secret\n")
    with pytest.raises(ValueError, match="already given at --api-key"):
        create_app(EngineConfig(), ServerConfig(api_key="secret", api_key_file=str(path), db_path=":memory:"))
    with pytest.raises(ValueError, match="cannot read the API key file"):
        create_app(EngineConfig(), ServerConfig(api_key_file=str(tmp_path / "missing"), db_path=":memory:"))
    # `chatserve serve` says so and exits 2, before loading any model.
    path.write_text("alice\n")
    done = subprocess.run([sys.executable, "-m", "chatserve.cli", "serve", "--api-key-file", str(path),
                           "--db", ":memory:"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and "line 1: expected 'USER KEY'" in done.stderr, done.stderr


def test_keys_name_their_users_and_only_their_digests_are_kept(key_file):
    users = Users.from_config(ServerConfig(api_key="default-key", api_key_file=str(key_file)))
    assert [users.user(k) for k in ("alice-key-1", "alice-key-2", "bob-key", "default-key", "bob-key ", "")] == \
        ["alice", "alice", "bob", "default", None, None]
    assert "bob-key" not in repr(vars(users))


def test_two_users_see_only_their_own_conversations(key_file, caplog):
    caplog.set_level(logging.INFO, logger="chatserve.server")
    config = ServerConfig(api_key="default-key", api_key_file=str(key_file), db_path=":memory:")
    with live_server(server_config=config) as srv:
        url = srv.url
        conv = ok(call(url, "alice-key-1", "POST", json={"title": "Alice's"}), 201)
        path = f"/{conv['id']}"
        with call(url, "alice-key-1", "POST", f"{path}/messages", json={"content": "Hi", "max_tokens": 3},
                  stream=True) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                      if line.startswith("data: {")]
        answer = events[-1]["message"]
        assert events[-1]["type"] == "done" and answer["status"] == "complete"
        ok(call(url, "bob-key", "POST", json={"title": "Bob's"}), 201)

        # Her other key is the same user; bob and the default user see only their own.
        assert listed(url, "alice-key-2") == ["Alice's"]
        assert listed(url, "bob-key") == ["Bob's"]
        assert listed(url, "default-key") == []
        assert ok(call(url, "alice-key-2", "GET", path))["messages"][1]["id"] == answer["id"]
        # For bob, alice's conversation does not exist, whatever he tries.
        for method, sub, body in (("GET", "", None), ("PATCH", "", {"title": "mine now"}), ("DELETE", "", None),
                                  ("POST", "/messages", {"content": "x"}),
                                  ("POST", f"/messages/{answer['parent_id']}/edit", {"content": "x"}),
                                  ("POST", f"/messages/{answer['id']}/regenerate", {}),
                                  ("POST", f"/messages/{answer['id']}/stop", None),
                                  ("POST", "/switch", {"message_id": answer["id"]})):
            not_found(call(url, "bob-key", method, f"{path}{sub}", json=body))
        after = call(url, "bob-key", "GET", params={"after": conv["id"]})  # not even as a list cursor
        assert after.status_code == 400 and after.json()["error"]["param"] == "after"
        assert ok(call(url, "alice-key-1", "GET", path))["title"] == "Alice's"  # untouched
        assert len(ok(call(url, "alice-key-1", "GET", path))["messages"]) == 2

        # No key or an unknown one: 401, on every protected route.
        for key in (None, "nobody-key", "alice-key-1x"):
            r = call(url, key, "GET")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = requests.post(f"{url}/v1/chat/completions", headers=headers("bob-key"), timeout=WAIT_S,
                          json={"model": "dummy_model", "messages": [{"role": "user", "content": "Hi"}],
                                "max_tokens": 2})
        assert r.status_code == 200, r.text
        ok(call(url, "alice-key-2", "DELETE", path))
        assert listed(url, "alice-key-1") == []

    log = caplog.text
    assert f"GET /v1/conversations{path} by user bob" in log and "POST /v1/conversations by user alice" in log
    assert "(user bob)" in log and f"request {answer['id']} (user alice)" in log  # each generation's line
    assert "refused, missing or unknown API key" in log
    assert not any(key in log for key in ("alice-key-1", "alice-key-2", "bob-key", "default-key"))


OLD_SCHEMA = """
CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
                            system_prompt TEXT, params TEXT NOT NULL, current_message_id TEXT);
CREATE TABLE messages (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,
                       conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
                       parent_id TEXT, role TEXT NOT NULL, content TEXT NOT NULL, reasoning_content TEXT,
                       created REAL NOT NULL, status TEXT NOT NULL, finish_reason TEXT, stats TEXT,
                       prompt_token_ids TEXT, output_token_ids TEXT, prompt_key TEXT);
"""


def test_a_store_from_before_users_belongs_to_the_default_user(tmp_path, key_file):
    """Upgraded at open: an owner column (the default user's), and titles cut to the bound."""
    db = tmp_path / "old.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.executescript(OLD_SCHEMA)
        conn.execute("INSERT INTO conversations VALUES ('conv_old', 'From before users', 1, 1, NULL, '{}', NULL)")
        # From before titles were bounded, too: cut to 256 characters when the store opens.
        conn.execute(f"INSERT INTO conversations VALUES ('conv_huge', '{'t' * 100_000}', 0, 0, NULL, '{{}}', NULL)")
    conn.close()
    with live_server(server_config=ServerConfig(api_key="default-key", api_key_file=str(key_file),
                                                db_path=str(db))) as srv:
        assert listed(srv.url, "default-key") == ["From before users", "t" * 256]
        assert listed(srv.url, "bob-key") == []
        not_found(call(srv.url, "bob-key", "GET", "/conv_old"))
    with live_server(server_config=ServerConfig(db_path=str(db))) as srv:  # without keys: the one local user
        assert listed(srv.url, None) == ["From before users", "t" * 256]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT owner FROM conversations").fetchall() == [("default",), ("default",)]
    conn.close()


def test_uvicorn_main_app_takes_the_key_file_from_the_environment(key_file):
    from chatserve.server.app import configs_from_env

    _, server = configs_from_env({"CHATSERVE_API_KEY_FILE": str(key_file), "CHATSERVE_API_KEY": "default-key"})
    assert (server.api_key_file, server.api_key) == (str(key_file), "default-key")
    assert Users.from_config(server).user("bob-key") == "bob"
