"""The /infer request body, and errors in the OpenAI shape: {"error": {message, type, param, code}}."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.structured import StructuredOutput

log = logging.getLogger("chatserve.server")


def whole_unicode(text: str) -> str:
    """JSON can carry a lone UTF-16 surrogate ("\\ud800"), which no tokenizer, database or UTF-8
    response can take: refused at the edge with a 400 rather than a 500 deep inside."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds a lone UTF-16 surrogate at character {exc.start}: send valid Unicode text") from None
    return text


# A request's text: any str that is valid Unicode.
Text = Annotated[str, AfterValidator(whole_unicode)]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class InferRequest(BaseModel):
    model: Text
    messages: list[ChatMessage]
    stream: bool = False
    # None: the model's generation_config default (sampling values), or until a stop condition
    # or the context is full (max_tokens).
    max_tokens: Optional[int] = Field(None, gt=0)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)
    seed: Optional[int] = None
    stop: Union[Text, list[Text], None] = None

    @field_validator("messages")
    @classmethod
    def not_empty(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise ValueError('must hold at least one message, e.g. [{"role": "user", "content": "Hi"}]')
        return messages


class APIError(Exception):
    """An error the client gets back as {"error": {...}} with this HTTP status."""

    def __init__(self, status_code: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status_code, self.message, self.type, self.param, self.code = status_code, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status_code, self.message, self.type, self.param, self.code)


def error_response(status_code: int, message: str, type: str = "invalid_request_error",
                   param: Optional[str] = None, code: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status_code)


class ErrorDetail(BaseModel):
    message: str = Field(description="what went wrong, phrased so the client knows what to change")
    type: str = Field(description="e.g. invalid_request_error, not_found_error, server_error")
    param: Optional[str] = Field(description="the request field at fault (e.g. 'content', 'params.top_p'), or null")
    code: Optional[str] = Field(description="a stable name for the error (e.g. 'conversation_not_found'), or null")


class ErrorResponse(BaseModel):
    """What every error returns (the OpenAI shape): what error_response() sends, for /openapi.json."""
    error: ErrorDetail


def _param(loc) -> Optional[str]:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def describe_validation_error(errors: list[dict]) -> tuple[str, Optional[str]]:
    """The first problem, phrased so the client knows what to change, and the field it is in."""
    err = errors[0]
    if err["type"] == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return (f"the request body is not valid JSON ({detail}); send a JSON object such as "
                '{"model": "...", "messages": [{"role": "user", "content": "Hi"}]}', None)
    param = _param(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if param is None:
        return ("the request body must be a JSON object with 'model' and 'messages', sent with "
                f"'Content-Type: application/json' ({msg})", None)
    if err["type"] == "missing":
        return f"{param} is required", param
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return f"{param}: {msg} (got {got})", param


def engine_error(exc: ValueError) -> APIError:
    """A 400 for the engine's refusal, naming the request field its message starts with."""
    message = str(exc)
    word = re.match(r"\w*", message).group()
    fields = {*InferRequest.model_fields, *SamplingFields.model_fields}
    param = word if word in fields else ("messages" if "prompt" in message else None)
    return APIError(400, message, param=param)


def document_errors_as_400(app: FastAPI) -> None:
    """FastAPI's schema lists a 422 validation error on every route with a body; this server
    answers bad input with 400 in the OpenAI error shape instead, so the schema says that."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            error = {"description": "bad input: the message says what to fix",
                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            for operation in (op for path in schema["paths"].values() for op in path.values()):
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses.setdefault("400", error)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            schemas.setdefault("ErrorDetail", ErrorDetail.model_json_schema())
            schemas.setdefault("ErrorResponse", ErrorResponse.model_json_schema(
                ref_template="#/components/schemas/{model}"))
        return app.openapi_schema

    app.openapi = openapi


def install_error_handlers(app: FastAPI) -> None:
    document_errors_as_400(app)
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(list(exc.errors()))
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal server error: {exc}", "server_error")


# -- OpenAI API request bodies ----------------------------------------------------------------------

class ContentPart(BaseModel):
    type: Literal["text"] = Field(description="only text parts; images and audio are not supported")
    text: Text


class OpenAIMessage(BaseModel):
    # "developer" is OpenAI's newer name for "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, list[ContentPart], None] = None
    name: Optional[Text] = None

    def as_template_message(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields both OpenAI routes share, plus the extras top_k, min_p, repetition_penalty, ignore_eos."""

    model: Text
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=16)
    max_tokens: Optional[int] = Field(None, gt=0)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: Optional[int] = None
    stop: Union[Text, list[Text], None] = None
    user: Optional[Text] = None
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    ignore_eos: bool = False
    # Token id (as a string, OpenAI's JSON keys) -> bias in [-100, 100]; -100 bans the token.
    logit_bias: Optional[dict[str, float]] = None
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}
    response_format: Optional[dict] = None
    # vLLM's structured outputs: {"json": schema, "regex": ..., "choice": [...], "grammar": ebnf,
    # "json_object": true}, one of them; and its older spelling, guided_json and the rest.
    structured_outputs: Optional[dict] = None
    guided_json: Union[dict, str, None] = None
    guided_regex: Optional[Text] = None
    guided_choice: Optional[list[Text]] = None
    guided_grammar: Optional[Text] = None

    def token_biases(self) -> dict[int, float]:
        biases = {}
        for key, bias in (self.logit_bias or {}).items():
            try:
                biases[int(key)] = bias
            except ValueError:
                raise APIError(400, f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                               param="logit_bias") from None
        return biases

    def structured_output(self) -> Optional[StructuredOutput]:
        """The one output constraint the request asks for, or None; a 400 for a malformed or
        doubled one (a schema that does not compile is the engine's 400, when the request is made)."""
        found: list[StructuredOutput] = []
        try:
            fmt = self.response_format or {}
            kind = fmt.get("type", "text")
            if kind == "json_object":
                found.append(StructuredOutput(json_object=True, source="response_format"))
            elif kind == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict) or "schema" not in spec:
                    raise ValueError('response_format: a json_schema format needs "json_schema": '
                                     '{"name": ..., "schema": {...}}')
                found.append(StructuredOutput.from_json_schema(spec["schema"], "response_format"))
            elif kind != "text":
                raise ValueError(f"response_format: type must be text, json_object or json_schema, got {kind!r}")
            so = dict(self.structured_outputs or {})
            unknown = sorted(set(so) - {"json", "regex", "choice", "grammar", "json_object"})
            if unknown:
                raise ValueError(f"structured_outputs: unknown key {unknown[0]!r} (use one of json, regex, choice, "
                                 "grammar, json_object)")
            for source, key, value in [("structured_outputs", k, v) for k, v in so.items() if v not in (None, False)] + [
                    ("guided_json", "json", self.guided_json), ("guided_regex", "regex", self.guided_regex),
                    ("guided_choice", "choice", self.guided_choice), ("guided_grammar", "grammar", self.guided_grammar)]:
                if value is None:
                    continue
                if key == "json":
                    found.append(StructuredOutput.from_json_schema(value, source))
                elif key == "json_object":
                    found.append(StructuredOutput(json_object=True, source=source))
                elif key == "choice":
                    if not isinstance(value, list):
                        raise ValueError(f"{source}: choice must be a list of strings")
                    found.append(StructuredOutput(choice=tuple(value), source=source))
                elif not isinstance(value, str) or not value:
                    raise ValueError(f"{source}: {key} must be a non-empty string")
                else:
                    found.append(StructuredOutput(**{key: value, "source": source}))
        except ValueError as exc:
            raise APIError(400, str(exc), param=str(exc).split(":")[0]) from None
        if len(found) > 1:
            raise APIError(400, f"give one output constraint, not several ({found[0].source} and {found[1].source})",
                           param=found[1].source)
        return found[0] if found else None

    @field_validator("stop")
    @classmethod
    def stop_strings(cls, stop):
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and (len(stop) > 4 or any(not s for s in stop)):
            raise ValueError("give at most 4 non-empty stop strings")
        return stop


