"""What every generating route shares: auth and engine dependencies, the served-model check,
one request's engine stream with its usage and log line, and responses that abort on disconnect."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Optional, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..config import CHARS_PER_TOKEN, DEFAULT_USER, ServerConfig
from ..engine.chat_template import TemplateTimeout, chat_job, encode_chat
from ..engine.engine import AsyncEngine
from ..engine.request import RequestOutput
from ..engine.sampling import DEFAULTABLE, SamplingParams
from .protocol import APIError, documented_errors, engine_error

log = logging.getLogger("chatserve.server")
T = TypeVar("T")


# Characters that str.splitlines, and so requests' and httpx's iter_lines, end a line at. JSON may
# carry them raw inside a string (a model can write U+2028); a streamed line holding one would
# reach the client cut in two, so they are sent as escapes.
_LINE_BREAKS = {c: f"\\u{c:04x}" for c in (0x0B, 0x0C, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029)}


def stream_json(obj) -> str:
    """obj as JSON for one line of a stream (NDJSON or SSE): UTF-8 text, no line break inside."""
    return json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)


def sse(event) -> str:
    """One server-sent event: a JSON object, or a bare string such as "[DONE]"."""
    return f"data: {event if isinstance(event, str) else stream_json(event)}\n\n"


def sampling_params(values: dict, defaults: dict) -> SamplingParams:
    """SamplingParams from a request's values (None: unset). Unset sampling values take the
    engine's defaults (`defaults`: the model's generation_config with the operator's
    --override-generation-config), as vLLM and `chatserve generate` do; a value the engine refuses
    is a 400 naming its field."""
    given = {name: value for name, value in values.items() if value is not None}
    for name in DEFAULTABLE:
        if name not in given and defaults.get(name) is not None:
            given[name] = defaults[name]
    try:
        return SamplingParams(**given)
    except ValueError as exc:
        raise engine_error(exc) from None


def prompt_char_limit(request: Request, engine: AsyncEngine) -> int:
    limit = request.app.state.server_config.max_prompt_chars
    return limit if limit is not None else CHARS_PER_TOKEN * engine.engine.max_model_len


def text_chars(value) -> int:
    """The characters of text in a request value: every string in it, dict keys included, at any depth."""
    total, stack = 0, [value]
    while stack:  # not recursive: a deeply nested value must not overflow the stack
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def check_text_size(request: Request, engine: AsyncEngine, value, param: str) -> None:
    """400 when a request brings more text than any prompt could use, before it is rendered or
    tokenized: a 4 MB prompt costs nothing but this count."""
    limit, chars = prompt_char_limit(request, engine), text_chars(value)
    if chars > limit:
        why = "--max-prompt-chars" if request.app.state.server_config.max_prompt_chars is not None else \
            f"{CHARS_PER_TOKEN} per token of the model's {engine.engine.max_model_len}-token context"
        raise APIError(400, f"the request has {chars} characters of text; this server takes at most {limit} ({why}): "
                            "shorten it", param=param, code="prompt_too_long")


async def with_chat_template(request: Request, engine: AsyncEngine, work: Callable[[Callable[..., str]], T],
                             param: str = "messages") -> T:
    """work(render) on a template thread (a few, bounded: a stuck render holds no thread other work
    needs), where render(messages, **template_kwargs) renders the chat template in a worker process
    and returns its text, with the control tokens spelled in the messages marked: encode it with
    encode_chat. A template that fails, or runs past --template-timeout, is the client's to fix: a
    400 naming `param`."""
    templates, tokenizer = request.app.state.templates, engine.engine.tokenizer
    limit = prompt_char_limit(request, engine)

    def render(messages: list[dict], **template_kwargs) -> str:
        return templates.render(chat_job(tokenizer, messages, **template_kwargs), limit)

    try:
        return await templates.call(work, render)
    except TemplateTimeout:
        raise APIError(400, f"the chat template took longer than {templates.timeout:g} s (--template-timeout) to "
                            "render these messages", param=param, code="template_timeout") from None
    except ValueError as exc:  # the template raised, or its output was too long
        raise APIError(400, f"the chat template rejected the messages: {exc}", param=param) from None


async def render_chat(request: Request, engine: AsyncEngine, messages: list[dict], **template_kwargs) -> list[int]:
    """The prompt ids of a chat: the model's own template (or a trusted request's), rendered in a
    worker process, control tokens spelled inside the messages encoded as plain text."""
    check_text_size(request, engine, [messages, template_kwargs], "messages")
    tokenizer = engine.engine.tokenizer
    return await with_chat_template(
        request, engine, lambda render: encode_chat(tokenizer, render(messages, **template_kwargs)))


class RetryLater(APIError):
    """A sound request the server cannot take now: the error carries a Retry-After header."""

    def __init__(self, status_code: int, message: str, type: str, code: str, retry_after: int = 1):
        super().__init__(status_code, message, type, code=code)
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        response = super().response()
        response.headers["Retry-After"] = str(self.retry_after)
        return response


def shutting_down(message: str = "the server is shutting down; retry shortly") -> RetryLater:
    return RetryLater(503, message, "service_unavailable_error", "shutting_down")


# Engine requests one HTTP request may start (completions: prompts x n), whatever --max-queue allows.
MAX_ENGINE_REQUESTS_PER_REQUEST = 128


def check_capacity(request: Request, count: int = 1, param: Optional[str] = "n") -> None:
    """Room for `count` more engine requests (a chat's n choices, a completion's prompts x n):
    --max-queue bounds engine requests in flight, not HTTP requests. A request that alone asks for
    more than one request may have is a 400 (retrying never helps); 429 when the queue has no room
    for it now (a bounded queue, not an unbounded wait); 503 while the server drains for shutdown."""
    state = request.app.state
    max_queue = state.server_config.max_queue
    limit = min(max_queue, MAX_ENGINE_REQUESTS_PER_REQUEST)
    if count > limit:
        raise APIError(400, f"this request asks for {count} generations (prompts x n); one request may ask for "
                            f"at most {limit} on this server: send fewer prompts or a smaller n", param=param,
                       code="too_many_generations")
    if state.draining:
        error = shutting_down()
    elif state.in_flight + count > max_queue:
        wanted = f"{count} more" if count > 1 else "another"
        error = RetryLater(429, f"the server is busy ({state.in_flight} generations in flight, at most "
                                f"{max_queue}; this request needs {wanted}); retry shortly",
                           "rate_limit_exceeded", "server_busy")
    else:
        return
    state.metrics.rejected.labels(error.code).inc()
    raise error


MODEL_NOT_FOUND = ("The model named is not served here (type invalid_request_error, param model, code "
                   "model_not_found); GET /v1/models lists the names served")

# What /openapi.json says a generating route may answer besides its 200.
GENERATION_ERRORS = documented_errors({
    400: "Bad input (type invalid_request_error; param names the field): a body that fails validation or is "
         "not JSON, or a prompt the model cannot take (too long, max_tokens over the context)",
    404: MODEL_NOT_FOUND,
    429: "--max-queue requests are in flight (type rate_limit_exceeded, code server_busy): retry after "
         "Retry-After seconds",
    503: "The model is still loading (code model_not_ready), or the server is shutting down (code "
         "shutting_down, with Retry-After)",
})


def check_model(request: Request, model: str) -> None:
    state = request.app.state
    served = [state.model_name, *state.server_config.model_aliases]
    if model not in served and model != state.model_path:
        raise APIError(404, f"model {model!r} is not served here; use one of {served}", param="model",
                       code="model_not_found")


class Users:
    """Who a request's API key belongs to: --api-key is DEFAULT_USER's key, --api-key-file gives
    one "USER KEY" pair a line. Only the keys' SHA-256 digests are kept, and a key is compared
    with every one of them in constant time, so neither the match nor its place leaks by timing."""

    def __init__(self, keys: dict[str, str]):  # key -> user
        self.by_digest = {self.digest(key): user for key, user in keys.items()}

    @staticmethod
    def digest(key: str) -> bytes:
        return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()

    @classmethod
    def from_config(cls, config: ServerConfig) -> "Users":
        """ValueError, naming the file and line, for a key file that cannot be read or is malformed."""
        keys: dict[str, str] = {}
        where: dict[str, str] = {}
        if config.api_key:
            keys[config.api_key], where[config.api_key] = DEFAULT_USER, "--api-key"
        if config.api_key_file:
            path = Path(config.api_key_file).expanduser()
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read the API key file {path}: {exc}") from None
            for number, line in enumerate(lines, 1):
                fields = line.split()
                if not fields or fields[0].startswith("#"):
                    continue  # a blank line or a comment
                here = f"{path}, line {number}"
                if len(fields) < 2 or (len(fields) > 2 and not fields[2].startswith("#")):
                    raise ValueError(f"{here}: expected 'USER KEY' (two words, then an optional # comment), "
                                     f"got {len(fields)} word(s)")
                user, key = fields[:2]
                if key in keys:
                    raise ValueError(f"{here}: this key is already given at {where[key]} (for user {keys[key]!r}); "
                                     "each key must name one user")
                keys[key], where[key] = user, here
            if not keys:
                raise ValueError(f"the API key file {path} holds no keys: add 'USER KEY' lines, or leave "
                                 "--api-key-file out to run without keys")
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self.by_digest)

    def user(self, key: str) -> Optional[str]:
        given, found = self.digest(key), None
        for digest, user in self.by_digest.items():  # no early exit: every key is compared
            if hmac.compare_digest(digest, given):
                found = user
        return found


def check_api_key(request: Request) -> str:
    """The user making the request (kept as request.state.user), from its
    'Authorization: Bearer KEY' header; 401 for a missing or unknown key. Without keys
    configured, everyone is DEFAULT_USER. Logs the user (never the key) of each request."""
    users: Users = request.app.state.users
    user = DEFAULT_USER
    if users:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        user = users.user(key.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            log.info("%s %s: refused, missing or unknown API key", request.method, request.url.path)
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
    request.state.user = user
    log.info("%s %s by user %s", request.method, request.url.path, user)
    return user


def get_engine(request: Request) -> AsyncEngine:
    state = request.app.state
    if state.engine is None:
        raise APIError(503, state.load_error or f"the model {state.model_name} is still loading; retry shortly",
                       "service_unavailable_error", code="model_not_ready")
    return state.engine


class Generation:
    """One request's engine stream, with the counts its log line, usage and metrics need."""

    def __init__(self, request: Request, outputs: AsyncIterator[RequestOutput], request_id: str):
        self.state = request.app.state
        self.outputs = outputs
        self.request_id = request_id
        self.start = time.monotonic()
        self.user = getattr(request.state, "user", DEFAULT_USER)
        self.last: Optional[RequestOutput] = None
        self.pending: Optional[RequestOutput] = None
        self.last_token_time: Optional[float] = None
        self.closed = False
        self.state.in_flight += 1

    async def first(self) -> RequestOutput:
        """Wait for the first output, so a request the engine refuses is a 400 before any streaming."""
        try:
            self.pending = self._arrived(await self.outputs.__anext__())
        except ValueError as exc:
            self._release()
            raise engine_error(exc) from None
        except RuntimeError as exc:  # the engine is shutting down
            self._release()
            self.state.metrics.rejected.labels("shutting_down").inc()
            raise shutting_down(str(exc)) from None
        return self.last

    async def next(self) -> RequestOutput:
        """The next output: first the one first() waited for, then the engine's."""
        if self.pending is not None:
            out, self.pending = self.pending, None
            return out
        return self._arrived(await self.outputs.__anext__())

    def _arrived(self, out: RequestOutput) -> RequestOutput:
        """Count an engine output as it arrives: the latencies are the ones the client sees."""
        metrics, now = self.state.metrics, time.monotonic()
        if self.last is None:  # the first output: the prompt has been admitted
            metrics.prompt_tokens.inc(out.num_prompt_tokens)
            metrics.cached_prompt_tokens.inc(out.num_cached_tokens)
        if out.token_ids:
            metrics.output_tokens.inc(len(out.token_ids))
            if self.last_token_time is None:
                metrics.time_to_first_token.observe(now - self.start)
            else:
                for _ in out.token_ids:
                    metrics.inter_token_latency.observe((now - self.last_token_time) / len(out.token_ids))
            self.last_token_time = now
        self.last = out
        return out

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
        self.state.metrics.finished.labels(out.finish_reason if out is not None and out.finished else "abort").inc()
        if out is None:  # cancelled before the engine answered: nothing ran, nothing to log
            return
        finish = out.finish_reason if out.finished else "abort (client went away)"
        n, ttft = out.num_output_tokens, out.time_to_first_token
        rate = (n - 1) / (elapsed - ttft) if ttft is not None and n > 1 and elapsed > ttft else 0.0
        log.info("request %s (user %s): %d prompt tokens (%d cached), %d output tokens, first token %s, "
                 "%.1f tokens/s after it, finish %s", self.request_id, self.user, out.num_prompt_tokens,
                 out.num_cached_tokens,
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


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> Optional[T]:
    """Await `work` (collecting an unstreamed answer) while watching the connection, since
    nobody reads a stream that would notice: None, with `work` cancelled, when the client leaves
    first. Either way `work` has stopped when this returns, so the engine iterators it read are
    idle and may be closed."""
    task = asyncio.ensure_future(work)
    disconnected = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait([task, disconnected], return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
    return None if task.cancelled() else task.result()
