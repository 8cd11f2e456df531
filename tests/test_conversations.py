"""/v1/conversations (docs/conversations-api.md) against a real uvicorn server, with dummy_model."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from contextlib import contextmanager

import pytest
import requests
from live_server import WAIT_S, idle, live_server, tiny_engine_config, wait_until
from scripted_model import ANSWER, REASONING, write_scripted_model
from starlette.testclient import TestClient

from chatserve.config import EngineConfig, ServerConfig
from chatserve.engine.chat_template import chat_job, render
from chatserve.engine.request import RequestOutput
from chatserve.models.dummy import IM_END, build_dummy_tokenizer
from chatserve.server import app as app_module
from chatserve.server.app import create_app
from chatserve.server.conversations import (Answer, DeltaEvent, DoneEvent, MessageEvent, Params, Tree, answer_params,
                                            build_prompt, conversation_json)
from chatserve.server.reasoning import ReasoningParser

BS = 16  # tiny_engine_config's block size
UNSET = dict.fromkeys(Params.model_fields)  # a conversation's params, none set
LONG = 400  # max_tokens of an answer that is stopped long before it ends


@pytest.fixture(scope="module")
def server():
    with live_server(server_config=ServerConfig(db_path=":memory:")) as srv:
        yield srv


def call(server, method: str, path: str, **kwargs) -> requests.Response:
    return requests.request(method, f"{server.url}/v1/conversations{path}", timeout=WAIT_S, **kwargs)


def ok(response: requests.Response, status: int = 200) -> dict:
    assert response.status_code == status, response.text
    return response.json()


def create(server, **body) -> dict:
    return ok(call(server, "POST", "", json=body), 201)


def get(server, conv_id: str) -> dict:
    return ok(call(server, "GET", f"/{conv_id}"))


def events(response: requests.Response):
    """The SSE events of a response: dicts, then "[DONE]"."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    for line in response.iter_lines(decode_unicode=True):
        if line:
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def answer(server, path: str, **body) -> list:
    """Post to an answering route and read its whole stream."""
    with call(server, "POST", path, json=body, stream=True) as r:
        return list(events(r))


def done(evts: list) -> dict:
    assert evts[-1] == "[DONE]" and evts[-2]["type"] == "done", evts[-3:]
    return evts[-2]


