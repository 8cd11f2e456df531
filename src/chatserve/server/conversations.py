"""Stored conversations: /v1/conversations (the contract is docs/conversations-api.md).

A conversation is a tree of messages in the Store. Posting, editing or regenerating answers over
SSE; the answer is saved while it streams and kept, marked stopped, when the client leaves or
asks to stop. Each answer keeps its exact prompt and output token ids, and the next turn extends
them rather than re-rendering the whole chat, so the history is a prefix-cache hit."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import sqlite3
import time
from collections import defaultdict
from contextlib import suppress
from typing import AsyncIterator, Callable, Literal, Optional, Union

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, create_model

from ..engine.chat_template import encode_chat
from ..engine.engine import AsyncEngine
from ..engine.request import RequestOutput
from ..engine.sampling import DEFAULTABLE, SamplingParams
from .protocol import (MAX_STOP_STRINGS, APIError, ErrorDetail, Float, Int, Stop, Text, documented_errors, example,
                       sampling_field)
from .reasoning import THINK_END, THINK_START, ReasoningParser, is_reasoning_model, prompt_opens_reasoning
from .store import DEFAULT_TITLE, MAX_TITLE_CHARS, Store, new_id
from .streaming import (ClosingStreamingResponse, Generation, check_api_key, check_capacity, check_text_size,
                        get_engine, sampling_params, sse, with_chat_template)

log = logging.getLogger("chatserve.server")

router = APIRouter(prefix="/v1/conversations", tags=["conversations"], dependencies=[Depends(check_api_key)])

SAVE_INTERVAL_S = 0.5  # how often a streaming answer's text so far is saved
STOP_WAIT_S = 10.0  # how long /stop waits for the answer to record its end
TITLE_CHARS = 60  # of a title taken from the first message
# Bounds on what a conversation stores, so that a list or a page of them stays small.
MAX_SYSTEM_PROMPT_CHARS = 32_768
MAX_CONTENT_CHARS = 131_072  # one message
LIST_LIMIT, MAX_LIST_LIMIT = 50, 100  # conversations per page of GET /v1/conversations
SEARCH_LIMIT = 20  # conversations per page of GET /v1/conversations/search (at most MAX_LIST_LIMIT)
MATCHES_SHOWN = 3  # of each conversation found: the title's match, then its best matching messages
MAX_QUERY_CHARS = 1000
MAX_IMPORT_MESSAGES = 10_000

# -- request bodies -------------------------------------------------------------------------------


class Params(BaseModel):
    """Sampling values, as the OpenAI routes take them; null: the server's default, else the model's
    (GET .../sampling tells which and what it is)."""
    temperature: Optional[Float] = sampling_field("temperature", description="0: greedy, up to 2; null: the "
                                                                           "default")
    top_p: Optional[Float] = sampling_field("top_p", description="nucleus sampling, in (0, 1]; null: the default")
    max_tokens: Optional[Int] = Field(None, gt=0, description="most tokens an answer may have; null: no limit "
                                                              "but a stop token or the context length")
    top_k: Optional[Int] = Field(None, ge=-1, description="sample from the k likeliest tokens; 0 or -1: off; null: "
                                                          "the default")
    min_p: Optional[Float] = sampling_field("min_p", description="drop tokens less likely than min_p times the "
                                                                 "likeliest, in [0, 1]; null: the default")
    repetition_penalty: Optional[Float] = sampling_field("repetition_penalty", description="> 1 discourages tokens "
                                                         "already in the prompt or answer, in (0, 2]; null: the default")
    presence_penalty: Optional[Float] = sampling_field("presence_penalty", description="OpenAI's, in [-2, 2]; null: 0")
    frequency_penalty: Optional[Float] = sampling_field("frequency_penalty", description="OpenAI's, in [-2, 2]; "
                                                                                         "null: 0")
    seed: Optional[Int] = Field(None, ge=-2**63, lt=2**64, description="the same seed gives the same answer; "
                                                                       "null: random")
    stop: Stop = Field(None, description=f"up to {MAX_STOP_STRINGS} strings that end the answer (not kept in it); "
                                         "null: none")


# A title is a non-empty string when sent (null is refused, not taken as "unset").
Title = Field(None, min_length=1, max_length=MAX_TITLE_CHARS,
              description="absent: 'New chat' until the first message names it")


class CreateConversation(BaseModel):
    model_config = example({"title": "Trip planning", "system_prompt": "Answer briefly.",
                            "params": {"temperature": 0.7}})

    title: Text = Title
    system_prompt: Optional[Text] = Field(None, max_length=MAX_SYSTEM_PROMPT_CHARS)
    params: Optional[Params] = None


class UpdateConversation(CreateConversation):
    """Only the fields sent change; in params, only the keys sent (null unsets one)."""
    model_config = example({"title": "Trip planning"})

    title: Text = Title
    system_prompt: Optional[Text] = Field(None, max_length=MAX_SYSTEM_PROMPT_CHARS)
    params: Optional[Params] = None


class Regenerate(Params):
    """Sampling values for this answer only, over the conversation's params."""


class EditMessage(Regenerate):
    model_config = example({"content": "Hello!"})

    content: Text = Field(max_length=MAX_CONTENT_CHARS)


class PostMessage(EditMessage):
    parent_id: Optional[Text] = Field(None, description="the answer this message follows. Absent: the "
                                     "conversation's current message; null: a new first message (a new root)")


class Switch(BaseModel):
    model_config = example({"message_id": "msg_..."})

    message_id: Text = Field(description="any message of the branch to show")


# -- response bodies: what conversation_json() and Tree.json() build, for /openapi.json -------------
# The routes return those dicts through these models (response_model), so each field must be here,
# in the dicts' order; a value outside a Literal would be a 500, not silently documented wrong.


class Cache(BaseModel):
    """How much of the current branch the prefix cache still holds: a hint that the next answer starts fast."""
    warm: bool = Field(description="cached_tokens > 0")
    cached_tokens: int = Field(description="tokens of the current branch (its last answer's prompt + output) "
                                           "whose KV blocks are still in the prefix cache; whole blocks only")


class Stats(BaseModel):
    prompt_tokens: int = Field(description="tokens in the answer's prompt")
    cached_tokens: int = Field(description="of the prompt tokens, those served from the prefix cache")
    completion_tokens: int = Field(description="tokens generated")
    time_to_first_token: Optional[float] = Field(description="seconds from the engine taking the request to the "
                                                             "first token; null when none came")
    tokens_per_second: float = Field(description="(completion_tokens - 1) / seconds from the first token to the "
                                                 "end, rounded to 0.01; 0 with fewer than 2 tokens")


