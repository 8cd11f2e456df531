"""create_app(): the FastAPI app. Its lifespan loads the model in the background and shuts the
engine down at exit; /health says whether the model is ready, /metrics how it is doing. On SIGTERM
or Ctrl-C the server drains: new requests get 503, every stream ends at once with its final chunk.
/health and /metrics stay open without the API key: they are for probes and scrapers."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import fields
from pathlib import Path
from typing import Callable, Mapping, Optional

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import EngineConfig, ServerConfig
from ..engine.engine import AsyncEngine, Engine
from . import conversations, infer, metrics, openai
from .protocol import error_response, install_error_handlers
from .store import Store
from .streaming import Users

log = logging.getLogger("chatserve.server")
WEB_DIR = Path(__file__).parent / "web"


def create_app(engine_config: EngineConfig, server_config: Optional[ServerConfig] = None) -> FastAPI:
    server_config = server_config or ServerConfig()
    engine_config.validate()  # a bad setting fails here, not in the background loader

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.store = Store.open(server_config.db_path)  # a bad --db path fails the start, loudly
        # Load in the background: the server answers at once (/health 503 until ready) and
        # the event loop stays free to log while a large model loads.
        loader = asyncio.create_task(_load(app, engine_config))
        restore_signals = _drain_on_signals(app, asyncio.get_running_loop())
        try:
            yield
        finally:
            restore_signals()
            loader.cancel()
            engine: Optional[AsyncEngine] = app.state.engine
            app.state.engine = None
            if engine is not None:
                engine.shutdown()
                log.info("engine stopped")
            app.state.store.close()

    app = FastAPI(title="chatserve", lifespan=lifespan)
    app.state.engine = None
    app.state.model_name = engine_config.model
    app.state.started = int(time.time())
    app.state.load_error = None
    app.state.server_config = server_config
    app.state.users = Users.from_config(server_config)  # a bad key file fails here, at start
    app.state.in_flight = 0
    app.state.store = None  # the conversation store, opened by the lifespan
    app.state.answers = {}  # conversation id -> its answer being generated (conversations.py)
    app.state.draining = False
    app.state.metrics = metrics.Metrics(app.state)
    install_error_handlers(app)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return exc.response()

    app.add_middleware(BodyLimit, max_bytes=server_config.max_body_bytes,
                       rejected=app.state.metrics.rejected.labels("request_too_large"))
    if server_config.cors_origins:  # added last, so outermost: error responses get CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=server_config.cors_origins,
                           allow_methods=["*"], allow_headers=["*"])

    @app.get("/health")
    async def health(request: Request):
        state = request.app.state
        if state.draining:  # a load balancer should send requests elsewhere
            return JSONResponse({"status": "shutting down", "model": state.model_name}, status_code=503)
        if state.engine is not None:
            return {"status": "ok", "model": state.model_name}
        body = {"status": "error", "error": state.load_error} if state.load_error else {"status": "loading"}
        return JSONResponse({**body, "model": state.model_name}, status_code=503)

    app.include_router(infer.router)
    app.include_router(metrics.router)
    app.include_router(openai.router)
    app.include_router(conversations.router)
    # The chat page: static files, open without the API key (the page asks for it in its settings).
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    return app


def drain(app: FastAPI) -> None:
    """Refuse new requests (503) and end every request in flight with its final chunk (finish
    reason "abort", "the engine is shutting down"), so the server can exit at once."""
    state = app.state
    if not state.draining:
        state.draining = True
        log.info("shutting down: ending %d requests in flight", state.in_flight)
    if state.engine is not None:
        state.engine.begin_shutdown()


def _drain_on_signals(app: FastAPI, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """On SIGTERM or Ctrl-C uvicorn stops accepting connections, then waits for the open ones to
    end before the lifespan's shutdown runs, and a stream may not end for minutes. So put a handler
    in front of the server's own that drains first. Returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals reach only the main thread, e.g. not a server run in a test's thread
    # Only a server's Python handler is chained; without one the signal keeps its default effect.
    previous = {sig: handler for sig in (signal.SIGINT, signal.SIGTERM)
                if callable(handler := signal.getsignal(sig))}

    def on_signal(signum, frame) -> None:
        # The handler may interrupt the event loop anywhere: let the loop do the draining.
        loop.call_soon_threadsafe(drain, app)
        previous[signum](signum, frame)

    for sig in previous:
        signal.signal(sig, on_signal)

    def restore() -> None:
        for sig, handler in previous.items():
            if signal.getsignal(sig) is on_signal:
                signal.signal(sig, handler)

    return restore


