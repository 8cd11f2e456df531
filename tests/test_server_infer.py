"""POST /infer and GET /health against a real uvicorn server on a free port, with dummy_model."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from live_server import WAIT_S, healthy, idle, live_server, tiny_engine_config, wait_until
from scripted_model import write_scripted_model
from starlette.testclient import TestClient

from chatserve.config import EngineConfig, ServerConfig
from chatserve.server.app import configs_from_env, create_app

REPO = Path(__file__).resolve().parents[1]
# Long enough to fill a KV block (so the prefix cache can serve it); greedy dummy_model answers it
# with 450+ tokens, no stop token.
HELLO = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
         {"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server():
    with live_server() as srv:
        yield srv


def post(server, timeout: float = WAIT_S, **body) -> requests.Response:
    body = {"model": "dummy_model", "messages": HELLO, **body}
    # json.dumps, not json=: it writes Infinity and NaN as JavaScript does, which requests refuses to.
    return requests.post(f"{server.url}/infer", data=json.dumps(body), headers={"content-type": "application/json"},
                         timeout=timeout)


def assert_error(response: requests.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert all(w in error["message"] for w in words), error["message"]
    return error


def test_health(server):
    r = requests.get(f"{server.url}/health", timeout=WAIT_S)
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": "dummy_model"}


def test_stream_arrives_line_by_line(server):
    body = {"model": "dummy_model", "messages": HELLO, "stream": True, "max_tokens": 200, "temperature": 0}
    with requests.post(f"{server.url}/infer", json=body, stream=True, timeout=WAIT_S) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        lines = r.iter_lines()
        first = json.loads(next(lines))
        # The first line is here while the request is still generating: it was flushed, not buffered.
        assert first["id"] in server.engine.requests
        chunks = [first] + [json.loads(line) for line in lines if line]
    assert len(chunks) > 10 and {c["id"] for c in chunks} == {first["id"]}
    for c in chunks:
        assert set(c) >= {"id", "created", "model", "choices"} and c["model"] == "dummy_model"
        (choice,) = c["choices"]
        assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str)
    assert all(c["choices"][0]["finish_reason"] is None and "usage" not in c for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    usage = last["usage"]
    assert usage["completion_tokens"] == 200 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 200
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 0

    # The same request unstreamed gives the same text, and its prompt now comes from the prefix cache.
    r = post(server, max_tokens=200, temperature=0)
    assert r.status_code == 200, r.text
    whole = r.json()
    assert whole["choices"][0]["message"]["content"] == "".join(c["choices"][0]["message"]["content"]
                                                              for c in chunks)
    assert whole["choices"][0]["finish_reason"] == "length" and whole["usage"]["completion_tokens"] == 200
    assert whole["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    wait_until(lambda: idle(server.engine), "the blocks to be free")


def test_max_tokens_is_respected(server):
    r = post(server, max_tokens=3, seed=1)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3
    assert body["model"] == "dummy_model" and body["choices"][0]["message"]["role"] == "assistant"


def test_a_bad_request_between_good_ones(server):
    assert post(server, max_tokens=2).status_code == 200
    error = assert_error(post(server, max_tokens=0), 400, "max_tokens", "greater than 0")
    assert error["type"] == "invalid_request_error" and error["param"] == "max_tokens"
    assert post(server, max_tokens=2).status_code == 200


def test_concurrent_requests_are_served_together(server):
    results = [None] * 4

    def ask(i: int) -> None:
        results[i] = post(server, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=20 + i,
                          temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert all(r is not None and r.status_code == 200 for r in results)
    assert len({r.json()["id"] for r in results}) == 4
    assert all(r.json()["usage"]["completion_tokens"] <= 20 + i for i, r in enumerate(results))
    wait_until(lambda: idle(server.engine), "every block to be free")


@pytest.mark.parametrize("body, param, words", [
    ({"messages": []}, "messages", ["at least one message"]),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", ["'user'", "robot"]),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", ["string"]),
    ({"model": None}, "model", ["string"]),
    ({"temperature": "hot"}, "temperature", ["number"]),
    ({"max_tokens": 100_000}, "max_tokens", ["at most"]),
    ({"messages": [{"role": "user", "content": "hello " * 600}]}, "messages", ["shorten it"]),
    ({"temperature": 1e308}, "temperature", ["less than or equal to 2"]),
    ({"temperature": float("inf")}, "temperature", ["finite number"]),
    ({"top_p": float("nan")}, "top_p", ["finite number"]),
    ({"seed": 10**30}, "seed", ["64 bits"]),
], ids=["empty", "role", "content", "model", "temperature", "max_tokens_over_context", "prompt_too_long",
        "temperature_huge", "temperature_infinity", "top_p_nan", "seed_huge"])
def test_bad_input_is_a_400_that_says_what_to_fix(server, body, param, words):
    assert assert_error(post(server, **body), 400, *words)["param"] == param


def test_malformed_json_and_unknown_model(server):
    r = requests.post(f"{server.url}/infer", data=b'{"model": "dummy_model", "messages": [',
                      headers={"content-type": "application/json"}, timeout=WAIT_S)
    assert_error(r, 400, "not valid JSON")
    error = assert_error(post(server, model="gpt-4"), 404, "gpt-4", "dummy_model")
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert healthy(server.url)


def test_dropping_a_stream_aborts_it_and_frees_its_blocks(server, caplog):
    caplog.set_level(logging.INFO, logger="chatserve.server")
    wait_until(lambda: idle(server.engine), "an idle engine")
    free_at_start = server.engine.block_manager.num_free_blocks
    body = {"model": "dummy_model", "messages": HELLO, "stream": True, "max_tokens": 450, "temperature": 0}
    with requests.Session() as session:
        r = session.post(f"{server.url}/infer", json=body, stream=True, timeout=WAIT_S)
        lines = r.iter_lines()
        request_id = json.loads(next(lines))["id"]
        next(lines)
        assert request_id in server.engine.requests
        r.close()
    wait_until(lambda: request_id not in server.engine.requests, "the abort")
    wait_until(lambda: server.engine.block_manager.num_free_blocks == free_at_start, "the blocks to be free")
    wait_until(lambda: f"request {request_id}" in caplog.text, "the request's log line")
    line = next(rec.getMessage() for rec in caplog.records if request_id in rec.getMessage())
    assert "abort" in line and "450 output tokens" not in line


def test_dropping_an_unstreamed_request_aborts_it(server, caplog):
    caplog.set_level(logging.INFO, logger="chatserve.server")
    wait_until(lambda: idle(server.engine), "an idle engine")
    body = json.dumps({"model": "dummy_model", "messages": HELLO, "max_tokens": 450, "temperature": 0}).encode()
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as conn:
        conn.sendall(b"POST /infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: server.engine.requests, "the request to start")
        (request_id,) = server.engine.requests
    wait_until(lambda: idle(server.engine), "every block to be free")
    wait_until(lambda: f"request {request_id}" in caplog.text, "the request's log line")
    assert "abort" in caplog.text and "450 output tokens" not in caplog.text


def test_demo_client_prints_the_demo_lines(server):
    out = subprocess.run([sys.executable, "-m", "chatserve.cli", "client", "--url", server.url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert_demo_output(out.stdout)
    out = subprocess.run([sys.executable, "-m", "chatserve.cli", "client", "--url", server.url, "--text",
                          "--max-tokens", "5"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.endswith("\n") and "Raw line" not in out.stdout, out.stderr


def test_stream_test_script_prints_the_demo_lines(server):
    out = subprocess.run([sys.executable, str(REPO / "stream_test.py"), server.url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert_demo_output(out.stdout)


def test_demo_clients_ask_for_the_served_model_and_send_the_api_key(tmp_path):
    """Against a server of another model, with --api-key: `chatserve client` (--api-key or
    $CHATSERVE_API_KEY) and stream_test.py ($CHATSERVE_API_KEY) find the model's name in /v1/models."""
    model_dir, _ = write_scripted_model(tmp_path)
    with live_server(tiny_engine_config(model=str(model_dir)), ServerConfig(api_key="sesame")) as srv:
        name = srv.app.state.model_name
        assert name != "dummy_model"
        keyless = {k: v for k, v in os.environ.items() if k != "CHATSERVE_API_KEY"}
        client = [sys.executable, "-m", "chatserve.cli", "client", "--url", srv.url]
        for command, env in ((client, {**keyless, "CHATSERVE_API_KEY": "sesame"}),
                             (client + ["--api-key", "sesame"], keyless),
                             ([sys.executable, str(REPO / "stream_test.py"), srv.url],
                              {**keyless, "CHATSERVE_API_KEY": "sesame"})):
            out = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
            assert out.returncode == 0, (command, out.stdout, out.stderr)
            assert_demo_output(out.stdout)
            assert f"'model': '{name}'" in out.stdout
        out = subprocess.run(client, capture_output=True, text=True, timeout=60, env=keyless)
        assert out.returncode == 1 and "401" in out.stderr and "API key" in out.stderr, out.stderr


