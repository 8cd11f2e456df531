"""A scheduled batch -> tensors -> one model forward -> the logits of the tokens to sample."""

from __future__ import annotations

import logging
import time

import torch

from ..models.layers import AttentionMetadata, KVCache, PrefillSpan
from ..models.loader import LoadedModel
from .request import Request


log = logging.getLogger("chatserve.engine")


def mark_decode_dynamic(input_ids, positions, meta: AttentionMetadata, kv_cache, logits_indices) -> None:
    """The batch size and the context width vary from step to step: say so to torch.compile up
    front, so that the first graph serves them all rather than the third."""
    for t in (input_ids, positions, meta.slot_mapping, logits_indices):
        torch._dynamo.mark_dynamic(t, 0)
    torch._dynamo.mark_dynamic(meta.decode_block_tables, (0, 1))
    torch._dynamo.mark_dynamic(meta.decode_bias, (0, 3))


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int, compile: bool = False):
        cfg = loaded.config
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = block_size
        # Decode-only steps through torch.compile: one graph for every batch size and context
        # length. Shapes are dynamic, but a size of 1 would get a graph of its own, so decode
        # tables are at least 2 blocks wide, and a batch of one gets a second row that writes its
        # K/V into a scratch block past the pool's (never allocated to a request).
        self.decode_model = None
        self.scratch_block = num_blocks
        self.kv_cache = KVCache(cfg.num_hidden_layers, num_blocks + bool(compile), block_size, cfg.num_key_value_heads,
                                cfg.head_dim, loaded.dtype, loaded.device)
        if compile:
            options = {"cpp_wrapper": True} if self.device.type == "cpu" else {}
            self.decode_model = torch.compile(self.model, dynamic=True, options=options)
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile before serving: one decode step of two rows, both on the scratch block."""
        log.info("compiling the decode step (torch.compile; minutes the first time, faster once cached) ...")
        start = time.monotonic()
        slot = self.scratch_block * self.block_size
        with torch.inference_mode():
            meta = AttentionMetadata(slot_mapping=self._tensor([slot, slot + 1]), block_size=self.block_size)
            self._decode_tables(meta, [[self.scratch_block]] * 2, [1, 2])
            args = (self._tensor([0, 0]), self._tensor([0, 1]), meta, self.kv_cache, self._tensor([0, 1]))
            mark_decode_dynamic(*args)
            self.decode_model(*args)
        log.info("decode step compiled in %.1f s", time.monotonic() - start)

    def _decode_tables(self, meta: AttentionMetadata, tables: list[list[int]], lens: list[int]) -> None:
        bs = self.block_size
        width = max(len(t) for t in tables)
        if self.decode_model is not None:
            width = max(width, 2)
        meta.decode_block_tables = self._tensor([t + [0] * (width - len(t)) for t in tables])
        attend = torch.arange(width * bs, device=self.device) < self._tensor(lens).unsqueeze(1)
        meta.decode_bias = torch.zeros(attend.shape, device=self.device).masked_fill_(~attend, float("-inf"))[
            :, None, None, :]

    def _tensor(self, data) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def execute(self, items: list[tuple[Request, int]]) -> tuple[torch.Tensor, list[Request], list[tuple[Request, int, int]]]:
        """Run the batch. Returns logits [S + P, vocab]: first for the S requests whose last token
        was computed (`sampled`), then P rows of prompt positions whose logprobs were asked for,
        as (request, first position, count) spans in order (`scored`)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillSpan] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        logits_indices: list[int] = []
        sampled: list[Request] = []
        prompt_indices: list[int] = []
        scored: list[tuple[Request, int, int]] = []
        for req, n in items:
            start, end = req.num_computed_tokens, req.num_computed_tokens + n
            offset = len(input_ids)
            input_ids.extend(req.token_ids[start:end])
            pos = range(start, end)
            positions.extend(pos)
            table = req.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            if n == 1:
                decode_tables.append(table[: -(-end // bs)])
                decode_lens.append(end)
            elif start == 0:
                prefills.append(PrefillSpan(offset, offset + n, end))
            else:
                # A later chunk, or a prompt behind a cached prefix: attend to the cache too.
                mask = torch.ones(n, end, dtype=torch.bool, device=self.device).tril(diagonal=start)
                prefills.append(PrefillSpan(offset, offset + n, end, self._tensor(table[: -(-end // bs)]), mask))
            if end == req.num_tokens:
                logits_indices.append(offset + n - 1)
                sampled.append(req)
            if req.prompt_logprobs is not None:
                # Positions whose logits predict a prompt token and are not scored yet (a
                # preempted request recomputes its prompt, but scores it once).
                first, last = max(start, len(req.prompt_logprobs)), min(end, req.num_prompt_tokens - 1)
                if first < last:
                    prompt_indices.extend(range(offset + first - start, offset + last - start))
                    scored.append((req, first, last - first))

        model = self.model
        if self.decode_model is not None and not prefills:
            model = self.decode_model
            if len(decode_tables) == 1:  # the second row (see __init__), whose logits nobody reads
                logits_indices.append(1)
                input_ids.append(0)
                positions.append(0)
                slots.append(self.scratch_block * bs)
                decode_tables.append([self.scratch_block])
                decode_lens.append(1)
        meta = AttentionMetadata(slot_mapping=self._tensor(slots), block_size=bs, prefills=prefills,
                                 num_prefill_tokens=sum(s.end - s.start for s in prefills))
        if decode_tables:
            self._decode_tables(meta, decode_tables, decode_lens)
        args = (self._tensor(input_ids), self._tensor(positions), meta, self.kv_cache,
                self._tensor(logits_indices + prompt_indices))
        if model is self.decode_model:
            mark_decode_dynamic(*args)
        return model(*args)[:len(sampled) + len(prompt_indices)], sampled, scored
