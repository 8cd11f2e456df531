"""The OpenAI API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

Streaming answers are server-sent events: `data: {chunk}` per text delta, a final chunk per choice
with its finish_reason (the engine's: "stop", "length", or "abort" when the server shuts down
mid-answer), a usage chunk when stream_options.include_usage is set, then `data: [DONE]`. n > 1 runs n engine requests side by side (they share the prompt's KV blocks
through the prefix cache) and interleaves their chunks as they come."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..engine.engine import AsyncEngine
from ..engine.request import RequestOutput
from ..engine.sampling import SamplingParams, TokenLogprob, effective_sampling_defaults
from ..engine.structured import StructuredOutput
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, NamedToolChoice, SamplingFields,
                       documented_errors, error_response)
from .reasoning import ReasoningParser, is_reasoning_model, prompt_opens_reasoning, split_reasoning
from .streaming import (GENERATION_ERRORS, MODEL_NOT_FOUND, ClosingStreamingResponse, Generation, check_api_key,
                        check_capacity, check_model, check_text_size, get_engine, render_chat, sampling_params, sse,
                        unless_disconnected)
from .tools import ForcedCallStream, ToolCallStream, call_schema, supports_tools

router = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])


# -- models -------------------------------------------------------------------------------------

def _model_card(request: Request, name: str) -> dict:
    """OpenAI's model object, plus a "chatserve" object once the model is loaded: the sampling
    values a request that leaves them unset gets, for clients to show."""
    state = request.app.state
    card = {"id": name, "object": "model", "created": state.started, "owned_by": "chatserve", "root": state.model_name}
    if state.engine is not None:
        card["chatserve"] = {"default_sampling": effective_sampling_defaults(state.engine.engine.generation_config)}
    return card


@router.get("/models", responses=documented_errors({}))
async def list_models(request: Request) -> dict:
    state = request.app.state
    return {"object": "list", "data": [_model_card(request, name)
                                       for name in (state.model_name, *state.server_config.model_aliases)]}


@router.get("/models/{model_id:path}", responses=documented_errors({404: MODEL_NOT_FOUND}))
async def get_model(model_id: str, request: Request) -> dict:
    check_model(request, model_id)
    return _model_card(request, model_id)


# -- shared by both completion routes ------------------------------------------------------------

def choice_params(body: SamplingFields, defaults: dict, max_tokens: Optional[int], logprobs: Optional[int],
                  choice: int, prompt_logprobs: Optional[int] = None,
                  structured: Optional[StructuredOutput] = None) -> SamplingParams:
    if body.prompt_logprobs is not None:
        if body.stream:
            raise APIError(400, "prompt_logprobs come with an unstreamed answer; leave stream out",
                           param="prompt_logprobs")
        prompt_logprobs = max(prompt_logprobs or 0, body.prompt_logprobs)
    values = body.model_dump(include={"presence_penalty", "frequency_penalty", "stop", "ignore_eos", "temperature",
                                      "top_p", "top_k", "min_p", "repetition_penalty"})
    # Each of n choices draws differently, yet the same seed still gives the same answers.
    seed = None if body.seed is None else body.seed + choice
    return sampling_params({**values, "max_tokens": max_tokens, "logprobs": logprobs, "seed": seed,
                            "prompt_logprobs": prompt_logprobs, "logit_bias": body.token_biases,
                            "structured_output": structured or body.structured_output}, defaults)


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet (one printable character per byte), reversed."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_DECODER = _bytes_to_unicode()


class TokenText:
    """A token's own bytes and text, as OpenAI's logprobs show them ("bytes:\\xe4" when a token is
    part of a multi-byte character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self.cache.get(token_id)
        if hit is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
            if piece and all(c in BYTE_DECODER for c in piece):
                raw = bytes(BYTE_DECODER[c] for c in piece)
            else:
                raw = self.tokenizer.decode([token_id]).encode("utf-8")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = self.cache[token_id] = (text, list(raw))
        return hit


def token_text(request: Request, engine: AsyncEngine) -> TokenText:
    state = request.app.state
    if getattr(state, "token_text", None) is None:
        state.token_text = TokenText(engine.engine.tokenizer)
    return state.token_text


@dataclass
class ChoiceState:
    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[str] = None


async def start_generations(request: Request, engine: AsyncEngine, prompts: list[list[int]],
                            params: list[SamplingParams], request_id: str) -> list[Generation]:
    """One engine request per (prompt, params) pair, each past its first output, so a request the
    engine refuses is a 400 before anything streams."""
    check_capacity(request, len(prompts))
    gens = [Generation(request, engine.generate({"prompt_token_ids": prompt_ids}, p, f"{request_id}-{i}"),
                       f"{request_id}-{i}") for i, (prompt_ids, p) in enumerate(zip(prompts, params))]
    try:
        # All at once, so the choices prefill in the same engine steps.
        firsts = await asyncio.gather(*(g.first() for g in gens), return_exceptions=True)
    except BaseException:
        await close_all(gens)
        raise
    refused = next((exc for exc in firsts if isinstance(exc, BaseException)), None)
    if refused is not None:
        await close_all(gens)
        raise refused
    return gens


async def close_all(gens: list[Generation]) -> None:
    for gen in gens:
        await gen.close()


async def merged(gens: list[Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) from every generation, in the order they arrive, until all finish."""
    if len(gens) == 1:
        while True:
            out = await gens[0].next()
            yield 0, out
            if out.finished:
                return
    arrived: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
        try:
            while True:
                out = await gen.next()
                arrived.put_nowait((i, out))
                if out.finished:
                    return
        except Exception as exc:
            arrived.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, item = await arrived.get()
            if isinstance(item, Exception):
                raise item
            yield i, item
            remaining -= item.finished
    finally:
        for t in tasks:
            t.cancel()
        # The engine iterators must be idle before the generations close them.
        await asyncio.gather(*tasks, return_exceptions=True)


def usage(gens: list[Generation], prompts_once: list[int], score_only: bool = False) -> dict:
    """Prompt tokens count once per distinct prompt (n choices share one), completion tokens per
    choice (none when the one token run to score a prompt is dropped)."""
    prompt = sum(gens[i].last.num_prompt_tokens for i in prompts_once)
    cached = sum(gens[i].last.num_cached_tokens for i in prompts_once)
    completion = 0 if score_only else sum(g.last.num_output_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def collect(request: Request, gens: list[Generation]) -> Optional[list[ChoiceState]]:
    """Every choice's whole answer; None when the client went away first (the answers are aborted)."""
    choices = [ChoiceState(i) for i in range(len(gens))]

    async def gather() -> bool:
        async for i, out in merged(gens):
            c = choices[i]
            c.text.append(out.text)
            c.prompt_logprobs.extend(out.prompt_logprobs or [])
            c.logprobs.extend(out.logprobs or [])
            if out.finished:
                c.finish_reason, c.error = out.finish_reason, out.error
        return True

    try:
        finished = await unless_disconnected(request, gather())
    finally:
        await close_all(gens)
    return None if finished is None else choices


def failed(choices: list[ChoiceState]) -> Optional[Response]:
    """The error response when the engine failed or shut down while answering."""
    for c in choices:
        if c.error:
            status, kind = (500, "server_error") if c.finish_reason == "error" else \
                (503, "service_unavailable_error")
            return error_response(status, c.error, kind)
    return None


def event_stream(gens: list[Generation], events: AsyncIterator[str]) -> Response:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        finally:
            await close_all(gens)

    return ClosingStreamingResponse(body(), media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def stream_chunks(gens: list[Generation], make_chunk: Callable[[int, RequestOutput, bool], Optional[dict]],
                        base: dict, include_usage: bool, prompts_once: list[int],
                        score_only: bool = False) -> AsyncIterator[str]:
    """The SSE events of a streamed answer: make_chunk(choice, output, is_last) gives each chunk's
    choice entry (None to send nothing), then the usage chunk and [DONE]. An engine failure ends
    the stream with an error event, which OpenAI clients raise."""
    extra = {"usage": None} if include_usage else {}
    error = None
    async for i, out in merged(gens):
        entry = make_chunk(i, out, False)
        if entry is not None:
            yield sse({**base, "choices": [entry], **extra})
        if out.finished:
            yield sse({**base, "choices": [make_chunk(i, out, True)], **extra})
            if out.finish_reason == "error":
                error = out.error
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(gens, prompts_once, score_only)})
    if error:
        yield sse({"error": {"message": error, "type": "server_error", "param": None, "code": None}})
    yield sse("[DONE]")


# -- /v1/chat/completions -----------------------------------------------------------------------

def chat_logprobs(tokens: TokenText, entries: list[TokenLogprob], top: int) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text, raw = tokens(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top[:top]]}
                        for e in entries], "refusal": None}


