"""A scheduled batch -> tensors -> one model forward -> the logits of the tokens to sample."""

from __future__ import annotations

from functools import partial

import torch

from ..models import native
from ..models.layers import AttentionMetadata, KVCache, PrefillSpan
from ..models.loader import LoadedModel
from .request import Request


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int, native_kernels: str = "off"):
        cfg = loaded.config
        # On the CPU, decode rows run on the native kernels once they are loaded (models/native.py).
        # (load_model started them: loaded from the cache, built, or building in the background.)
        self.native = native_kernels != "off" and loaded.device.type == "cpu"
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = block_size
        self.kv_cache = KVCache(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                                cfg.head_dim, loaded.dtype, loaded.device)

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

        meta = AttentionMetadata(slot_mapping=self._tensor(slots), block_size=bs, prefills=prefills,
                                 num_prefill_tokens=sum(s.end - s.start for s in prefills))
        # With the native kernels loaded, the step runs on them (CausalLM.forward_native): a
        # decode-only step wholly; a step with prefills its norms, SiLU and matmuls, and, handed
        # over in meta.ops, its rows' RoPE and K/V write, its prefill chunks' attention
        # (ops.prefill_attention) and its decode rows' (ops.decode_attention).
        ops = native.ops() if self.native else None
        if decode_tables:
            width = max(len(t) for t in decode_tables)
            meta.decode_block_tables = self._tensor([t + [0] * (width - len(t)) for t in decode_tables])
            lens = meta.decode_context_lens = self._tensor(decode_lens)
            if ops is None:  # the PyTorch path's mask; the native kernel reads the lengths
                attend = torch.arange(width * bs, device=self.device) < lens.unsqueeze(1)
                meta.decode_bias = torch.zeros(attend.shape, device=self.device).masked_fill_(
                    ~attend, float("-inf"))[:, None, None, :]
        meta.ops = ops if prefills else None
        run = self.model if ops is None else partial(self.model.forward_native, ops)
        logits = run(self._tensor(input_ids), self._tensor(positions), meta, self.kv_cache,
                     self._tensor(logits_indices + prompt_indices))
        return logits, sampled, scored
