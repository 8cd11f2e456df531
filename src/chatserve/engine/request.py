"""A request's state, owned by the engine thread."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .sampling import SamplingParams, TokenLogprob


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # the caller went away
    ERROR = "error"


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, eos_token_ids: list[int], detokenizer):
        self.request_id = request_id
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt, then every generated token
        self.num_prompt_tokens = len(prompt_token_ids)
        self.max_tokens = max_tokens
        self.stop_token_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.detokenizer = detokenizer
        self.generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        # The structured-output matcher (params.structured_output), advanced once per generated token.
        self.grammar = None
        self.status = RequestStatus.WAITING
        self.arrival_time = time.monotonic()
        self.first_token_time: Optional[float] = None
        # KV state: tokens whose K/V are in the cache, and the blocks holding them.
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hash chain of the full blocks registered so far
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at admission
        self.num_preemptions = 0
        self.finish_reason: Optional[FinishReason] = None
        self.stop_reason: Optional[object] = None  # the stop string or token id that ended it
        self.error: Optional[str] = None
        # params.prompt_logprobs: entry j is prompt token j+1's, computed from position j's logits.
        self.prompt_logprobs: Optional[list] = None if params.prompt_logprobs is None else []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass
class RequestOutput:
    """What one step produced for one request: a delta, plus running totals."""

    request_id: str
    text: str  # new text since the last output
    token_ids: list[int]  # new token ids since the last output
    finished: bool = False
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: Optional[list[TokenLogprob]] = None
    # With params.prompt_logprobs, on the first output: one entry per prompt token (the first's
    # logprob None).
    prompt_logprobs: Optional[list[TokenLogprob]] = None
    error: Optional[str] = None
    # Seconds from arrival to the first token, once there is one.
    time_to_first_token: Optional[float] = None


@dataclass
class CompletionOutput:
    """A whole finished generation (LLM.generate)."""

    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None
    num_cached_tokens: int = 0
    logprobs: Optional[list[TokenLogprob]] = None
    prompt_logprobs: Optional[list[TokenLogprob]] = None
    error: Optional[str] = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.token_ids.extend(out.token_ids)
        if out.logprobs:
            self.logprobs = (self.logprobs or []) + out.logprobs
        self.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason, self.stop_reason, self.error = out.finish_reason, out.stop_reason, out.error