def assert_error(response: requests.Response, status: int, param=None, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert all(w in error["message"] for w in words), error["message"]
    return error


@contextmanager
def slow_engine(server, delay: float = 0.02):
    """Each engine step takes at least `delay`: a long answer is still running when the test acts."""
    step = server.engine.step

    def slow_step():
        time.sleep(delay)
        return step()

    server.engine.step = slow_step
    try:
        yield
    finally:
        del server.engine.step


def settled(server) -> None:
    wait_until(lambda: not server.app.state.answers and idle(server.engine), "no answer in flight, every block free")


# -- conversations --------------------------------------------------------------------------------


def test_create_list_get_rename_delete(server):
    a = create(server)
    assert a["id"].startswith("conv_") and a["object"] == "conversation" and a["title"] == "New chat"
    assert a["messages"] == [] and a["current_message_id"] is None and a["system_prompt"] is None
    assert a["params"] == UNSET
    assert list(UNSET) == ["temperature", "top_p", "max_tokens", "top_k", "min_p", "repetition_penalty",
                           "presence_penalty", "frequency_penalty", "seed", "stop"]
    assert a["cache"] == {"warm": False, "cached_tokens": 0}
    assert isinstance(a["created"], int) and isinstance(a["updated"], int)
    b = create(server, title="Trip", system_prompt="Be brief.", params={"temperature": 0})
    assert b["title"] == "Trip" and b["system_prompt"] == "Be brief."
    assert b["params"] == {**UNSET, "temperature": 0}

    listed = ok(call(server, "GET", ""))
    assert listed["object"] == "list"
    ids = [c["id"] for c in listed["data"]]
    assert ids.index(b["id"]) < ids.index(a["id"])  # most recently updated first
    assert all("messages" not in c for c in listed["data"])

    renamed = ok(call(server, "PATCH", f"/{a['id']}", json={"title": "Renamed"}))
    assert renamed["title"] == "Renamed" and renamed["messages"] == []
    ids = [c["id"] for c in ok(call(server, "GET", ""))["data"]]
    assert ids.index(a["id"]) < ids.index(b["id"])
    # In params only the keys sent change; null unsets one.
    patched = ok(call(server, "PATCH", f"/{b['id']}", json={"params": {"max_tokens": 5}, "system_prompt": None}))
    assert patched["params"] == {**UNSET, "temperature": 0, "max_tokens": 5}
    assert patched["system_prompt"] is None and patched["title"] == "Trip"
    patched = ok(call(server, "PATCH", f"/{b['id']}", json={"params": {"temperature": None}}))
    assert patched["params"] == {**UNSET, "max_tokens": 5}
    assert get(server, b["id"])["params"] == patched["params"]

    assert ok(call(server, "DELETE", f"/{a['id']}")) == {"id": a["id"], "object": "conversation.deleted",
                                                           "deleted": True}
    assert_error(call(server, "GET", f"/{a['id']}"), 404, "id", a["id"])
    assert_error(call(server, "DELETE", f"/{a['id']}"), 404, "id")
    assert a["id"] not in [c["id"] for c in ok(call(server, "GET", ""))["data"]]


def test_parent_id_null_starts_a_new_root_and_only_a_default_title_is_replaced(server):
    conv_id = create(server)["id"]
    first = done(answer(server, f"/{conv_id}/messages", content="Named by me", max_tokens=2))
    assert first["conversation"]["title"] == "Named by me"
    evts = answer(server, f"/{conv_id}/messages", content="Another start", parent_id=None, max_tokens=2)
    root, again = evts[0]["message"], done(evts)
    assert root["parent_id"] is None and root["siblings"] == [first["message"]["parent_id"], root["id"]]
    assert again["conversation"]["title"] == "Named by me"  # named once, by the first root
    assert [m["id"] for m in get(server, conv_id)["messages"]] == [root["id"], again["message"]["id"]]
    # A title given (or PATCHed) is kept; "params": null changes no params.
    kept = create(server, title="Mine", params={"max_tokens": 2})
    assert done(answer(server, f"/{kept['id']}/messages", content="Hi"))["conversation"]["title"] == "Mine"
    assert ok(call(server, "PATCH", f"/{kept['id']}", json={"params": None}))["params"] == kept["params"]
    settled(server)


# -- answers --------------------------------------------------------------------------------------


def test_a_message_streams_its_answer_and_is_stored(server):
    conv = create(server)
    evts = answer(server, f"/{conv['id']}/messages", content="Hello there\nand more", max_tokens=8, temperature=0)
    user, assistant = evts[0]["message"], evts[1]["message"]
    assert [e["type"] for e in evts[:2]] == ["message", "message"]
    assert user["role"] == "user" and user["content"] == "Hello there\nand more" and user["parent_id"] is None
    assert user["status"] == "complete" and user["siblings"] == [user["id"]] and user["sibling_index"] == 0
    assert user["object"] == "conversation.message" and user["id"].startswith("msg_")
    assert assistant["role"] == "assistant" and assistant["parent_id"] == user["id"]
    assert assistant["status"] == "generating" and assistant["finish_reason"] is None and assistant["content"] == ""
    deltas = evts[2:-2]
    assert deltas and all(d["type"] == "delta" and d["message_id"] == assistant["id"] for d in deltas)
    assert all(set(d) - {"type", "message_id"} <= {"content", "reasoning_content"} for d in deltas)

    final = done(evts)
    message, conversation = final["message"], final["conversation"]
    assert message["id"] == assistant["id"] and message["status"] == "complete"
    assert message["finish_reason"] == "length"
    assert message["content"] == "".join(d.get("content", "") for d in deltas)
    stats = message["stats"]
    assert set(stats) == {"prompt_tokens", "cached_tokens", "completion_tokens", "time_to_first_token",
                          "tokens_per_second"}
    assert stats["completion_tokens"] == 8 and stats["prompt_tokens"] > 0 and stats["time_to_first_token"] > 0
    # The first user message names the conversation; the answer is the branch shown.
    assert conversation["title"] == "Hello there" and conversation["current_message_id"] == assistant["id"]
    assert "messages" not in conversation
    assert conversation["cache"] == {"warm": True, "cached_tokens": stats["prompt_tokens"] + 7}  # all computed

    stored = get(server, conv["id"])
    assert stored["messages"] == [user, message] and stored["title"] == "Hello there"
    settled(server)


def test_edit_makes_a_sibling_branch_and_switch_goes_back(server):
    conv_id = create(server)["id"]
    first = done(answer(server, f"/{conv_id}/messages", content="first", max_tokens=4))["message"]
    evts = answer(server, f"/{conv_id}/messages", content="second", max_tokens=4)
    u2, a2 = evts[0]["message"], done(evts)["message"]
    assert u2["parent_id"] == first["id"]

    evts = answer(server, f"/{conv_id}/messages/{u2['id']}/edit", content="second, edited", max_tokens=4)
    u2b, a2b = evts[0]["message"], done(evts)["message"]
    assert u2b["parent_id"] == first["id"] and u2b["content"] == "second, edited"
    assert u2b["siblings"] == [u2["id"], u2b["id"]] and u2b["sibling_index"] == 1
    branch = get(server, conv_id)["messages"]
    assert [m["id"] for m in branch] == [first["parent_id"], first["id"], u2b["id"], a2b["id"]]

    back = ok(call(server, "POST", f"/{conv_id}/switch", json={"message_id": u2["id"]}))
    assert back["current_message_id"] == a2["id"]
    assert [m["id"] for m in back["messages"]] == [first["parent_id"], first["id"], u2["id"], a2["id"]]
    assert back["messages"][2]["siblings"] == [u2["id"], u2b["id"]] and back["messages"][2]["sibling_index"] == 0
    assert get(server, conv_id)["current_message_id"] == a2["id"]
    # Switching to a message above the fork follows the most recently created child down.
    assert ok(call(server, "POST", f"/{conv_id}/switch", json={"message_id": first["id"]}))["current_message_id"] \
        == a2b["id"]

    # Editing the first message starts a second root.
    evts = answer(server, f"/{conv_id}/messages/{first['parent_id']}/edit", content="again", max_tokens=4)
    root = evts[0]["message"]
    assert root["parent_id"] is None and root["siblings"] == [first["parent_id"], root["id"]]
    assert [m["id"] for m in get(server, conv_id)["messages"]] == [root["id"], done(evts)["message"]["id"]]
    settled(server)


def test_regenerate_adds_a_sibling_answer(server):
    conv_id = create(server)["id"]
    first = done(answer(server, f"/{conv_id}/messages", content="Hi", max_tokens=4))["message"]
    evts = answer(server, f"/{conv_id}/messages/{first['id']}/regenerate", temperature=1.0, max_tokens=5)
    assert evts[0]["type"] == "message" and evts[0]["message"]["role"] == "assistant"  # no user message
    again = done(evts)["message"]
    assert again["parent_id"] == first["parent_id"] and again["stats"]["completion_tokens"] == 5
    assert again["siblings"] == [first["id"], again["id"]] and again["sibling_index"] == 1
    # The body is optional.
    with requests.post(f"{server.url}/v1/conversations/{conv_id}/messages/{first['id']}/regenerate",
                       stream=True, timeout=WAIT_S) as r:
        third = done(list(events(r)))["message"]
    assert third["siblings"] == [first["id"], again["id"], third["id"]]
    assert [m["id"] for m in get(server, conv_id)["messages"]] == [first["parent_id"], third["id"]]

    assert_error(call(server, "POST", f"/{conv_id}/messages/{first['parent_id']}/regenerate", json={}), 400,
                 "message_id", "user message")
    assert_error(call(server, "POST", f"/{conv_id}/messages/{first['id']}/edit", json={"content": "x"}), 400,
                 "message_id", "answer")
    settled(server)


def test_the_next_turn_extends_the_previous_token_ids(server):
    store, engine = server.app.state.store, server.engine
    conv_id = create(server, system_prompt="You are a helpful assistant.")["id"]
    turn1 = done(answer(server, f"/{conv_id}/messages", content="Tell me a story", max_tokens=30,
                        temperature=0))["message"]
    prompt1, output1, _ = store.token_ids(turn1["id"])
    p1, c1 = turn1["stats"]["prompt_tokens"], turn1["stats"]["completion_tokens"]
    assert (len(prompt1), len(output1)) == (p1, c1) == (p1, 30)

    turn2 = done(answer(server, f"/{conv_id}/messages", content="And then?", max_tokens=8, temperature=0))["message"]
    prompt2, _, _ = store.token_ids(turn2["id"])
    assert prompt2[:p1 + c1] == prompt1 + output1
    # The whole computed history: full blocks and the partial last one (not the last answer token,
    # which was sampled, never fed back).
    assert turn2["stats"]["cached_tokens"] == p1 + c1 - 1

    # A changed system prompt breaks the history's ids: the next prompt is rendered afresh.
    call(server, "PATCH", f"/{conv_id}", json={"system_prompt": "Answer in French."})
    turn3 = done(answer(server, f"/{conv_id}/messages", content="Merci", max_tokens=4, temperature=0))["message"]
    branch = get(server, conv_id)["messages"]
    chat = [{"role": "system", "content": "Answer in French."}] + [
        {"role": m["role"], "content": m["content"]} for m in branch[:-1]]
    assert store.token_ids(turn3["id"])[0] == engine.apply_chat_template(chat)
    settled(server)


def test_continue_extends_a_cut_answer_token_exactly(server):
    """A length-stopped answer goes on in the same message: its prompt is the stored history and
    answer ids (nothing re-rendered, no end of turn), and the next turn reuses all of it from the cache."""
    store, tokenizer = server.app.state.store, server.engine.tokenizer
    conv_id = create(server, params={"temperature": 0})["id"]
    first = done(answer(server, f"/{conv_id}/messages", content="Tell me a story", max_tokens=6))["message"]
    assert (first["status"], first["finish_reason"]) == ("complete", "length")
    prompt1, output1, key1 = store.token_ids(first["id"])
    p1, c1 = len(prompt1), len(output1)

    evts = answer(server, f"/{conv_id}/messages/{first['id']}/continue", max_tokens=7)
    opening = evts[0]["message"]  # the same message, generating again, with its text so far; no user message
    assert evts[0]["type"] == "message" and evts[1]["type"] == "delta"
    assert (opening["id"], opening["status"], opening["finish_reason"], opening["content"]) == \
        (first["id"], "generating", None, first["content"])
    final = done(evts)["message"]
    added = "".join(e.get("content", "") for e in evts[1:-2])
    assert added and final["content"] == first["content"] + added
    assert (final["id"], final["status"], final["finish_reason"]) == (first["id"], "complete", "length")
    assert final["siblings"] == [first["id"]] and done(evts)["conversation"]["current_message_id"] == first["id"]
    # Its prompt: the history and the answer so far, token for token, all computed ones from the cache.
    stats = final["stats"]
    assert (stats["prompt_tokens"], stats["cached_tokens"], stats["completion_tokens"]) == (p1 + c1, p1 + c1 - 1, 7)
    prompt2, output2, key2 = store.token_ids(first["id"])
    assert (prompt2, key2) == (prompt1, key1) and output2[:c1] == output1 and len(output2) == c1 + 7
    assert tokenizer.decode(output2, skip_special_tokens=True) == final["content"]
    assert get(server, conv_id)["messages"][-1] == final

    # The next turn extends the whole history: every computed token of it from the prefix cache.
    turn2 = done(answer(server, f"/{conv_id}/messages", content="And then?", max_tokens=3))["message"]
    assert store.token_ids(turn2["id"])[0][:p1 + c1 + 7] == prompt1 + output2
    assert turn2["stats"]["cached_tokens"] == p1 + c1 + 7 - 1
    # After a new system prompt the stored ids no longer fit: the history is rendered afresh and
    # the answer's text encoded after it.
    ok(call(server, "PATCH", f"/{conv_id}", json={"system_prompt": "Be brief."}))
    history = [{"role": "system", "content": "Be brief."}] + [
        {"role": m["role"], "content": m["content"]} for m in get(server, conv_id)["messages"][:-1]]
    fresh, said = server.engine.apply_chat_template(history), tokenizer.encode(turn2["content"],
                                                                              add_special_tokens=False)
    again = done(answer(server, f"/{conv_id}/messages/{turn2['id']}/continue", max_tokens=2))["message"]
    assert again["stats"]["prompt_tokens"] == len(fresh) + len(said)
    prompt3, output3, _ = store.token_ids(turn2["id"])
    assert (prompt3, output3[:len(said)], len(output3)) == (fresh, said, len(said) + 2)
    # Only the last answer of a branch goes on; a user message or an unknown one cannot.
    assert_error(call(server, "POST", f"/{conv_id}/messages/{first['id']}/continue"), 400, "message_id", "replies")
    assert_error(call(server, "POST", f"/{conv_id}/messages/{first['parent_id']}/continue"), 400, "message_id",
                 "user message")
    assert_error(call(server, "POST", f"/{conv_id}/messages/msg_nope/continue"), 404, "message_id")
    assert_error(call(server, "POST", f"/{conv_id}/messages/{turn2['id']}/continue", json={"max_tokens": 100_000}),
                 400, "max_tokens")
    assert store.message(conv_id, turn2["id"])["status"] == "complete"  # the refused one changed nothing
    settled(server)


def test_continue_a_stopped_answer_completes_it(server):
    settled(server)
    conv_id = create(server, params={"temperature": 0})["id"]
    with slow_engine(server), requests.post(f"{server.url}/v1/conversations/{conv_id}/messages", stream=True,
                                            timeout=WAIT_S, json={"content": "Hi", "max_tokens": LONG}) as r:
        stream = events(r)
        assistant = [next(stream), next(stream)][1]["message"]
        next(stream)
        stopped = ok(call(server, "POST", f"/{conv_id}/messages/{assistant['id']}/stop"))
        list(stream)
    assert (stopped["status"], stopped["finish_reason"]) == ("stopped", "abort")
    settled(server)
    final = done(answer(server, f"/{conv_id}/messages/{assistant['id']}/continue", max_tokens=3))["message"]
    assert (final["status"], final["finish_reason"]) == ("complete", "length")
    assert final["content"].startswith(stopped["content"]) and len(final["content"]) > len(stopped["content"])
    settled(server)
    # A continuation is stopped as an answer is, its text so far kept, the old and the new.
    with slow_engine(server), call(server, "POST", f"/{conv_id}/messages/{assistant['id']}/continue", stream=True,
                                   json={"max_tokens": LONG}) as r:
        stream = events(r)
        next(stream), next(stream)
        again = ok(call(server, "POST", f"/{conv_id}/messages/{assistant['id']}/stop"))
        list(stream)
    assert (again["status"], again["finish_reason"]) == ("stopped", "abort")
    assert again["content"].startswith(final["content"]) and again["stats"]["completion_tokens"] < LONG
    settled(server)


# -- deleting messages, search, export and import ---------------------------------------------------


def test_deleting_a_message_takes_its_replies_and_moves_the_branch(server):
    conv_id = create(server, params={"max_tokens": 2})["id"]
    a1 = done(answer(server, f"/{conv_id}/messages", content="one"))["message"]
    a2 = done(answer(server, f"/{conv_id}/messages", content="two"))["message"]
    a2b = done(answer(server, f"/{conv_id}/messages/{a2['id']}/regenerate"))["message"]
    a3 = done(answer(server, f"/{conv_id}/messages", content="three"))["message"]
    u1, u2 = a1["parent_id"], a2["parent_id"]

    # An answer with replies: it and everything below it; the branch moves to the sibling before it.
    gone = ok(call(server, "DELETE", f"/{conv_id}/messages/{a2b['id']}"))
    assert (gone["id"], gone["object"], gone["deleted"]) == (a2b["id"], "conversation.message.deleted", True)
    assert gone["deleted_ids"] == [a2b["id"], a3["parent_id"], a3["id"]]
    assert gone["conversation"]["current_message_id"] == a2["id"]
    assert [m["id"] for m in gone["conversation"]["messages"]] == [u1, a1["id"], u2, a2["id"]]
    assert gone["conversation"]["messages"][-1]["siblings"] == [a2["id"]]
    assert get(server, conv_id) == gone["conversation"]
    # Its question's only answer: the question goes too; the branch ends at the answer before.
    gone = ok(call(server, "DELETE", f"/{conv_id}/messages/{a2['id']}"))
    assert gone["deleted_ids"] == [u2, a2["id"]]
    assert [m["id"] for m in gone["conversation"]["messages"]] == [u1, a1["id"]]
    assert gone["conversation"]["current_message_id"] == a1["id"]
    # The conversation goes on from there.
    again = done(answer(server, f"/{conv_id}/messages", content="two again"))["message"]
    assert [m["id"] for m in get(server, conv_id)["messages"]] == [u1, a1["id"], again["parent_id"], again["id"]]
    # A first message: the whole tree under it.
    gone = ok(call(server, "DELETE", f"/{conv_id}/messages/{u1}"))
    assert gone["deleted_ids"] == [u1, a1["id"], again["parent_id"], again["id"]]
    assert (gone["conversation"]["messages"], gone["conversation"]["current_message_id"]) == ([], None)
    assert server.app.state.store.messages(conv_id) == []
    assert_error(call(server, "DELETE", f"/{conv_id}/messages/{u1}"), 404, "message_id")
    assert_error(call(server, "DELETE", f"/conv_nope/messages/{u1}"), 404, "id")
    settled(server)


def test_search_export_and_import_are_the_users_own(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("alice alice-key\nbob bob-key\n")
    with live_server(server_config=ServerConfig(db_path=":memory:", api_key_file=str(keys))) as srv:
        alice, bob = ({"Authorization": f"Bearer {k}"} for k in ("alice-key", "bob-key"))
        conv_id = ok(call(srv, "POST", "", json={"title": "Café plans"}, headers=alice), 201)["id"]
        done(answer_as(srv, alice, f"/{conv_id}/messages", content="Where is the zebra crossing?", max_tokens=2))
        for path, method in ((f"/{conv_id}/export", "GET"), ("/search?q=zebra", "GET"),
                             (f"/{conv_id}/messages/{get_as(srv, alice, conv_id)['current_message_id']}", "DELETE")):
            response = call(srv, method, path, headers=bob)
            if path.startswith("/search"):
                assert ok(response)["data"] == []  # bob finds none of alice's
            else:
                assert_error(response, 404, "id")
        assert [c["id"] for c in ok(call(srv, "GET", "/search", params={"q": "cafe"}, headers=alice))["data"]] \
            == [conv_id]
        exported = ok(call(srv, "GET", f"/{conv_id}/export", headers=alice))
        imported = ok(call(srv, "POST", "/import", json=exported, headers=bob), 201)
        assert ok(call(srv, "GET", "", headers=bob))["data"][0]["id"] == imported["id"]  # bob's copy
        assert [c["title"] for c in ok(call(srv, "GET", "", headers=alice))["data"]] == ["Café plans"]


def answer_as(server, headers: dict, path: str, **body) -> list:
    with call(server, "POST", path, json=body, stream=True, headers=headers) as r:
        return list(events(r))


def get_as(server, headers: dict, conv_id: str) -> dict:
    return ok(call(server, "GET", f"/{conv_id}", headers=headers))


def test_search_finds_titles_and_messages_a_page_at_a_time(server):
    ids = [create(server, title=f"Zorblax notes {i}")["id"] for i in range(3)][::-1]  # most recent first
    talk = create(server, params={"max_tokens": 2})["id"]
    done(answer(server, f"/{talk}/messages", content="Tell me about the quokka and the Zorblax"))
    other = create(server, params={"max_tokens": 2})["id"]
    done(answer(server, f"/{other}/messages", content="Nothing to see"))

    found = ok(call(server, "GET", "/search", params={"q": "zorblax"}))
    assert found["object"] == "list" and [c["id"] for c in found["data"]] == [talk, *ids]
    assert not found["has_more"] and (found["first_id"], found["last_id"]) == (talk, ids[-1])
    user_message = get(server, talk)["messages"][0]
    match = found["data"][0]["matches"][-1]
    assert (match["message_id"], match["role"]) == (user_message["id"], "user")
    assert [match["snippet"][a:b] for a, b in match["highlights"]] == ["Zorblax"]
    title_match = found["data"][1]["matches"]
    assert title_match == [{"message_id": None, "role": None, "snippet": "Zorblax notes 2", "highlights": [[0, 7]]}]
    assert found["data"][1]["title"] == "Zorblax notes 2" and "messages" not in found["data"][1]
    # Paged as the list is; FTS5's syntax: phrases, prefixes, OR; every word must match.
    first = ok(call(server, "GET", "/search", params={"q": "zorblax", "limit": 2}))
    rest = ok(call(server, "GET", "/search", params={"q": "zorblax", "limit": 2, "after": first["last_id"]}))
    assert [c["id"] for c in first["data"] + rest["data"]] == [talk, *ids] and first["has_more"]
    assert not rest["has_more"]
    for q, expected in (('"the quokka"', [talk]), ("quok*", [talk]), ("quokka OR nothing", [other, talk]),
                        ("quokka nothing", []), ("notes NOT 2", ids[1:])):
        assert [c["id"] for c in ok(call(server, "GET", "/search", params={"q": q}))["data"]] == expected, q
    # A renamed conversation is found by its new title only; a deleted one is gone from the index.
    ok(call(server, "PATCH", f"/{ids[0]}", json={"title": "Renamed"}))
    assert [c["id"] for c in ok(call(server, "GET", "/search", params={"q": "zorblax"}))["data"]] == [talk, *ids[1:]]
    ok(call(server, "DELETE", f"/{talk}"))
    assert ok(call(server, "GET", "/search", params={"q": "quokka"}))["data"] == []
    # FTS5 syntax errors and bad values: 400s naming the parameter; the server keeps serving.
    for params, param in (({"q": "AND ("}, "q"), ({"q": '"unclosed'}, "q"), ({"q": "nope:word"}, "q"),
                          ({}, "q"), ({"q": ""}, "q"), ({"q": "x", "limit": 0}, "limit"),
                          ({"q": "x", "after": "conv_nope"}, "after")):
        assert_error(call(server, "GET", "/search", params=params), 400, param)
    assert ok(call(server, "GET", "/search", params={"q": '"C++"'}))["data"] == []  # quoted, it reads


def test_search_indexes_a_store_from_before_search(tmp_path):
    """A store written before the search index existed is indexed when opened."""
    from chatserve.server.store import SCHEMA, Store

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA)
        db.execute("INSERT INTO conversations (id, title, created, updated, params) VALUES "
                   "('conv_old', 'Old title', 1, 1, '{}')")
        db.execute("INSERT INTO messages (id, conversation_id, role, content, created, status) VALUES "
                   "('msg_old', 'conv_old', 'user', 'an ancient wombat', 1, 'complete')")
    db.close()
    store = Store(str(path))
    assert [c["id"] for c in store.conversations(query="wombat")] == ["conv_old"]
    assert [c["id"] for c in store.conversations(query="old")] == ["conv_old"]
    assert store.matches("conv_old", "wombat", 3) == [{"message_id": "msg_old", "role": "user",
                                                       "snippet": "an ancient wombat", "highlights": [[11, 17]]}]
    store.close()


def comparable(export: dict) -> dict:
    """An export without what an import makes anew: ids (as each message's place) and timestamps."""
    place = {m["id"]: i for i, m in enumerate(export["messages"])}
    return {**{k: v for k, v in export.items() if k not in ("updated", "created")},
            "current_message_id": place.get(export["current_message_id"]),
            "messages": [{**m, "id": place[m["id"]], "parent_id": place.get(m["parent_id"])}
                         for m in export["messages"]]}


def test_export_then_import_makes_the_same_tree(server):
    conv_id = create(server, title="Round trip", system_prompt="Be brief.", params={"max_tokens": 3,
                                                                                     "temperature": 0})["id"]
    a1 = done(answer(server, f"/{conv_id}/messages", content="one"))["message"]
    done(answer(server, f"/{conv_id}/messages", content="two"))
    done(answer(server, f"/{conv_id}/messages/{a1['id']}/regenerate"))
    done(answer(server, f"/{conv_id}/messages", content="other root", parent_id=None))
    ok(call(server, "POST", f"/{conv_id}/switch", json={"message_id": a1["id"]}))

    response = call(server, "GET", f"/{conv_id}/export")
    exported = ok(response)
    assert response.headers["content-disposition"] == 'attachment; filename="Round trip.json"'
    assert (exported["object"], exported["version"], exported["title"]) == ("conversation.export", 1, "Round trip")
    assert len(exported["messages"]) == 7 and exported["current_message_id"] != a1["id"]  # a1's newest leaf
    imported = ok(call(server, "POST", "/import", json=exported), 201)
    assert imported["id"] != conv_id and imported["title"] == "Round trip"
    assert [m["content"] for m in imported["messages"]] == [m["content"] for m in get(server, conv_id)["messages"]]
    again = ok(call(server, "GET", f"/{imported['id']}/export"))
    assert not {m["id"] for m in again["messages"]} & {m["id"] for m in exported["messages"]}
    assert comparable(again) == comparable(exported)
    # The imported conversation goes on like any other (its prompt rendered afresh).
    assert done(answer(server, f"/{imported['id']}/messages", content="more"))["message"]["status"] == "complete"

    # Markdown: the branch on show.
    response = call(server, "GET", f"/{conv_id}/export", params={"format": "markdown"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/markdown")
    branch = get(server, conv_id)["messages"]
    expected = "# Round trip\n\n## System\n\nBe brief.\n\n" + "".join(
        f"## {'You' if m['role'] == 'user' else 'Assistant'}\n\n{m['content']}\n\n" for m in branch)
    assert response.text == expected[:-1]  # one line break at the end

    # A tree that is not one: a 400 naming the field; nothing stored.
    before = len(server.app.state.store.conversations())
    msgs = exported["messages"]
    bad = [({**exported, "messages": [{**msgs[1], "parent_id": None}]}, "messages[0].role"),
           ({**exported, "messages": [msgs[0], {**msgs[1], "parent_id": "nope"}]}, "messages[1].parent_id"),
           ({**exported, "messages": [msgs[0], msgs[0]]}, "messages[1].id"),
           ({**exported, "messages": msgs[:1], "current_message_id": None}, "messages[0]"),
           ({**exported, "current_message_id": msgs[0]["id"]}, "current_message_id"),
           ({**exported, "messages": [msgs[0], {**msgs[1], "role": "user"}]}, "messages[1].role"),
           ({**exported, "version": 2}, "version"), ({**exported, "messages": [{"role": "user"}]}, "messages[0].id")]
    for body, param in bad:
        assert_error(call(server, "POST", "/import", json=body), 400, param)
    assert len(server.app.state.store.conversations()) == before
    empty = ok(call(server, "POST", "/import", json={"title": "Empty"}), 201)
    assert (empty["messages"], empty["current_message_id"], empty["title"]) == ([], None, "Empty")
    settled(server)


def test_sampling_tells_each_value_an_answer_gets_and_its_source(qwen2_dir):
    """Conversation params, else --override-generation-config, else the model's generation_config
    (the tiny model's: temperature 0.7, top_p 0.8, top_k 20), else the built-in default."""
    engine_config = tiny_engine_config(model=str(qwen2_dir), override_generation_config={"top_p": 0.5, "min_p": 0.05})
    with live_server(engine_config) as srv:
        fresh = ok(call(srv, "GET", "/sampling"))
        assert fresh["object"] == "conversation.sampling" and fresh["conversation_id"] is None
        assert fresh["context_length"] == srv.engine.max_model_len
        assert fresh["params"]["temperature"] == {"value": 0.7, "source": "model"}
        conv = create(srv, params={"temperature": 0.3, "stop": "END", "seed": 7})
        got = ok(call(srv, "GET", f"/{conv['id']}/sampling"))
        assert got["conversation_id"] == conv["id"]
        assert got["params"] == {
            "temperature": {"value": 0.3, "source": "conversation"}, "top_p": {"value": 0.5, "source": "server"},
            "max_tokens": {"value": None, "source": "default"}, "top_k": {"value": 20, "source": "model"},
            "min_p": {"value": 0.05, "source": "server"}, "repetition_penalty": {"value": 1.0, "source": "default"},
            "presence_penalty": {"value": 0.0, "source": "default"},
            "frequency_penalty": {"value": 0.0, "source": "default"}, "seed": {"value": 7, "source": "conversation"},
            "stop": {"value": ["END"], "source": "conversation"}}
        # They are what an answer is sampled with.
        used = answer_params(Params(), get(srv, conv["id"])["params"], srv.engine.generation_config)
        assert {name: getattr(used, name) for name in got["params"]} == {
            name: v["value"] for name, v in got["params"].items()}
        # Set in the conversation, any value is the conversation's; unset, it falls back again.
        ok(call(srv, "PATCH", f"/{conv['id']}", json={"params": {"top_k": 5, "temperature": None,
                                                                   "repetition_penalty": 1.1}}))
        got = ok(call(srv, "GET", f"/{conv['id']}/sampling"))["params"]
        assert got["top_k"] == {"value": 5, "source": "conversation"}
        assert got["temperature"] == {"value": 0.7, "source": "model"}
        assert got["repetition_penalty"] == {"value": 1.1, "source": "conversation"}
        assert_error(call(srv, "GET", "/conv_nope/sampling"), 404, "id")
        for params, param in (({"top_k": -2}, "params.top_k"), ({"min_p": 1.5}, "params.min_p"),
                              ({"stop": ["a"] * 5}, "params.stop"), ({"seed": 2**64}, "params.seed"),
                              ({"presence_penalty": 3}, "params.presence_penalty")):
            assert_error(call(srv, "PATCH", f"/{conv['id']}", json={"params": params}), 400, param)


# Like Qwen3's template: the answer after the last user message is rendered with an (empty)
# thinking block, every earlier answer without one.
THINKING_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last_user %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.parametrize("template", ["chatml", "thinking"])
def test_build_prompt_extends_ids_only_while_the_history_holds(template):
    tok = build_dummy_tokenizer()
    if template == "thinking":
        tok.chat_template = THINKING_TEMPLATE
    im_end = tok.convert_tokens_to_ids(IM_END)

    def full(messages):
        return tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)

    def render_here(messages):  # what the server's template workers do, in this process
        return render(chat_job(tok, messages))

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    ids1, key1 = build_prompt(render_here, tok, "m", chat, None)
    assert ids1 == full(chat)

    def turn2(content, output_ids, finish_reason, system="Be brief.", model="m"):
        messages = [{"role": "system", "content": system}, chat[1], {"role": "assistant", "content": content},
                    {"role": "user", "content": "More"}]
        previous = {"prompt_token_ids": ids1, "output_token_ids": output_ids, "prompt_key": key1,
                    "finish_reason": finish_reason}
        return build_prompt(render_here, tok, model, messages, previous)[0], full(messages)

    # Ids that tokenize the answer's text as a fresh render would give the same prompt either way,
    # whether the answer ended on the end-of-turn token or at max_tokens, or was empty.
    hi = tok.encode("Hi there", add_special_tokens=False)
    for content, output_ids, reason in (("Hi there", hi + [im_end], "stop"), ("Hi there", hi, "length"),
                                        ("", [im_end], "stop")):
        ids, rendered = turn2(content, output_ids, reason)
        assert ids == rendered
    # Generated ids that a fresh render would tokenize differently are kept as they are.
    odd = [tok.convert_tokens_to_ids("ew")] * 3
    ids, rendered = turn2("ewewew", odd, "length")
    assert ids[:len(ids1) + 3] == ids1 + odd and tok.decode(ids) == tok.decode(rendered)
    # A changed system prompt or model: rendered afresh.
    for kwargs in ({"system": "Be long."}, {"model": "other"}):
        ids, rendered = turn2("ewewew", odd, "length", **kwargs)
        assert ids == rendered


def test_reasoning_is_split_from_the_answer_and_the_raw_ids_kept():
    ans = Answer(None, None, "conv_x", "msg_x", None, ReasoningParser())
    outs = [RequestOutput("r", "<think>Let me", [1, 2]), RequestOutput("r", " see</thi", [3]),
            RequestOutput("r", "nk>\n\nHi", [4, 5]), RequestOutput("r", "!", [6], finished=True, finish_reason="stop")]
    deltas = [ans.feed(out) for out in outs]
    assert deltas[0] == {"type": "delta", "message_id": "msg_x", "reasoning_content": "Let me"}
    assert "".join(d.get("reasoning_content", "") for d in deltas if d) == "Let me see"
    assert "".join(d.get("content", "") for d in deltas if d) == "Hi!"
    assert ans.output_ids == [1, 2, 3, 4, 5, 6] and ans.finish_reason == "stop" and ans.status == "complete"


def test_a_reasoning_model_answer_is_stored_split_and_its_ids_extended(tmp_path):
    """End to end on a real (scripted) model that thinks first: every turn is
    <think>REASONING</think>ANSWER, stored split, streamed split, and turn 2 extends turn 1's ids."""
    model_dir, script = write_scripted_model(tmp_path / "model")
    with live_server(tiny_engine_config(model=str(model_dir))) as srv:
        conv_id = create(srv, params={"temperature": 0})["id"]
        turns = []
        for content in ("Hi there. How are you?", "And you?"):
            evts = answer(srv, f"/{conv_id}/messages", content=content, max_tokens=40)
            deltas = [e for e in evts[:-1] if e["type"] == "delta"]
            assert "".join(d.get("reasoning_content", "") for d in deltas) == REASONING
            assert "".join(d.get("content", "") for d in deltas) == ANSWER
            message = done(evts)["message"]
            assert (message["reasoning_content"], message["content"]) == (REASONING, ANSWER)
            assert message["finish_reason"] == "stop" and message["status"] == "complete"
            turns.append(message)
        prompt1, output1, _ = srv.app.state.store.token_ids(turns[0]["id"])
        prompt2, _, _ = srv.app.state.store.token_ids(turns[1]["id"])
        assert output1 == script[1:]  # the raw ids, think tags and end of turn included
        assert prompt2[:len(prompt1) + len(output1)] == prompt1 + output1
        assert turns[1]["stats"]["cached_tokens"] == len(prompt1) + len(output1) - 1
        # Continuing an answer that ended on its end-of-turn token goes on from before that token
        # (none inserted), in the answer's part (here: past the reasoning, so content).
        _, output2, _ = srv.app.state.store.token_ids(turns[1]["id"])
        evts = answer(srv, f"/{conv_id}/messages/{turns[1]['id']}/continue", max_tokens=40)
        again = done(evts)["message"]
        assert again["stats"]["prompt_tokens"] == len(prompt2) + len(output2) - 1
        # Its every token is computed already, but the last must be again for its logits: so
        # the partial last block is recomputed, the full ones come from the cache.
        assert again["stats"]["cached_tokens"] == (len(prompt2) + len(output2) - 2) // BS * BS
        assert all("reasoning_content" not in e for e in evts[1:-2])
        assert (again["reasoning_content"], again["finish_reason"]) == (REASONING, "stop")
        assert again["content"].startswith(ANSWER)
        stored = get(srv, conv_id)["messages"]
        assert [(m["role"], m["reasoning_content"]) for m in stored] == \
            [("user", None), ("assistant", REASONING), ("user", None), ("assistant", REASONING)]


# -- stopping -------------------------------------------------------------------------------------


def test_dropping_the_stream_keeps_the_partial_answer_stopped(server):
    settled(server)
    conv_id = create(server)["id"]
    with slow_engine(server), requests.Session() as session:
        r = session.post(f"{server.url}/v1/conversations/{conv_id}/messages", stream=True, timeout=WAIT_S,
                         json={"content": "Hello", "max_tokens": LONG, "temperature": 0})
        stream = events(r)
        assistant = [next(stream), next(stream)][1]["message"]
        seen = "".join(next(stream).get("content", "") for _ in range(3))
        assert assistant["id"] in server.engine.requests
        r.close()
        settled(server)  # the engine request aborted and its blocks freed
    message = get(server, conv_id)["messages"][-1]
    assert message["id"] == assistant["id"] and message["status"] == "stopped"
    assert message["finish_reason"] == "abort" and message["content"].startswith(seen) and seen
    assert 3 <= message["stats"]["completion_tokens"] < LONG
    # The conversation goes on from the partial answer.
    assert done(answer(server, f"/{conv_id}/messages", content="Go on", max_tokens=4))["message"]["status"] \
        == "complete"
    settled(server)


def test_stop_ends_the_answer_and_a_second_message_meanwhile_is_a_409(server):
    settled(server)
    conv_id = create(server)["id"]
    with slow_engine(server), requests.post(f"{server.url}/v1/conversations/{conv_id}/messages", stream=True,
                                            timeout=WAIT_S, json={"content": "Hi", "max_tokens": LONG}) as r:
        stream = events(r)
        user, assistant = next(stream)["message"], next(stream)["message"]
        first_delta = next(stream)
        busy = assert_error(call(server, "POST", f"/{conv_id}/messages", json={"content": "and?"}), 409, None,
                            "already generating")
        assert busy["code"] == "conversation_busy"
        assert_error(call(server, "POST", f"/{conv_id}/messages/{user['id']}/edit", json={"content": "x"}), 409)
        assert_error(call(server, "POST", f"/{conv_id}/messages/{assistant['id']}/regenerate"), 409)
        # Reading the conversation meanwhile shows the answer generating, its text saved as it grows.
        assert get(server, conv_id)["messages"][-1]["status"] == "generating"
        wait_until(lambda: get(server, conv_id)["messages"][-1]["content"], "the partial answer to be saved")

        stopped = ok(call(server, "POST", f"/{conv_id}/messages/{assistant['id']}/stop"))
        assert stopped["id"] == assistant["id"] and stopped["status"] == "stopped"
        assert stopped["finish_reason"] == "abort" and stopped["stats"]["completion_tokens"] < LONG
        rest = list(stream)
    final = done(rest)["message"]
    assert final["status"] == "stopped" and final["content"] == stopped["content"]
    assert final["content"] == "".join(e.get("content", "") for e in [first_delta, *rest[:-2]])
    assert ok(call(server, "POST", f"/{conv_id}/messages/{assistant['id']}/stop")) == final  # already stopped
    settled(server)
    assert done(answer(server, f"/{conv_id}/messages", content="ok", max_tokens=3))["message"]["status"] == "complete"


def test_deleting_a_conversation_stops_its_answer(server):
    settled(server)
    conv_id = create(server)["id"]
    with slow_engine(server), requests.post(f"{server.url}/v1/conversations/{conv_id}/messages", stream=True,
                                            timeout=WAIT_S, json={"content": "Hi", "max_tokens": LONG}) as r:
        stream = events(r)
        next(stream), next(stream), next(stream)
        ok(call(server, "DELETE", f"/{conv_id}"))
        assert list(stream)[-1] == "[DONE]"
    settled(server)
    assert_error(call(server, "GET", f"/{conv_id}"), 404, "id")


def test_an_engine_failure_mid_answer_is_an_error_event(server):
    settled(server)
    conv_id = create(server)["id"]
    step, steps = server.engine.step, []

    def failing_step():
        steps.append(1)
        if len(steps) == 4:
            raise RuntimeError("boom")
        return step()

    server.engine.step = failing_step
    try:
        evts = answer(server, f"/{conv_id}/messages", content="Hi", max_tokens=LONG)
    finally:
        del server.engine.step
    assert evts[-1] == "[DONE]" and evts[-2]["type"] == "error" and "done" not in [e["type"] for e in evts[:-1]]
    # The exception's text stays in the log, under the request id the message names.
    error = evts[-2]["error"]
    assert "boom" not in error["message"] and "request id" in error["message"] and error["type"] == "server_error"
    message = get(server, conv_id)["messages"][-1]
    assert message["status"] == "error" and message["finish_reason"] == "error"
    assert message["content"] == "".join(e.get("content", "") for e in evts[2:-2])
    settled(server)


def test_a_shutdown_ends_the_answer_with_a_stopped_done_event():
    with live_server() as srv:  # draining is for good: a server of its own
        conv_id = create(srv)["id"]
        with slow_engine(srv), requests.post(f"{srv.url}/v1/conversations/{conv_id}/messages", stream=True,
                                             timeout=WAIT_S, json={"content": "Hi", "max_tokens": LONG}) as r:
            stream = events(r)
            next(stream), next(stream), next(stream)
            # Only a new answer is refused while one streams (409); a PATCH goes through.
            assert ok(call(srv, "PATCH", f"/{conv_id}", json={"title": "Busy"}))["title"] == "Busy"
            app_module.drain(srv.app)  # what SIGTERM and Ctrl-C do
            final = done(list(stream))["message"]
        assert final["status"] == "stopped" and final["finish_reason"] == "abort"
        assert 0 < final["stats"]["completion_tokens"] < LONG
        assert get(srv, conv_id)["messages"][-1] == final
        busy = assert_error(call(srv, "POST", f"/{conv_id}/messages", json={"content": "x"}), 503)
        assert busy["code"] == "shutting_down"


# -- errors ---------------------------------------------------------------------------------------


def test_errors_use_the_openai_shape(server):
    conv_id = create(server)["id"]
    first = done(answer(server, f"/{conv_id}/messages", content="Hi", max_tokens=2))["message"]
    nope = "conv_nope"
    for method, path, body in (("GET", f"/{nope}", None), ("PATCH", f"/{nope}", {"title": "x"}),
                               ("POST", f"/{nope}/messages", {"content": "x"}),
                               ("POST", f"/{nope}/switch", {"message_id": first["id"]})):
        error = assert_error(call(server, method, path, json=body), 404, "id", nope)
        assert error["type"] == "not_found_error" and error["code"] == "conversation_not_found"
    for path, body in ((f"/{conv_id}/messages/msg_nope/edit", {"content": "x"}),
                       (f"/{conv_id}/messages/msg_nope/regenerate", {}), (f"/{conv_id}/messages/msg_nope/stop", None),
                       (f"/{conv_id}/switch", {"message_id": "msg_nope"})):
        assert assert_error(call(server, "POST", path, json=body), 404, "message_id")["code"] == "message_not_found"
    assert_error(call(server, "POST", f"/{conv_id}/messages", json={"content": "x", "parent_id": "msg_nope"}), 404,
                 "parent_id")
    assert_error(call(server, "POST", f"/{conv_id}/messages", json={"content": "x", "parent_id": first["parent_id"]}),
                 400, "parent_id", "user message")
    assert_error(call(server, "POST", f"/{conv_id}/messages/{first['parent_id']}/stop"), 400, "message_id")

    messages = f"/{conv_id}/messages"
    assert_error(call(server, "POST", messages, json={}), 400, "content", "required")
    assert_error(call(server, "POST", messages, json={"content": "x", "temperature": -1}), 400, "temperature")
    assert_error(call(server, "POST", messages, json={"content": "x", "max_tokens": 0}), 400, "max_tokens")
    assert_error(call(server, "POST", messages, json={"content": "x", "max_tokens": 100_000}), 400, "max_tokens",
                 "at most")
    assert_error(call(server, "POST", messages, json={"content": "hello " * 600}), 400, "content", "shorten it")
    assert_error(call(server, "POST", messages, data=b'{"content": ', headers={"content-type": "application/json"}),
                 400, None, "not valid JSON")
    assert_error(call(server, "POST", "", json={"params": {"top_p": 2}}), 400, "params.top_p")
    assert_error(call(server, "PATCH", f"/{conv_id}", json={"title": None}), 400, "title")
    assert_error(call(server, "PATCH", f"/{conv_id}", json={"title": ""}), 400, "title")
    assert_error(call(server, "POST", f"/{conv_id}/switch", json={}), 400, "message_id", "required")
    # None of them stored anything or left the conversation busy.
    assert [m["id"] for m in get(server, conv_id)["messages"]] == [first["parent_id"], first["id"]]
    settled(server)


def test_sizes_and_sampling_values_are_bounded(server):
    """A title, system prompt or message over its bound, or a sampling value out of range (JSON's
    Infinity included), is a 400 naming the field, and nothing is stored."""
    conv_id = create(server, title="t" * 256, system_prompt="s" * 32_768)["id"]
    before = get(server, conv_id)
    too_long = [("POST", "", {"title": "t" * 257}, "title"),
                ("POST", "", {"system_prompt": "s" * 32_769}, "system_prompt"),
                ("PATCH", f"/{conv_id}", {"title": "t" * 257}, "title"),
                ("PATCH", f"/{conv_id}", {"system_prompt": "s" * 32_769}, "system_prompt"),
                ("POST", f"/{conv_id}/messages", {"content": "c" * 131_073}, "content")]
    for method, path, body, param in too_long:
        assert_error(call(server, method, path, json=body), 400, param, "at most")
    out_of_range = [("POST", "", {"params": {"temperature": float("inf")}}, "params.temperature", "finite"),
                    ("PATCH", f"/{conv_id}", {"params": {"temperature": float("nan")}}, "params.temperature", "finite"),
                    ("PATCH", f"/{conv_id}", {"params": {"temperature": 2.5}}, "params.temperature", "2"),
                    ("PATCH", f"/{conv_id}", {"params": {"top_p": 1e308}}, "params.top_p", "1"),
                    ("POST", f"/{conv_id}/messages", {"content": "x", "temperature": float("inf")}, "temperature",
                     "finite")]
    for method, path, body, param, word in out_of_range:  # json.dumps writes Infinity and NaN as JavaScript does
        assert_error(call(server, method, path, data=json.dumps(body), headers={"content-type": "application/json"}),
                     400, param, word)
    assert get(server, conv_id) == before
    assert ok(call(server, "PATCH", f"/{conv_id}", json={"params": {"temperature": 2}}))["params"]["temperature"] == 2


def test_the_list_is_paged():
    with live_server(server_config=ServerConfig(db_path=":memory:")) as srv:
        ids = [create(srv, title=f"c{i}")["id"] for i in range(5)][::-1]  # most recent first
        first = ok(call(srv, "GET", "", params={"limit": 2}))
        assert [c["id"] for c in first["data"]] == ids[:2]
        assert (first["object"], first["first_id"], first["last_id"], first["has_more"]) == \
            ("list", ids[0], ids[1], True)
        second = ok(call(srv, "GET", "", params={"limit": 2, "after": first["last_id"]}))
        assert [c["id"] for c in second["data"]] == ids[2:4] and second["has_more"]
        # A conversation updated meanwhile moves to the top; the cursor stays where it was.
        ok(call(srv, "PATCH", f"/{ids[4]}", json={"title": "renamed"}))
        rest = ok(call(srv, "GET", "", params={"limit": 2, "after": second["last_id"]}))
        assert (rest["data"], rest["first_id"], rest["last_id"], rest["has_more"]) == ([], None, None, False)
        everything = ok(call(srv, "GET", ""))  # the default page holds 50
        assert [c["id"] for c in everything["data"]] == [ids[4], *ids[:4]] and not everything["has_more"]
        for params, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"after": "conv_nope"}, "after")):
            assert_error(call(srv, "GET", "", params=params), 400, param)
        assert ok(call(srv, "GET", "", params={"limit": 100}))["data"] == everything["data"]


