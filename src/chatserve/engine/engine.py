"""Engine: the synchronous step loop. AsyncEngine: the same engine on its own thread, with an
asyncio stream per request. LLM: offline generation for scripts."""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Optional, Sequence, Union

import torch

from ..config import EngineConfig
from ..models.layers import KVCache
from ..models.loader import LoadedModel, load_model
from .detokenizer import IncrementalDetokenizer
from .kv_cache import BlockManager
from .request import CompletionOutput, FinishReason, Request, RequestOutput
from .runner import ModelRunner
from .sampling import Sampler, SamplingParams, TokenLogprob, logprobs_of
from .scheduler import Scheduler
from .structured import GrammarCompiler

log = logging.getLogger("chatserve.engine")


def internal_error(request_id: str) -> str:
    """What a failed request's caller is told: the exception's text (which may hold paths or
    data) stays in the log, found by the request id."""
    return f"internal error in the engine; the log has the details under request id {request_id}"


Prompt = Union[str, list[int], dict]


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_preemptions: int


class Engine:
    def __init__(self, config: Optional[EngineConfig] = None, loaded: Optional[LoadedModel] = None):
        self.config = config = config or EngineConfig()
        config.validate()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.loaded = loaded or load_model(config)
        self.tokenizer = self.loaded.tokenizer
        # The sampling defaults of every request that leaves a value unset: the model's
        # generation_config, over which the operator's override_generation_config wins.
        self.generation_config = {**self.loaded.generation_config, **config.override_generation_config}
        mcfg = self.loaded.config
        num_blocks = config.num_kv_blocks or max(1, int(config.kv_cache_memory_gib * 2**30) // KVCache.bytes_per_block(
            mcfg.num_hidden_layers, config.block_size, mcfg.num_key_value_heads, mcfg.head_dim, self.loaded.dtype))
        self.num_blocks = num_blocks
        # A request alone must always fit, so the context is capped by the pool's size.
        self.max_model_len = min(config.max_model_len or mcfg.max_position_embeddings,
                                 mcfg.max_position_embeddings, num_blocks * config.block_size)
        self.loaded.model.ensure_context(self.max_model_len)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.loaded, num_blocks, config.block_size, config.native_kernels)
        self.sampler = Sampler(config.seed)
        self.requests: dict[str, Request] = {}
        self.eos_token_ids = self.loaded.eos_token_ids
        self.grammars = GrammarCompiler(self.tokenizer, mcfg.vocab_size, self.eos_token_ids)
        self.num_preemptions = 0
        self._ids = itertools.count()
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB), max context %d tokens", num_blocks,
                 config.block_size, self.runner.kv_cache.data.numel() * self.runner.kv_cache.data.element_size() / 2**30,
                 self.max_model_len)

    # -- requests -----------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        ids = list(prompt)
        vocab = self.loaded.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        return ids

    def apply_chat_template(self, messages: list[dict], **kwargs) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.loaded.name} has no chat template; send a plain prompt instead")
        # Control tokens spelled inside the messages are encoded as text: a message cannot open a turn.
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 sanitize_control_tokens=True, **kwargs)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def make_request(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                     request_id: Optional[str] = None) -> Request:
        """Validate and build a request. Safe to call from any thread: touches no engine state."""
        params = params or SamplingParams()
        prompt_ids = self.tokenize_prompt(prompt)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this model's context holds at most "
                             f"{self.max_model_len} (prompt and output together): shorten it")
        if params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(f"max_tokens={params.max_tokens} is too large: the prompt has {len(prompt_ids)} tokens "
                             f"and the context holds {self.max_model_len}, so at most {room} can be generated")
        vocab = self.loaded.config.vocab_size
        if any(token >= vocab for token in params.logit_bias):
            raise ValueError(f"logit_bias: token id {max(params.logit_bias)} is out of range: this model's "
                             f"token ids are 0 to {vocab - 1}")
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop, params.include_stop_str_in_output,
                                       params.skip_special_tokens)
        req = Request(request_id or f"req-{uuid.uuid4().hex}", prompt_ids, params,
                      params.max_tokens or room, self.eos_token_ids, detok)
        if params.structured_output is not None:
            # Compiled here, on the caller's thread (cached by constraint), never on the engine's.
            req.grammar = self.grammars.matcher(params.structured_output)
        return req

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.scheduler.add(req)

    def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        req = self.make_request(prompt, params, request_id)
        self.add(req)
        return req.request_id

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        req = self.requests.get(request_id)
        if req is None:
            return None
        return self._finish(req, FinishReason.ABORT)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), bm.num_free_blocks,
                           bm.num_blocks, bm.num_queried_tokens, bm.num_hit_tokens, self.num_preemptions)

    # -- the step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        self.num_preemptions += batch.num_preempted
        if not batch:
            return []
        try:
            return self._run(batch.items)
        except Exception as exc:
            if len(batch.items) == 1:
                return [self._fail(batch.items[0][0], exc)]
            log.exception("engine step failed for a batch of %d requests: running each alone to find the culprit",
                          len(batch.items))
        # Fault isolation: a request whose parameters break the forward or the sampler fails
        # alone; the others redo their part of the step (nothing was committed) and go on.
        outputs = []
        for item in batch.items:
            try:
                outputs.extend(self._run([item]))
            except Exception as exc:
                outputs.append(self._fail(item[0], exc))
        return outputs

    def _run(self, items: list[tuple[Request, int]]) -> list[RequestOutput]:
        """Forward and sample, then commit: until sampling succeeds no request state changes, so
        a failed run can be retried request by request."""
        logits, sampled, scored = self.runner.execute(items)
        tokens, logprobs = self.sampler(logits[:len(sampled)], sampled) if sampled else ([], [])
        scores = self._prompt_logprobs(logits[len(sampled):], scored)
        for req, entries in scores:
            req.prompt_logprobs.extend(entries)
        for req, n in items:
            req.num_computed_tokens += n
            self.block_manager.commit_full_blocks(req)
        now = time.monotonic()
        outputs = []
        for req, token, lp in zip(sampled, tokens, logprobs):
            try:
                outputs.append(self._append_token(req, token, lp, now))
            except Exception as exc:  # past the commit: this request ends, the others go on
                outputs.append(self._fail(req, exc))
        return outputs

    @staticmethod
    def _prompt_logprobs(logits: torch.Tensor, scored: list[tuple[Request, int, int]]) -> list[tuple[Request, list]]:
        """The logprob entries of each (request, first position, count) span of prompt positions:
        position p's logits score prompt token p + 1."""
        out, row = [], 0
        for req, first, count in scored:
            out.append((req, logprobs_of(logits[row:row + count], req.token_ids[first + 1:first + 1 + count],
                                         req.params.prompt_logprobs)))
            row += count
        return out

    def _fail(self, req: Request, exc: Exception) -> RequestOutput:
        log.error("request %s failed in the engine: %r", req.request_id, exc, exc_info=exc)
        return self._finish(req, FinishReason.ERROR, error=internal_error(req.request_id))

    def _append_token(self, req: Request, token: int, logprob, now: float) -> RequestOutput:
        # Only freshly sampled tokens come here (a preempted request's recompute samples nothing
        # until it has caught up), so each matcher advances exactly once per token.
        if req.grammar is not None and not req.grammar.accept_token(token):
            raise RuntimeError(f"token {token} breaks the request's output constraint (is every token the "
                               "constraint allows banned by logit_bias?)")
        req.token_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = now
        reason = None
        if token in req.stop_token_ids or (req.grammar is not None and req.grammar.is_terminated()):
            # A complete grammar allows only a stop token next, which ends it even with ignore_eos.
            reason, req.stop_reason = FinishReason.STOP, token
            text = req.detokenizer.flush()
        else:
            text = req.detokenizer.update([token])
            if req.detokenizer.stopped:
                reason, req.stop_reason = FinishReason.STOP, req.detokenizer.stop_reason
            elif req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
                text += req.detokenizer.flush()
                # The held-back tail may complete a stop string only now.
                reason = FinishReason.STOP if req.detokenizer.stopped else FinishReason.LENGTH
                req.stop_reason = req.detokenizer.stop_reason
        out = self._output(req, text, [token], [logprob] if logprob is not None else None)
        if req.prompt_logprobs is not None and req.num_output_tokens == 1:
            out.prompt_logprobs = [TokenLogprob(req.token_ids[0], None, []), *req.prompt_logprobs]
        if reason is not None:
            self._finish(req, reason, out)
        return out

    def _output(self, req: Request, text: str, token_ids: list[int], logprobs=None) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id, text=text, token_ids=token_ids,
            num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=req.num_cached_tokens,
            num_output_tokens=req.num_output_tokens, logprobs=logprobs,
            time_to_first_token=None if req.first_token_time is None else req.first_token_time - req.arrival_time)

    def _finish(self, req: Request, reason: FinishReason, out: Optional[RequestOutput] = None,
                error: Optional[str] = None) -> RequestOutput:
        self.scheduler.finish(req)
        self.requests.pop(req.request_id, None)
        req.finish_reason, req.error = reason, error
        out = out or self._output(req, "", [])
        out.finished, out.finish_reason, out.stop_reason, out.error = True, reason.value, req.stop_reason, error
        return out

    def finish_all(self, reason: FinishReason, error: Optional[str] = None) -> list[RequestOutput]:
        """End every request (shutdown) rather than leave callers hanging."""
        return [self._finish(req, reason, error=error) for req in list(self.requests.values())]

    def fail_all(self, exc: Exception) -> list[RequestOutput]:
        """A step raised: end every request with an error, the exception in the log under their ids."""
        log.error("engine step failed; requests %s end with an error: %r", ", ".join(self.requests), exc,
                  exc_info=exc)
        return [self._finish(req, FinishReason.ERROR, error=internal_error(req.request_id))
                for req in list(self.requests.values())]

    # -- offline ------------------------------------------------------------------------------

    def run_to_completion(self, request_ids: Sequence[str]) -> dict[str, CompletionOutput]:
        results = {rid: CompletionOutput(rid, list(self.requests[rid].token_ids)) for rid in request_ids}
        while any(rid in self.requests for rid in request_ids):
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].add(out)
        return results


