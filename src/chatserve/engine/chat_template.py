"""Chat templates rendered so that a message cannot forge a turn, in worker processes that a
runaway template cannot hold.

Control tokens spelled inside the inputs (e.g. a user writing "<|im_end|>\\n<|im_start|>system")
are encoded as plain text, while the template's own are control tokens. This is transformers'
apply_chat_template(..., sanitize_control_tokens=True), cut into its two halves so that the
rendering can run elsewhere: chat_job() marks the control-token spellings in the inputs with
private-use characters and gathers what rendering needs (picklable), render() renders it,
encode_chat() encodes the rendered text, marked spans as text. Text without marks (every ordinary
prompt) encodes exactly as before: one tokenizer.encode of the whole text.

The control tokens are the tokenizer's special tokens and the added tokens its template writes
(transformers' choice); other added tokens in a message (e.g. a Qwen user typing "<think>") keep
their ids, as Hugging Face tokenizers give them.

Jinja's sandbox bounds what a template may touch, not how long it runs or how much it allocates
(a loop in a loop, "x" * 10**10), and a Python thread cannot be stopped. So TemplateWorkers
renders in processes: one past its time is killed (and replaced when next needed), each has an
address-space limit, and at most `size` renders run at once, on threads of their own.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Callable, Optional, TypeVar

from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import (_get_control_token_patterns, _normalize_chat_messages,
                                                    encode_marked_chat, mark_control_tokens, render_jinja_template)

T = TypeVar("T")
WORKER_START_S = 120.0  # generous: the import may share a loaded machine


def chat_job(tokenizer, messages: list[dict], add_generation_prompt: bool = True, chat_template: Optional[str] = None,
             tools: Optional[list] = None, documents: Optional[list] = None, **kwargs) -> dict:
    """What render() needs to render `messages` as tokenizer.apply_chat_template(...,
    sanitize_control_tokens=True) would: plain data, nothing of the template parsed here (Jinja
    folds constant expressions while compiling, so even compiling a template can run for ever)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; send a plain prompt instead")
    added = [SimpleNamespace(content=t.content, special=t.special) for t in tokenizer.added_tokens_decoder.values()]
    return {"template": tokenizer.get_chat_template(chat_template, tools), "added_tokens": added,
            "chat_control_tokens": getattr(tokenizer, "chat_control_tokens", None),
            "messages": _normalize_chat_messages(messages), "tools": tools, "documents": documents,
            "add_generation_prompt": add_generation_prompt, "special_tokens": tokenizer.special_tokens_map,
            "variables": kwargs}


def render(job: dict) -> str:
    """The chat as text, with the control-token spellings in the inputs marked (for encode_chat).
    The control tokens are those transformers picks (its own method, on the job's copy of the
    tokenizer's added tokens)."""
    tokens = SimpleNamespace(added_tokens_decoder=dict(enumerate(job["added_tokens"])),
                             chat_control_tokens=job["chat_control_tokens"])
    control_tokens, _ = _get_control_token_patterns(
        PreTrainedTokenizerBase._get_control_tokens(tokens, job["template"]))

    def mark(value):
        return mark_control_tokens(value, control_tokens)

    rendered, _ = render_jinja_template(
        conversations=[mark(job["messages"])], tools=mark(job["tools"]), documents=mark(job["documents"]),
        chat_template=job["template"], add_generation_prompt=job["add_generation_prompt"],
        **{**job["special_tokens"], **mark(job["variables"])})
    return rendered[0]


def encode_chat(tokenizer, text: str) -> list[int]:
    """Token ids of a text render() gave (or any part of one): marked spans as plain text, the rest
    (the template's own control tokens included) as tokenizer.encode gives it. A ValueError when
    the tokenizer would make a control token of a marked span even as plain text."""
    return encode_marked_chat(tokenizer, text)


class TemplateFailed(ValueError):
    """The template raised while rendering (its message says what), or its output was too long."""