def test_a_bad_request_between_good_ones(server):
    conv_id = create(server)["id"]
    path = f"/{conv_id}/messages"
    assert done(answer(server, path, content="one", max_tokens=3))["message"]["status"] == "complete"
    assert_error(call(server, "POST", path, json={"content": "two", "max_tokens": 100_000}), 400, "max_tokens")
    assert done(answer(server, path, content="three", max_tokens=3))["message"]["status"] == "complete"
    assert [m["content"] for m in get(server, conv_id)["messages"][::2]] == ["one", "three"]
    settled(server)


def test_the_api_key_guards_the_routes_and_openapi_documents_them():
    client = TestClient(create_app(EngineConfig(), ServerConfig(api_key="secret", db_path=":memory:")))
    assert_error(client.get("/v1/conversations"), 401, None, "API key")
    assert_error(client.post("/v1/conversations", json={}), 401, None, "API key")
    spec = client.get("/openapi.json").json()
    assert {"/v1/conversations", "/v1/conversations/{conv_id}", "/v1/conversations/{conv_id}/messages",
            "/v1/conversations/{conv_id}/messages/{message_id}/edit",
            "/v1/conversations/{conv_id}/messages/{message_id}/regenerate",
            "/v1/conversations/{conv_id}/messages/{message_id}/stop",
            "/v1/conversations/{conv_id}/switch"} <= set(spec["paths"])
    assert {"PostMessage", "EditMessage", "CreateConversation", "UpdateConversation", "Switch"} <= set(
        spec["components"]["schemas"])


