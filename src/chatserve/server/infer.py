"""POST /infer: the original demo's protocol. stream=true gives NDJSON, one chat-completion-shaped
object per text delta; the last line carries finish_reason ("stop" or "length"; "abort" with an
"error" object when the server shuts down mid-stream, "error" when the engine failed) and usage.
stream=false gives one object with the whole message."""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..engine.engine import AsyncEngine
from ..engine.request import RequestOutput
from .protocol import InferRequest, error_response
from .streaming import (GENERATION_ERRORS, ClosingStreamingResponse, Generation, check_api_key, check_capacity,
                        check_model, get_engine, render_chat, sampling_params, stream_json, unless_disconnected)

router = APIRouter()


@router.post("/infer", dependencies=[Depends(check_api_key)], responses=GENERATION_ERRORS)
async def infer(body: InferRequest, request: Request, engine: AsyncEngine = Depends(get_engine)) -> Response:
    state = request.app.state
    check_model(request, body.model)
    params = sampling_params(body.model_dump(include={"max_tokens", "seed", "stop", "temperature", "top_p", "top_k"}),
                             engine.engine.generation_config)
    prompt_ids = await render_chat(request, engine, [m.model_dump() for m in body.messages])
    check_capacity(request)

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
                        yield stream_json(last) + "\n"
                        return
                    if out.text:  # empty while the detokenizer holds back part of a character
                        yield stream_json(chunk(out.text, None)) + "\n"
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

    try:
        collected = await unless_disconnected(request, collect())
    finally:
        await gen.close()
    if collected is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    text, out = collected
    if out.error:
        status, kind = (500, "server_error") if out.finish_reason == "error" else (503, "service_unavailable_error")
        return error_response(status, out.error, kind)
    return JSONResponse({**chunk(text, out.finish_reason), "usage": gen.usage()})


