"""The native CPU decode kernels (models/csrc/decode.cpp) against the PyTorch path they replace:
each op alone, then a whole decode step of every tiny architecture at every storage (fp32, bf16,
int8, int4), logits and the KV cache written, over sequences that cross KV blocks; then an engine
and a served model with the kernels on and off."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from chatserve import EngineConfig, SamplingParams
from chatserve.engine.engine import LLM
from chatserve.models import native
from chatserve.models.layers import AttentionMetadata, KVCache, PrefillSpan, RMSNorm
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
        got = model.decode(ops, tokens, positions, meta, kv_native, torch.arange(len(prompts)))
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


def test_engine_greedy_tokens_are_the_same_with_and_without_the_kernels(ops, qwen3_dir, caplog):
    prompts = [[5, 9, 200, 17], list(range(30, 70))]  # decodes crossing block boundaries, batched
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = {}
    for mode in ("off", "on"):
        with caplog.at_level(logging.INFO, logger="chatserve.native"):
            llm = LLM(str(qwen3_dir), dtype="float32", device="cpu", native_kernels=mode, block_size=16)
        assert llm.engine.runner.native == (mode == "on")
        outs[mode] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs["on"] == outs["off"]


def test_native_kernels_flag(tmp_path):
    with pytest.raises(ValueError, match="native_kernels"):
        EngineConfig(native_kernels="sometimes").validate()
    from chatserve.cli import build_parser

    args = build_parser().parse_args(["serve", "--native-kernels", "off"])
    assert args.native_kernels == "off"


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
    for rows in (1, 2, 3, 4, 7, 32, 77):  # one and two rows take four tiles at once, more go by fours
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(rows, 160) * 2).to(dtype)
            expected = x.float() @ deq.t() + bias
            got = layer(x)
            assert got.dtype == dtype and got.shape == (rows, 208)
            # Activations in int8 blocks of 32, as llama.cpp's Q8_0 dot products: ~0.4% error.
            assert ((got.float() - expected).norm() / expected.norm()).item() < 0.01
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