# What a success returns, per JSON route.
JSON_ROUTES = {("/v1/conversations", "post"): ("201", "ConversationWithMessages"),
               ("/v1/conversations", "get"): ("200", "ConversationList"),
               ("/v1/conversations/{conv_id}", "get"): ("200", "ConversationWithMessages"),
               ("/v1/conversations/{conv_id}", "patch"): ("200", "ConversationWithMessages"),
               ("/v1/conversations/{conv_id}", "delete"): ("200", "DeletedConversation"),
               ("/v1/conversations/{conv_id}/messages/{message_id}/stop", "post"): ("200", "Message"),
               ("/v1/conversations/{conv_id}/switch", "post"): ("200", "ConversationWithMessages"),
               ("/v1/conversations/search", "get"): ("200", "SearchList"),
               ("/v1/conversations/sampling", "get"): ("200", "EffectiveSampling"),
               ("/v1/conversations/{conv_id}/sampling", "get"): ("200", "EffectiveSampling"),
               ("/v1/conversations/import", "post"): ("201", "ConversationWithMessages"),
               ("/v1/conversations/{conv_id}/messages/{message_id}", "delete"): ("200", "DeletedMessages")}
ANSWERING_ROUTES = ("/v1/conversations/{conv_id}/messages", "/v1/conversations/{conv_id}/messages/{message_id}/edit",
                    "/v1/conversations/{conv_id}/messages/{message_id}/regenerate",
                    "/v1/conversations/{conv_id}/messages/{message_id}/continue")


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def test_openapi_declares_the_responses_and_the_error_shape(server):
    spec = ok(requests.get(f"{server.url}/openapi.json", timeout=WAIT_S))
    schemas = spec["components"]["schemas"]
    for (path, method), (status, model) in JSON_ROUTES.items():
        content = spec["paths"][path][method]["responses"][status]["content"]
        assert content == {"application/json": {"schema": ref(model)}}, (path, method)
    for path in ANSWERING_ROUTES:
        responses = spec["paths"][path]["post"]["responses"]
        assert list(responses["200"]["content"]) == ["text/event-stream"]
        assert '"type": "done"' in responses["200"]["description"]
        data = responses["200"]["content"]["text/event-stream"]["itemSchema"]["properties"]["data"]
        assert [e["title"] for e in data["anyOf"][0]["contentSchema"]["oneOf"]] == [
            "MessageEvent", "DeltaEvent", "DoneEvent", "ErrorEvent"]
        assert responses["409"]["content"]["application/json"]["schema"] == ref("ErrorResponse")
        assert "conversation_busy" in responses["409"]["description"]
    # Every route's errors have the OpenAI shape; none lists a 422 (validation errors are 400s here).
    for path, ops in spec["paths"].items():
        for method, op in ops.items() if path.startswith("/v1/conversations") else ():
            assert "422" not in op["responses"], (path, method)
            for status in ("401", "default", *(["404"] if "{conv_id}" in path else [])):
                assert op["responses"][status]["content"]["application/json"]["schema"] == ref("ErrorResponse")
    not_found = spec["paths"]["/v1/conversations/{conv_id}"]["get"]["responses"]["404"]
    assert "conversation_not_found" in not_found["description"]
    assert schemas["ErrorResponse"]["properties"] == {"error": ref("ErrorDetail")}
    assert set(schemas["ErrorDetail"]["properties"]) == set(schemas["ErrorDetail"]["required"]) == {
        "message", "type", "param", "code"}
    assert set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(spec))) <= set(schemas)  # none dangles
    props = {name: schemas[name]["properties"] for name in schemas}
    assert props["ConversationWithMessages"]["messages"]["items"] == ref("Message")
    assert props["Conversation"]["cache"] == ref("Cache") and "messages" not in props["Conversation"]
    assert {"siblings", "sibling_index", "stats"} <= set(props["Message"])

    # The schemas name exactly the keys the routes send, every one always there.
    conv_id = create(server)["id"]
    done(answer(server, f"/{conv_id}/messages", content="Hi", max_tokens=3))
    got, listed = get(server, conv_id), ok(call(server, "GET", ""))
    deleted = ok(call(server, "DELETE", f"/{create(server)['id']}"))
    reply = got["messages"][1]
    for name, obj in (("ConversationWithMessages", got), ("ConversationList", listed),
                      ("Conversation", listed["data"][0]), ("Message", reply), ("Stats", reply["stats"]),
                      ("Cache", got["cache"]), ("DeletedConversation", deleted)):
        assert set(props[name]) == set(schemas[name]["required"]) == set(obj), name
    assert set(props["Params"]) == set(got["params"])
    settled(server)