class Message(BaseModel):
    id: str = Field(description="msg_...")
    object: Literal["conversation.message"]
    parent_id: Optional[str] = Field(description="the message this one follows; null for a first message (a root)")
    role: Literal["user", "assistant"]
    content: str = Field(description="the text (for an answer, without its reasoning); so far, while generating")
    reasoning_content: Optional[str] = Field(description="a reasoning model's <think> part of an answer, else null")
    created: int = Field(description="Unix time, seconds")
    status: Literal["complete", "generating", "stopped", "error"] = Field(
        description="stopped: the answer was cut short (stop, client gone, shutdown, crash), its text kept")
    finish_reason: Optional[Literal["stop", "length", "abort", "error"]] = Field(
        description="why an answer ended; null for a user message and while generating")
    siblings: list[str] = Field(description="ids of the messages with the same parent, this one included, "
                                            "in creation order")
    sibling_index: int = Field(description="this message's place in siblings")
    stats: Optional[Stats] = Field(description="an answer's numbers once it ended; else null")


class Conversation(BaseModel):
    id: str = Field(description="conv_...")
    object: Literal["conversation"]
    title: str = Field(description="'New chat' until a user message that starts a root names it (its first "
                                   "line, at most 60 characters)")
    created: int = Field(description="Unix time, seconds")
    updated: int = Field(description="Unix time, seconds: last PATCH, message or answer's end (lists sort by it)")
    system_prompt: Optional[str]
    params: Params = Field(description="sampling values for every answer; a message's own values override them")
    current_message_id: Optional[str] = Field(description="the leaf of the branch on show (an answer); null "
                                                          "before the first message")
    cache: Cache


class ConversationWithMessages(Conversation):
    messages: list[Message] = Field(description="the branch on show, root first, down to current_message_id")


class ConversationList(BaseModel):
    """One page of the list, as OpenAI's lists are: the next page is ?after=last_id, while has_more."""
    object: Literal["list"]
    data: list[Conversation] = Field(description="most recently updated first; without messages")
    first_id: Optional[str] = Field(description="the first conversation's id; null for an empty page")
    last_id: Optional[str] = Field(description="the last conversation's id (the next page's after); null for an "
                                               "empty page")
    has_more: bool = Field(description="whether more conversations follow this page")


class DeletedConversation(BaseModel):
    id: str
    object: Literal["conversation.deleted"]
    deleted: Literal[True]


class DeletedMessages(BaseModel):
    id: str = Field(description="the message asked for")
    object: Literal["conversation.message.deleted"]
    deleted: Literal[True]
    deleted_ids: list[str] = Field(description="every message deleted: the one asked for, its replies and theirs "
                                               "down the tree, and the question of an answer that was its only one")
    conversation: ConversationWithMessages = Field(description="the conversation after it, with the branch now on show")


class SearchMatch(BaseModel):
    message_id: Optional[str] = Field(description="the message that matched; null: the title matched")
    role: Optional[Literal["user", "assistant"]] = Field(description="the message's role; null for the title")
    snippet: str = Field(description="the text around the match ('…' where it is cut), plain text")
    highlights: list[list[int]] = Field(description="[start, end) character offsets of the matched terms in snippet")


class SearchResult(Conversation):
    matches: list[SearchMatch] = Field(description="where it matched: the title first, then the best matching "
                                                   "messages (of any branch), at most 3 in all")


class SearchList(BaseModel):
    """One page of the conversations found, paged as the list is (?after=last_id while has_more)."""
    object: Literal["list"]
    data: list[SearchResult] = Field(description="most recently updated first")
    first_id: Optional[str]
    last_id: Optional[str]
    has_more: bool


class ExportedMessage(BaseModel):
    id: Text = Field(description="unique in the export; a new one is made on import")
    parent_id: Optional[Text] = Field(description="an earlier message of the export; null for a first message")
    role: Literal["user", "assistant"]
    content: Text
    reasoning_content: Optional[Text] = None
    created: Optional[Float] = Field(None, ge=0, allow_inf_nan=False, description="Unix time; absent: the import's")
    status: Literal["complete", "generating", "stopped", "error"] = "complete"
    finish_reason: Optional[Literal["stop", "length", "abort", "error"]] = None
    stats: Optional[Stats] = None


class ConversationExport(BaseModel):
    """The whole tree of a conversation: GET .../export gives it, POST /v1/conversations/import takes it."""
    model_config = example({"object": "conversation.export", "version": 1, "title": "Trip planning",
                            "system_prompt": None, "params": {"temperature": 0.7},
                            "messages": [{"id": "1", "parent_id": None, "role": "user", "content": "Hi"},
                                         {"id": "2", "parent_id": "1", "role": "assistant", "content": "Hello!"}],
                            "current_message_id": "2"})

    object: Literal["conversation.export"] = "conversation.export"
    version: Literal[1] = 1
    title: Text = Field(DEFAULT_TITLE, min_length=1, max_length=MAX_TITLE_CHARS)
    system_prompt: Optional[Text] = Field(None, max_length=MAX_SYSTEM_PROMPT_CHARS)
    params: Params = Field(default_factory=Params)
    created: Optional[Float] = Field(None, ge=0, allow_inf_nan=False, description="Unix time; absent: the import's")
    updated: Optional[Float] = Field(None, description="when it was exported from; ignored on import")
    current_message_id: Optional[Text] = Field(None, description="the leaf of the branch on show; absent or null: "
                                                                 "the newest leaf of the last first message")
    messages: list[ExportedMessage] = Field(default_factory=list, max_length=MAX_IMPORT_MESSAGES,
                                            description="every message of the tree, parents before their replies "
                                                        "(creation order)")


class EffectiveValue(BaseModel):
    value: Union[float, int, list[str], None] = Field(description="what an answer is sampled with (null: none, "
                                                                  "e.g. max_tokens: until a stop token or the context "
                                                                  "is full; seed: random)")
    source: Literal["conversation", "server", "model", "default"] = Field(
        description="conversation: its params; server: --override-generation-config; model: the model's "
                    "generation_config; default: chatserve's built-in value")


EffectiveParams = create_model("EffectiveParams", __doc__="Each sampling value of Params, as answers get it.",
                               **{name: (EffectiveValue, ...) for name in Params.model_fields})


class EffectiveSampling(BaseModel):
    object: Literal["conversation.sampling"]
    conversation_id: Optional[str] = Field(description="null for GET /v1/conversations/sampling: what a new "
                                                       "conversation gets")
    params: EffectiveParams = Field(description="a message's own values still override these, for its answer")
    context_length: int = Field(description="the model's context in tokens (prompt and answer together)")


# The answer stream's events (the data of each SSE event but the last, "[DONE]").


class MessageEvent(BaseModel):
    """A message just stored: the new user message (not for regenerate or continue), then the answer,
    generating (for continue: the answer being continued, with its text so far)."""
    type: Literal["message"]
    message: Message


class DeltaEvent(BaseModel):
    """New text of the answer: only the keys that have some."""
    type: Literal["delta"]
    message_id: str
    content: str = Field("", description="absent when none")
    reasoning_content: str = Field("", description="absent when none")


class DoneEvent(BaseModel):
    """The answer as saved (status complete, or stopped: by .../stop or a server shutdown), with its stats."""
    type: Literal["done"]
    message: Message
    conversation: Conversation = Field(description="without messages")