class BodyTooLarge(StarletteHTTPException):
    """Raised while the body is read: FastAPI passes an HTTPException from its body reading on."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"the request body is larger than this server accepts ({max_bytes} bytes)")

    def response(self) -> JSONResponse:
        return error_response(413, self.detail, code="request_too_large")


class BodyLimit:
    """413 for a request body over max_bytes: at once from Content-Length, else (a chunked body) as
    soon as the bytes read pass the limit. It counts the body as the app reads it, buffering none."""

    def __init__(self, app: ASGIApp, max_bytes: int, rejected) -> None:
        self.app, self.max_bytes, self.rejected = app, max_bytes, rejected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            self.rejected.inc()
            return await BodyTooLarge(self.max_bytes).response()(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    self.rejected.inc()
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)


async def _load(app: FastAPI, config: EngineConfig) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def work() -> None:
        try:
            outcome = (Engine(config), None)
        except Exception as exc:
            outcome = (None, exc)
        with suppress(RuntimeError):  # the loop is closed: the server stopped while loading
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(outcome))

    log.info("loading model %s ...", config.model)
    start = time.monotonic()
    # A daemon thread rather than the default executor, so stopping mid-load never waits for it.
    threading.Thread(target=work, name="chatserve-load", daemon=True).start()
    engine, error = await done
    if error is not None:
        app.state.load_error = f"could not load model {config.model}: {error}"
        log.error("%s", app.state.load_error)
        return
    async_engine = AsyncEngine(engine)
    async_engine.start()
    app.state.engine = async_engine
    app.state.model_name = engine.loaded.name
    kv = engine.runner.kv_cache.data
    log.info("model %s ready in %.1f s: device %s, dtype %s, KV cache %d blocks x %d tokens (%.2f GiB), "
             "max context %d tokens", engine.loaded.name, time.monotonic() - start, engine.loaded.device,
             str(engine.loaded.dtype).removeprefix("torch."), engine.num_blocks, engine.config.block_size,
             kv.numel() * kv.element_size() / 2**30, engine.max_model_len)


def _parse(annotation: str, text: str):
    if text.strip().lower() in ("", "none") and "Optional" in annotation:
        return None
    if "bool" in annotation:
        return text.strip().lower() in ("1", "true", "yes", "on")
    for kind in (int, float):
        if kind.__name__ in annotation:
            return kind(text)
    return text


def configs_from_env(environ: Mapping[str, str] = os.environ) -> tuple[EngineConfig, ServerConfig]:
    """CHATSERVE_<FIELD> for every EngineConfig field (CHATSERVE_MODEL, CHATSERVE_DEVICE,
    CHATSERVE_NUM_KV_BLOCKS, ...), plus CHATSERVE_API_KEY, CHATSERVE_API_KEY_FILE, CHATSERVE_CORS_ORIGINS (comma
    separated), CHATSERVE_MAX_QUEUE, CHATSERVE_MAX_BODY_BYTES, CHATSERVE_MODEL_ALIASES (comma
    separated) and CHATSERVE_DB (the conversation store's SQLite file)."""
    values = {}
    for f in fields(EngineConfig):
        text = environ.get(f"CHATSERVE_{f.name.upper()}")
        if text is not None:
            try:
                values[f.name] = _parse(str(f.type), text)
            except ValueError:
                raise ValueError(f"CHATSERVE_{f.name.upper()}={text!r} is not a valid {f.type}") from None

    def listed(name: str) -> list[str]:
        return [item.strip() for item in environ.get(name, "").split(",") if item.strip()]

    server = ServerConfig(api_key=environ.get("CHATSERVE_API_KEY") or None,
                          api_key_file=environ.get("CHATSERVE_API_KEY_FILE") or None,
                          cors_origins=listed("CHATSERVE_CORS_ORIGINS"),
                          max_queue=int(environ.get("CHATSERVE_MAX_QUEUE", ServerConfig.max_queue)),
                          max_body_bytes=int(environ.get("CHATSERVE_MAX_BODY_BYTES", ServerConfig.max_body_bytes)),
                          model_aliases=listed("CHATSERVE_MODEL_ALIASES"),
                          db_path=environ.get("CHATSERVE_DB") or None)
    return EngineConfig(**values), server