# apply_chat_template arguments the server sets itself; a request passing them would break rendering.
RESERVED_TEMPLATE_KWARGS = {"messages", "conversation", "tokenize", "add_generation_prompt", "return_dict",
                            "return_tensors", "continue_final_message", "tokenizer_kwargs",
                            "return_assistant_tokens_mask", "padding", "truncation", "max_length"}


class ChatCompletionRequest(SamplingFields):
    messages: list[OpenAIMessage]
    max_completion_tokens: Optional[int] = Field(None, gt=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    # Passed to the chat template, e.g. {"enable_thinking": false} for Qwen3.
    chat_template_kwargs: Optional[dict] = None
    tools: Optional[list] = None

    @field_validator("messages")
    @classmethod
    def not_empty(cls, messages):
        if not messages:
            raise ValueError('must hold at least one message, e.g. [{"role": "user", "content": "Hi"}]')
        return messages

    @field_validator("chat_template_kwargs")
    @classmethod
    def no_reserved_keys(cls, kwargs):
        reserved = sorted(set(kwargs or {}) & RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise ValueError(f"{reserved[0]!r} is set by the server, not by chat_template_kwargs (which passes "
                             "variables to the template, e.g. {\"enable_thinking\": false})")
        return kwargs

    @field_validator("tools")
    @classmethod
    def no_tools(cls, tools):
        if tools:
            raise ValueError("tool calling is not supported by this server; leave 'tools' out")
        return tools


class CompletionRequest(SamplingFields):
    prompt: Union[Text, list[Text], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def prompts_not_empty(cls, prompt):
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, (str, list)) and not p for p in prompt)):
            raise ValueError("must be a non-empty string, list of strings, or list of token ids")
        return prompt

    @field_validator("suffix")
    @classmethod
    def no_suffix(cls, suffix):
        if suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported")
        return suffix
