"""Operating the server: /metrics, the bounded queue (429), the body limit (413), draining on
SIGTERM / Ctrl-C, the start-up log and `serve --help`; against real uvicorn servers on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests
from live_server import WAIT_S, healthy, idle, live_server, tiny_engine_config, wait_until
from prometheus_client.parser import text_string_to_metric_families

from chatserve.cli import build_parser
from chatserve.config import ServerConfig
from chatserve.engine.engine import AsyncEngine, Engine
from chatserve.engine.sampling import SamplingParams
from chatserve.server import app as app_module

REPO = Path(__file__).resolve().parents[1]
HELLO = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
         {"role": "user", "content": "Hello"}]
MAX_BODY = 16_000
NO_STORE = {"db_path": ":memory:"}  # keep no conversations on disk


@pytest.fixture(scope="module")
def server():
    with live_server(tiny_engine_config(num_kv_blocks=128),
                     ServerConfig(max_queue=2, max_body_bytes=MAX_BODY, api_key="secret", **NO_STORE)) as srv:
        yield srv


AUTH = {"Authorization": "Bearer secret"}


def post(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/infer", json={"model": "dummy_model", "messages": HELLO, **body}, headers=AUTH,
                         timeout=WAIT_S)


def open_stream(url: str, session: requests.Session, max_tokens: int = 900):
    """A streamed /infer that goes on for a while; returns (response, line iterator, request id)."""
    body = {"model": "dummy_model", "messages": HELLO, "stream": True, "max_tokens": max_tokens, "temperature": 0}
    r = session.post(f"{url}/infer", json=body, headers=AUTH, stream=True, timeout=WAIT_S)
    assert r.status_code == 200, r.text
    lines = (line for line in r.iter_lines() if line)
    return r, lines, json.loads(next(lines))["id"]


def scrape(url: str) -> dict[str, float]:
    """Every sample of /metrics, keyed like `name` or `name{label="value"}`."""
    r = requests.get(f"{url}/metrics", timeout=WAIT_S)  # no API key: open to scrapers
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if "le" not in s.labels:  # histogram buckets are not needed here
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def assert_error(r: requests.Response, status: int, type_: str, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (type_, code), error
    return error


# -- /metrics -------------------------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_latencies(server):
    wait_until(lambda: idle(server.engine), "an idle engine")
    before = scrape(server.url)
    with requests.Session() as session:
        r, lines, _ = open_stream(server.url, session, max_tokens=20)
        chunks = [json.loads(line) for line in lines]
        r.close()
    prompt_tokens = chunks[-1]["usage"]["prompt_tokens"]
    whole = post(server.url, max_tokens=20, temperature=0)  # the same prompt: from the prefix cache now
    assert whole.status_code == 200, whole.text
    cached = whole.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0
    wait_until(lambda: scrape(server.url)['chatserve_requests_finished_total{finish_reason="length"}']
               == before['chatserve_requests_finished_total{finish_reason="length"}'] + 2, "both requests to count")
    after = scrape(server.url)

    def grew(name: str) -> float:
        return after[name] - before[name]

    assert grew("chatserve_output_tokens_total") == 40
    assert grew("chatserve_prompt_tokens_total") == 2 * prompt_tokens
    assert grew("chatserve_cached_prompt_tokens_total") == cached
    assert grew("chatserve_time_to_first_token_seconds_count") == 2
    assert grew("chatserve_inter_token_latency_seconds_count") == 38
    assert grew("chatserve_inter_token_latency_seconds_sum") > 0
    assert after["chatserve_kv_cache_blocks_total"] == 128
    assert after["chatserve_kv_cache_blocks_used"] == 0
    assert 0 < after["chatserve_prefix_cache_hit_rate"] <= 1
    for idle_gauge in ("chatserve_requests_running", "chatserve_requests_waiting", "chatserve_requests_in_flight"):
        assert after[idle_gauge] == 0
    assert after["chatserve_preemptions_total"] == 0
    assert after["chatserve_tokens_generated_after_disconnect_total"] == 0


def test_metrics_answer_while_the_model_loads(monkeypatch):
    """A real server whose model load is held: /metrics is 200 with zeros, without the API key."""
    release = threading.Event()

    def held_engine(config):
        release.wait(WAIT_S)
        raise RuntimeError("no model in this test")

    monkeypatch.setattr(app_module, "Engine", held_engine)
    try:
        with live_server(server_config=ServerConfig(api_key="secret", **NO_STORE), wait_for_model=False) as srv:
            assert requests.get(f"{srv.url}/health", timeout=WAIT_S).json()["status"] == "loading"
            metrics = scrape(srv.url)
            assert metrics["chatserve_requests_running"] == 0 and metrics["chatserve_kv_cache_blocks_total"] == 0
            assert metrics["chatserve_output_tokens_total"] == 0
            assert metrics["chatserve_tokens_generated_after_disconnect_total"] == 0
            r = requests.post(f"{srv.url}/infer", json={"model": "dummy_model", "messages": HELLO}, timeout=WAIT_S)
            assert r.status_code == 401  # the API key still guards generation
    finally:
        release.set()


def test_tokens_after_disconnect_counts_only_real_waste(monkeypatch):
    """The counter is honest: 0 when aborts work, and it counts the tokens of an abort that fails."""
    engine = AsyncEngine(Engine(tiny_engine_config()))
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def leave_after(n: int, request_id: str) -> None:
        outputs = engine.generate("Hello there", params, request_id)
        for _ in range(n):
            await asyncio.wait_for(outputs.__anext__(), WAIT_S)
        await outputs.aclose()  # the client goes away: this aborts the request

    try:
        asyncio.run(leave_after(3, "fine"))
        wait_until(lambda: idle(engine.engine), "the abort")
        assert engine.num_tokens_after_abort == 0
        monkeypatch.setattr(engine.engine, "abort_request", lambda request_id: None)  # a broken abort
        asyncio.run(leave_after(3, "broken"))
        wait_until(lambda: idle(engine.engine), "the request to run to max_tokens")
        # All but the tokens made before the abort was queued (the engine may run a little ahead).
        assert 50 < engine.num_tokens_after_abort <= 200 - 3
    finally:
        engine.shutdown()


# -- the bounded queue ----------------------------------------------------------------------------


def test_a_full_queue_answers_429_with_retry_after(server):
    wait_until(lambda: idle(server.engine), "an idle engine")
    before = scrape(server.url)
    with requests.Session() as s1, requests.Session() as s2:
        streams = [open_stream(server.url, s) for s in (s1, s2)]
        metrics = scrape(server.url)
        assert metrics["chatserve_requests_in_flight"] == 2
        assert metrics["chatserve_requests_running"] + metrics["chatserve_requests_waiting"] == 2
        assert metrics["chatserve_kv_cache_blocks_used"] > 0
        r = post(server.url, max_tokens=2)
        error = assert_error(r, 429, "rate_limit_exceeded", "server_busy")
        assert r.headers["Retry-After"] == "1" and "busy" in error["message"] and error["param"] is None
        for r, _, _ in streams:
            r.close()  # both clients go away: their requests are aborted
    wait_until(lambda: server.app.state.in_flight == 0 and idle(server.engine), "the aborts")
    assert post(server.url, max_tokens=2).status_code == 200
    after = scrape(server.url)
    assert after['chatserve_requests_rejected_total{code="server_busy"}'] == \
        before['chatserve_requests_rejected_total{code="server_busy"}'] + 1
    assert after['chatserve_requests_finished_total{finish_reason="abort"}'] == \
        before['chatserve_requests_finished_total{finish_reason="abort"}'] + 2
    assert after["chatserve_tokens_generated_after_disconnect_total"] == 0


def completions(url: str, prompt, **body) -> requests.Response:
    return requests.post(f"{url}/v1/completions", json={"model": "dummy_model", "prompt": prompt, "max_tokens": 2,
                                                         **body}, headers=AUTH, timeout=WAIT_S)


def test_the_queue_counts_generations_not_http_requests(server):
    """--max-queue 2: one request of prompts x n takes that many places, in every route."""
    wait_until(lambda: idle(server.engine), "an idle engine")
    before = scrape(server.url)
    assert completions(server.url, ["a", "b"]).status_code == 200  # 2 fit an empty queue
    with requests.Session() as s1:
        # Seconds of work (ignore_eos: it cannot end early), held while the others are tried.
        stream = s1.post(f"{server.url}/v1/completions", json={"model": "dummy_model", "prompt": "a", "stream": True,
                         "max_tokens": 2000, "ignore_eos": True}, headers=AUTH, stream=True, timeout=WAIT_S)
        lines = stream.iter_lines()  # kept: dropping the iterator would close the connection
        assert stream.status_code == 200 and next(lines)
        assert server.app.state.in_flight == 1
        # One place is left: two prompts, or n=2, do not fit now (429, retry later)...
        for r in (completions(server.url, ["a", "b"]), completions(server.url, "a", n=2),
                  requests.post(f"{server.url}/v1/chat/completions", json={"model": "dummy_model", "messages": HELLO,
                                "n": 2, "max_tokens": 2}, headers=AUTH, timeout=WAIT_S)):
            error = assert_error(r, 429, "rate_limit_exceeded", "server_busy")
            assert "needs 2 more" in error["message"] and r.headers["Retry-After"] == "1"
        assert server.app.state.in_flight == 1 and len(server.engine.requests) == 1  # none of them started
        assert completions(server.url, "a").status_code == 200  # ...one does
        stream.close()
    wait_until(lambda: server.app.state.in_flight == 0 and idle(server.engine), "the abort")
    # More than the queue holds in one request can never be served: 400, not 429, even when idle.
    for r, param in ((completions(server.url, ["a", "b", "c"]), "prompt"), (completions(server.url, "a", n=3), "n"),
                     (completions(server.url, [[1, 2]] * 64, n=16), "n"),
                     (requests.post(f"{server.url}/v1/chat/completions", json={"model": "dummy_model",
                      "messages": HELLO, "n": 3}, headers=AUTH, timeout=WAIT_S), "n")):
        error = assert_error(r, 400, "invalid_request_error", "too_many_generations")
        assert error["param"] == param and "at most 2" in error["message"], error
    assert server.engine.requests == {} and server.app.state.in_flight == 0
    after = scrape(server.url)
    assert after['chatserve_requests_rejected_total{code="server_busy"}'] == \
        before['chatserve_requests_rejected_total{code="server_busy"}'] + 3


# -- the body limit -------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_by_content_length(server):
    big = json.dumps({"model": "dummy_model", "messages": [{"role": "user", "content": "x" * MAX_BODY}]})
    r = requests.post(f"{server.url}/infer", data=big, headers={**AUTH, "Content-Type": "application/json"},
                      timeout=WAIT_S)
    error = assert_error(r, 413, "invalid_request_error", "request_too_large")
    assert str(MAX_BODY) in error["message"]
    assert server.engine.requests == {}
    assert post(server.url, max_tokens=2).status_code == 200  # still serving


def test_a_chunked_body_over_the_limit_is_413_while_it_is_read(server):
    def chunks(total: int):
        body = json.dumps({"model": "dummy_model", "messages": HELLO, "max_tokens": 2,
                           "stop": ["y" * (total - 200)]}).encode()
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    def send(total: int) -> requests.Response:
        # A generator body goes out chunked, with no Content-Length to check up front.
        return requests.post(f"{server.url}/infer", data=chunks(total),
                             headers={**AUTH, "Content-Type": "application/json"}, timeout=WAIT_S)

    assert send(MAX_BODY // 2).status_code == 200  # a chunked body under the limit is fine
    assert_error(send(2 * MAX_BODY), 413, "invalid_request_error", "request_too_large")
    assert post(server.url, max_tokens=2).status_code == 200
    assert scrape(server.url)['chatserve_requests_rejected_total{code="request_too_large"}'] >= 1


# -- draining for shutdown ------------------------------------------------------------------------


def test_draining_ends_streams_and_refuses_new_requests():
    with live_server(server_config=ServerConfig(**NO_STORE)) as srv:
        with requests.Session() as session:
            r, lines, _ = open_stream(srv.url, session, max_tokens=400)
            app_module.drain(srv.app)  # what SIGTERM and Ctrl-C do
            last = json.loads(list(lines)[-1])
            r.close()
        assert last["choices"][0]["finish_reason"] == "abort" and "shutting down" in last["error"]["message"]
        assert last["usage"]["completion_tokens"] < 400
        r = post(srv.url, max_tokens=2)
        assert_error(r, 503, "service_unavailable_error", "shutting_down")
        assert r.headers["Retry-After"] == "1"
        health = requests.get(f"{srv.url}/health", timeout=WAIT_S)
        assert health.status_code == 503 and health.json()["status"] == "shutting down"
        assert scrape(srv.url)['chatserve_requests_rejected_total{code="shutting_down"}'] == 1
        wait_until(lambda: idle(srv.engine), "every block to be free")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def refused(url: str) -> bool:
    try:
        r = requests.get(f"{url}/health", timeout=1)
    except requests.ConnectionError:
        return True
    assert r.status_code == 503, r.text  # answered in the moment before the listener closed
    return False


def stream_then_signal(command: list[str], sig: int, env: dict) -> tuple[int, float, dict, str]:
    """Start a server, open a long stream, send `sig` after a few lines. Returns the exit code,
    the seconds from the signal to the exit, the stream's last line, and the server's log."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # A file, not a pipe: nobody reads a pipe while the server runs, and a full one would block it.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([arg.replace("PORT", str(port)) for arg in command], cwd=REPO, env=env,
                                stderr=log, stdout=subprocess.DEVNULL, text=True)
        try:
            wait_until(lambda: healthy(url) or proc.poll() is not None, "the server to load", timeout=60)
            assert proc.poll() is None, "the server exited early"
            with requests.Session() as session:
                body = {"model": "dummy_model", "messages": HELLO, "stream": True, "max_tokens": 900,
                        "temperature": 0}
                r = session.post(f"{url}/infer", json=body, stream=True, timeout=WAIT_S)
                lines = (line for line in r.iter_lines() if line)
                for _ in range(3):
                    next(lines)
                proc.send_signal(sig)
                signalled = time.monotonic()
                last = json.loads(list(lines)[-1])
            wait_until(lambda: refused(url), "new connections to be refused", timeout=5)
            code = proc.wait(timeout=10)
            elapsed = time.monotonic() - signalled
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.seek(0)
            output = log.read()
            print(output)  # pytest shows it when the test fails
    return code, elapsed, last, output


