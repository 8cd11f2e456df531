"""Continuous batching: which requests run this step, and with how many tokens each.

Every step has a token budget. Running requests that decode take one token each, first, so a
long prompt never stalls the streams already flowing; prompts then prefill in chunks with what
is left. When the pool runs out of blocks the newest running request is preempted: its blocks
go back (full ones stay in the prefix cache) and it is recomputed when there is room again."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .kv_cache import BlockManager
from .request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    # (request, tokens to compute this step): prefill chunks first, then single-token steps.
    items: list[tuple[Request, int]]
    num_preempted: int = 0

    def __bool__(self) -> bool:
        return bool(self.items)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        items: list[tuple[Request, int]] = []
        preempted = 0
        # Decodes first, then running prefills, oldest first within each.
        order = sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1)
        for req in order:
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.blocks.allocate(req, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted += 1
                if victim is req:
                    break
            else:
                items.append((req, n))
                budget -= n

        # Admit waiting requests while there is budget, room in the batch and free blocks.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            cached = self.blocks.find_cached_prefix(req)
            n = min(req.num_tokens - cached.num_tokens, budget)
            if not self.blocks.can_admit(req, cached, n):
                break
            self.waiting.popleft()
            self.blocks.admit(req, cached)
            if not self.blocks.allocate(req, n):  # can_admit said yes; this cannot fail
                raise RuntimeError("block accounting error")
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            items.append((req, n))
            budget -= n

        items.sort(key=lambda item: item[1] == 1)
        return ScheduledBatch(items, preempted)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free_request(req)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Take a request out, from wherever it is, and return its blocks (exactly once)."""
        if req.status is RequestStatus.FINISHED:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.blocks.free_request(req)
        req.status = RequestStatus.FINISHED