class ErrorEvent(BaseModel):
    """The engine failed mid-answer; the answer is saved with status error."""
    type: Literal["error"]
    error: ErrorDetail


ANSWER_EVENTS = (MessageEvent, DeltaEvent, DoneEvent, ErrorEvent)


# -- what /openapi.json says the routes return besides their response_model ----------------------

ERRORS = {
    400: "Bad input (type invalid_request_error; param names the field, e.g. 'content' or 'params.top_p'): a "
         "body that fails validation or is not JSON, a request that does not fit the tree (e.g. a parent_id "
         "that is a user message), or a prompt the model cannot take (too long, max_tokens over the context)",
    401: "Without 'Authorization: Bearer <key>', or with an unknown key, when the server has keys (--api-key, "
         "--api-key-file; code invalid_api_key)",
    404: "No such conversation of this user (type not_found_error, param id, code conversation_not_found: "
         "another user's conversation is not found either), or no such message in it (param message_id, or "
         "parent_id for POST .../messages; code message_not_found)",
    409: "The conversation is already answering (code conversation_busy, param null): wait for the stream's "
         "end, or stop the answer (POST .../messages/{message_id}/stop)",
    429: "--max-queue generations are in flight (type rate_limit_exceeded, code server_busy): retry after "
         "Retry-After seconds",
    503: "The model is still loading (code model_not_ready), or the server is shutting down (code "
         "shutting_down, with Retry-After)",
}


def errors(*statuses: int) -> dict:
    """The route's error responses: these, 401, and the rest as "default"."""
    return documented_errors({status: ERRORS[status] for status in statuses})


def _event_schema(model: type[BaseModel]) -> dict:
    """model's JSON schema, the models in it referred to in /openapi.json's components (which the
    JSON routes' response models put there)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    schema.pop("$defs", None)
    return schema


SSE_DESCRIPTION = """The answer as server-sent events: each is one `data: <JSON>` line and a blank line.

1. `{"type": "message", "message": Message}`: the new user message (not for regenerate or continue),
   then the new answer (status generating), both already stored; for continue, only the answer
   being continued (status generating, its content so far: the deltas append to it).
2. `{"type": "delta", "message_id", "content"?, "reasoning_content"?}`: new text of the answer; only
   the keys that have some.
3. `{"type": "done", "message": Message, "conversation": Conversation}`: the answer as saved, with its
   stats (status complete; stopped after .../stop or when the server shuts down); the conversation
   without messages. Left out when the conversation was deleted meanwhile.
   Or, when the engine failed: `{"type": "error", "error": {message, type, param, code}}` (the
   answer is saved with status error).
4. `data: [DONE]`.

