"""create_app(): the FastAPI app. Its lifespan loads the model in the background and shuts the
engine down at exit; /health says whether the model is ready, /metrics how it is doing. On SIGTERM
or Ctrl-C the server drains: new requests get 503, every stream ends at once with its final chunk.
/health and /metrics stay open without the API key: they are for probes and scrapers."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import threading
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import fields
from pathlib import Path
from typing import Callable, Mapping, Optional, Union
from urllib.parse import urlsplit, urlunsplit

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from ..config import EngineConfig, ServerConfig
from ..engine.chat_template import TemplateWorkers
from ..engine.engine import AsyncEngine, Engine
from ..engine.sampling import effective_sampling_defaults
from . import conversations, infer, metrics, openai
from .protocol import error_response, install_error_handlers
from .store import Store
from .streaming import Users, check_api_key

log = logging.getLogger("chatserve.server")
WEB_DIR = Path(__file__).parent / "web"
# The chat page's Content-Security-Policy: its own files only (scripts, styles, KaTeX's fonts), no
# inline script or style attribute, no eval, and no framing by other sites (which a <meta> policy
# cannot say). Model output is sanitized besides (web/render.js); this is the second wall.
WEB_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def create_app(engine_config: EngineConfig, server_config: Optional[ServerConfig] = None,
               on_load_error: Optional[Callable[[str], None]] = None) -> FastAPI:
    """on_load_error(message): called on the event loop when the model cannot be loaded (`chatserve
    serve` stops the server); without it the server stays up, /health saying why it failed."""
    server_config = server_config or ServerConfig()
    engine_config.validate()  # a bad setting fails here, not in the background loader
    server_config.validate()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.store = Store.open(server_config.db_path)  # a bad --db path fails the start, loudly
        # Load in the background: the server answers at once (/health 503 until ready) and
        # the event loop stays free to log while a large model loads.
        loader = asyncio.create_task(_load(app, engine_config, on_load_error))
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
            app.state.templates.close()

    app = FastAPI(title="chatserve", lifespan=lifespan)
    app.state.engine = None
    app.state.model_name = served_name(engine_config.model, server_config.served_model_name)
    app.state.model_path = engine_config.model  # accepted in requests too
    app.state.system_fingerprint = f"chatserve-{__version__}"
    app.state.started = int(time.time())
    app.state.load_error = None
    app.state.server_config = server_config
    app.state.users = Users.from_config(server_config)  # a bad key file fails here, at start
    app.state.in_flight = 0
    app.state.store = None  # the conversation store, opened by the lifespan
    app.state.answers = {}  # conversation id -> its answer being generated (conversations.py)
    app.state.draining = False
    # Chat templates render in worker processes, started when first needed.
    app.state.templates = TemplateWorkers(server_config.template_workers, server_config.template_timeout)
    app.state.metrics = metrics.Metrics(app.state)
    install_error_handlers(app, authenticate=check_api_key)

    @app.exception_handler(BodyRefused)
    async def body_refused(_: Request, exc: BodyRefused) -> JSONResponse:
        return exc.response()

    app.add_middleware(RequestBody, max_bytes=server_config.max_body_bytes, timeout=server_config.body_timeout,
                       rejected=app.state.metrics.rejected)
    if server_config.cors_origins:  # added after the others, so outside them: their errors get CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=server_config.cors_origins,
                           allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(AllowedHosts, names=[server_config.host, *server_config.allowed_hosts])
    if not server_config.api_key and not is_loopback(host_name(server_config.host)):
        log.warning("listening on %s without an API key: anyone who can reach this address can read every stored "
                    "conversation and generate; set --api-key (or CHATSERVE_API_KEY)", server_config.host)

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
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache",
                                                             "Content-Security-Policy": WEB_CSP})

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


class BodyRefused(StarletteHTTPException):
    """Raised while the body is read (FastAPI passes an HTTPException from its body reading on):
    too large (413) or too slow (408). The connection closes: the rest of the body is not read."""

    def __init__(self, status_code: int, message: str, code: str):
        super().__init__(status_code, message)
        self.code = code

    def response(self) -> JSONResponse:
        response = error_response(self.status_code, self.detail, code=self.code)
        response.headers["Connection"] = "close"
        return response


class RequestBody:
    """Bounds on reading a request body, counted as the app reads it, buffering none: 413 when it
    passes max_bytes (at once from Content-Length, else as soon as the bytes read pass it), 408
    when it has not all arrived `timeout` seconds after the headers. Once the body is in, reading
    on (a stream watching for the client to leave) waits as long as it likes."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float, rejected) -> None:
        self.app, self.max_bytes, self.timeout, self.rejected = app, max_bytes, timeout, rejected

    def refuse(self, status_code: int, message: str, code: str) -> BodyRefused:
        self.rejected.labels(code).inc()
        return BodyRefused(status_code, message, code)

    def too_large(self) -> BodyRefused:
        return self.refuse(413, f"the request body is larger than this server accepts ({self.max_bytes} bytes)",
                           "request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self.too_large().response()(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline, received, complete = loop.time() + self.timeout, 0, False

        async def bounded_receive():
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except asyncio.TimeoutError:
                raise self.refuse(408, f"the request body did not arrive within {self.timeout:g} seconds of its "
                                       "headers", "request_timeout") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self.too_large()
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        await self.app(scope, bounded_receive, send)


def host_name(host: str) -> str:
    """The name in a Host header or a --host/--allowed-host value, lower case, without port,
    brackets or a final dot: 'LocalHost:8000' -> 'localhost', '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # name:port; more colons: a bare IPv6 address
        host = host.partition(":")[0]
    return host.rstrip(".")


def _address(name: str) -> Union[ipaddress.IPv4Address, ipaddress.IPv6Address, None]:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def is_loopback(name: str) -> bool:
    return name == "localhost" or getattr(_address(name), "is_loopback", False)


class AllowedHosts:
    """400 for a request whose Host header names another server: a web page whose DNS name an
    attacker rebinds to 127.0.0.1 would otherwise read, write and generate through a key-less
    local server. Allowed: loopback names, `names` (the --host and every --allowed-host; "*" for
    any), and the address the connection arrived at (an IP address cannot be rebound, so
    `--host 0.0.0.0` still answers at http://<its IP>:<port>). Redirects go out relative, never
    to whatever Host was sent."""

    def __init__(self, app: ASGIApp, names: list[str]) -> None:
        self.app, self.any = app, "*" in names
        # Not 0.0.0.0 or [::] of `--host 0.0.0.0`: no client reaches a server by that name, but some
        # browsers let any web page send requests to http://0.0.0.0:PORT.
        self.names = {name for name in map(host_name, names) if not getattr(_address(name), "is_unspecified", False)}

    def allowed(self, name: str, scope: Scope) -> bool:
        server = scope.get("server") or ("",)
        return self.any or is_loopback(name) or name in self.names or name == server[0]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = Headers(scope=scope).get("host")
        # No Host at all (HTTP/1.0) is no browser's request, so no rebinding.
        if host is not None and not self.allowed(name := host_name(host), scope):
            response = error_response(400, f"the Host header {host!r} names a server other than this one (a "
                                           "defence against DNS rebinding); to serve it under that name, start "
                                           f"the server with --allowed-host {name or '*'}", code="invalid_host")
            return await response(scope, receive, send)

        async def send_relative(message) -> None:
            if message["type"] == "http.response.start" and 300 <= message["status"] < 400:
                message = {**message, "headers": [(key, _relative(value) if key.lower() == b"location" else value)
                                                  for key, value in message["headers"]]}
            await send(message)

        await self.app(scope, receive, send_relative)


def _relative(location: bytes) -> bytes:
    """'http://host/static/' -> '/static/': a redirect stays on whichever name the client used."""
    parts = urlsplit(location.decode("latin-1"))
    return urlunsplit(("", "", parts.path or "/", parts.query, parts.fragment)).encode("latin-1")


async def _load(app: FastAPI, config: EngineConfig, on_error: Optional[Callable[[str], None]]) -> None:
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
        if on_error is not None:
            on_error(app.state.load_error)
        return
    async_engine = AsyncEngine(engine)
    async_engine.start()
    app.state.engine = async_engine
    app.state.system_fingerprint = f"chatserve-{__version__}-{str(engine.loaded.dtype).removeprefix('torch.')}"
    kv = engine.runner.kv_cache.data
    log.info("model %s ready in %.1f s: device %s, dtype %s, KV cache %d blocks x %d tokens (%.2f GiB), "
             "max context %d tokens", engine.loaded.name, time.monotonic() - start, engine.loaded.device,
             str(engine.loaded.dtype).removeprefix("torch."), engine.num_blocks, engine.config.block_size,
             kv.numel() * kv.element_size() / 2**30, engine.max_model_len)
    log.info("%s", describe_sampling_defaults(engine))
    url = app.state.server_config.url
    if url:
        log.info("chatserve ready: %s (web chat), OpenAI API at %s/v1", url, url)
    else:  # under `uvicorn main:app`, whose own line says where it listens
        log.info("chatserve ready: the web chat at /, the OpenAI API at /v1")


def describe_sampling_defaults(engine: Engine) -> str:
    """The start-up line that says how a request that sets no sampling values is sampled, and why."""
    defaults = effective_sampling_defaults(engine.generation_config)
    overridden = [name for name in defaults if name in engine.config.override_generation_config]
    from_model = [name for name in defaults if name not in overridden
                  and engine.loaded.generation_config.get(name) is not None]
    sources = [f"{', '.join(names)} from {where}" for names, where in (
        (overridden, "--override-generation-config"), (from_model, "the model's generation_config")) if names]
    return ("default sampling (for requests that leave it unset): "
            + ", ".join(f"{name} {value}" for name, value in defaults.items())
            + f" ({'; '.join(sources) or 'built-in defaults: the model has no generation_config values'})")


def served_name(model: str, override: Optional[str] = None) -> str:
    """The name clients see: the override, a hub id as it is, a local folder's or GGUF file's own
    name (a full path says where the server keeps its files, and is long)."""
    if override:
        return override
    path = Path(model).expanduser()
    if model != "dummy_model" and path.exists():
        path = path.resolve()
        return path.stem if path.suffix == ".gguf" else path.name
    return model


def _parse(annotation: str, text: str):
    if text.strip().lower() in ("", "none") and "Optional" in annotation:
        return None
    if "bool" in annotation:
        return text.strip().lower() in ("1", "true", "yes", "on")
    if annotation == "dict":  # JSON, as the command line's --override-generation-config
        return json.loads(text)
    for kind in (int, float):
        if kind.__name__ in annotation:
            return kind(text)
    return text


def configs_from_env(environ: Mapping[str, str] = os.environ) -> tuple[EngineConfig, ServerConfig]:
    """CHATSERVE_<FIELD> for every EngineConfig field (CHATSERVE_MODEL, CHATSERVE_DEVICE,
    CHATSERVE_NUM_KV_BLOCKS, CHATSERVE_OVERRIDE_GENERATION_CONFIG as JSON, ...), plus
    CHATSERVE_API_KEY, CHATSERVE_API_KEY_FILE, CHATSERVE_CORS_ORIGINS (comma separated),
    CHATSERVE_MAX_QUEUE, CHATSERVE_MAX_BODY_BYTES, CHATSERVE_MODEL_ALIASES (comma separated),
    CHATSERVE_ALLOWED_HOSTS (comma separated), CHATSERVE_HEADER_TIMEOUT, CHATSERVE_BODY_TIMEOUT and
    CHATSERVE_DB (the conversation store's SQLite file)."""
    values = {}
    for f in fields(EngineConfig):
        text = environ.get(f"CHATSERVE_{f.name.upper()}")
        if text is not None:
            try:
                values[f.name] = _parse(str(f.type), text)
            except ValueError:
                kind = "JSON object" if f.type == "dict" else f.type
                raise ValueError(f"CHATSERVE_{f.name.upper()}={text!r} is not a valid {kind}") from None

    def listed(name: str) -> list[str]:
        return [item.strip() for item in environ.get(name, "").split(",") if item.strip()]

    server = ServerConfig(api_key=environ.get("CHATSERVE_API_KEY") or None,
                          api_key_file=environ.get("CHATSERVE_API_KEY_FILE") or None,
                          cors_origins=listed("CHATSERVE_CORS_ORIGINS"),
                          max_queue=int(environ.get("CHATSERVE_MAX_QUEUE", ServerConfig.max_queue)),
                          max_body_bytes=int(environ.get("CHATSERVE_MAX_BODY_BYTES", ServerConfig.max_body_bytes)),
                          body_timeout=float(environ.get("CHATSERVE_BODY_TIMEOUT", ServerConfig.body_timeout)),
                          header_timeout=float(environ.get("CHATSERVE_HEADER_TIMEOUT", ServerConfig.header_timeout)),
                          model_aliases=listed("CHATSERVE_MODEL_ALIASES"),
                          allowed_hosts=listed("CHATSERVE_ALLOWED_HOSTS"),
                          db_path=environ.get("CHATSERVE_DB") or None)
    return EngineConfig(**values), server