def assert_stream_ended_by_shutdown(last: dict) -> None:
    assert last["choices"][0]["finish_reason"] == "abort", last
    assert "shutting down" in last["error"]["message"] and last["usage"]["completion_tokens"] < 900


SERVE = [sys.executable, "-m", "chatserve.cli", "serve", "--port", "PORT", "--num-kv-blocks", "64",
         "--num-threads", "1", "--device", "cpu", "--dtype", "float32"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_drains_and_exits_on_a_signal(sig):
    code, elapsed, last, log = stream_then_signal(SERVE, sig, {**os.environ, "CHATSERVE_DB": ":memory:"})
    assert_stream_ended_by_shutdown(last)
    assert code == 0 and elapsed < 5, (code, elapsed, log)
    assert "Traceback" not in log, log
    # The start-up log says what is served, on what, and where.
    assert "model dummy_model ready" in log and "device cpu, dtype float32, KV cache 64 blocks" in log
    assert "Uvicorn running on http://127.0.0.1:" in log
    port = re.search(r"Uvicorn running on http://127.0.0.1:(\d+)", log).group(1)
    url = f"http://127.0.0.1:{port}"
    assert f"chatserve ready: {url} (web chat), OpenAI API at {url}/v1" in log
    assert "default sampling (for requests that leave it unset): temperature 1.0, top_p 1.0" in log


def test_uvicorn_main_app_drains_on_sigterm():
    env = {**os.environ, "CHATSERVE_NUM_KV_BLOCKS": "64", "CHATSERVE_NUM_THREADS": "1", "CHATSERVE_DEVICE": "cpu",
           "CHATSERVE_DB": ":memory:"}
    command = [sys.executable, "-m", "uvicorn", "main:app", "--port", "PORT"]
    code, elapsed, last, log = stream_then_signal(command, signal.SIGTERM, env)
    assert_stream_ended_by_shutdown(last)
    # uvicorn's own CLI re-raises SIGTERM once it has shut down gracefully, so it dies by the signal.
    assert code in (0, -signal.SIGTERM) and elapsed < 5, (code, elapsed, log)
    assert "Application shutdown complete" in log


# -- the command line -----------------------------------------------------------------------------


def test_serve_help_explains_every_flag():
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    for action in serve._actions:
        assert action.help and action.help.strip(), f"{action.option_strings} has no help"
    text = serve.format_help()
    for flag in ("--max-queue", "--max-body-bytes", "--shutdown-timeout", "/metrics", "429", "413"):
        assert flag in text, flag


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "CHATSERVE_DB": ":memory:"})


