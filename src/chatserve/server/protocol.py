"""The /infer request body, and errors in the OpenAI shape: {"error": {message, type, param, code}}."""

from __future__ import annotations

import functools
import json
import logging
import re
import typing
import uuid
from typing import Annotated, Callable, Literal, Mapping, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field, Strict, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

from ..engine.sampling import SAMPLING_RANGES

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


# A request's scalars keep their JSON types, as OpenAI's API does: "4" is no integer, true no
# number, "yes" no boolean (pydantic's strict mode; a float still takes an integer such as 1).
# Text: any str that is valid Unicode.
Text = Annotated[str, Strict(), AfterValidator(whole_unicode)]
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]

# Stop strings per request, on every route (OpenAI's bound).
MAX_STOP_STRINGS = 4


def stop_strings(stop: Union[str, list[str], None]) -> Optional[list[str]]:
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (len(stop) > MAX_STOP_STRINGS or any(not s for s in stop)):
        raise ValueError(f"give at most {MAX_STOP_STRINGS} non-empty stop strings")
    return stop


# One stop string or a list of them; the schema states the bound that stop_strings() checks.
Stop = Annotated[Union[Text, Annotated[list[Text], Field(json_schema_extra={"maxItems": MAX_STOP_STRINGS})], None],
                 AfterValidator(stop_strings)]


def not_empty(messages: list) -> list:
    if not messages:
        raise ValueError('must hold at least one message, e.g. [{"role": "user", "content": "Hi"}]')
    return messages


def messages_field(message: type) -> type:
    """A list of at least one message: checked with a message that says what to send, and
    stated in the schema (minItems)."""
    return Annotated[list[message], Field(json_schema_extra={"minItems": 1}), AfterValidator(not_empty)]


def example(body: dict) -> dict:
    """A request model's config holding one example body: shown at /docs, and quoted by the error
    for a body that is not valid JSON."""
    return {"json_schema_extra": {"examples": [body]}}


def sampling_field(name: str, default=None, **kwargs):
    """A request field for the sampling value `name`: finite (JSON's Infinity and NaN are refused)
    and in the engine's range for it, so the 400 names the field before anything is stored or run."""
    allowed = SAMPLING_RANGES[name]
    low = {"gt" if allowed.low_open else "ge": allowed.low}
    return Field(default, **low, le=allowed.high, allow_inf_nan=False, **kwargs)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class InferRequest(BaseModel):
    model_config = example({"model": "dummy_model", "messages": [{"role": "user", "content": "Hi"}], "stream": True})

    model: Text
    messages: messages_field(ChatMessage)
    stream: Bool = False
    # None: the model's generation_config default (sampling values), or until a stop condition
    # or the context is full (max_tokens).
    max_tokens: Optional[Int] = Field(None, gt=0)
    temperature: Optional[Float] = sampling_field("temperature")
    top_p: Optional[Float] = sampling_field("top_p")
    top_k: Optional[Int] = Field(None, ge=-1)
    seed: Optional[Int] = None
    stop: Stop = None


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


# How /openapi.json describes the errors every route may give, by status; a route adds its own.
COMMON_ERRORS = {
    401: "Without 'Authorization: Bearer <key>' when the server runs with --api-key (code invalid_api_key)",
    "default": "Any other error, in the same shape (e.g. 413 request_too_large, 500 server_error)",
}


def documented_errors(descriptions: dict) -> dict:
    """A route's `responses` for /openapi.json: {status: description} (COMMON_ERRORS added), each in
    the OpenAI error shape. The "default" entry also keeps FastAPI from listing a 422, which this
    server never sends: its validation errors are 400s."""
    descriptions = {**descriptions, **{k: v for k, v in COMMON_ERRORS.items() if k not in descriptions}}
    ordered = sorted(k for k in descriptions if k != "default") + ["default"]
    return {status: {"model": ErrorResponse, "description": descriptions[status]} for status in ordered}


def _param(loc) -> Optional[str]:
    """("body", "messages", 0, "role") -> "messages[0].role"; ("query", "limit") -> "limit"."""
    out = ""
    for part in loc:
        if part in ("body", "query") and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def body_hint(body_model: Optional[type]) -> str:
    """What a route's body should be, for the errors about a body that is no JSON object: the
    model's example body, else its required fields."""
    if body_model is None:
        return "a JSON object"
    examples = (body_model.model_config.get("json_schema_extra") or {}).get("examples")
    if examples:
        return f"a JSON object such as {json.dumps(examples[0])}"
    required = [name for name, f in body_model.model_fields.items() if f.is_required()]
    if required:
        return "a JSON object with " + " and ".join(repr(name) for name in required)
    return f"a JSON object of the fields {', '.join(repr(name) for name in body_model.model_fields)} (all optional)"


