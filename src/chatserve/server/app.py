"""create_app(): the FastAPI app. Its lifespan loads the model in the background and shuts the
engine down at exit; /health says whether the model is ready."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import fields
from typing import Mapping, Optional

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from ..config import EngineConfig, ServerConfig
from ..engine.engine import AsyncEngine, Engine
from . import infer
from .protocol import install_error_handlers

log = logging.getLogger("chatserve.server")


def create_app(engine_config: EngineConfig, server_config: Optional[ServerConfig] = None) -> FastAPI:
    server_config = server_config or ServerConfig()
    engine_config.validate()  # a bad setting fails here, not in the background loader

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background: the server answers at once (/health 503 until ready) and
        # the event loop stays free to log while a large model loads.
        loader = asyncio.create_task(_load(app, engine_config))
        try:
            yield
        finally:
            loader.cancel()
            engine: Optional[AsyncEngine] = app.state.engine
            app.state.engine = None
            if engine is not None:
                engine.shutdown()
                log.info("engine stopped")

    app = FastAPI(title="chatserve", lifespan=lifespan)
    app.state.engine = None
    app.state.model_name = engine_config.model
    app.state.load_error = None
    app.state.server_config = server_config
    app.state.in_flight = 0
    install_error_handlers(app)
    if server_config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=server_config.cors_origins,
                           allow_methods=["*"], allow_headers=["*"])

    @app.get("/health")
    async def health(request: Request):
        state = request.app.state
        if state.engine is not None:
            return {"status": "ok", "model": state.model_name}
        body = {"status": "error", "error": state.load_error} if state.load_error else {"status": "loading"}
        return JSONResponse({**body, "model": state.model_name}, status_code=503)

    app.include_router(infer.router)
    return app


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
    CHATSERVE_NUM_KV_BLOCKS, ...), plus CHATSERVE_API_KEY, CHATSERVE_CORS_ORIGINS (comma
    separated), CHATSERVE_MAX_QUEUE and CHATSERVE_MODEL_ALIASES (comma separated)."""
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
                          cors_origins=listed("CHATSERVE_CORS_ORIGINS"),
                          max_queue=int(environ.get("CHATSERVE_MAX_QUEUE", ServerConfig.max_queue)),
                          model_aliases=listed("CHATSERVE_MODEL_ALIASES"))
    return EngineConfig(**values), server