def test_the_response_models_keep_the_json_as_built(server):
    """The routes return conversation_json() and Tree.json() through their response models: the
    same keys, in the same order, with the same values and types; the events are the documented ones."""
    app, store = server.app, server.app.state.store

    def same(response: requests.Response, expected: dict) -> None:
        assert response.status_code in (200, 201), response.text
        assert json.dumps(response.json()) == json.dumps(expected)

    created = call(server, "POST", "", json={"params": {"temperature": 0.5, "max_tokens": 3}})
    conv_id = created.json()["id"]
    same(created, {**conversation_json(app, store, store.conversation(conv_id)), "messages": []})
    evts = answer(server, f"/{conv_id}/messages", content="Hi")
    kinds = {"message": MessageEvent, "delta": DeltaEvent, "done": DoneEvent}
    for event in evts[:-1]:
        assert kinds[event["type"]].model_validate(event).model_dump(exclude_unset=True) == event
    settled(server)
    with_messages = conversation_json(app, store, store.conversation(conv_id), with_messages=True)
    same(call(server, "GET", f"/{conv_id}"), with_messages)
    listed = [conversation_json(app, store, c) for c in store.conversations(limit=50)]
    same(call(server, "GET", ""), {"object": "list", "data": listed, "first_id": listed[0]["id"],
                                   "last_id": listed[-1]["id"], "has_more": len(store.conversations()) > 50})
    answer_id = with_messages["current_message_id"]
    same(call(server, "POST", f"/{conv_id}/messages/{answer_id}/stop"),
         Tree(store.messages(conv_id)).json(store.message(conv_id, answer_id)))
    same(call(server, "POST", f"/{conv_id}/switch", json={"message_id": answer_id}), with_messages)
    patched = call(server, "PATCH", f"/{conv_id}", json={"system_prompt": "Be brief."})
    same(patched, conversation_json(app, store, store.conversation(conv_id), with_messages=True))
    same(call(server, "DELETE", f"/{conv_id}"), {"id": conv_id, "object": "conversation.deleted", "deleted": True})