def describe_validation_error(errors: list[dict], body_model: Optional[type] = None) -> tuple[str, Optional[str]]:
    """The first problem, phrased so the client knows what to change, and the field it is in;
    body_model: the route's request body, which a body that is no JSON object is told to be."""
    err = errors[0]
    if err["type"] == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail}); send {body_hint(body_model)}", None
    param = _param(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if param is None:
        return (f"the request body must be {body_hint(body_model)}, sent with 'Content-Type: application/json' "
                f"({msg})", None)
    if err["type"] == "missing":
        return f"{param} is required", param
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return f"{param}: {msg} (got {got})", param


def route_body_model(request: Request) -> Optional[type]:
    """The pydantic model of the matched route's body (Optional[Model] unwrapped), if it has one."""
    body_field = getattr(request.scope.get("route"), "body_field", None)
    if body_field is None:
        return None
    annotation = body_field.field_info.annotation
    candidates = typing.get_args(annotation) or (annotation,)
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


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


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request, headers: Mapping[str, str]) -> list[str]:
    """Every method some route takes at this path: Starlette's 405 names only the first route's,
    and /v1/conversations, for one, has a GET route and a POST route. (A mount, the static files,
    matches any method; its own Allow, in `headers`, says which it takes.)"""
    given = {m.strip() for m in headers.get("Allow", "").split(",") if m.strip()}
    routes = [route for route in request.app.router.routes if not isinstance(route, Mount)]
    return [method for method in HTTP_METHODS if method in given or any(
        route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)]


def install_error_handlers(app: FastAPI, authenticate: Optional[Callable[[Request], None]] = None) -> None:
    """authenticate: the dependency that guards routes (raising APIError 401). FastAPI parses a
    JSON body before it runs any dependency, so a route guarded by it runs it here first: a client
    without the key learns that, not what is wrong with its body."""
    document_errors_as_400(app)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        route = request.scope.get("route")
        if authenticate is not None and any(d.dependency is authenticate for d in getattr(route, "dependencies", [])):
            try:
                authenticate(request)
            except APIError as error:
                return error.response()
        message, param = describe_validation_error(list(exc.errors()), route_body_model(request))
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        response = error_response(exc.status_code, str(exc.detail), kind)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(allowed_methods(request, exc.headers or {}))
        return response

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # The exception's text may hold paths, SQL or data of other users: it goes to the log only,
        # under an id the client can quote.
        request_id = f"req_{uuid.uuid4().hex}"
        log.error("request %s (%s %s) failed: %r", request_id, request.method, request.url.path, exc, exc_info=exc)
        response = error_response(500, f"internal server error; the server log has the details under request id "
                                       f"{request_id}", "server_error", code="internal_error")
        response.headers["X-Request-ID"] = request_id
        return response


# -- OpenAI API request bodies ----------------------------------------------------------------------

class ContentPart(BaseModel):
    type: Literal["text"] = Field(description="only text parts; images, audio and files are not supported")
    text: Text


class FunctionCall(BaseModel):
    name: Text
    arguments: Text = Field(description="the arguments as a JSON string, as OpenAI sends them")


class ToolCall(BaseModel):
    id: Optional[Text] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: Optional[Text] = None
    parameters: Optional[dict] = Field(None, description="the arguments' JSON schema")
    strict: Optional[Bool] = None


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: Text


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class OpenAIMessage(BaseModel):
    # "developer" is OpenAI's newer name for "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[Text, list[ContentPart], None] = None
    name: Optional[Text] = None
    tool_calls: Optional[list[ToolCall]] = None  # an assistant's earlier calls
    tool_call_id: Optional[Text] = None  # a tool message: the call it answers

    @field_validator("content", mode="before")
    @classmethod
    def text_parts_only(cls, content):
        """An image, audio or file part is a 400 that says so, before pydantic's union errors
        (which would name its own internals) have a say."""
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(f"a {kind!r} content part: this model takes text only; send text parts "
                                     '({"type": "text", "text": "..."}) or a string')
        return content

    def as_template_message(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.tool_calls:
            # Templates write the arguments out themselves (`| tojson`): as an object where they parse.
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


class StreamOptions(BaseModel):
    include_usage: Bool = False


class SamplingFields(BaseModel):
    """Fields both OpenAI routes share, plus the extras top_k, min_p, repetition_penalty, ignore_eos."""

    model: Text
    stream: Bool = False
    stream_options: Optional[StreamOptions] = None
    n: Int = Field(1, ge=1, le=16)
    max_tokens: Optional[Int] = Field(None, gt=0)
    temperature: Optional[Float] = sampling_field("temperature")
    top_p: Optional[Float] = sampling_field("top_p")
    presence_penalty: Float = sampling_field("presence_penalty", 0.0)
    frequency_penalty: Float = sampling_field("frequency_penalty", 0.0)
    seed: Optional[Int] = None
    stop: Stop = None
    user: Optional[Text] = None
    top_k: Optional[Int] = Field(None, ge=-1)
    min_p: Optional[Float] = sampling_field("min_p")
    repetition_penalty: Optional[Float] = sampling_field("repetition_penalty")
    ignore_eos: Bool = False
    # vLLM's: each prompt token's logprob (and the top k there), on an unstreamed answer.
    prompt_logprobs: Optional[Int] = Field(None, ge=0, le=20)
    # Token id (as a string, OpenAI's JSON keys) -> bias in [-100, 100]; -100 bans the token.
    logit_bias: Optional[dict[str, Float]] = None
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}
    response_format: Optional[dict] = None
    # vLLM's structured outputs: {"json": schema, "regex": ..., "choice": [...], "grammar": ebnf,
    # "json_object": true}, one of them; and its older spelling, guided_json and the rest.
    structured_outputs: Optional[dict] = None
    guided_json: Union[dict, str, None] = None
    guided_regex: Optional[Text] = None
    guided_choice: Optional[list[Text]] = None
    guided_grammar: Optional[Text] = None

    @functools.cached_property
    def token_biases(self) -> dict[int, float]:
        biases = {}
        for key, bias in (self.logit_bias or {}).items():
            try:
                biases[int(key)] = bias
            except ValueError:
                raise APIError(400, f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                               param="logit_bias") from None
        return biases

    @functools.cached_property
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