Closing the connection stops the answer: its text so far is kept, status stopped."""

SSE_RESPONSE = {200: {"description": SSE_DESCRIPTION, "content": {"text/event-stream": {
    "schema": {"type": "string"},
    # How FastAPI's own SSE routes describe each event (OpenAPI 3.2's itemSchema).
    "itemSchema": {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"type": "string", "contentMediaType": "application/json",
         "contentSchema": {"oneOf": [_event_schema(model) for model in ANSWER_EVENTS]}},
        {"const": "[DONE]"}]}}}}}}}


# -- lookups --------------------------------------------------------------------------------------


def get_store(request: Request) -> Store:
    store = request.app.state.store
    if store is None:
        raise APIError(503, "the conversation store is not open", "service_unavailable_error")
    return store


def current_user(request: Request) -> str:
    """The user check_api_key found (the router's dependency, so it has run)."""
    return request.state.user


def find_conversation(store: Store, conv_id: str, user: str) -> dict:
    """The user's conversation, else 404: another user's is not found either."""
    conv = store.conversation(conv_id, user)
    if conv is None:
        raise APIError(404, f"no conversation {conv_id!r}", "not_found_error", param="id",
                       code="conversation_not_found")
    return conv


def find_message(store: Store, conv_id: str, message_id: str, param: str = "message_id",
                 role: Optional[str] = None, wrong_role: str = "") -> dict:
    """The message, else 404; with role, a message of another role is a 400 saying wrong_role."""
    msg = store.message(conv_id, message_id)
    if msg is None:
        raise APIError(404, f"no message {message_id!r} in conversation {conv_id!r}", "not_found_error",
                       param=param, code="message_not_found")
    if role is not None and msg["role"] != role:
        name = "message" if param == "message_id" else param
        raise APIError(400, f"{name} {message_id!r} {wrong_role}", param=param)
    return msg


def check_idle(app: FastAPI, conv_id: str) -> None:
    if conv_id in app.state.answers:
        raise APIError(409, f"conversation {conv_id!r} is already generating an answer; wait for it or stop it "
                            "(POST .../messages/{message_id}/stop)", code="conversation_busy")


class Tree:
    """A conversation's messages as a tree: branches, siblings, leaves."""

    def __init__(self, messages: list[dict]):
        self.messages = {m["id"]: m for m in messages}
        self.children: dict[Optional[str], list[str]] = defaultdict(list)  # None: the roots
        for m in messages:  # in creation order
            self.children[m["parent_id"]].append(m["id"])

    def branch(self, leaf_id: Optional[str]) -> list[dict]:
        """Root first, down to leaf_id."""
        out = []
        while leaf_id is not None:
            msg = self.messages[leaf_id]
            out.append(msg)
            leaf_id = msg["parent_id"]
        return out[::-1]

    def leaf_below(self, message_id: str) -> str:
        """Down from message_id by the most recently created child at each level."""
        while self.children.get(message_id):
            message_id = self.children[message_id][-1]
        return message_id

    def subtree(self, message_id: str) -> list[str]:
        """message_id and every message below it, parents first."""
        out, stack = [], [message_id]
        while stack:
            out.append(stack.pop())
            stack.extend(reversed(self.children.get(out[-1], [])))
        return out

    def json(self, msg: dict) -> dict:
        siblings = self.children[msg["parent_id"]]
        return {"id": msg["id"], "object": "conversation.message", "parent_id": msg["parent_id"],
                "role": msg["role"], "content": msg["content"], "reasoning_content": msg["reasoning_content"],
                "created": int(msg["created"]), "status": msg["status"], "finish_reason": msg["finish_reason"],
                "siblings": list(siblings), "sibling_index": siblings.index(msg["id"]), "stats": msg["stats"]}


def cache_state(app: FastAPI, store: Store, conv: dict) -> dict:
    """How much of the current branch's tokens (its last answer's prompt + output) the prefix cache
    still holds. The block manager belongs to the engine thread; reading its hash table from here
    cannot crash (the GIL makes each dict lookup atomic) but may be a step out of date, which is
    fine for a hint."""
    engine: Optional[AsyncEngine] = app.state.engine
    ids = store.answer_token_ids(conv["current_message_id"]) if engine is not None else None
    cached = engine.engine.block_manager.cached_prefix_tokens(ids) if ids else 0
    return {"warm": cached > 0, "cached_tokens": cached}


def conversation_json(app: FastAPI, store: Store, conv: dict, with_messages: bool = False) -> dict:
    out = {"id": conv["id"], "object": "conversation", "title": conv["title"], "created": int(conv["created"]),
           "updated": int(conv["updated"]), "system_prompt": conv["system_prompt"],
           "params": {name: conv["params"].get(name) for name in Params.model_fields},  # older ones lack some
           "current_message_id": conv["current_message_id"], "cache": cache_state(app, store, conv)}
    if with_messages:
        tree = Tree(store.messages(conv["id"]))
        out["messages"] = [tree.json(m) for m in tree.branch(conv["current_message_id"])]
    return out


# -- prompts --------------------------------------------------------------------------------------


def chat_messages(system_prompt: Optional[str], branch: list[dict]) -> list[dict]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": m["role"], "content": m["content"]} for m in branch]


def prompt_key(model: str, text: str) -> str:
    """Names the rendered history an answer was prompted with (model included: its ids mean nothing to another)."""
    return hashlib.sha256(f"{model}\0{text}".encode()).hexdigest()


# Stands in for the previous answer's text when rendering, to find what the template puts after it.
ANSWER_MARK = "\x00chatserve-answer\x00"


def build_prompt(render: Callable[..., str], tokenizer, model: str, messages: list[dict],
                 previous: Optional[dict]) -> tuple[list[int], str]:
    """(prompt ids, prompt key) for answering `messages` (which end with the user's message);
    render(messages) renders the chat template (streaming.with_chat_template), the control tokens
    spelled in the messages marked, to be encoded as text by encode_chat.

    previous: the answer just before that message (messages[-2]), with its "prompt_token_ids",
    "output_token_ids", "prompt_key" and "finish_reason", or None. While the history it was prompted
    with is unchanged, the prompt extends its exact ids; otherwise the chat is rendered afresh."""
    text = render(messages)
    ids = None
    if previous is not None and len(messages) >= 3:
        with suppress(ValueError):  # a template that rejects the stand-in: render afresh
            ids = _extend(render, tokenizer, model, messages, text, previous)
    if ids is None:
        ids = encode_chat(tokenizer, text)  # the rendered text carries its own BOS
    return ids, prompt_key(model, text)


def _extend(render: Callable[..., str], tokenizer, model: str, messages: list[dict], text: str,
            previous: dict) -> Optional[list[int]]:
    """previous prompt ids + previous output ids + the template's text after that answer (its
    closing, the user's turn, the new answer's opening), or None when those do not line up.

    The template's text after the answer is found by rendering a stand-in in its place, rather
    than by comparing renders with and without the new message: templates such as Qwen3's render
    the last answer differently once a user message follows it."""
    output_ids = previous["output_token_ids"] or []
    before = render(messages[:-2])  # what the previous answer was prompted with
    if not previous["prompt_token_ids"] or prompt_key(model, before) != previous["prompt_key"]:
        return None  # the system prompt, the template or the model changed since
    marked = render(messages[:-2] + [{**messages[-2], "content": ANSWER_MARK}, messages[-1]])
    if marked.count(ANSWER_MARK) != 1:
        return None
    after = marked.split(ANSWER_MARK)[1]  # e.g. "<|im_end|>\n<|im_start|>user\n...<|im_start|>assistant\n"
    if not (text.startswith(before) and text.endswith(after) and len(before) + len(after) <= len(text)):
        return None
    if previous["finish_reason"] == "stop" and output_ids:
        # It ended on a stop token, usually the one the template closes the turn with: keep one.
        stop_text = tokenizer.decode(output_ids[-1:], skip_special_tokens=False)
        if stop_text and after.startswith(stop_text):
            after = after[len(stop_text):]
    return previous["prompt_token_ids"] + output_ids + encode_chat(tokenizer, after)


def answer_params(body: Params, conv_params: dict, defaults: dict) -> SamplingParams:
    """The message's values, else the conversation's, else the model's generation_config."""
    values = {name: getattr(body, name, None) for name in Params.model_fields}
    return sampling_params({name: conv_params.get(name) if value is None else value
                            for name, value in values.items()}, defaults)


def effective_sampling(conv_params: dict, engine: AsyncEngine) -> dict:
    """Each sampling value an answer gets when its message sets none, and where it comes from: the
    conversation's params, else (for the values a generation_config may set, DEFAULTABLE) the
    operator's --override-generation-config, else the model's generation_config, else the built-in
    default: the order answer_params() applies them in."""
    server, model = engine.engine.config.override_generation_config, engine.engine.loaded.generation_config
    builtin = SamplingParams()
    out = {}
    for name in Params.model_fields:
        value, source = conv_params.get(name), "conversation"
        if value is None and name in DEFAULTABLE and server.get(name) is not None:
            value, source = server[name], "server"
        elif value is None and name in DEFAULTABLE and model.get(name) is not None:
            value, source = model[name], "model"
        elif value is None:
            value, source = getattr(builtin, name), "default"
        if name == "stop":
            value = [value] if isinstance(value, str) else list(value)
        out[name] = {"value": value, "source": source}
    return out


def sampling_json(engine: AsyncEngine, conv: Optional[dict]) -> dict:
    return {"object": "conversation.sampling", "conversation_id": conv["id"] if conv else None,
            "params": effective_sampling(conv["params"] if conv else {}, engine),
            "context_length": engine.engine.max_model_len}


def title_from(content: str) -> Optional[str]:
    """The first line, cut at TITLE_CHARS; None for a blank message."""
    lines = content.strip().splitlines()
    return lines[0].strip()[:TITLE_CHARS] if lines else None


def imported_messages(body: ConversationExport) -> tuple[list[dict], Optional[str]]:
    """The export's messages with fresh ids, checked to make a tree (a 400 naming the field where not),
    and the new id of the message to show."""
    new_ids: dict[str, str] = {}
    roles: dict[str, str] = {}
    answered: set[str] = set()
    out = []
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        if m.id in new_ids:
            raise APIError(400, f"{where}.id: {m.id!r} is the id of an earlier message too", param=f"{where}.id")
        if m.parent_id is None and m.role != "user":
            raise APIError(400, f"{where}: a first message (parent_id null) must be the user's", param=f"{where}.role")
        if m.parent_id is not None:
            if m.parent_id not in new_ids:
                raise APIError(400, f"{where}.parent_id: {m.parent_id!r} is not the id of an earlier message (parents "
                                    "come before their replies)", param=f"{where}.parent_id")
            if roles[m.parent_id] == m.role:
                raise APIError(400, f"{where}: a {m.role} message cannot follow a {m.role} message (user and assistant "
                                    "take turns)", param=f"{where}.role")
            answered.add(m.parent_id)
        new_ids[m.id], roles[m.id] = new_id("msg"), m.role
        answer = m.role == "assistant"
        status, reason = (m.status, m.finish_reason) if answer else ("complete", None)
        if status == "generating":  # cut off where it was exported from
            status, reason = "stopped", "abort"
        out.append({"id": new_ids[m.id], "parent_id": new_ids.get(m.parent_id), "role": m.role, "content": m.content,
                    "reasoning_content": m.reasoning_content if answer else None,
                    "created": time.time() if m.created is None else m.created, "status": status,
                    "finish_reason": reason if answer else None,
                    "stats": m.stats.model_dump() if answer and m.stats else None})
    unanswered = [i for i, m in enumerate(body.messages) if m.role == "user" and m.id not in answered]
    if unanswered:
        where = f"messages[{unanswered[0]}]"
        raise APIError(400, f"{where}: a user message without an answer (every question of a conversation has one)",
                       param=where)
    current = body.current_message_id
    if current is not None and roles.get(current) != "assistant":
        raise APIError(400, f"current_message_id: {current!r} is not the id of an answer in messages",
                       param="current_message_id")
    if current is not None:
        return out, new_ids[current]
    roots = [m["id"] for m in out if m["parent_id"] is None]
    return out, Tree(out).leaf_below(roots[-1]) if roots else None


def markdown_export(conv: dict, branch: list[dict]) -> str:
    """The branch as a Markdown document: the title, the system prompt, then each message under
    its speaker's heading (an answer's reasoning folded in a <details> block)."""
    parts = [f"# {conv['title']}", ""]
    if conv["system_prompt"]:
        parts += ["## System", "", conv["system_prompt"], ""]
    for m in branch:
        parts += ["## You" if m["role"] == "user" else "## Assistant", ""]
        if m["reasoning_content"]:
            parts += ["<details><summary>Reasoning</summary>", "", m["reasoning_content"], "", "</details>", ""]
        parts += [m["content"], ""]
        if m["role"] == "assistant" and m["status"] != "complete":
            parts += [f"*({m['status']})*", ""]
    return "\n".join(parts)


# -- one answer -----------------------------------------------------------------------------------


class Answer:
    """One answer being generated: turns engine outputs into SSE events, saves the text as it
    grows, and records its end exactly once, however the stream ends."""

    def __init__(self, app: FastAPI, store: Store, conv_id: str, message_id: str, gen: Optional[Generation],
                 parser: Optional[ReasoningParser], content: str = "", reasoning: str = "",
                 output_ids: tuple[int, ...] = ()):
        """content, reasoning, output_ids: the answer so far, which this generation continues."""
        self.app, self.store, self.conv_id, self.message_id, self.gen = app, store, conv_id, message_id, gen
        self.request_id = message_id  # the engine's id of this generation (/stop aborts it)
        self.parser = parser
        self.content: list[str] = [content] if content else []
        self.reasoning: list[str] = [reasoning] if reasoning else []
        self.output_ids: list[int] = list(output_ids)
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None
        self.last_save = time.monotonic()
        self.finished = False
        self.ended = asyncio.Event()  # set once the end is saved: /stop waits for it

    def feed(self, out: RequestOutput) -> Optional[dict]:
        """The delta event for one engine output, if it has new text."""
        self.output_ids.extend(out.token_ids)
        if self.parser is None:
            reasoning, content = "", out.text
        else:
            reasoning, content = self.parser.feed(out.text)
            if out.finished:
                more = self.parser.flush()
                reasoning, content = reasoning + more[0], content + more[1]
        if out.finished:
            self.finish_reason, self.error = out.finish_reason, out.error
        self.content.append(content)
        self.reasoning.append(reasoning)
        delta = {k: v for k, v in (("content", content), ("reasoning_content", reasoning)) if v}
        return {"type": "delta", "message_id": self.message_id, **delta} if delta else None

    def save(self, status: str = "generating", stats: Optional[dict] = None) -> None:
        thought = self.parser is not None and self.parser.thought
        try:
            self.store.save_answer(self.conv_id, self.message_id, "".join(self.content),
                                   "".join(self.reasoning) if thought else None, self.output_ids, status,
                                   None if status == "generating" else (self.finish_reason or "abort"), stats)
        except sqlite3.Error as exc:  # e.g. the store closed at shutdown: the next start marks it stopped
            log.warning("could not save answer %s: %s", self.message_id, exc)
        self.last_save = time.monotonic()

    def stats(self) -> dict:
        usage, out = self.gen.usage(), self.gen.last
        elapsed, ttft, n = time.monotonic() - self.gen.start, out.time_to_first_token, out.num_output_tokens
        rate = (n - 1) / (elapsed - ttft) if ttft is not None and n > 1 and elapsed > ttft else 0.0
        return {"prompt_tokens": usage["prompt_tokens"],
                "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                "completion_tokens": usage["completion_tokens"], "time_to_first_token": ttft,
                "tokens_per_second": round(rate, 2)}

    @property
    def status(self) -> str:
        if self.finish_reason in ("stop", "length"):
            return "complete"
        return "error" if self.finish_reason == "error" else "stopped"  # None: the client went away

    def finish(self) -> None:
        """Save the end and free the conversation for its next message (before the done event, so a
        client may post again as soon as it reads it)."""
        if self.finished:
            return
        self.finished = True
        try:
            self.save(self.status, self.stats())
        finally:
            if self.app.state.answers.get(self.conv_id) is self:
                del self.app.state.answers[self.conv_id]
            self.ended.set()

    async def end(self) -> None:
        """finish(), then end the engine request (aborting it if still running) and log it."""
        try:
            self.finish()
        finally:
            await self.gen.close()

    async def events(self, opening: list[dict]) -> AsyncIterator[str]:
        try:
            for msg in opening:
                yield sse({"type": "message", "message": msg})
            while self.finish_reason is None:
                out = await self.gen.next()
                delta = self.feed(out)
                if delta:
                    yield sse(delta)
                if self.finish_reason is None and time.monotonic() - self.last_save >= SAVE_INTERVAL_S:
                    self.save()
            self.finish()
            if self.status == "error":
                yield sse({"type": "error", "error": {"message": self.error or "the engine failed",
                                                      "type": "server_error", "param": None, "code": None}})
            else:
                conv = self.store.conversation(self.conv_id)
                message = self.store.message(self.conv_id, self.message_id)
                if conv is not None and message is not None:  # else deleted meanwhile
                    yield sse({"type": "done", "message": Tree(self.store.messages(self.conv_id)).json(message),
                               "conversation": conversation_json(self.app, self.store, conv)})
            yield sse("[DONE]")
        finally:
            await self.end()


class AnswerResponse(ClosingStreamingResponse):
    """Also ends the answer when its body never ran (the client left before the first byte)."""

    def __init__(self, answer: Answer, opening: list[dict]):
        super().__init__(answer.events(opening), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.answer = answer

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.answer.end()


async def start_answer(request: Request, engine: AsyncEngine, store: Store, conv: dict, parent_id: Optional[str],
                       user_content: Optional[str], body: Params) -> Response:
    """Answer under parent_id: a new user message (user_content) first, or, for a regenerate
    (user_content None), a new answer to the user message parent_id."""
    app, conv_id = request.app, conv["id"]
    check_idle(app, conv_id)
    tree = Tree(store.messages(conv_id))
    branch = tree.branch(parent_id)
    user = None
    if user_content is not None:
        user = {"id": new_id("msg"), "parent_id": parent_id, "role": "user", "content": user_content,
                "status": "complete"}
        branch.append(user)
    previous = branch[-2] if len(branch) >= 2 and branch[-2]["role"] == "assistant" else None
    if previous is not None:
        prompt_ids, output_ids, key = store.token_ids(previous["id"])
        previous = {**previous, "prompt_token_ids": prompt_ids, "output_token_ids": output_ids, "prompt_key": key}
    tokenizer, messages = engine.engine.tokenizer, chat_messages(conv["system_prompt"], branch)
    check_text_size(request, engine, messages, "content")
    prompt_ids, key = await with_chat_template(
        request, engine, lambda render: build_prompt(render, tokenizer, app.state.model_name, messages, previous),
        param="content")
    params = answer_params(body, conv["params"], engine.engine.generation_config)

    message_id = new_id("msg")  # also the engine's request id (Answer.request_id), for /stop
    assistant = {"id": message_id, "parent_id": branch[-1]["id"], "role": "assistant", "content": "",
                 "status": "generating"}
    title = title_from(user_content) if user and parent_id is None and conv["title"] == DEFAULT_TITLE else None
    parser = ReasoningParser(prompt_opens_reasoning(tokenizer, prompt_ids)) if is_reasoning_model(tokenizer) else None
    answer = Answer(app, store, conv_id, message_id, None, parser)
    return await stream_answer(request, engine, answer, prompt_ids, params, "content",
                               lambda: store.start_answer(conv_id, user, assistant, prompt_ids, key, title),
                               [m["id"] for m in ([user] if user else []) + [assistant]])


async def stream_answer(request: Request, engine: AsyncEngine, answer: "Answer", prompt_ids: list[int],
                        params: SamplingParams, prompt_param: str, save_start: Callable[[], None],
                        opening_ids: list[str]) -> Response:
    """Start the engine on prompt_ids for `answer` and stream it. save_start() stores the answer's
    start once the engine has taken the prompt (a prompt it refuses is a 400 naming prompt_param,
    and nothing is stored); opening_ids: the messages the stream opens with."""
    app, store, conv_id, message_id = request.app, answer.store, answer.conv_id, answer.message_id
    check_idle(app, conv_id)  # again: another answer may have started while the template rendered
    check_capacity(request)
    app.state.answers[conv_id] = None  # taken before the first await: a second message now gets 409
    gen = None
    try:
        gen = Generation(request, engine.generate({"prompt_token_ids": prompt_ids}, params, answer.request_id),
                         answer.request_id)
        try:
            await gen.first()  # the engine refusing the prompt is a 400 before anything is stored
        except APIError as exc:
            if exc.param == "messages":  # the engine's name for the prompt
                exc.param = prompt_param
            raise
        find_conversation(store, conv_id, current_user(request))  # it may have been deleted meanwhile
        save_start()
    except BaseException:
        app.state.answers.pop(conv_id, None)
        if gen is not None:
            await gen.close()  # a no-op when first() failed
        raise
    answer.gen = gen
    app.state.answers[conv_id] = answer
    tree = Tree(store.messages(conv_id))
    return AnswerResponse(answer, [tree.json(tree.messages[i]) for i in opening_ids])


def continue_prompt(render: Callable[..., str], tokenizer, model: str, messages: list[dict], answer: dict,
                    stored: tuple, eos_token_ids: list[int]) -> tuple[list[int], list[int], str]:
    """(prompt ids, the answer's ids so far, prompt key) to go on with `answer`, which answered
    `messages` (ending with the user's message). While that history renders as it did, these are
    the answer's stored ids, token-exact: nothing re-rendered, no end of turn inserted (one the
    answer stopped on is dropped). Otherwise (a new system prompt, another model or template) the
    history is rendered afresh and the answer's text encoded after it."""
    text = render(messages)
    key = prompt_key(model, text)
    prompt_ids, output_ids, stored_key = stored
    if prompt_ids and stored_key == key:
        output_ids = list(output_ids or [])
    else:
        prompt_ids = encode_chat(tokenizer, text)
        said = answer["content"]
        if answer["reasoning_content"] is not None:
            said = f"{THINK_START}\n{answer['reasoning_content']}\n{THINK_END}\n\n{said}"
        output_ids = tokenizer.encode(said, add_special_tokens=False)
    if answer["finish_reason"] == "stop" and output_ids and output_ids[-1] in eos_token_ids:
        output_ids = output_ids[:-1]
    return prompt_ids, output_ids, key


async def continue_answer(request: Request, engine: AsyncEngine, store: Store, conv: dict, msg: dict,
                          body: Params) -> Response:
    """Extend the answer msg by a new generation, appended to the same message."""
    app, conv_id = request.app, conv["id"]
    tree = Tree(store.messages(conv_id))
    if tree.children.get(msg["id"]):
        raise APIError(400, f"message {msg['id']!r} has replies; only the last answer of a branch can be continued "
                            "(regenerate it instead, or continue the branch's last answer)", param="message_id")
    check_idle(app, conv_id)
    tokenizer, messages = engine.engine.tokenizer, chat_messages(conv["system_prompt"], tree.branch(msg["parent_id"]))
    check_text_size(request, engine, [messages, msg["content"], msg["reasoning_content"]], "message_id")
    stored = store.token_ids(msg["id"])
    prompt_ids, output_ids, key = await with_chat_template(
        request, engine, lambda render: continue_prompt(render, tokenizer, app.state.model_name, messages, msg,
                                                        stored, engine.engine.eos_token_ids),
        param="message_id")
    params = answer_params(body, conv["params"], engine.engine.generation_config)
    parser = None
    if is_reasoning_model(tokenizer):
        # Where the answer so far left the reasoning: replay its text (what it held back was flushed into it).
        parser = ReasoningParser(prompt_opens_reasoning(tokenizer, prompt_ids))
        parser.feed(tokenizer.decode(output_ids, skip_special_tokens=True))
        parser.held = ""
    answer = Answer(app, store, conv_id, msg["id"], None, parser, msg["content"], msg["reasoning_content"] or "",
                    output_ids)
    answer.request_id = new_id(msg["id"])  # the message's last generation may still be leaving the engine
    return await stream_answer(request, engine, answer, prompt_ids + output_ids, params, "message_id",
                               lambda: store.start_continue(conv_id, msg["id"], prompt_ids, output_ids, key),
                               [msg["id"]])


# -- routes ---------------------------------------------------------------------------------------


@router.post("", status_code=201, response_model=ConversationWithMessages, responses=errors(400))
async def create_conversation(body: CreateConversation, request: Request, store: Store = Depends(get_store)) -> dict:
    """A new conversation, with "messages": [], owned by the user whose key created it."""
    conv = store.create_conversation(body.title, body.system_prompt, (body.params or Params()).model_dump(),
                                     owner=current_user(request))
    return {**conversation_json(request.app, store, conv), "messages": []}


@router.get("", response_model=ConversationList, responses=errors(400))
async def list_conversations(request: Request, store: Store = Depends(get_store),
                             limit: int = Query(LIST_LIMIT, ge=1, le=MAX_LIST_LIMIT,
                                                description="conversations on this page"),
                             after: Optional[str] = Query(None, description="a conversation's id: the page starts "
                                                          "after it (the last_id of the page before)")) -> dict:
    """The user's conversations, most recently updated first, without messages, a page at a time."""
    try:
        convs = store.conversations(current_user(request), limit + 1, after)
    except KeyError:
        raise APIError(400, f"after: no conversation {after!r} to list after (deleted meanwhile?); list again from "
                            "the start", param="after") from None
    page = [conversation_json(request.app, store, c) for c in convs[:limit]]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(convs) > limit}


@router.get("/search", response_model=SearchList, responses=errors(400))
async def search_conversations(request: Request, store: Store = Depends(get_store),
                               q: str = Query(min_length=1, max_length=MAX_QUERY_CHARS,
                                              description="words to find in titles and message text, in SQLite "
                                                          "FTS5's query syntax: all the words (AND), \"a phrase\", "
                                                          "OR, NOT, pref* for a prefix"),
                               limit: int = Query(SEARCH_LIMIT, ge=1, le=MAX_LIST_LIMIT,
                                                  description="conversations on this page"),
                               after: Optional[str] = Query(None, description="a conversation's id: the page starts "
                                                            "after it (the last_id of the page before)")) -> dict:
    """The user's conversations whose title or any message (of any branch) matches q, most recently
    updated first, a page at a time, each with where it matched."""
    user = current_user(request)
    try:
        convs = store.conversations(user, limit + 1, after, query=q)
        page = [{**conversation_json(request.app, store, c), "matches": store.matches(c["id"], q, MATCHES_SHOWN)}
                for c in convs[:limit]]
    except KeyError:
        raise APIError(400, f"after: no conversation {after!r} found to page after (deleted meanwhile?); search "
                            "again from the start", param="after") from None
    except sqlite3.OperationalError as exc:  # FTS5 refusing the query: the user's to fix
        raise APIError(400, f"q: cannot read the search query {q!r} ({exc}); put words with characters other "
                            "than letters and digits in double quotes, e.g. \"C++\"", param="q") from None
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(convs) > limit}


