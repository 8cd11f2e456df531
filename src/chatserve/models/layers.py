"""The shared transformer layers: RMSNorm, rotary embedding, attention over the paged KV cache,
gated MLP, and the decoder stack the Qwen2, Llama and Qwen3 families are built from.

Module and parameter names follow Hugging Face's checkpoints, so weights load by name."""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as the reference does (the same ops, so fp32 is bit-exact with it), so
        # bf16 keeps its accuracy. Spelled out rather than F.rms_norm: on the CPU that is a chain of
        # about ten ops of its own (one row: 21 us against 17), and decode runs two per layer.
        h = x if x.dtype == torch.float32 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (h if x.dtype == torch.float32 else h.to(x.dtype))


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict]) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention scaling factor for the rope types these families use."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq.float(), 1.0
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq.float(), 1.0
    if rope_type == "freq_factors":  # a GGUF's rope_freqs tensor: one divisor per frequency
        return (inv_freq / torch.tensor(scaling["factors"], dtype=torch.float64)).float(), 1.0
    if rope_type == "linear":
        return (inv_freq / scaling["factor"]).float(), 1.0
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled).float(), 1.0
    if rope_type == "yarn":
        factor = scaling["factor"]
        old_len = scaling.get("original_max_position_embeddings")
        if old_len is None:
            raise ValueError("yarn rope_scaling needs original_max_position_embeddings")
        beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
        ramp = (torch.arange(head_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)
        extrapolation = 1 - ramp.clamp(0, 1)
        inv = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
        mscale = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        return inv.float(), float(mscale)
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported (default, linear, llama3, yarn are)")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, looked up by each token's position. The tables are made
    for as many positions as the engine's context holds (resize), not max_position_embeddings:
    Qwen2.5's 32768 positions are 16 MiB of fp32 tables, SmolLM2 served with a 1024-token context
    needs 0.5 of its 4 MiB. Used before any resize, they cover max_positions."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: Optional[dict]):
        super().__init__()
        inv_freq, self.mscale = rope_inv_freq(head_dim, theta, scaling)
        self.max_positions = max_positions
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos", None, persistent=False)
        self.register_buffer("sin", None, persistent=False)

    @property
    def length(self) -> int:
        return 0 if self.cos is None else self.cos.shape[0]

    def resize(self, positions: int) -> None:
        """Tables for positions 0 .. positions-1."""
        freqs = torch.outer(torch.arange(positions, dtype=torch.float32, device=self.inv_freq.device), self.inv_freq)
        cos, sin = freqs.cos().mul_(self.mscale), freqs.sin().mul_(self.mscale)
        self.cos = torch.cat([cos, cos], dim=-1)
        # The first half negated: apply_rope's rotation is then a roll, with no negation or concat.
        self.sin = torch.cat([sin.neg(), sin], dim=-1)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos is None:
            self.resize(self.max_positions)
        return self.cos, self.sin

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # [N, 1, head_dim], broadcast over heads.
        cos, sin = self.tables()
        return cos[positions].to(dtype).unsqueeze(1), sin[positions].to(dtype).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x * cos + [-x2, x1] * sin, with sin's first half already negated."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


@dataclass
class PrefillSpan:
    """One request's prefill chunk inside the flattened batch."""

    start: int  # first token of the chunk in the batch
    end: int
    context_len: int  # tokens of KV the chunk attends to: cached ones + the chunk itself
    block_table: Optional[torch.Tensor] = None  # needed only when context_len > the chunk length
    mask: Optional[torch.Tensor] = None  # [chunk, context_len] causal mask aligned bottom-right
    _slots: Optional[torch.Tensor] = field(default=None, repr=False)

    def context_slots(self, slot_mapping: torch.Tensor, block_size: int) -> torch.Tensor:
        """The KV pool slot of each of the context's tokens: made once a step, read by every layer."""
        if self._slots is None:
            if self.block_table is None:  # the context is the chunk itself
                self._slots = slot_mapping[self.start:self.end]
            else:
                offsets = torch.arange(block_size, device=self.block_table.device)
                self._slots = (self.block_table.unsqueeze(1) * block_size + offsets).view(-1)[: self.context_len]
        return self._slots


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and what each query attends to, for one engine step.

    The batch is flattened: prefill chunks first, then one token per decoding request."""

    slot_mapping: torch.Tensor  # [N] slot of each token in the flattened KV pool
    block_size: int = 16  # tokens per KV block, the KV cache's
    prefills: list[PrefillSpan] = field(default_factory=list)
    num_prefill_tokens: int = 0
    decode_block_tables: Optional[torch.Tensor] = None  # [D, max_blocks]
    decode_bias: Optional[torch.Tensor] = None  # [D, 1, 1, max_blocks * block_size] fp32: 0 attend, -inf not
    decode_context_lens: Optional[torch.Tensor] = None  # [D] tokens of KV each decode attends to, its own included
    # The native kernels (models/native.py), when the runner has them for a step with prefills: the
    # rows' norms, RoPE and K/V write run on ops.rope_kv_write, the prefill chunks' attention on
    # ops.prefill_attention (fp32/bf16 with head_dim % 16 == 0, else SDPA), the decode rows' on
    # ops.decode_attention (a mixed step's PyTorch decode attention, gathering every row's padded
    # KV, was ~1/3 of the step with 32 streams; a SmolLM2 bf16 step of a 480-token chunk and 32
    # decode rows at 64-576 tokens: 1650 -> 920 ms on 1 thread).
    ops: Any = None
    # (cos, sin, positions): the model's fp32 rotary tables and every row's position, which those
    # kernels read; CausalLM.forward and forward_native set them when `ops` is.
    rope: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None


def zeroed(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros, but on the CPU in fresh anonymous pages, which the kernel hands out zeroed when
    first touched: memory is only taken as the KV cache fills. torch.zeros writes every page at
    start: a server given a 4 GiB pool holds 4 GiB from its first second (SmolLM2 with 1024 tokens'
    cache serving one 512-token prompt: 22.5 MiB of KV resident, 12 with these pages)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
    pages = mmap.mmap(-1, max(nbytes, 1))
    return torch.frombuffer(pages, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


class KVCache:
    """One preallocated pool per layer: [num_blocks * block_size, num_kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, 2, num_blocks * block_size, num_kv_heads, head_dim)
        self.data = zeroed(shape, dtype, device)
        # Each layer's (K, V) views, made once: indexing `data` every layer of every step costs ops.
        self._layers = [(self.data[i, 0], self.data[i, 1]) for i in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._layers[i]

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self._layers


# A fused Linear and the checkpoint modules whose weights are its row slices, in order.
FUSED_LINEARS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fused_linear(in_features: int, part_sizes: list[int], bias: bool) -> nn.Linear:
    """One Linear for several of a checkpoint's (same input, outputs stacked): fewer, larger
    matmuls per token. part_sizes tells the loader where each checkpoint weight goes."""
    linear = nn.Linear(in_features, sum(part_sizes), bias=bias)
    linear.part_sizes = list(part_sizes)
    return linear


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim ** -0.5
        hidden = cfg.hidden_size
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # q, k and v in one matmul: checkpoints' q_proj/k_proj/v_proj load into its row slices.
        self.qkv_proj = fused_linear(hidden, [self.q_size, self.kv_size, self.kv_size], cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, meta: AttentionMetadata, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        n, heads, p = x.shape[0], self.num_heads, meta.num_prefill_tokens
        qkv = self.qkv_proj(x)
        k = v = decoded = None
        if meta.ops is not None:
            # The native kernels: the prefill rows' norms, RoPE and K/V write (their attention
            # reads K and V back from the pools), the decode rows' whole attention.
            q = self._native_rope(qkv[:p], meta, k_pool, v_pool) if p else None
            decoded = self._native_decode(qkv[p:], meta, k_pool, v_pool) if n > p else None
            if not p:
                return self.o_proj(decoded)
        else:
            # q and k side by side as heads + kv_heads rows of head_dim: one RoPE for both.
            qk = qkv[:, : self.q_size + self.kv_size].view(-1, heads + self.num_kv_heads, self.head_dim)
            v = qkv[:, self.q_size + self.kv_size:].view(-1, self.num_kv_heads, self.head_dim)
            if self.q_norm is not None:
                qk = torch.cat([self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])], dim=1)
            qk = apply_rope(qk, cos, sin)
            q, k = qk[:, :heads], qk[:, heads:]
            k_pool.index_copy_(0, meta.slot_mapping, k)
            v_pool.index_copy_(0, meta.slot_mapping, v)
            if not meta.prefills:  # decodes only: the common step, without the scatter into `out`
                return self.o_proj(self._decode(q, meta, k_pool, v_pool, meta.block_size).view(n, -1))
        out = q.new_empty(n, heads, self.head_dim)
        native = meta.ops is not None and self._native_prefill(meta.ops, q.dtype)
        for span in meta.prefills:
            if native:
                out[span.start:span.end] = self._native_prefill_span(q, span, meta, k_pool, v_pool)
            else:
                out[span.start:span.end] = self._prefill(q, k, v, span, meta, k_pool, v_pool)
        if decoded is not None:
            out[p:] = decoded.view(-1, heads, self.head_dim)
        elif meta.decode_block_tables is not None:
            out[p:] = self._decode(q[p:], meta, k_pool, v_pool, meta.block_size)
        return self.o_proj(out.view(n, -1))

    def _norms(self) -> tuple:
        """(q_norm, k_norm, eps) as the native kernels take them."""
        if self.q_norm is None:
            return None, None, 0.0
        return self.q_norm.weight, self.k_norm.weight, self.q_norm.eps

    def _native_rope(self, qkv, meta: AttentionMetadata, k_pool, v_pool) -> torch.Tensor:
        """ops.rope_kv_write on the prefill rows of qkv: their roped queries [P, heads, head_dim]."""
        cos, sin, positions = meta.rope
        p = qkv.shape[0]
        return meta.ops.rope_kv_write(qkv.contiguous(), cos, sin, positions[:p], k_pool, v_pool,
                                      meta.slot_mapping[:p], *self._norms(), self.num_heads, self.num_kv_heads)

    def _native_decode(self, qkv, meta: AttentionMetadata, k_pool, v_pool) -> torch.Tensor:
        """ops.decode_attention on the decode rows of qkv (as CausalLM.forward_native calls it): [D, heads * head_dim]."""
        cos, sin, positions = meta.rope
        d = qkv.shape[0]
        return meta.ops.decode_attention(qkv.contiguous(), cos, sin, positions[-d:], k_pool, v_pool,
                                         meta.slot_mapping[-d:], meta.decode_block_tables, meta.decode_context_lens,
                                         *self._norms(), self.num_heads, self.num_kv_heads, meta.block_size,
                                         self.scale)

    def _native_prefill(self, ops, dtype: torch.dtype) -> bool:
        """Whether ops.prefill_attention runs vectorised for this layer (fp32 or bf16, head_dim a
        multiple of 16, an AVX-512 build); else the chunk keeps PyTorch's SDPA. Asked once a dtype."""
        known = self.__dict__.setdefault("_prefill_kernel", {})
        if dtype not in known:
            known[dtype] = bool(ops.prefill_attention_vectorised(dtype, self.head_dim))
        return known[dtype]

    def _native_prefill_span(self, q, span: PrefillSpan, meta: AttentionMetadata, k_pool, v_pool) -> torch.Tensor:
        """One prefill chunk's attention on ops.prefill_attention, which reads the whole context's K/V
        from the pools (the chunk's own written there already) through each token's slot: 2.2x
        SDPA's speed in fp32, 3.5x in bf16 (a 512-token SmolLM2 prefill: 818 -> 719 ms in fp32,
        566 -> 450 ms in bf16; decode.cpp has the figures)."""
        slots = span.context_slots(meta.slot_mapping, meta.block_size)
        return meta.ops.prefill_attention(q[span.start:span.end].contiguous(), k_pool, v_pool, slots, self.scale)

    def _gather(self, pool: torch.Tensor, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
        blocks = pool.view(-1, block_size, self.num_kv_heads, self.head_dim)[block_table]
        return blocks.view(*block_table.shape[:-1], -1, self.num_kv_heads, self.head_dim)

    def _prefill(self, q, k, v, span: PrefillSpan, meta: AttentionMetadata, k_pool, v_pool) -> torch.Tensor:
        """Attention of one prefill chunk. k, v: the step's fresh K/V rows, or None to read the
        chunk's back from the pools (the native path wrote them there)."""
        qs = q[span.start:span.end].transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
        if span.block_table is None:
            # The whole context is this chunk: attend to the fresh K/V, plain causal.
            if k is None:
                slots = span.context_slots(meta.slot_mapping, meta.block_size)
                k, v, span = k_pool[slots], v_pool[slots], replace(span, start=0, end=len(slots))
            ks = k[span.start:span.end].transpose(0, 1).unsqueeze(0)
            vs = v[span.start:span.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            ks = self._gather(k_pool, span.block_table, meta.block_size)[: span.context_len]
            vs = self._gather(v_pool, span.block_table, meta.block_size)[: span.context_len]
            ks, vs = ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=span.mask, scale=self.scale,
                                               enable_gqa=True)
        return o[0].transpose(0, 1)

    def _decode(self, q, meta: AttentionMetadata, k_pool, v_pool, block_size) -> torch.Tensor:
        # One query per request: group the query heads by KV head and use batched matmuls,
        # which beats SDPA's GQA path for single-token queries on CPU.
        # In fp32 whatever the run dtype: these small batched matmuls are ~5x faster than in bf16
        # on the CPU (measured in the engine: 10 vs 50 us), and softmax wants fp32 anyway.
        d, dtype = q.shape[0], q.dtype
        fp32 = dtype == torch.float32
        group = self.num_heads // self.num_kv_heads
        ks = self._gather(k_pool, meta.decode_block_tables, block_size)  # [D, T, KV, Dh]
        vs = self._gather(v_pool, meta.decode_block_tables, block_size)
        if not fp32:
            q, ks, vs = q.float(), ks.float(), vs.float()
        qg = q.reshape(d, self.num_kv_heads, group, self.head_dim)
        # bias + scale * (q k^T) in one op: [D, KV, G, T]
        scores = torch.add(meta.decode_bias, torch.matmul(qg, ks.permute(0, 2, 3, 1)), alpha=self.scale)
        out = torch.matmul(torch.softmax(scores, dim=-1), vs.transpose(1, 2))  # [D, KV, G, Dh]
        out = out.view(d, self.num_heads, self.head_dim)
        return out if fp32 else out.to(dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        # gate and up in one matmul, loaded from the checkpoints' gate_proj and up_proj.
        self.gate_up_proj = fused_linear(hidden, [intermediate, intermediate], bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bool(cfg.raw.get("mlp_bias", False)))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, meta, k_pool, v_pool):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, k_pool, v_pool)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    """HF's `model.*` part: embeddings, layers, final norm."""

    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """A decoder-only causal LM. Families differ only in how they read their config (read_config)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)

    @torch.inference_mode()
    def score(self, input_ids: list[int], block_size: int = 16) -> torch.Tensor:
        """Logits [n, vocab] at every position of one sequence, through the paged-attention prefill
        path with a KV cache of its own (quality checks, prompt logprobs)."""
        cfg, n = self.config, len(input_ids)
        self.ensure_context(n)
        dtype, device = self.model.norm.weight.dtype, self.model.norm.weight.device
        kv = KVCache(cfg.num_hidden_layers, -(-n // block_size), block_size, cfg.num_key_value_heads, cfg.head_dim,
                     dtype, device)
        positions = torch.arange(n, device=device)
        meta = AttentionMetadata(slot_mapping=positions, block_size=block_size, prefills=[PrefillSpan(0, n, n)],
                                 num_prefill_tokens=n)
        return self(torch.tensor(input_ids, device=device), positions, meta, kv, positions)

    def ensure_context(self, positions: int) -> None:
        """Rotary tables for at least positions 0 .. positions-1: an engine's context, which is what
        its KV cache holds (see RotaryEmbedding). Made once for the first engine; never shrunk, as
        engines may share the model."""
        if self.rotary.length < positions:
            self.rotary.resize(positions)
            self.__dict__.pop("_plan", None)  # the decode plan holds the tables

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        # A tied model has an lm_head module only when quantization gave it its own.
        if "lm_head" in self._modules:
            return self.lm_head(x)
        return F.linear(x, self.model.embed_tokens.weight)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: KVCache, logits_indices: torch.Tensor) -> torch.Tensor:
        """Hidden states of the flattened batch in, logits of the tokens at logits_indices out (fp32)."""
        x = self.model.embed_tokens(input_ids)
        if meta.ops is not None:  # the kernels take the tables and the positions
            cos = sin = None
            meta = replace(meta, rope=(*self.rotary.tables(), positions))
        else:
            cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, meta, *kv_cache.layer(i))
        x = self.model.norm(x[logits_indices])
        return self.compute_logits(x).float()

    def forward_native(self, ops, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       kv_cache: KVCache, logits_indices: torch.Tensor) -> torch.Tensor:
        """forward() on the native kernels (`ops`, models/native.py), read from a plan made once
        (nn.Module's call and attribute machinery is ~1 ms a step on a 30-layer model): per layer
        the fused norms with the residual add, SiLU-and-multiply and the matmuls; the attention of
        a decode-only step on decode_attention (with its norms, RoPE and K/V write), that of a step
        with prefills through the Attention module (meta.ops set: the rows' norms, RoPE and K/V
        write, and the decode rows' attention, on the kernels).
        The residual stream `x` is added to in place; `h` is always the normed input of the next
        sublayer. (A 512-token SmolLM2 prefill spent 85 of 815 ms in fp32 on PyTorch's norms, SiLU
        and adds: ~60 ops a layer.)"""
        plan, head, first_norm, eps, cos, sin, attention, add_rms_norm, silu_mul = self._decode_plan(ops)
        x = self.model.embed_tokens(input_ids)
        h = ops.rms_norm.default(x, first_norm, eps)
        if meta.prefills:
            meta = replace(meta, ops=ops, rope=(cos, sin, positions))
        slots, tables, lens, block_size = (meta.slot_mapping, meta.decode_block_tables, meta.decode_context_lens,
                                           meta.block_size)
        for (qkv, o, gate_up, down, post_norm, next_norm, q_norm, k_norm, heads, kv_heads, scale, module), (
                k_pool, v_pool) in zip(plan, kv_cache.layers()):
            if meta.prefills:
                a = module(h, None, None, meta, k_pool, v_pool)
            else:
                a = o(attention(qkv(h), cos, sin, positions, k_pool, v_pool, slots, tables, lens, q_norm, k_norm, eps,
                                heads, kv_heads, block_size, scale))
            h = add_rms_norm(x, a, post_norm, eps)
            h = add_rms_norm(x, down(silu_mul(gate_up(h))), next_norm, eps)
        return head(h[logits_indices]).float()

    def _decode_plan(self, ops) -> tuple:
        cached = self.__dict__.get("_plan")
        if cached is not None and cached[0] is ops:
            return cached[1]
        layers = self.model.layers
        plan = []
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            following = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            plan.append((fast_linear(attn.qkv_proj), fast_linear(attn.o_proj),
                         fast_linear(mlp.gate_up_proj), fast_linear(mlp.down_proj),
                         layer.post_attention_layernorm.weight, following.weight,
                         None if attn.q_norm is None else attn.q_norm.weight,
                         None if attn.k_norm is None else attn.k_norm.weight,
                         attn.num_heads, attn.num_kv_heads, attn.scale, attn))
        lm_head = self._modules.get("lm_head")
        if lm_head is None:  # tied and kept float: the embedding is the head
            weight = self.model.embed_tokens.weight
            head = lambda h: F.linear(h, weight)  # noqa: E731
        else:
            head = fast_linear(lm_head, torch.float32)
        built = (plan, head, layers[0].input_layernorm.weight, self.config.rms_norm_eps, *self.rotary.tables(),
                 ops.decode_attention.default, ops.add_rms_norm.default, ops.silu_mul.default)
        self.__dict__["_plan"] = (ops, built)
        return built


def fast_linear(layer: nn.Module, out_dtype: Optional[torch.dtype] = None):
    """layer(rows) for the 2-D rows of a decode step: a layer on a native kernel as that kernel bound
    to its tensors (no nn.Module call or attribute lookups; any number of rows; out_dtype: the
    result's, default the input's; the bias added inside, in fp32, converted once here), else the
    layer itself."""
    if not getattr(layer, "native", False):
        return layer
    op, args = layer.native_call()
    bias = None if layer.bias is None else layer.bias.float()
    return lambda h: op(h, *args, bias, out_dtype)