class LLM:
    """Offline generation: `LLM("dummy_model").generate(["Hello"], SamplingParams(max_tokens=16))`."""

    def __init__(self, model: str = "dummy_model", **engine_kwargs):
        self.engine = Engine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 params: Union[SamplingParams, Sequence[SamplingParams], None] = None) -> list[CompletionOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        results = self.engine.run_to_completion(ids)
        return [results[rid] for rid in ids]

    def chat(self, messages: Union[list[dict], list[list[dict]]], params: Optional[SamplingParams] = None,
             **template_kwargs) -> list[CompletionOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.engine.apply_chat_template(c, **template_kwargs)} for c in conversations]
        return self.generate(prompts, params)


class AsyncEngine:
    """One engine thread owns the model, the KV cache and every request; callers talk to it
    through a queue and read their outputs from an asyncio queue each."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        # Held while checking _stopping and queueing (no request is queued behind "stop", never
        # answered), and while _aborting changes together with the queue.
        self._lock = threading.Lock()
        # Ids whose abort was queued and not yet carried out, and the token ids generated for such
        # requests by steps that began after the abort was queued: wasted work, which stays 0.
        self._aborting: set[str] = set()
        self.num_tokens_after_abort = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        return cls(Engine(config))

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="chatserve-engine", daemon=True)
            self._thread.start()

    def begin_shutdown(self) -> None:
        """Refuse new requests and end every one in flight with a final abort output ("the engine
        is shutting down"), without waiting: safe to call from the event loop at signal time."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._commands.put(("stop", None))

    def shutdown(self, timeout: float = 5.0) -> None:
        """begin_shutdown(), then wait for the engine thread to end."""
        self.begin_shutdown()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    async def generate(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Closing the iterator early (a client went away) aborts it."""
        if self._stopping:  # before start(): a stopped engine must not get a new thread
            raise RuntimeError("the engine is shutting down")
        self.start()
        # Tokenizing a long text prompt takes a while: on a worker thread, not the event loop.
        req = await asyncio.to_thread(self.engine.make_request, prompt, params, request_id)  # ValueError on bad input
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            # Checked here, not on the engine thread: a duplicate would take over the other
            # request's stream, and Engine.add raising there would end the engine thread.
            if req.request_id in self._streams:
                raise ValueError(f"request id {req.request_id!r} is already in use")
            self._streams[req.request_id] = (asyncio.get_running_loop(), stream)
            self._commands.put(("add", req))
        finished = False
        try:
            while not finished:
                out: RequestOutput = await stream.get()
                finished = out.finished
                yield out
        finally:
            self._streams.pop(req.request_id, None)
            if not finished:
                self.abort(req.request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:  # the engine thread discards the id only after this add
            self._commands.put(("abort", request_id))
            self._aborting.add(request_id)  # after the put: see _loop

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        # One wake-up of each event loop per step, not one per output: each call_soon_threadsafe
        # writes to the loop's self-pipe.
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                loop, stream = target
                batches.setdefault(loop, []).append((stream, out))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _handle(self, command: str, arg) -> bool:
        if command == "stop":
            self._deliver(self.engine.finish_all(FinishReason.ABORT, "the engine is shutting down"))
            return False
        if command == "add":
            if arg.request_id in self._streams:
                self.engine.add(arg)
        elif command == "abort":
            out = self.engine.abort_request(arg)
            if out is not None:
                self._deliver([out])
            if arg not in self.engine.requests:  # else the abort failed, and its tokens count
                with self._lock:
                    self._aborting.discard(arg)
        return True

    def _loop(self) -> None:
        engine = self.engine
        while True:
            # Taken before this iteration's command: each id in it had its abort queued before
            # then, so carried out before the step below; a token the step makes for it is waste.
            aborting = set(self._aborting) if self._aborting else ()
            # Block while idle; while busy, take every command that arrived, then step.
            try:
                cmd = self._commands.get_nowait() if engine.has_unfinished() else self._commands.get()
            except queue.Empty:
                cmd = None
            if cmd is not None:
                if not self._handle(*cmd):
                    return
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # keep serving: fail the requests in flight, not the thread
                outputs = engine.fail_all(exc)
            if aborting:
                self.num_tokens_after_abort += sum(len(out.token_ids) for out in outputs
                                                   if out.request_id in aborting)
            self._deliver(outputs)


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for stream, out in batch:
        stream.put_nowait(out)