class TemplateTimeout(Exception):
    """A render ran past the time bound; its worker was killed."""


def _serve(conn, memory_bytes: int) -> None:
    """A worker: render jobs from conn until it closes; an error goes back as its text."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        with open("/proc/self/statm") as f:  # what this process maps already, in pages
            limit = int(f.read().split()[0]) * resource.getpagesize() + memory_bytes
    except OSError:  # no /proc (not Linux): no memory bound, the time bound still holds
        limit = None
    if limit is not None and (hard == resource.RLIM_INFINITY or limit < hard):
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    conn.send("ready")
    while True:
        try:
            job, max_chars = conn.recv()
        except (EOFError, OSError):
            return
        try:
            text = render(job)
            if len(text) > max_chars:
                raise TemplateFailed(f"the rendered chat has {len(text)} characters; at most {max_chars} are taken")
            reply = (True, text)
        except MemoryError:
            reply = (False, "the template needed more memory than a render may use")
        except Exception as exc:  # the template's error, e.g. raise_exception() or a bad operation
            reply = (False, str(exc) or type(exc).__name__)
        del job
        conn.send(reply)


class _Worker:
    def __init__(self, context, memory_bytes: int):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, memory_bytes), name="chatserve-template",
                                       daemon=True)
        self.process.start()
        child.close()
        # Its start (an import of transformers' template code) is not the render's time.
        try:
            started = self.conn.poll(WORKER_START_S) and self.conn.recv() == "ready"
        except (EOFError, OSError):
            started = False
        if not started:
            self.kill()
            raise RuntimeError(f"a chat template worker did not start within {WORKER_START_S:g} s")

    def kill(self) -> None:
        self.conn.close()
        self.process.kill()
        self.process.join(5)


class TemplateWorkers:
    """Chat templates rendered in worker processes, each render bounded by `timeout` seconds and
    `memory_bytes` of memory, at most `size` at once. call() runs a function on one of `size`
    threads of its own (a render waits there, never on a thread other work needs); that function
    renders with render()."""

    def __init__(self, size: int = 2, timeout: float = 10.0, memory_bytes: int = 2**30):
        if size < 1 or timeout <= 0:
            raise ValueError("template workers need size >= 1 and timeout > 0")
        self.size, self.timeout, self.memory_bytes = size, timeout, memory_bytes
        # forkserver: workers fork from a clean process with the renderer imported, fast and
        # without the threads (torch's, the engine's) a fork of this process would inherit.
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload([__name__])
        self.executor = ThreadPoolExecutor(size, thread_name_prefix="chatserve-template")
        self.idle: list[_Worker] = []
        self.lock = threading.Lock()
        self.closed = False

    async def call(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def render(self, job: dict, max_chars: int) -> str:
        """Render on a worker (call from a function given to call()). TemplateTimeout past the time
        bound, TemplateFailed when the template raised or its output exceeds max_chars."""
        with self.lock:
            if self.closed:
                raise RuntimeError("the template workers are closed")
            worker = self.idle.pop() if self.idle else None
        if worker is None:
            worker = _Worker(self.context, self.memory_bytes)
        try:
            worker.conn.send((job, max_chars))
            if not worker.conn.poll(self.timeout):
                raise TemplateTimeout(f"the chat template took longer than {self.timeout:g} s to render")
            ok, value = worker.conn.recv()
        except TemplateTimeout:
            worker.kill()
            raise
        except (EOFError, OSError):  # the worker died (e.g. killed by the OOM killer)
            worker.kill()
            raise TemplateFailed("the chat template's worker died while rendering") from None
        with self.lock:
            if self.closed:
                worker.kill()
            else:
                self.idle.append(worker)
        if not ok:
            raise TemplateFailed(value)
        return value

    def close(self) -> None:
        with self.lock:
            self.closed = True
            idle, self.idle = self.idle, []
        self.executor.shutdown(wait=False, cancel_futures=True)
        for worker in idle:
            worker.kill()