def assert_demo_output(stdout: str) -> None:
    lines = stdout.splitlines()
    assert lines[0] == "Response received successfully"
    raw, received = lines[1::2], lines[2::2]
    assert raw and len(raw) == len(received)
    assert all(r.startswith("Raw line: b'{\"id\": ") for r in raw)
    assert all(r.startswith("Received: {'id': ") for r in received)
    assert "'finish_reason': 'stop'" in received[-1] or "'finish_reason': 'length'" in received[-1]
    assert "'usage': {'prompt_tokens': " in received[-1]


# -- without a running server ---------------------------------------------------------------------


def test_health_is_503_until_the_model_is_loaded():
    app = create_app(EngineConfig(), ServerConfig(api_key="secret"))
    client = TestClient(app)  # outside `with`: the lifespan never runs, so nothing loads
    r = client.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "loading", "model": "dummy_model"}
    body = {"model": "dummy_model", "messages": HELLO}
    assert_error(client.post("/infer", json=body), 401, "API key")
    r = client.post("/infer", json=body, headers={"Authorization": "Bearer secret"})
    assert_error(r, 503, "loading")


def test_configs_from_env():
    engine, srv = configs_from_env({"CHATSERVE_MODEL": "/models/x", "CHATSERVE_NUM_KV_BLOCKS": "64",
                                    "CHATSERVE_KV_CACHE_MEMORY_GIB": "0.5", "CHATSERVE_ENABLE_PREFIX_CACHING": "0",
                                    "CHATSERVE_MAX_MODEL_LEN": "", "CHATSERVE_CORS_ORIGINS": "http://a, http://b",
                                    "CHATSERVE_API_KEY": "k"})
    assert (engine.model, engine.num_kv_blocks, engine.kv_cache_memory_gib) == ("/models/x", 64, 0.5)
    assert engine.enable_prefix_caching is False and engine.max_model_len is None
    assert srv.cors_origins == ["http://a", "http://b"] and srv.api_key == "k"
    assert configs_from_env({})[0] == EngineConfig()
    with pytest.raises(ValueError, match="CHATSERVE_NUM_KV_BLOCKS"):
        configs_from_env({"CHATSERVE_NUM_KV_BLOCKS": "many"})
    engine, _ = configs_from_env({"CHATSERVE_OVERRIDE_GENERATION_CONFIG": '{"temperature": 0.7, "top_p": 0.8}'})
    assert engine.override_generation_config == {"temperature": 0.7, "top_p": 0.8}
    with pytest.raises(ValueError, match="CHATSERVE_OVERRIDE_GENERATION_CONFIG.*JSON object"):
        configs_from_env({"CHATSERVE_OVERRIDE_GENERATION_CONFIG": "temperature=0.7"})
    bad, _ = configs_from_env({"CHATSERVE_OVERRIDE_GENERATION_CONFIG": '{"temperature": -1}'})
    with pytest.raises(ValueError, match=r"override_generation_config: temperature must be in \[0, 2\]"):
        create_app(bad)  # checked at start, before the model loads


def test_main_module_builds_the_app_from_env(monkeypatch):
    monkeypatch.setenv("CHATSERVE_MODEL", "dummy_model")
    monkeypatch.syspath_prepend(str(REPO))
    sys.modules.pop("main", None)
    import main

    assert main.app.state.model_name == "dummy_model"
    sys.modules.pop("main", None)


def test_cors_is_off_unless_an_origin_is_given():
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    closed = TestClient(create_app(EngineConfig(), ServerConfig(db_path=":memory:")))
    r = closed.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in closed.get("/health", headers={"Origin": "http://evil.example"}).headers
    opened = TestClient(create_app(EngineConfig(), ServerConfig(db_path=":memory:",
                                                                cors_origins=["http://localhost:3000"])))
    r = opened.options("/v1/chat/completions", headers={**preflight, "Origin": "http://localhost:3000"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = opened.options("/v1/chat/completions", headers=preflight)
    assert r.headers.get("access-control-allow-origin") != "http://evil.example"