# -- persistence ----------------------------------------------------------------------------------


def test_conversations_survive_a_restart(tmp_path):
    db = tmp_path / "data" / "conversations.sqlite3"  # its directory is created
    config = ServerConfig(db_path=str(db))
    with live_server(tiny_engine_config(), config) as srv:
        conv_id = create(srv, title="Kept", system_prompt="Be brief.")["id"]
        evts = answer(srv, f"/{conv_id}/messages", content="Remember me", max_tokens=5, temperature=0)
        before = get(srv, conv_id)
    # A crash mid-answer leaves it "generating": the next start marks it stopped.
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE messages SET status = 'generating', finish_reason = NULL WHERE id = ?",
                     (done(evts)["message"]["id"],))
    conn.close()
    with live_server(tiny_engine_config(), config) as srv:
        after = get(srv, conv_id)
        assert [c["id"] for c in ok(call(srv, "GET", ""))["data"]] == [conv_id]
        assert after["title"] == "Kept" and after["system_prompt"] == "Be brief."
        assert after["messages"][0] == before["messages"][0]
        assert after["messages"][1] == {**before["messages"][1], "status": "stopped", "finish_reason": "abort"}
        # The conversation goes on, extending the stored ids in the new process.
        turn2 = done(answer(srv, f"/{conv_id}/messages", content="Again", max_tokens=3))["message"]
        prompt1, output1, _ = srv.app.state.store.token_ids(before["messages"][1]["id"])
        assert srv.app.state.store.token_ids(turn2["id"])[0][:len(prompt1) + 5] == prompt1 + output1