@router.get("/sampling", response_model=EffectiveSampling, responses=errors(503))
async def new_conversation_sampling(engine: AsyncEngine = Depends(get_engine)) -> dict:
    """The sampling values a new conversation's answers get, each with its source (no conversation
    params yet: the server's, the model's or the built-in defaults)."""
    return sampling_json(engine, None)


@router.post("/import", status_code=201, response_model=ConversationWithMessages, responses=errors(400))
async def import_conversation(body: ConversationExport, request: Request, store: Store = Depends(get_store)) -> dict:
    """A new conversation of this user from an export (GET .../export): the same tree, new ids."""
    messages, current = imported_messages(body)
    conv = store.import_conversation(current_user(request), body.title, body.system_prompt, body.params.model_dump(),
                                     time.time() if body.created is None else body.created, messages, current)
    return conversation_json(request.app, store, conv, with_messages=True)


@router.get("/{conv_id}", response_model=ConversationWithMessages, responses=errors(404))
async def get_conversation(conv_id: str, request: Request, store: Store = Depends(get_store)) -> dict:
    """A conversation with the branch on show."""
    return conversation_json(request.app, store, find_conversation(store, conv_id, current_user(request)), with_messages=True)


@router.patch("/{conv_id}", response_model=ConversationWithMessages, responses=errors(400, 404))
async def update_conversation(conv_id: str, body: UpdateConversation, request: Request,
                              store: Store = Depends(get_store)) -> dict:
    """Change the fields sent (rename: send title); in params, only the keys sent (null unsets one).
    Allowed while an answer streams: a new system prompt or params apply from the next answer."""
    conv = find_conversation(store, conv_id, current_user(request))
    sent = body.model_fields_set
    values = {name: getattr(body, name) for name in ("title", "system_prompt") if name in sent}
    if body.params is not None:
        values["params"] = {**conv["params"], **body.params.model_dump(include=body.params.model_fields_set)}
    store.update_conversation(conv_id, **values)
    return conversation_json(request.app, store, find_conversation(store, conv_id, current_user(request)), with_messages=True)