def test_serve_exits_when_its_model_cannot_load_with_the_message_generate_gives():
    missing = "/no/such/model-dir"
    generate = cli("generate", "--model", missing)
    assert generate.returncode == 2
    message = generate.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: could not load model {missing}: ") and "config.json" in message, message
    start = time.monotonic()
    serve = cli("serve", "--model", missing, "--port", str(free_port()))
    assert serve.returncode == 2 and time.monotonic() - start < 60, serve.stderr
    assert serve.stderr.strip().splitlines()[-1] == message, serve.stderr
    assert "Traceback" not in serve.stderr


@pytest.mark.parametrize("args, words", [
    (["generate", "--temperature", "-1"], ["argument --temperature", "temperature must be in [0, 2]"]),
    (["generate", "--top-p", "2"], ["argument --top-p", "top_p must be in (0, 1]"]),
    (["generate", "--top-k", "x"], ["argument --top-k", "'x' is not an integer"]),
    (["generate", "--min-p", "nan"], ["argument --min-p", "finite"]),
    (["generate", "--repetition-penalty", "0"], ["argument --repetition-penalty", "must be in (0, 2]"]),
    (["generate", "--max-tokens", "0"], ["argument --max-tokens", "at least 1"]),
    (["serve", "--override-generation-config", "{temperature: 0.7}"], ["not valid JSON"]),
    (["serve", "--override-generation-config", '["temperature"]'], ["must be a JSON object"]),
    (["serve", "--override-generation-config", '{"temprature": 0.7}'], ["'temprature' is not a sampling default",
                                                                        "temperature, top_p"]),
    (["serve", "--override-generation-config", '{"top_p": 1.5}'], ["top_p must be in (0, 1]"]),
    (["serve", "--override-generation-config", '{"temperature": "0.7"}'], ["temperature must be a number"]),
    (["chat", "--model", "dummy_model", "--override-generation-config", '{"top_k": true}'],
     ["top_k must be an integer"]),
], ids=["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "override_json",
        "override_not_object", "override_key", "override_range", "override_type", "chat_override_type"])
def test_bad_sampling_flags_are_refused_before_the_model_loads(args, words):
    """A model path that does not exist comes first: had it been loaded, that would be the error."""
    out = cli(*args, "--model", "/no/such/model-dir", timeout=60)
    assert out.returncode == 2, out.stderr
    assert f"usage: chatserve {args[0]}" in out.stderr and "could not load" not in out.stderr, out.stderr
    assert all(w in out.stderr for w in words), out.stderr


def test_an_unknown_flag_shows_the_commands_usage():
    out = cli("serve", "--prot", timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("usage: chatserve serve ") and "--port PORT" in out.stderr, out.stderr
    assert "chatserve serve: error: unrecognized arguments: --prot" in out.stderr


def test_help_says_what_is_served_where_and_explains_every_flag():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("generate", "serve", "client"):
        for action in commands[name]._actions:
            assert action.help and action.help.strip(), f"{name} {action.option_strings} has no help"
    for text in (parser.format_help(), commands["serve"].format_help()):
        flat = " ".join(text.split())
        for words in ("web chat at /", "OpenAI API at /v1", "/infer", "/v1/conversations"):
            assert words in flat, (words, flat)
    assert "--override-generation-config" in commands["serve"].format_help()
