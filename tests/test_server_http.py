"""HTTP hardening against a real uvicorn server: streamed lines that line readers keep whole,
internal errors that tell the client an id and the log the rest, Host headers checked against
DNS rebinding, slow clients timed out while their request is read."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import requests
from live_server import WAIT_S, healthy, live_server, tiny_engine_config, wait_until
from scripted_model import HI, REASONING, write_scripted_model

from chatserve.cli import build_parser
from chatserve.config import ServerConfig
from chatserve.server.app import configs_from_env, create_app

@pytest.fixture(scope="module")
def server():
    with live_server() as srv:
        yield srv


# Characters str.splitlines ends a line at, which JSON may carry raw inside a string.
LINE_BREAKING_ANSWER = "Paris\u2028Rome\u0085Oslo"


@pytest.fixture(scope="module")
def line_break_server(tmp_path_factory):
    """The scripted model, whose greedy answer holds U+2028 and U+0085."""
    model_dir, _ = write_scripted_model(tmp_path_factory.mktemp("scripted"), answer=LINE_BREAKING_ANSWER)
    with live_server(tiny_engine_config(model=str(model_dir))) as srv:
        yield srv


def _data(lines) -> list:
    """The JSON of each `data:` line (SSE) or each line (NDJSON), [DONE] left out."""
    out = []
    for line in lines:
        line = line.decode() if isinstance(line, bytes) else line
        if not line or line == "data: [DONE]":
            continue
        out.append(json.loads(line.removeprefix("data: ")))
    return out


def _streams(srv):
    """(path, body, text of one parsed line) for every streaming route."""
    model = srv.app.state.model_name
    chat = {"model": model, "messages": HI, "max_tokens": 40, "temperature": 0, "stream": True}
    yield "/v1/chat/completions", chat, lambda d: "".join(c["delta"].get("content") or "" for c in d["choices"])
    yield "/infer", chat, lambda d: d["choices"][0]["message"]["content"]


@pytest.mark.parametrize("reader", ["requests", "httpx"])
def test_line_separators_in_an_answer_keep_every_streamed_line_whole(line_break_server, reader):
    srv = line_break_server
    for path, body, text in _streams(srv):
        if reader == "requests":
            with requests.post(srv.url + path, json=body, stream=True, timeout=WAIT_S) as r:
                assert r.status_code == 200
                chunks = _data(r.iter_lines())
        else:
            with httpx.stream("POST", srv.url + path, json=body, timeout=WAIT_S) as r:
                assert r.status_code == 200
                chunks = _data(r.iter_lines())
        streamed = "".join(text(d) for d in chunks)
        assert LINE_BREAKING_ANSWER in streamed, (path, streamed)


def test_line_separators_in_the_conversation_stream(line_break_server):
    srv = line_break_server
    conv = requests.post(f"{srv.url}/v1/conversations", json={"params": {"temperature": 0}}, timeout=WAIT_S).json()
    with httpx.stream("POST", f"{srv.url}/v1/conversations/{conv['id']}/messages", timeout=WAIT_S,
                      json={"content": HI[0]["content"], "max_tokens": 40}) as r:
        assert r.status_code == 200
        events = _data(r.iter_lines())
    deltas = [e for e in events if e["type"] == "delta"]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == REASONING
    assert "".join(d.get("content", "") for d in deltas) == LINE_BREAKING_ANSWER
    assert events[-1]["type"] == "done" and events[-1]["message"]["content"] == LINE_BREAKING_ANSWER


def test_an_internal_error_tells_the_client_an_id_and_the_log_the_detail(server, caplog):
    caplog.set_level(logging.ERROR, logger="chatserve.server")
    db = server.app.state.store.db
    db.execute("ALTER TABLE conversations RENAME TO elsewhere")  # a real fault: SQLite raises
    try:
        r = requests.get(f"{server.url}/v1/conversations", timeout=WAIT_S)
    finally:
        db.execute("ALTER TABLE elsewhere RENAME TO conversations")
    assert r.status_code == 500
    error = r.json()["error"]
    request_id = r.headers["X-Request-ID"]
    assert request_id.startswith("req_") and request_id in error["message"]
    assert (error["type"], error["code"], error["param"]) == ("server_error", "internal_error", None)
    assert "conversations" not in error["message"] and "table" not in error["message"]
    logged = [rec for rec in caplog.records if request_id in rec.getMessage()]
    assert logged and "no such table: conversations" in logged[0].getMessage() and logged[0].exc_info
    # The server goes on serving.
    assert requests.get(f"{server.url}/v1/conversations", timeout=WAIT_S).status_code == 200


# -- the Host header (DNS rebinding) ---------------------------------------------------------------

def get_as(srv, host: str, path: str = "/v1/conversations", **kwargs) -> requests.Response:
    return requests.get(srv.url + path, headers={"Host": host}, timeout=WAIT_S, **kwargs)


def test_a_foreign_host_header_is_a_400_and_loopback_names_are_served(server):
    port = server.port
    for host in (f"attacker.example:{port}", "attacker.example", f"localhost.attacker.example:{port}",
                 f"127.0.0.1.nip.io:{port}"):
        r = get_as(server, host)
        assert r.status_code == 400, host
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_host")
        assert "--allowed-host" in error["message"] and "data" not in r.json()
    assert get_as(server, f"attacker.example:{port}", "/health").status_code == 400
    for host in (f"localhost:{port}", f"LocalHost.:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost",
                 f"127.0.0.2:{port}"):
        assert get_as(server, host).status_code == 200, host


def test_allowed_hosts_add_names_and_a_star_allows_any():
    with live_server(server_config=ServerConfig(host="chat.lan", allowed_hosts=["Chat.Example", "other.example:9"]),
                     wait_for_model=False) as srv:
        for host in ("chat.lan", f"chat.lan:{srv.port}", "chat.example:443", "other.example"):
            assert get_as(srv, host, "/v1/models").status_code == 200, host
        assert get_as(srv, "attacker.example", "/v1/models").status_code == 400
    # The wildcard address a server listens on is no name to reach it by (the "0.0.0.0 day").
    with live_server(server_config=ServerConfig(host="0.0.0.0", allowed_hosts=["[::]"]), wait_for_model=False) as srv:
        assert get_as(srv, f"0.0.0.0:{srv.port}", "/v1/models").status_code == 400
        assert get_as(srv, f"[::]:{srv.port}", "/v1/models").status_code == 400
        assert get_as(srv, f"127.0.0.1:{srv.port}", "/v1/models").status_code == 200
    with live_server(server_config=ServerConfig(allowed_hosts=["*"]), wait_for_model=False) as srv:
        assert get_as(srv, "attacker.example", "/v1/models").status_code == 200


def test_redirects_are_relative_whatever_the_host(server):
    r = get_as(server, f"localhost:{server.port}", "/static", allow_redirects=False)
    assert r.is_redirect and r.headers["location"] == "/static/"
    r = requests.get(server.url + "/health/?x=1", allow_redirects=False, timeout=WAIT_S)
    assert r.is_redirect and r.headers["location"] == "/health?x=1"


def test_a_non_loopback_address_without_an_api_key_is_warned_about(caplog):
    caplog.set_level(logging.WARNING, logger="chatserve.server")
    create_app(tiny_engine_config(), ServerConfig(host="0.0.0.0"))
    (warning,) = [rec for rec in caplog.records if "without an API key" in rec.getMessage()]
    assert warning.levelname == "WARNING" and "0.0.0.0" in warning.getMessage()
    caplog.clear()
    create_app(tiny_engine_config(), ServerConfig(host="0.0.0.0", api_key="sesame"))
    create_app(tiny_engine_config(), ServerConfig(host="::1"))
    create_app(tiny_engine_config(), ServerConfig(host="localhost"))
    assert not [rec for rec in caplog.records if "without an API key" in rec.getMessage()]


def test_allowed_hosts_from_the_command_line_and_the_environment():
    args = build_parser().parse_args(["serve", "--allowed-host", "chat.example", "--allowed-host", "*"])
    assert args.allowed_host == ["chat.example", "*"]
    _, server_config = configs_from_env({"CHATSERVE_ALLOWED_HOSTS": "chat.example, other.example"})
    assert server_config.allowed_hosts == ["chat.example", "other.example"]
    assert ServerConfig().allowed_hosts == [] and ServerConfig().host == "127.0.0.1"


@pytest.mark.parametrize("flag", ["--header-timeout", "--body-timeout"])
def test_a_timeout_that_is_not_positive_is_refused_at_start(flag):
    out = subprocess.run([sys.executable, "-m", "chatserve.cli", "serve", flag, "0", "--db", ":memory:"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "timeouts must be > 0" in out.stderr, out.stderr


# -- slow clients: bounds on reading a request ------------------------------------------------------

HEADER_TIMEOUT, BODY_TIMEOUT = 1.0, 1.5


@pytest.fixture(scope="module")
def strict_server():
    with live_server(server_config=ServerConfig(header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT)) as srv:
        yield srv


def trickle(srv, pieces, interval: float) -> tuple[bytes, float]:
    """Send pieces one by one, `interval` seconds apart, over a raw socket, until the server
    closes the connection; returns (all it sent back, seconds until it closed)."""
    start = time.monotonic()
    reply = b""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT_S) as sock:
        sock.settimeout(interval)
        for piece in pieces:
            try:
                sock.sendall(piece)
            except OSError:  # closed by the server
                break
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            reply += data
            if not data:
                return reply, time.monotonic() - start
        sock.settimeout(WAIT_S)
        while data := sock.recv(65536):
            reply += data
    return reply, time.monotonic() - start


def test_a_slow_header_sender_is_disconnected(strict_server):
    srv = strict_server
    # One header line every 0.2 s: 100 of them would take 20 s.
    head = [b"GET /health HTTP/1.1\r\nHost: localhost\r\n"] + [b"X-Slow: %d\r\n" % i for i in range(100)]
    reply, elapsed = trickle(srv, head, 0.2)
    assert reply == b"" and HEADER_TIMEOUT * 0.9 <= elapsed < HEADER_TIMEOUT + 5, elapsed
    # A connection that sends nothing at all is closed too.
    reply, elapsed = trickle(srv, [b""], 0.2)
    assert reply == b"" and elapsed < HEADER_TIMEOUT + 5
    assert requests.get(f"{srv.url}/health", timeout=WAIT_S).status_code == 200


def test_a_slow_body_gets_408_and_the_connection_closes(strict_server):
    srv = strict_server
    body = json.dumps({"model": "dummy_model", "messages": HI, "max_tokens": 2}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    # The body, 4 bytes every 0.2 s: all of it would take several seconds.
    reply, elapsed = trickle(srv, [head] + [body[i:i + 4] for i in range(0, len(body), 4)], 0.2)
    assert elapsed < BODY_TIMEOUT + 5, elapsed
    status, _, rest = reply.partition(b"\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout", reply
    headers, _, payload = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in headers.lower()
    error = json.loads(payload)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_timeout")
    assert srv.engine.requests == {}
    metrics = requests.get(f"{srv.url}/metrics", timeout=WAIT_S).text
    assert 'chatserve_requests_rejected_total{code="request_timeout"} 1.0' in metrics


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response with a Content-Length, however the bytes arrive."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b""
    head, _, payload = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(payload) < length:
        payload += sock.recv(65536)
    return head + b"\r\n\r\n" + payload


def test_requests_in_time_and_long_streams_are_not_cut(strict_server):
    srv = strict_server
    # Headers and body in pieces, each well within its bound, on one kept-alive connection.
    body = json.dumps({"model": "dummy_model", "messages": HI, "max_tokens": 2}).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT_S) as sock:
        for _ in range(2):
            sock.sendall(b"POST /infer HTTP/1.1\r\nHost: localhost\r\n")
            time.sleep(HEADER_TIMEOUT / 3)
            sock.sendall(f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            time.sleep(BODY_TIMEOUT / 3)
            sock.sendall(body)
            reply = read_response(sock)
            assert reply.startswith(b"HTTP/1.1 200 OK"), reply
            time.sleep(HEADER_TIMEOUT / 3)  # then the next request on the same connection
    # A stream that lasts longer than both bounds together runs to its end.
    step = srv.engine.step

    def slow_step():
        time.sleep(0.05)
        return step()

    srv.engine.step = slow_step
    try:
        start = time.monotonic()
        with requests.post(f"{srv.url}/v1/chat/completions", stream=True, timeout=WAIT_S,
                           json={"model": "dummy_model", "messages": HI, "max_tokens": 80, "stream": True,
                                 "ignore_eos": True}) as r:
            chunks = _data(r.iter_lines())
        elapsed = time.monotonic() - start
    finally:
        del srv.engine.step
    assert elapsed > HEADER_TIMEOUT + BODY_TIMEOUT
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "chatserve.cli", "serve", "--port", "PORT", "--header-timeout", "1", "--num-kv-blocks",
     "32", "--num-threads", "1", "--device", "cpu", "--db", ":memory:"],
    [sys.executable, "-m", "uvicorn", "main:app", "--port", "PORT", "--http",
     "chatserve.server.connection:HeaderTimeoutProtocol"],
], ids=["chatserve_serve", "uvicorn_main_app"])
def test_both_entry_points_bound_the_headers_and_check_the_host(command):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "CHATSERVE_HEADER_TIMEOUT": "1", "CHATSERVE_NUM_KV_BLOCKS": "32",
           "CHATSERVE_NUM_THREADS": "1", "CHATSERVE_DEVICE": "cpu", "CHATSERVE_DB": ":memory:"}
    srv = SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port)
    proc = subprocess.Popen([arg.replace("PORT", str(port)) for arg in command], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: healthy(srv.url) or proc.poll() is not None, "the server to load", timeout=60)
        assert proc.poll() is None
        head = [b"GET /health HTTP/1.1\r\nHost: localhost\r\n"] + [b"X-Slow: %d\r\n" % i for i in range(100)]
        reply, elapsed = trickle(srv, head, 0.2)
        assert reply == b"" and elapsed < 6, elapsed
        assert get_as(srv, f"attacker.example:{port}", "/v1/models").status_code == 400
        assert get_as(srv, f"localhost:{port}", "/v1/models").status_code == 200
    finally:
        proc.terminate()
        proc.wait(WAIT_S)