@router.delete("/{conv_id}", response_model=DeletedConversation, responses=errors(404))
async def delete_conversation(conv_id: str, request: Request, store: Store = Depends(get_store)) -> dict:
    """Delete a conversation and all its messages; an answer it is generating is stopped."""
    find_conversation(store, conv_id, current_user(request))
    answer: Optional[Answer] = request.app.state.answers.get(conv_id)
    if answer is not None and request.app.state.engine is not None:
        request.app.state.engine.abort(answer.request_id)
    store.delete_conversation(conv_id)
    return {"id": conv_id, "object": "conversation.deleted", "deleted": True}


@router.post("/{conv_id}/messages", status_code=200, response_class=AnswerResponse,
             responses={**SSE_RESPONSE, **errors(400, 404, 409, 429, 503)})
async def post_message(conv_id: str, body: PostMessage, request: Request, store: Store = Depends(get_store),
                       engine: AsyncEngine = Depends(get_engine)) -> Response:
    """A new user message under parent_id, then its answer, streamed."""
    conv = find_conversation(store, conv_id, current_user(request))
    parent_id = body.parent_id if "parent_id" in body.model_fields_set else conv["current_message_id"]
    if parent_id is not None:
        find_message(store, conv_id, parent_id, "parent_id", "assistant",
                     "is a user message; a new message follows an answer (to change a message, use .../edit)")
    return await start_answer(request, engine, store, conv, parent_id, body.content, body)


