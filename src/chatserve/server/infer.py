"""POST /infer: the original demo's protocol. stream=true gives NDJSON, one chat-completion-shaped
object per text delta; the last line carries finish_reason ("stop" or "length"; "abort" with an
"error" object when the server shuts down mid-stream, "error" when the engine failed) and usage.
stream=false gives one object with the whole message."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import AsyncIterator, Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2.exceptions import TemplateError

from ..engine.engine import AsyncEngine
from ..engine.request import RequestOutput
from ..engine.sampling import SamplingParams
from .protocol import APIError, InferRequest, engine_error, error_response

log = logging.getLogger("chatserve.server")

router = APIRouter()


def check_api_key(request: Request) -> None:
    key = request.app.state.server_config.api_key
    if key and request.headers.get("authorization") != f"Bearer {key}":
        raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


def get_engine(request: Request) -> AsyncEngine:
    state = request.app.state
    if state.engine is None:
        raise APIError(503, state.load_error or f"the model {state.model_name} is still loading; retry shortly",
                       "service_unavailable_error", code="model_not_ready")
    return state.engine


def sampling_params(body: InferRequest, defaults: dict) -> SamplingParams:
    values = {"max_tokens": body.max_tokens, "seed": body.seed, "stop": body.stop or []}
    # Unset sampling values take the model's generation_config, as `chatserve generate` does.
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(body, name)
        value = defaults.get(name) if value is None else value
        if value is not None:
            values[name] = value
    try:
        return SamplingParams(**values)
    except ValueError as exc:
        raise engine_error(exc) from None


class Generation:
    """One request's engine stream, with the counts its log line and usage need."""

    def __init__(self, request: Request, outputs: AsyncIterator[RequestOutput], request_id: str):
        self.state = request.app.state
        self.outputs = outputs
        self.request_id = request_id
        self.start = time.monotonic()
        self.last: Optional[RequestOutput] = None
        self.pending: Optional[RequestOutput] = None
        self.closed = False
        self.state.in_flight += 1

    async def first(self) -> RequestOutput:
        """Wait for the first output, so a request the engine refuses is a 400 before any streaming."""
        try:
            self.pending = self.last = await self.outputs.__anext__()
        except ValueError as exc:
            self._release()
            raise engine_error(exc) from None
        except RuntimeError as exc:  # the engine is shutting down
            self._release()
            raise APIError(503, str(exc), "service_unavailable_error") from None
        return self.last

    async def next(self) -> RequestOutput:
        """The next output: first the one first() waited for, then the engine's."""
        if self.pending is not None:
            out, self.pending = self.pending, None
            return out
        self.last = await self.outputs.__anext__()
        return self.last

    def _release(self) -> bool:
        released, self.closed = not self.closed, True
        if released:
            self.state.in_flight -= 1
        return released

    async def close(self) -> None:
        """End the request (once first() succeeded) and log its one line."""
        if not self._release():
            return
        # Closing the engine's iterator aborts the request if it is still running (the client left).
        await self.outputs.aclose()
        out, elapsed = self.last, time.monotonic() - self.start
        finish = out.finish_reason if out.finished else "abort (client went away)"
        n, ttft = out.num_output_tokens, out.time_to_first_token
        rate = (n - 1) / (elapsed - ttft) if ttft is not None and n > 1 and elapsed > ttft else 0.0
        log.info("request %s: %d prompt tokens (%d cached), %d output tokens, first token %s, "
                 "%.1f tokens/s after it, finish %s", self.request_id, out.num_prompt_tokens, out.num_cached_tokens,
                 n, "-" if ttft is None else f"{ttft * 1000:.0f} ms", rate, finish)

    def usage(self) -> dict:
        out = self.last
        return {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_output_tokens,
                "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
                "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body iterator however the response ends: when the client disconnects, the
    request is aborted at once rather than whenever the generator is garbage collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


@router.post("/infer", dependencies=[Depends(check_api_key)])
async def infer(body: InferRequest, request: Request, engine: AsyncEngine = Depends(get_engine)) -> Response:
    state = request.app.state
    served = [state.model_name, *state.server_config.model_aliases]
    if body.model not in served:
        raise APIError(404, f"model {body.model!r} is not served here; use one of {served}", param="model",
                       code="model_not_found")
    params = sampling_params(body, engine.engine.loaded.generation_config)
    try:
        # The tokenizer's own template, rendered by transformers' sandboxed Jinja; it may reject a
        # conversation (e.g. roles that do not alternate), which is the client's to fix.
        prompt_ids = engine.engine.apply_chat_template([m.model_dump() for m in body.messages])
    except (ValueError, TemplateError) as exc:
        raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
    if state.in_flight >= state.server_config.max_queue:
        raise APIError(503, f"the server is busy ({state.in_flight} requests in flight); retry shortly",
                       "service_unavailable_error", code="server_busy")

    request_id, created = str(uuid.uuid4()), int(time.time())
    gen = Generation(request, engine.generate({"prompt_token_ids": prompt_ids}, params, request_id), request_id)
    await gen.first()

    def chunk(content: str, finish_reason: Optional[str]) -> dict:
        return {"id": request_id, "created": created, "model": state.model_name,
                "choices": [{"message": {"role": "assistant", "content": content},
                             "finish_reason": finish_reason, "index": 0}]}

    if body.stream:
        async def lines() -> AsyncIterator[str]:
            try:
                while True:
                    out = await gen.next()
                    if out.finished:
                        last = {**chunk(out.text, out.finish_reason), "usage": gen.usage()}
                        if out.error:
                            last["error"] = {"message": out.error, "type": "server_error", "param": None,
                                             "code": None}
                        yield json.dumps(last) + "\n"
                        return
                    if out.text:  # empty while the detokenizer holds back part of a character
                        yield json.dumps(chunk(out.text, None)) + "\n"
            finally:
                await gen.close()

        return ClosingStreamingResponse(lines(), media_type="application/x-ndjson")

    async def collect() -> tuple[str, RequestOutput]:
        text = []
        while True:
            out = await gen.next()
            text.append(out.text)
            if out.finished:
                return "".join(text), out

    # Nobody streams the answer, so watch the connection ourselves: a client that leaves aborts it.
    collecting = asyncio.ensure_future(collect())
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait([collecting, disconnected], return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
        if not collecting.done():
            collecting.cancel()
            await asyncio.wait([collecting])  # the engine's iterator must be idle before it is closed
        await gen.close()
    if collecting.cancelled():
        return Response(status_code=499)  # the client is gone; nobody reads this
    text, out = collecting.result()
    if out.error:
        status, kind = (500, "server_error") if out.finish_reason == "error" else (503, "service_unavailable_error")
        return error_response(status, out.error, kind)
    return JSONResponse({**chunk(text, out.finish_reason), "usage": gen.usage()})


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
