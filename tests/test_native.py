"""The native CPU decode kernels (models/csrc/decode.cpp) against the PyTorch path they replace:
each op alone, then a whole decode step of every tiny architecture at every storage (fp32, bf16,
int8, int4), logits and the KV cache written, over sequences that cross KV blocks; then an engine
and a served model with the kernels on and off."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chatserve import EngineConfig, SamplingParams
from chatserve.engine.engine import LLM
from chatserve.models import native
from chatserve.models.layers import Attention, AttentionMetadata, KVCache, PrefillSpan, RMSNorm, RotaryEmbedding
from chatserve.models.loader import load_model


@pytest.fixture(scope="module")
def ops():
    native.start("on", torch.device("cpu"))
    return native.ops()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_and_silu_match_pytorch(ops, dtype):
    torch.manual_seed(0)
    norm = RMSNorm(100, 1e-6)
    norm.weight.data = torch.randn(100)
    norm = norm.to(dtype)
    x, delta = torch.randn(5, 100, dtype=dtype) * 3, torch.randn(5, 100, dtype=dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.02, "rtol": 0.01}
    torch.testing.assert_close(ops.rms_norm(x, norm.weight, 1e-6), norm(x), **tol)
    residual = x.clone()
    out = ops.add_rms_norm(residual, delta, norm.weight, 1e-6)
    torch.testing.assert_close(residual, x + delta, atol=0, rtol=0)  # the residual stream, added in place
    torch.testing.assert_close(out, norm(x + delta), **tol)
    gate_up = torch.randn(3, 2 * 70, dtype=dtype) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate) * up, **tol)


def test_bad_arguments_are_errors_not_crashes(ops):
    with pytest.raises(RuntimeError, match="contiguous 2-D"):
        ops.rms_norm(torch.randn(4, 8).t(), torch.ones(4), 1e-6)
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(torch.randn(4, 8), torch.ones(7), 1e-6)
    # Norms, RoPE and the K/V write (2 heads, 1 KV head of 16): a slot or position past the pool or
    # the tables, a table of another width, never a write out of bounds.
    qkv, tables, pools = torch.randn(3, 64), torch.randn(32, 16), [torch.zeros(8, 1, 16) for _ in range(2)]

    def rope(slots, positions, cos=tables):
        return ops.rope_kv_write(qkv, cos, tables, torch.tensor(positions), *pools, torch.tensor(slots), None, None,
                                 0.0, 2, 1)

    assert rope([0, 1, 7], [0, 5, 31]).shape == (3, 2, 16)
    for slots, positions, message in (([0, 1, 8], [0, 1, 2], "slot out of range"),
                                      ([0, 1, -1], [0, 1, 2], "slot out of range"),
                                      ([0, 1, 2], [0, 1, 32], "position out of range")):
        with pytest.raises(RuntimeError, match=message):
            rope(slots, positions)
    with pytest.raises(RuntimeError, match="cos/sin"):
        rope([0, 1, 2], [0, 1, 2], cos=torch.randn(32, 8))


def prefilled(model, cfg, prompts: list[list[int]], block_size: int):
    """A KV cache holding each prompt, written by the PyTorch prefill path; the sequences' blocks
    are interleaved in the pool (sequence i takes blocks i, i + n, i + 2n, ...)."""
    dtype = model.model.norm.weight.dtype
    n, longest = len(prompts), max(map(len, prompts)) + 1
    blocks_each = -(-longest // block_size)
    kv = KVCache(cfg.num_hidden_layers, n * blocks_each, block_size, cfg.num_key_value_heads, cfg.head_dim,
                 dtype, torch.device("cpu"))
    tables = [[i + n * b for b in range(blocks_each)] for i in range(n)]
    for ids, table in zip(prompts, tables):
        pos = torch.arange(len(ids))
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(len(ids))])
        meta = AttentionMetadata(slot_mapping=slots, block_size=block_size, prefills=[PrefillSpan(0, len(ids), len(ids))],
                                 num_prefill_tokens=len(ids))
        model(torch.tensor(ids), pos, meta, kv, pos[-1:])
    return kv, tables


def decode_meta(prompts, tables, block_size: int) -> tuple[torch.Tensor, AttentionMetadata]:
    """The metadata of one step decoding the token after each prompt, as the runner builds it."""
    lens = [len(p) + 1 for p in prompts]
    positions = torch.tensor([n - 1 for n in lens])
    slots = torch.tensor([t[(n - 1) // block_size] * block_size + (n - 1) % block_size for t, n in zip(tables, lens)])
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(slot_mapping=slots, block_size=block_size)
    meta.decode_block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    meta.decode_context_lens = torch.tensor(lens)
    attend = torch.arange(width * block_size) < meta.decode_context_lens.unsqueeze(1)
    meta.decode_bias = torch.zeros(attend.shape).masked_fill_(~attend, float("-inf"))[:, None, None, :]
    return positions, meta


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8", "int4"])
def test_decode_step_matches_pytorch_path(ops, tiny_model_dir, storage):
    quantization = storage if storage.startswith("int") else None
    dtype = "float32" if storage == "float32" else "bfloat16"
    loaded = load_model(EngineConfig(model=str(tiny_model_dir), dtype=dtype, device="cpu", quantization=quantization))
    model, cfg, block_size = loaded.model, loaded.config, 4
    torch.manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (1, 6, 13)]  # within, at and across blocks
    kv, tables = prefilled(model, cfg, prompts, block_size)
    positions, meta = decode_meta(prompts, tables, block_size)
    tokens = torch.randint(0, cfg.vocab_size, (len(prompts),))
    kv_native = KVCache(cfg.num_hidden_layers, kv.num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim,
                        kv.data.dtype, torch.device("cpu"))
    kv_native.data.copy_(kv.data)
    with torch.inference_mode():
        expected = model(tokens, positions, meta, kv, torch.arange(len(prompts)))
        got = model.forward_native(ops, tokens, positions, meta, kv_native, torch.arange(len(prompts)))
    if storage == "float32":
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(kv_native.data, kv.data, atol=1e-5, rtol=1e-5)
    else:
        # bf16 activations (and int8 ones inside the integer kernel): the two paths round at other
        # points and sum in other orders.
        def rel(a, b):
            return ((a.float() - b.float()).norm() / b.float().norm()).item()

        # bf16 comes out bit-exact today; int8 activations cost the most.
        bound = {"bfloat16": 1e-3, "int4": 0.02, "int8": 0.05}[storage]
        assert rel(got, expected) <= bound, rel(got, expected)
        assert rel(kv_native.data, kv.data) <= bound, rel(kv_native.data, kv.data)
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 2 / 3


@pytest.mark.parametrize("budget", [512, 48], ids=["whole-prompts", "chunked"])
def test_engine_greedy_tokens_are_the_same_with_and_without_the_kernels(ops, qwen3_dir, caplog, monkeypatch, budget):
    """Decodes crossing block boundaries, batched, after prompts prefilled whole or in chunks of a
    48-token budget (the 150-token prompt's later chunks attend to its cached ones)."""
    prompts = [[5, 9, 200, 17], list(range(30, 70)), [(7 * i) % 900 + 3 for i in range(150)]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    counting = CountingOps(ops)
    monkeypatch.setattr(native, "ops", lambda: counting)
    outs = {}
    for mode in ("off", "on"):
        with caplog.at_level(logging.INFO, logger="chatserve.native"):
            llm = LLM(str(qwen3_dir), dtype="float32", device="cpu", native_kernels=mode, block_size=16,
                      max_num_batched_tokens=budget)
        assert llm.engine.runner.native == (mode == "on")
        outs[mode] = [o.token_ids for o in llm.generate(prompts, params)]
        assert (counting.calls > 0) == (mode == "on")  # the prefills attended on the kernel
    assert (counting.behind > 0) == (budget < 150)
    assert outs["on"] == outs["off"]


# (heads, kv_heads, head_dim, qk_norm): groups of 1, 7 (Qwen2.5-0.5B) and 2 (Qwen3, q/k norms);
# head_dim 48 (bf16 scores in fp32: not a multiple of 32), 40 (not of 16) and 272 (over 256): the
# scalar kernel, as every fp16 cache.
ATTENTION_SHAPES = [(4, 4, 64, False), (14, 2, 64, False), (16, 8, 128, True), (6, 2, 48, False),
                    (4, 2, 40, False), (2, 1, 272, False)]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "{}-{}-{}{}".format(*s[:3], "-qknorm" if s[3] else ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_decode_attention_matches_pytorch_over_long_and_uneven_contexts(ops, shape, dtype):
    """ops.decode_attention against Attention's PyTorch path (the projections made identities, so
    both return the attention itself) on one call whose rows' contexts differ widely: 1 token, a
    block and a bit, exactly one 256-token chunk, one past it, and several chunks ending mid-chunk,
    blocks scattered over the pool; the same output whatever the thread count."""
    heads, kv_heads, dim, qk_norm = shape
    torch.manual_seed(3)
    cfg = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=dim,
                          hidden_size=(heads + 2 * kv_heads) * dim, attention_bias=False, qk_norm=qk_norm,
                          rms_norm_eps=1e-6)
    attn = Attention(cfg)
    attn.qkv_proj, attn.o_proj = nn.Identity(), nn.Identity()
    if qk_norm:
        attn.q_norm.weight.data.uniform_(0.5, 1.5)
        attn.k_norm.weight.data.uniform_(0.5, 1.5)
    attn = attn.to(dtype)
    rotary = RotaryEmbedding(dim, 1024, 10000.0, None)
    lens, block_size = [1, 20, 256, 257, 600, 531], 16
    blocks = [-(-n // block_size) for n in lens]
    order = torch.randperm(sum(blocks)).tolist()  # each row's blocks scattered over the pool
    tables = [order[sum(blocks[:i]):sum(blocks[:i + 1])] for i in range(len(lens))]
    k_pool, v_pool = (torch.randn(sum(blocks) * block_size, kv_heads, dim).to(dtype) for _ in range(2))
    positions = torch.tensor([n - 1 for n in lens])
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([t[(n - 1) // block_size] * block_size + (n - 1) % block_size
                                   for t, n in zip(tables, lens)]), block_size=block_size)
    meta.decode_block_tables = torch.tensor([t + [0] * (max(blocks) - len(t)) for t in tables])
    meta.decode_context_lens = torch.tensor(lens)
    attend = torch.arange(max(blocks) * block_size) < meta.decode_context_lens.unsqueeze(1)
    meta.decode_bias = torch.zeros(attend.shape).masked_fill_(~attend, float("-inf"))[:, None, None, :]
    qkv = (torch.randn(len(lens), cfg.hidden_size) * 2).to(dtype)
    cos, sin = rotary(positions, dtype)
    native_meta = AttentionMetadata(meta.slot_mapping, block_size, decode_block_tables=meta.decode_block_tables,
                                    decode_context_lens=meta.decode_context_lens, ops=ops,
                                    rope=(rotary.cos, rotary.sin, positions))
    pools = (k_pool.clone(), v_pool.clone())
    with torch.inference_mode():
        expected = attn(qkv, cos, sin, meta, k_pool, v_pool)
        got = attn(qkv, cos, sin, native_meta, *pools)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            got_2 = attn(qkv, cos, sin, native_meta, *(p.clone() for p in pools))
        finally:
            torch.set_num_threads(threads)
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got_2, got, atol=0, rtol=0)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pools, (k_pool, v_pool), atol=1e-5, rtol=1e-5)  # this token's K and V
    else:  # both sum in fp32 and round the output once; they differ in the order of the sums
        assert ((got.float() - expected.float()).norm() / expected.float().norm()).item() <= 1e-3
        torch.testing.assert_close(got.float(), expected.float(), atol=0.02, rtol=0.02)
        torch.testing.assert_close(pools, (k_pool, v_pool), atol=0.02, rtol=0.02)


def prefill_reference(q, k_pool, v_pool, slots, scale):
    """Causal attention of the last T of C context tokens in fp32 by F.scaled_dot_product_attention:
    the mask aligned bottom-right (query i sees tokens 0 .. C - T + i), KV heads repeated for GQA."""
    rows, heads, _ = q.shape
    k, v = (pool[slots].float().transpose(0, 1) for pool in (k_pool, v_pool))
    k, v = (x.repeat_interleave(heads // k_pool.shape[1], dim=0) for x in (k, v))
    mask = torch.ones(rows, slots.numel(), dtype=torch.bool).tril(diagonal=slots.numel() - rows)
    return F.scaled_dot_product_attention(q.float().transpose(0, 1), k, v, attn_mask=mask, scale=scale).transpose(0, 1)


def scattered_pools(context: int, kv_heads: int, dim: int, dtype, block_size: int = 16):
    """K/V pools of more blocks than the context takes, the context's blocks shuffled over them and
    every other slot NaN (a read outside the context poisons the result); the context's slots."""
    blocks = -(-context // block_size)
    order = torch.randperm(blocks + 7)[:blocks]
    slots = (order.unsqueeze(1) * block_size + torch.arange(block_size)).view(-1)[:context]
    pools = []
    for _ in range(2):
        pool = torch.full(((blocks + 7) * block_size, kv_heads, dim), float("nan"), dtype=dtype)
        pool[slots] = torch.randn(context, kv_heads, dim).to(dtype)
        pools.append(pool)
    return (*pools, slots)


# (heads, kv_heads, head_dim): SmolLM2, Qwen2.5-0.5B, Qwen3; 48: bf16 rows of 24 pairs (16 and a
# part 16-word transpose); 40: not a multiple of 16 (the scalar kernel, as every fp16 cache).
PREFILL_SHAPES = [(9, 3, 64), (14, 2, 64), (16, 8, 128), (6, 2, 48), (4, 2, 40)]
# (queries, context): a fresh prompt (context = queries) of 1, 7, 33 and 512 tokens; a chunk behind
# cached tokens, crossing tiles and blocks unevenly; a 128-token chunk at the end of 640.
PREFILL_SIZES = [(1, 1), (7, 7), (33, 33), (512, 512), (77, 177), (128, 640)]


@pytest.mark.parametrize("sizes", PREFILL_SIZES, ids=lambda s: "{}-of-{}".format(*s))
@pytest.mark.parametrize("shape", PREFILL_SHAPES, ids=lambda s: "{}-{}-{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_prefill_attention_matches_sdpa(ops, dtype, shape, sizes):
    heads, kv_heads, dim = shape
    rows, context = sizes
    if dtype == torch.float16 and (dim != 64 or rows == 512):
        pytest.skip("the scalar kernel: a few shapes are enough")
    torch.manual_seed(rows * 1000 + context + dim)
    k_pool, v_pool, slots = scattered_pools(context, kv_heads, dim, dtype)
    q = (torch.randn(rows, heads, dim) * 2).to(dtype)  # scores of a few units: a peaked softmax
    scale = dim ** -0.5
    got = ops.prefill_attention(q, k_pool, v_pool, slots, scale)
    expected = prefill_reference(q, k_pool, v_pool, slots, scale)
    assert got.dtype == dtype and got.shape == q.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    else:  # rounded to 8 (bf16) or 11 (fp16) bits at the end, bf16 P rounded before P . V
        bound = 1e-2 if dtype == torch.bfloat16 else 2e-3
        assert ((got.float() - expected).norm() / expected.norm()).item() <= bound
    if rows >= 128:  # tasks are independent of the thread count: the same bits on 2 threads
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            torch.testing.assert_close(ops.prefill_attention(q, k_pool, v_pool, slots, scale), got, atol=0, rtol=0)
        finally:
            torch.set_num_threads(threads)


def test_prefill_attention_bad_arguments_are_errors(ops):
    k_pool, v_pool, slots = scattered_pools(40, 2, 64, torch.float32)
    q = torch.randn(8, 6, 64)
    bad_slot = slots.clone()
    bad_slot[3] = k_pool.shape[0]  # one past the pool
    with pytest.raises(RuntimeError, match="outside the pool"):
        ops.prefill_attention(q, k_pool, v_pool, bad_slot, 0.125)
    bad_slot[3] = -1
    with pytest.raises(RuntimeError, match="outside the pool"):
        ops.prefill_attention(q, k_pool, v_pool, bad_slot, 0.125)
    with pytest.raises(RuntimeError, match="fewer slots"):
        ops.prefill_attention(q, k_pool, v_pool, slots[:7], 0.125)
    with pytest.raises(RuntimeError, match="head_dim"):
        ops.prefill_attention(torch.randn(8, 6, 32), k_pool, v_pool, slots, 0.125)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        ops.prefill_attention(torch.randn(8, 5, 64), k_pool, v_pool, slots, 0.125)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.prefill_attention(q.bfloat16(), k_pool, v_pool, slots, 0.125)
    with pytest.raises(RuntimeError, match="of one shape"):
        ops.prefill_attention(q, k_pool, v_pool[:-1], slots, 0.125)
    with pytest.raises(RuntimeError, match="int64"):
        ops.prefill_attention(q, k_pool, v_pool, slots.int(), 0.125)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.prefill_attention(q.transpose(0, 1), k_pool, v_pool, slots, 0.125)
    assert ops.prefill_attention_vectorised(torch.float32, 64) and not ops.prefill_attention_vectorised(torch.float32, 40)
    assert not ops.prefill_attention_vectorised(torch.float16, 64)


class CountingOps:
    """The native ops, counting the prefill_attention calls and the spans behind cached tokens."""

    def __init__(self, ops):
        self.ops, self.calls, self.behind = ops, 0, 0

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def prefill_attention(self, q, k_pool, v_pool, slots, scale):
        self.calls += 1
        self.behind += slots.numel() > q.shape[0]
        return self.ops.prefill_attention(q, k_pool, v_pool, slots, scale)


def mixed_meta(prompts, tables, block_size: int, fresh: int, cached: int, chunk: int):
    """A step as the runner builds it for `mixed_step_inputs`: a fresh prompt of `fresh` tokens in
    sequence 3's blocks, a chunk of `chunk` tokens of sequence 2 behind its `cached` ones, then one
    decode row for each of sequences 0 and 1 (after their prompts)."""
    def slot(table, p):
        return table[p // block_size] * block_size + p % block_size

    spans = [PrefillSpan(0, fresh, fresh),
             PrefillSpan(fresh, fresh + chunk, cached + chunk, torch.tensor(tables[2][: -(-(cached + chunk) // block_size)]),
                         torch.ones(chunk, cached + chunk, dtype=torch.bool).tril(diagonal=cached))]
    positions = list(range(fresh)) + list(range(cached, cached + chunk)) + [len(p) for p in prompts[:2]]
    owner = [3] * fresh + [2] * chunk + [0, 1]
    slots = torch.tensor([slot(tables[s], p) for s, p in zip(owner, positions)])
    meta = AttentionMetadata(slot_mapping=slots, block_size=block_size, prefills=spans, num_prefill_tokens=fresh + chunk)
    _, decode = decode_meta(prompts[:2], tables[:2], block_size)
    meta.decode_block_tables, meta.decode_context_lens = decode.decode_block_tables, decode.decode_context_lens
    return torch.tensor(positions), meta, decode.decode_bias


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mixed_step_decode_rows_on_the_kernel_match_pytorch(ops, tiny_model_dir, dtype):
    """A step with two prefill spans (one from scratch, one behind a cached prefix) and decode rows
    crossing KV blocks: every row's norms, RoPE and K/V write, the prefill spans' and the decode
    rows' attention on the native kernels (meta.ops) give the PyTorch path's logits and KV cache."""
    loaded = load_model(EngineConfig(model=str(tiny_model_dir), dtype=dtype, device="cpu"))
    model, cfg, block_size = loaded.model, loaded.config, 4
    torch.manual_seed(2)
    # Sequence 0 decodes at position 12 (its fourth block), 1 at 4 (a new block), 2 holds 9 cached
    # tokens and prefills 5 more; 3 is a placeholder whose blocks the fresh 7-token prompt takes.
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (12, 4, 9, 1)]
    kv, tables = prefilled(model, cfg, prompts, block_size)
    positions, meta, bias = mixed_meta(prompts, tables, block_size, fresh=7, cached=9, chunk=5)
    tokens = torch.randint(0, cfg.vocab_size, (positions.numel(),))
    kv_native = KVCache(cfg.num_hidden_layers, kv.num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim,
                        kv.data.dtype, torch.device("cpu"))
    kv_native.data.copy_(kv.data)
    every = torch.arange(positions.numel())
    counting = CountingOps(ops)
    with torch.inference_mode():
        meta.decode_bias = bias
        expected = model(tokens, positions, meta, kv, every)
        meta.decode_bias, meta.ops = None, counting  # as the runner hands it over with the kernels loaded
        got = model(tokens, positions, meta, kv_native, every)
    # Both prefill spans of every layer on prefill_attention, one behind its cached tokens.
    assert counting.calls == 2 * cfg.num_hidden_layers and counting.behind == cfg.num_hidden_layers
    if dtype == "float32":
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(kv_native.data, kv.data, atol=1e-5, rtol=1e-5)
    else:
        def rel(a, b):
            return ((a.float() - b.float()).norm() / b.float().norm()).item()

        # The decode rows (which attend to other sequences) within test_decode_step_matches_pytorch_path's
        # bound. The prefill rows' attention sums in another order than SDPA's and rounds its
        # weights to bf16 for P . V (as SDPA's own bf16 kernel): in these tiny bf16 models the two
        # paths' logits are ~1% apart, each 1.5-1.7% from the fp32 model's (the kernel's nearer).
        assert rel(got[12:], expected[12:]) <= 1e-3
        assert rel(got, expected) <= 0.02 and rel(kv_native.data, kv.data) <= 0.02
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 2 / 3


def test_engine_mixed_steps_greedy_tokens_are_the_same_with_and_without_the_kernels(ops, qwen3_dir):
    """Prompts prefilling in chunks of a 16-token budget while others decode, and a prompt behind a
    cached prefix arriving mid-run: every step's tokens the same with the kernels on and off."""
    first, long = [5, 9, 200, 17], list(range(30, 70))
    late = long[:32] + [7, 8, 9, 10, 11]  # two full blocks of `long` cached
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for mode in ("off", "on"):
        engine = LLM(str(qwen3_dir), dtype="float32", device="cpu", native_kernels=mode, block_size=16,
                     max_num_batched_tokens=16).engine
        assert engine.runner.native == (mode == "on")
        reqs = [engine.make_request(p, params) for p in (first, long, late)]
        engine.add(reqs[0])
        engine.add(reqs[1])
        mixed = steps = 0
        while engine.has_unfinished():
            if steps == 5:
                engine.add(reqs[2])
            batch = engine.scheduler.schedule()
            sizes = [n for _, n in batch.items]
            mixed += max(sizes) > 1 and min(sizes) == 1
            engine._run(batch.items)  # not step(): a failing step must fail the test, not be retried alone
            steps += 1
        assert mixed >= 3
        assert engine.stats().prefix_cache_hit_tokens >= 32  # `late` prefilled behind its cached prefix
        outs[mode] = [r.token_ids[r.num_prompt_tokens:] for r in reqs]
    assert outs["on"] == outs["off"]


def test_native_kernels_flag(tmp_path):
    with pytest.raises(ValueError, match="native_kernels"):
        EngineConfig(native_kernels="sometimes").validate()
    from chatserve.cli import build_parser

    args = build_parser().parse_args(["serve", "--native-kernels", "off"])
    assert args.native_kernels == "off"


def matches_dequantized(layer, deq: torch.Tensor, bias: torch.Tensor, row_counts) -> None:
    """layer(x) against x @ deq.T + bias for fp32 and bf16 activations, rows in the counts the tile
    driver splits differently. The activations go in int8 blocks of 32, as llama.cpp's Q8_0 dot
    products: ~0.4% error."""
    out_features, in_features = deq.shape
    for rows in row_counts:
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(rows, in_features) * 2).to(dtype)
            expected = x.float() @ deq.t() + bias
            got = layer(x)
            assert got.dtype == dtype and got.shape == (rows, out_features)
            assert ((got.float() - expected).norm() / expected.norm()).item() < 0.01


def test_int8_kernel_is_the_int8_matmul(ops):
    if not ops.integer_kernels_available():
        pytest.skip("this CPU has no AVX-512 VNNI: int8 layers keep PyTorch's kernel")
    from chatserve.models.quantization import Int8Linear, NativeInt8Embedding, dequantize_int8_blocks, quantize_int8

    torch.manual_seed(0)
    weight, bias = torch.randn(208, 160) * 0.05, torch.randn(208)  # 13 tiles: an odd count; 5 blocks
    q, scales = quantize_int8(weight, block=32)
    layer = Int8Linear(q, scales, bias, native=True)
    assert layer.native and not hasattr(layer, "qweight")
    deq = dequantize_int8_blocks(q, scales.half().float())  # the layout keeps fp16 scales, as Q8_0
    matches_dequantized(layer, deq, bias, (1, 2, 3, 4, 7, 32, 77))  # 1-2 rows: four tiles at once
    # Its rows serve a tied embedding's lookups exactly.
    embedding = NativeInt8Embedding(layer, torch.float32)
    ids = torch.tensor([[0, 15, 16], [207, 100, 31]])
    torch.testing.assert_close(embedding(ids), deq[ids], atol=0, rtol=0)
    # A per-row scale is the same layout with each block at the row's scale; a file's blocks may
    # come as a strided [out, blocks, 32] view.
    q_row, row_scales = quantize_int8(weight)
    per_row = Int8Linear(q_row, row_scales, native=True)
    x = torch.randn(2, 160)
    expected = x @ (q_row.float() * row_scales.half().float().unsqueeze(1)).t()
    assert ((per_row(x) - expected).norm() / expected.norm()).item() < 0.01
    strided = torch.zeros(208, 5, 40, dtype=torch.int8)[..., 4:36]
    strided.copy_(q.view(208, 5, 32))
    assert torch.equal(Int8Linear(strided, scales, native=True).packed, layer.packed)
    with pytest.raises(RuntimeError, match="does not match"):
        ops.int8_gemm(torch.randn(1, 96), layer.packed, layer.block_scales, 208)


def test_int4_kernel_is_the_int4_matmul(ops):
    """Both int4 layouts: scales and mins (Q4_1, --quantization int4), and Q4_0's fp16 scales alone
    (every zero 0), against the dequantized weights, every row count the tile driver splits."""
    if not ops.integer_kernels_available():
        pytest.skip("this CPU has no AVX-512 VNNI: int4 layers keep PyTorch's kernel")
    from chatserve.models.quantization import Int4Linear, quantize_int4

    torch.manual_seed(0)
    weight, bias = torch.randn(208, 160) * 0.05, torch.randn(208)  # 13 tiles, 5 groups
    q, scales, zeros = quantize_int4(weight, 32)
    symmetric_scales = (weight.view(208, 5, 32).abs().amax(-1) / 7).half().float()  # as Q4_0 stores them
    q_symmetric = (weight.view(208, 5, 32) / symmetric_scales.unsqueeze(-1)).round().clamp(-8, 7).view(208, 160) + 8
    for q, scales, zeros, scale_dtype in ((q, scales, zeros, torch.bfloat16),
                                          (q_symmetric.to(torch.uint8), symmetric_scales, torch.zeros_like(scales),
                                           torch.float16)):
        layer = Int4Linear(q, scales, zeros, 32, bias, native=True)
        assert layer.native and layer.scales.dtype == scale_dtype
        kept = scales.to(scale_dtype).float()  # the layout keeps the scales (and mins) at its dtype
        mins = (zeros - 8 * scales).to(scale_dtype).float()
        deq = (q.float().view(208, 5, 32) * kept.unsqueeze(-1) + mins.unsqueeze(-1)).view(208, 160)
        matches_dequantized(layer, deq, bias, (1, 2, 3, 7, 32, 77))
    with pytest.raises(RuntimeError, match="does not match"):
        ops.int4_gemm(torch.randn(1, 96), layer.packed, layer.scales, 208)


def test_kernel_cache_clears_dead_builds_and_stale_libraries(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    import time

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = native.cache_dir()
    cache.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    files = {name: cache / name for name in (
        f"decode-aaaa.{dead_pid}.1.tmp",        # a build whose process died: removed
        f"decode-aaaa.{os.getpid()}.1.tmp",     # a build going on: kept
        "decode-old.so", "decode-recent.so", "decode-current.so", "notes.txt")}
    for f in files.values():
        f.write_bytes(b"x")
    month_ago = time.time() - (native.STALE_DAYS + 1) * 86400
    for name in ("decode-old.so", "decode-current.so", "notes.txt"):
        os.utime(files[name], (month_ago, month_ago))
    native.tidy(files["decode-current.so"])
    assert sorted(f.name for f in cache.iterdir()) == sorted([
        f"decode-aaaa.{os.getpid()}.1.tmp", "decode-recent.so", "decode-current.so", "notes.txt"])