@router.post("/{conv_id}/messages/{message_id}/edit", status_code=200, response_class=AnswerResponse,
             responses={**SSE_RESPONSE, **errors(400, 404, 409, 429, 503)})
async def edit_message(conv_id: str, message_id: str, body: EditMessage, request: Request,
                       store: Store = Depends(get_store), engine: AsyncEngine = Depends(get_engine)) -> Response:
    """A new user message beside the user message message_id (same parent), then its answer, streamed."""
    conv = find_conversation(store, conv_id, current_user(request))
    msg = find_message(store, conv_id, message_id, role="user",
                       wrong_role="is an answer; edit a user message, or regenerate this one")
    return await start_answer(request, engine, store, conv, msg["parent_id"], body.content, body)


@router.post("/{conv_id}/messages/{message_id}/regenerate", status_code=200, response_class=AnswerResponse,
             responses={**SSE_RESPONSE, **errors(400, 404, 409, 429, 503)})
async def regenerate(conv_id: str, message_id: str, request: Request, body: Optional[Regenerate] = None,
                     store: Store = Depends(get_store), engine: AsyncEngine = Depends(get_engine)) -> Response:
    """A new answer beside the answer message_id (to the same user message), streamed. The body is optional."""
    conv = find_conversation(store, conv_id, current_user(request))
    msg = find_message(store, conv_id, message_id, role="assistant",
                       wrong_role="is a user message; regenerate an answer, or edit this one")
    return await start_answer(request, engine, store, conv, msg["parent_id"], None, body or Regenerate())