# apply_chat_template arguments the server sets itself; a request passing them would break rendering.
RESERVED_TEMPLATE_KWARGS = {"messages", "conversation", "tokenize", "add_generation_prompt", "return_dict",
                            "return_tensors", "continue_final_message", "tokenizer_kwargs",
                            "return_assistant_tokens_mask", "padding", "truncation", "max_length",
                            "sanitize_control_tokens"}


class ChatCompletionRequest(SamplingFields):
    model_config = example({"model": "dummy_model", "messages": [{"role": "user", "content": "Hi"}]})

    messages: messages_field(OpenAIMessage)
    max_completion_tokens: Optional[Int] = Field(None, gt=0)
    logprobs: Bool = False
    top_logprobs: Optional[Int] = Field(None, ge=0, le=20)
    # Passed to the chat template, e.g. {"enable_thinking": false} for Qwen3.
    chat_template_kwargs: Optional[dict] = None
    tools: Optional[list[ToolDefinition]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    # OpenAI's effort levels map onto the template's thinking switch (Qwen3's enable_thinking).
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high"]] = None
    modalities: Optional[list[Literal["text", "audio"]]] = None
    functions: Optional[list] = None
    function_call: Union[str, dict, None] = None
    parallel_tool_calls: Optional[Bool] = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def no_reserved_keys(cls, kwargs):
        reserved = sorted(set(kwargs or {}) & RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise ValueError(f"{reserved[0]!r} is set by the server, not by chat_template_kwargs (which passes "
                             "variables to the template, e.g. {\"enable_thinking\": false})")
        return kwargs

    @field_validator("functions", "function_call")
    @classmethod
    def no_legacy_functions(cls, functions):
        if functions:  # never silently ignored: a client relying on them must know
            raise ValueError("the legacy 'functions' / 'function_call' are not supported: send 'tools' and "
                             "'tool_choice' instead")
        return functions

    @field_validator("modalities")
    @classmethod
    def text_output_only(cls, modalities):
        if modalities and set(modalities) != {"text"}:
            raise ValueError('this model answers in text only: leave modalities out or send ["text"]')
        return modalities


class CompletionRequest(SamplingFields):
    model_config = example({"model": "dummy_model", "prompt": "Once upon a time", "max_tokens": 16})

    prompt: Union[Text, list[Text], list[Int], list[list[Int]]]
    # 0 only with echo: score the prompt (echo + logprobs), generate nothing.
    max_tokens: Optional[Int] = Field(None, ge=0)
    echo: Bool = False
    logprobs: Optional[Int] = Field(None, ge=0, le=5)
    best_of: Optional[Int] = None
    suffix: Optional[Text] = None

    @field_validator("prompt")
    @classmethod
    def prompts_not_empty(cls, prompt):
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, (str, list)) and not p for p in prompt)):
            raise ValueError("must be a non-empty string, list of strings, or list of token ids")
        return prompt

    def num_prompts(self) -> int:
        """How many prompts this is: a string or a list of token ids is one."""
        prompt = self.prompt
        return 1 if isinstance(prompt, str) or isinstance(prompt[0], int) else len(prompt)

    @field_validator("suffix")
    @classmethod
    def no_suffix(cls, suffix):
        if suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported")
        return suffix