@router.post("/chat/completions", responses=GENERATION_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           engine: AsyncEngine = Depends(get_engine)) -> Response:
    check_model(request, body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    tokenizer = engine.engine.tokenizer
    template_kwargs = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort is not None:  # the template's thinking switch, unless the request set it itself
        template_kwargs.setdefault("enable_thinking", body.reasoning_effort not in ("none", "minimal"))
    if "chat_template" in template_kwargs and not request.app.state.server_config.trust_request_chat_template:
        # A client's own Jinja runs in this process: refused unless the operator trusts the clients.
        raise APIError(400, "chat_template_kwargs.chat_template: this server renders its model's own chat template "
                       "only (start it with --trust-request-chat-template to accept one from requests)",
                       param="chat_template_kwargs.chat_template")
    tools, forced = tool_setup(body, tokenizer, template_kwargs.get("chat_template"))
    if tools:
        template_kwargs["tools"] = tools
    messages = [m.as_template_message() for m in body.messages]
    prompt_ids = await render_chat(request, engine, messages, **template_kwargs)
    reasoning = is_reasoning_model(tokenizer)
    opened = reasoning and prompt_opens_reasoning(tokenizer, prompt_ids)
    top = body.top_logprobs or 0
    defaults = engine.engine.generation_config
    params = [choice_params(body, defaults, body.max_completion_tokens or body.max_tokens,
                            top if body.logprobs else None, i, structured=forced) for i in range(body.n)]

    def tool_stream() -> Optional[ToolCallStream]:
        return None if not tools else ForcedCallStream() if forced else ToolCallStream()

    def with_calls(message: dict, calls: list[dict], finish_reason: Optional[str]) -> Optional[str]:
        """Puts the calls on the message; the finish_reason the answer ends with."""
        if not calls:
            return finish_reason
        message["tool_calls"] = calls if body.parallel_tool_calls is not False else calls[:1]
        message["content"] = message.get("content") or None
        return "tool_calls" if finish_reason == "stop" else finish_reason
    request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    gens = await start_generations(request, engine, [prompt_ids] * body.n, params, request_id)
    tokens = token_text(request, engine)
    base = {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": body.model, "system_fingerprint": request.app.state.system_fingerprint}

    if body.stream:
        parsers = [ReasoningParser(opened) if reasoning else None for _ in gens]
        calling = [tool_stream() for _ in gens]
        finish_reasons: list[Optional[str]] = [None] * len(gens)
        started = [False] * len(gens)
        pending: list[list[TokenLogprob]] = [[] for _ in gens]

        def make_chunk(i: int, out: RequestOutput, last: bool) -> Optional[dict]:
            if last:
                return {"index": i, "delta": {}, "logprobs": None,
                        "finish_reason": finish_reasons[i] or out.finish_reason}
            pending[i].extend(out.logprobs or [])
            text = out.text
            delta: dict = {}
            if not started[i]:
                started[i] = True
                delta["role"] = "assistant"
            if parsers[i] is not None:
                thought, text = parsers[i].feed(text)
                if out.finished:
                    more_thought, more_text = parsers[i].flush()
                    thought, text = thought + more_thought, text + more_text
                if thought:
                    delta["reasoning_content"] = thought
            if calling[i] is not None:
                # Calls stream whole, one delta entry each, once the answer is complete.
                text = calling[i].feed(text)
                if out.finished:
                    rest, calls = calling[i].finish()
                    text += rest
                    called: dict = {}
                    finish_reasons[i] = with_calls(called, calls, out.finish_reason)
                    if "tool_calls" in called:
                        delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(called["tool_calls"])]
            if text or "role" in delta:
                delta["content"] = text
            # Logprobs ride with the next chunk that carries text (or the last one).
            if not (text or delta.get("reasoning_content") or "role" in delta or "tool_calls" in delta
                    or (out.finished and pending[i])):
                return None
            lp = chat_logprobs(tokens, pending[i], top) if body.logprobs and pending[i] else None
            pending[i] = []
            return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": None}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(gens, stream_chunks(gens, make_chunk, base, include_usage, [0]))

    choices = await collect(request, gens)
    if choices is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    if (error := failed(choices)) is not None:
        return error
    answers = []
    for c in choices:
        text = "".join(c.text)
        message = {"role": "assistant", "content": text, "refusal": None}
        if reasoning:
            thought, content = split_reasoning(text, opened)
            message = {"role": "assistant", "content": content, "refusal": None, "reasoning_content": thought}
        finish_reason = c.finish_reason
        if (calling := tool_stream()) is not None:
            head = calling.feed(message["content"])
            rest, calls = calling.finish()
            message["content"] = head + rest
            finish_reason = with_calls(message, calls, finish_reason)
        answers.append({"index": c.index, "message": message, "finish_reason": finish_reason,
                        "logprobs": chat_logprobs(tokens, c.logprobs, top) if body.logprobs else None})
    extra = {} if body.prompt_logprobs is None else {
        "prompt_logprobs": vllm_prompt_logprobs(tokens, choices[0].prompt_logprobs, body.prompt_logprobs)}
    return JSONResponse({**base, "object": "chat.completion", "choices": answers, "usage": usage(gens, [0]), **extra})


def tool_setup(body: ChatCompletionRequest, tokenizer,
               request_template: Optional[str]) -> tuple[Optional[list[dict]], Optional[StructuredOutput]]:
    """The tool definitions for the template (None when no tool may be called) and, for
    tool_choice "required" or a named function, the constraint that makes the answer one call."""
    choice = body.tool_choice or ("auto" if body.tools else "none")
    if choice != "none" and not body.tools:
        raise APIError(400, "tool_choice needs tools: declare the functions in 'tools'", param="tool_choice")
    if choice == "none":
        return None, None
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    names = [t["function"]["name"] for t in tools]
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    if named is not None and named not in names:
        raise APIError(400, f"tool_choice names {named!r}, which is not among the tools ({', '.join(names)})",
                       param="tool_choice")
    template = request_template or (tokenizer.get_chat_template(None, tools)
                                    if getattr(tokenizer, "chat_template", None) else "")
    if not supports_tools(template):
        raise APIError(400, "this model's chat template does not render tools, so it cannot call them; leave "
                            "'tools' out", param="tools")
    if choice == "auto":
        return tools, None
    if body.structured_output is not None:
        raise APIError(400, "tool_choice required or a named function already constrains the answer; leave "
                            "response_format out", param="tool_choice")
    return tools, StructuredOutput.from_json_schema(call_schema(tools, named), "tool_choice")


# -- /v1/completions ----------------------------------------------------------------------------

async def completion_prompts(request: Request, body: CompletionRequest, engine: AsyncEngine) -> list[list[int]]:
    """The prompts' token ids. A text prompt is the caller's own raw text, not a chat turn: the
    special tokens spelled in it are special tokens (that is how a raw prompt writes a chat format
    by hand), unlike a chat message's text (see render_chat)."""
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    check_text_size(request, engine, prompt, "prompt")
    try:
        # Off the event loop: a long text takes a while to tokenize.
        prompts = await asyncio.to_thread(lambda: [engine.engine.tokenize_prompt(p) for p in prompt])
    except ValueError as exc:
        raise APIError(400, str(exc), param="prompt") from None
    limit = engine.engine.max_model_len
    for p in prompts:
        if len(p) >= limit:
            raise APIError(400, f"a prompt has {len(p)} tokens; this model's context holds at most {limit} "
                                "(prompt and output together): shorten it", param="prompt")
    return prompts


def vllm_prompt_logprobs(tokens: TokenText, entries: list[TokenLogprob], k: int) -> list[Optional[dict]]:
    """vLLM's prompt_logprobs: per prompt token, None for the first, else {token id: {logprob, rank,
    decoded_token}} for the token itself and the k likeliest there."""
    out: list[Optional[dict]] = []
    for e in entries:
        if e.logprob is None:
            out.append(None)
            continue
        item = {str(e.token_id): {"logprob": e.logprob, "rank": e.rank, "decoded_token": tokens(e.token_id)[0]}}
        for rank, (token_id, logprob) in enumerate(e.top[:k], start=1):
            item.setdefault(str(token_id), {"logprob": logprob, "rank": rank, "decoded_token": tokens(token_id)[0]})
        out.append(item)
    return out


class LegacyLogprobs:
    """The completions API's logprobs: parallel lists of tokens, their logprobs, the top
    alternatives as {token: logprob}, and each token's character offset in the choice's text."""

    def __init__(self, tokens: TokenText, offset: int):
        self.tokens, self.offset = tokens, offset

    def __call__(self, entries: list[TokenLogprob]) -> dict:
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text = self.tokens(e.token_id)[0]
            out["tokens"].append(text)
            out["token_logprobs"].append(e.logprob)
            # A prompt's first token has no logprob (nothing predicts it): null, as OpenAI's echo gives.
            out["top_logprobs"].append(None if e.logprob is None else {self.tokens(t)[0]: lp for t, lp in e.top})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


@router.post("/completions", responses=GENERATION_ERRORS)
async def completions(body: CompletionRequest, request: Request,
                      engine: AsyncEngine = Depends(get_engine)) -> Response:
    check_model(request, body.model)
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of is not supported unless it equals n", param="best_of")
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens: 0 generates nothing; it is allowed only with echo (to score a prompt)",
                       param="max_tokens")
    # Before tokenizing: a thousand prompts x n must not cost a thousand tokenizations to refuse.
    check_capacity(request, body.num_prompts() * body.n, param="n" if body.n > 1 else "prompt")
    prompts = await completion_prompts(request, body, engine)
    defaults = engine.engine.generation_config
    # echo with logprobs: the prompt's tokens come back with theirs (what lm-eval's loglikelihood
    # tasks read). max_tokens 0 (score only) runs one token and drops it.
    score_only = body.max_tokens == 0
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    # Choice index = prompt index * n + choice within the prompt, as OpenAI numbers them.
    params = [choice_params(body, defaults, 1 if score_only else body.max_tokens, body.logprobs, j, prompt_logprobs)
              for _ in prompts for j in range(body.n)]
    all_prompts = [p for p in prompts for _ in range(body.n)]
    prompts_once = list(range(0, len(all_prompts), body.n))
    request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    gens = await start_generations(request, engine, all_prompts, params, request_id)
    tokens = token_text(request, engine)
    echoes = [engine.engine.tokenizer.decode(p) if body.echo else "" for p in all_prompts]
    base = {"id": request_id, "object": "text_completion", "created": created,
            "model": body.model, "system_fingerprint": request.app.state.system_fingerprint}

    def answer_part(out_text: str, out_logprobs: Optional[list[TokenLogprob]]) -> tuple[str, list[TokenLogprob]]:
        return ("", []) if score_only else (out_text, out_logprobs or [])

    def first_offset(i: int) -> int:  # logprobs' text offsets start after an echo without logprobs
        return 0 if prompt_logprobs is not None else len(echoes[i])

    if body.stream:
        logprobs = [LegacyLogprobs(tokens, first_offset(i)) for i in range(len(echoes))]
        pending: list[list[TokenLogprob]] = [[] for _ in gens]

        def make_chunk(i: int, out: RequestOutput, last: bool) -> Optional[dict]:
            if last:
                return {"index": i, "text": "", "logprobs": None, "finish_reason": out.finish_reason}
            out_text, out_logprobs = answer_part(out.text, out.logprobs)
            pending[i].extend((out.prompt_logprobs or []) + out_logprobs)
            text, echoes[i] = echoes[i] + out_text, ""
            if not text and not (out.finished and pending[i]):
                return None
            lp = logprobs[i](pending[i]) if body.logprobs is not None else None
            pending[i] = []
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": None}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(gens, stream_chunks(gens, make_chunk, base, include_usage, prompts_once, score_only))

    choices = await collect(request, gens)
    if choices is None:
        return Response(status_code=499)
    if (error := failed(choices)) is not None:
        return error
    answers = []
    for c in choices:
        text, entries = answer_part("".join(c.text), c.logprobs)
        answers.append({"index": c.index, "text": echoes[c.index] + text, "finish_reason": c.finish_reason,
                        "logprobs": LegacyLogprobs(tokens, first_offset(c.index))(
                            (c.prompt_logprobs if body.echo else []) + entries) if body.logprobs is not None else None})
        if body.prompt_logprobs is not None:
            answers[-1]["prompt_logprobs"] = vllm_prompt_logprobs(tokens, c.prompt_logprobs, body.prompt_logprobs)
    return JSONResponse({**base, "choices": answers, "usage": usage(gens, prompts_once, score_only)})
