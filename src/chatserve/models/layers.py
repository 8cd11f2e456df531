"""The shared transformer layers: RMSNorm, rotary embedding, attention over the paged KV cache,
gated MLP, and the decoder stack the Qwen2, Llama and Qwen3 families are built from.

Module and parameter names follow Hugging Face's checkpoints, so weights load by name."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as the reference does, so bf16 keeps its accuracy.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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
    """cos/sin tables for every position, looked up by each token's position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: Optional[dict]):
        super().__init__()
        inv_freq, mscale = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos() * mscale, persistent=False)
        self.register_buffer("sin", emb.sin() * mscale, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # [N, 1, head_dim], broadcast over heads.
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class PrefillSpan:
    """One request's prefill chunk inside the flattened batch."""

    start: int  # first token of the chunk in the batch
    end: int
    context_len: int  # tokens of KV the chunk attends to: cached ones + the chunk itself
    block_table: Optional[torch.Tensor] = None  # needed only when context_len > the chunk length
    mask: Optional[torch.Tensor] = None  # [chunk, context_len] causal mask aligned bottom-right


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and what each query attends to, for one engine step.

    The batch is flattened: prefill chunks first, then one token per decoding request."""

    slot_mapping: torch.Tensor  # [N] slot of each token in the flattened KV pool
    prefills: list[PrefillSpan] = field(default_factory=list)
    num_prefill_tokens: int = 0
    decode_block_tables: Optional[torch.Tensor] = None  # [D, max_blocks]
    decode_mask: Optional[torch.Tensor] = None  # [D, 1, 1, max_blocks * block_size], True = attend


class KVCache:
    """One preallocated pool per layer: [num_blocks * block_size, num_kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, 2, num_blocks * block_size, num_kv_heads, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, 0], self.data[i, 1]


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim ** -0.5
        hidden = cfg.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_pool, v_pool = kv_cache.layer(self.layer_idx)
        k_pool.index_copy_(0, meta.slot_mapping, k)
        v_pool.index_copy_(0, meta.slot_mapping, v)

        out = torch.empty_like(q)
        for span in meta.prefills:
            out[span.start:span.end] = self._prefill(q, k, v, span, k_pool, v_pool, kv_cache.block_size)
        if meta.decode_block_tables is not None:
            out[meta.num_prefill_tokens:] = self._decode(
                q[meta.num_prefill_tokens:], meta, k_pool, v_pool, kv_cache.block_size)
        return self.o_proj(out.view(n, -1))

    def _gather(self, pool: torch.Tensor, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
        blocks = pool.view(-1, block_size, self.num_kv_heads, self.head_dim)[block_table]
        return blocks.view(*block_table.shape[:-1], -1, self.num_kv_heads, self.head_dim)

    def _prefill(self, q, k, v, span: PrefillSpan, k_pool, v_pool, block_size) -> torch.Tensor:
        qs = q[span.start:span.end].transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
        if span.block_table is None:
            # The whole context is this chunk: attend to the fresh K/V, plain causal.
            ks = k[span.start:span.end].transpose(0, 1).unsqueeze(0)
            vs = v[span.start:span.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            ks = self._gather(k_pool, span.block_table, block_size)[: span.context_len]
            vs = self._gather(v_pool, span.block_table, block_size)[: span.context_len]
            ks, vs = ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=span.mask, scale=self.scale,
                                               enable_gqa=True)
        return o[0].transpose(0, 1)

    def _decode(self, q, meta: AttentionMetadata, k_pool, v_pool, block_size) -> torch.Tensor:
        # One query per request: group the query heads by KV head and use batched matmuls,
        # which beats SDPA's GQA path for single-token queries on CPU.
        d = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        ks = self._gather(k_pool, meta.decode_block_tables, block_size).transpose(1, 2)  # [D, KV, T, Dh]
        vs = self._gather(v_pool, meta.decode_block_tables, block_size).transpose(1, 2)
        qg = q.view(d, self.num_kv_heads, group, self.head_dim)
        scores = torch.matmul(qg, ks.transpose(-1, -2)).float() * self.scale  # [D, KV, G, T]
        scores = scores.masked_fill(~meta.decode_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(vs.dtype)
        return torch.matmul(probs, vs).view(d, self.num_heads, self.head_dim)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bool(cfg.raw.get("mlp_bias", False)))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, meta, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    """HF's `model.*` part: embeddings, layers, final norm."""

    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
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
        dtype, device = self.model.norm.weight.dtype, self.model.norm.weight.device
        kv = KVCache(cfg.num_hidden_layers, -(-n // block_size), block_size, cfg.num_key_value_heads, cfg.head_dim,
                     dtype, device)
        positions = torch.arange(n, device=device)
        meta = AttentionMetadata(slot_mapping=positions, prefills=[PrefillSpan(0, n, n)], num_prefill_tokens=n)
        return self(torch.tensor(input_ids, device=device), positions, meta, kv, positions)

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        # A tied model has an lm_head module only when quantization gave it its own.
        if "lm_head" in self._modules:
            return self.lm_head(x)
        return F.linear(x, self.model.embed_tokens.weight)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: KVCache, logits_indices: torch.Tensor) -> torch.Tensor:
        """Hidden states of the flattened batch in, logits of the tokens at logits_indices out (fp32)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, meta, kv_cache)
        x = self.model.norm(x[logits_indices])
        return self.compute_logits(x).float()