@router.get("/{conv_id}/sampling", response_model=EffectiveSampling, responses=errors(404, 503))
async def conversation_sampling(conv_id: str, request: Request, store: Store = Depends(get_store),
                                engine: AsyncEngine = Depends(get_engine)) -> dict:
    """The sampling values this conversation's answers get (a message's own values aside), each with
    its source: the conversation's params, the server's --override-generation-config, the model's
    generation_config, or the built-in default."""
    return sampling_json(engine, find_conversation(store, conv_id, current_user(request)))


@router.get("/{conv_id}/export", response_model=ConversationExport, responses={
    **errors(400, 404), 200: {"description": "format=json: the whole tree (ConversationExport); format=markdown: the "
                                             "branch on show as a Markdown document",
                              "content": {"text/markdown": {"schema": {"type": "string"}}}}})
async def export_conversation(conv_id: str, request: Request, response: Response, store: Store = Depends(get_store),
                              format: Literal["json", "markdown"] = Query(
                                  "json", description="json: the whole tree, for POST /v1/conversations/import; "
                                                      "markdown: the branch on show, to read")):
    """The conversation as a download (Content-Disposition: attachment)."""
    conv = find_conversation(store, conv_id, current_user(request))
    messages = store.messages(conv_id)
    name = re.sub(r"[^\w .-]+", "", conv["title"]).strip()[:80] or "conversation"
    if format == "markdown":
        return Response(markdown_export(conv, Tree(messages).branch(conv["current_message_id"])),
                        media_type="text/markdown; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}.md"'})
    response.headers["Content-Disposition"] = f'attachment; filename="{name}.json"'
    return {"object": "conversation.export", "version": 1, "title": conv["title"],
            "system_prompt": conv["system_prompt"], "params": conv["params"], "created": conv["created"],
            "updated": conv["updated"], "current_message_id": conv["current_message_id"],
            "messages": [{name: m[name] for name in ExportedMessage.model_fields} for m in messages]}


@router.delete("/{conv_id}/messages/{message_id}", response_model=DeletedMessages, responses=errors(404))
async def delete_message(conv_id: str, message_id: str, request: Request, store: Store = Depends(get_store)) -> dict:
    """Delete a message and everything below it in the tree (its replies, their replies, ...). An
    answer that was its question's only one takes the question with it (no question is kept
    unanswered). A branch on show through it moves to the sibling before it (else after it), down to
    its newest leaf, or, with no sibling left, ends at the parent. An answer generating among them is stopped."""
    conv = find_conversation(store, conv_id, current_user(request))
    find_message(store, conv_id, message_id)
    tree = Tree(store.messages(conv_id))
    top = message_id
    parent = tree.messages[message_id]["parent_id"]
    if tree.messages[message_id]["role"] == "assistant" and tree.children[parent] == [message_id]:
        top = parent
    gone = tree.subtree(top)
    current = conv["current_message_id"]
    if current in gone:
        top_parent = tree.messages[top]["parent_id"]
        siblings = tree.children[top_parent]
        at = siblings.index(top)
        rest = siblings[:at][-1:] or siblings[at + 1:at + 2]
        current = tree.leaf_below(rest[0]) if rest else top_parent
    answer: Optional[Answer] = request.app.state.answers.get(conv_id)
    if answer is not None and answer.message_id in gone and request.app.state.engine is not None:
        request.app.state.engine.abort(answer.request_id)
    store.delete_messages(conv_id, gone, current)
    conv = find_conversation(store, conv_id, current_user(request))
    return {"id": message_id, "object": "conversation.message.deleted", "deleted": True, "deleted_ids": gone,
            "conversation": conversation_json(request.app, store, conv, with_messages=True)}


@router.post("/{conv_id}/messages/{message_id}/continue", status_code=200, response_class=AnswerResponse,
             responses={**SSE_RESPONSE, **errors(400, 404, 409, 429, 503)})
async def continue_message(conv_id: str, message_id: str, request: Request, body: Optional[Regenerate] = None,
                           store: Store = Depends(get_store), engine: AsyncEngine = Depends(get_engine)) -> Response:
    """Go on with the answer message_id (one cut by max_tokens or a stop): a new generation appended
    to the same message, streamed. Its prompt is the answer's stored token ids (history and answer
    so far), so nothing is re-rendered. The answer must be its branch's last message. The body is optional."""
    conv = find_conversation(store, conv_id, current_user(request))
    msg = find_message(store, conv_id, message_id, role="assistant",
                       wrong_role="is a user message; continue an answer (to change a message, use .../edit)")
    return await continue_answer(request, engine, store, conv, msg, body or Regenerate())


@router.post("/{conv_id}/messages/{message_id}/stop", response_model=Message, responses=errors(400, 404))
async def stop(conv_id: str, message_id: str, request: Request, store: Store = Depends(get_store)) -> dict:
    """Stop the answer message_id if it is generating (its text so far is kept, status stopped), and
    return it as saved; an answer already ended is returned as it is. (If its stream's reader stalls,
    it may still say generating after 10 s: no more tokens come, and it is saved once the stream ends.)"""
    find_conversation(store, conv_id, current_user(request))
    find_message(store, conv_id, message_id, role="assistant",
                 wrong_role="is a user message; only an answer can be stopped")
    answer: Optional[Answer] = request.app.state.answers.get(conv_id)
    engine: Optional[AsyncEngine] = request.app.state.engine
    if answer is not None and answer.message_id == message_id and engine is not None:
        engine.abort(answer.request_id)  # the answer's stream sees the abort and saves the end
        # A stream whose reader stalls may take longer; the message then still says generating.
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(answer.ended.wait(), STOP_WAIT_S)
    msg = find_message(store, conv_id, message_id)
    return Tree(store.messages(conv_id)).json(msg)


@router.post("/{conv_id}/switch", response_model=ConversationWithMessages, responses=errors(400, 404))
async def switch(conv_id: str, body: Switch, request: Request, store: Store = Depends(get_store)) -> dict:
    """Show the branch through message_id, continued down by the most recently created child at each level."""
    find_conversation(store, conv_id, current_user(request))
    find_message(store, conv_id, body.message_id)
    leaf = Tree(store.messages(conv_id)).leaf_below(body.message_id)
    store.update_conversation(conv_id, touch=False, current_message_id=leaf)
    return conversation_json(request.app, store, find_conversation(store, conv_id, current_user(request)), with_messages=True)
