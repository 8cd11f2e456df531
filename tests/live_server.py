"""A real uvicorn server on a free loopback port, in a thread, for tests that speak HTTP to it."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Iterator, Optional

import requests
import torch
import uvicorn

from chatserve.config import EngineConfig, ServerConfig
from chatserve.server.app import create_app
from chatserve.server.connection import http_protocol

WAIT_S = 30.0  # generous bound for a loaded 2-core machine


def wait_until(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def idle(engine) -> bool:
    return not engine.requests and engine.block_manager.num_free_blocks == engine.num_blocks


def tiny_engine_config(**overrides) -> EngineConfig:
    values = dict(model="dummy_model", device="cpu", dtype="float32", num_kv_blocks=32, block_size=16, num_threads=1)
    return EngineConfig(**{**values, **overrides})


@contextmanager
def live_server(engine_config: Optional[EngineConfig] = None, server_config: Optional[ServerConfig] = None,
                wait_for_model: bool = True) -> Iterator[SimpleNamespace]:
    """Yields (url, app, engine, port) once /health is 200 (or, without wait_for_model, once the
    server listens, engine None); stops the server and checks it ended.
    Conversations live in memory unless server_config names a db_path: tests never touch the
    user's own store."""
    threads = torch.get_num_threads()
    server_config = server_config or ServerConfig()
    if server_config.db_path is None:
        server_config = dataclasses.replace(server_config, db_path=":memory:")
    app = create_app(engine_config or tiny_engine_config(), server_config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # The protocol `chatserve serve` runs: its header timeout included.
    srv = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning",
                                        http=http_protocol(server_config.header_timeout)))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        if wait_for_model:
            wait_until(lambda: healthy(url), "the server to load the model", timeout=60)
        else:
            wait_until(lambda: srv.started, "the server to start")
        engine = app.state.engine.engine if wait_for_model else None
        yield SimpleNamespace(url=url, app=app, engine=engine, port=sock.getsockname()[1])
    finally:
        srv.should_exit = True
        thread.join(WAIT_S)
        sock.close()
        torch.set_num_threads(threads)
    assert not thread.is_alive(), "the server did not stop"
