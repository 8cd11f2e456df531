"""Weight-only int8 / int4 quantization of a safetensors model at load (--quantization)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from chatserve import Engine, EngineConfig, SamplingParams
from chatserve.models.loader import cpu_has_native_bf16, load_model
from chatserve.models.quantization import (
    INT8_KERNEL_MAX_ROWS,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    PackedLinear,
    SplitEmbedding,
    SplitLinear,
    check_supported,
    quantize_int4,
    quantize_int8,
)

TEXT_IDS = [17, 250, 3, 999, 42, 640, 77, 5, 310, 128, 64, 900, 11, 12, 13, 500, 501, 2, 760, 33] * 3


def test_int8_layer_is_its_dequantized_matmul():
    torch.manual_seed(0)
    w, bias = torch.randn(96, 64) * 0.1, torch.randn(96)
    layer = Int8Linear.quantize(w, bias)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    deq = q.float() * scales.bfloat16().float().unsqueeze(1)
    # The kernel (few rows) and the dequantized GEMM (many rows) compute the same product.
    for rows in (1, INT8_KERNEL_MAX_ROWS + 8):
        x = torch.randn(rows, 64)
        expected = F.linear(x.bfloat16().float(), deq, bias)
        torch.testing.assert_close(layer(x), expected, atol=0.05, rtol=0.02)
    assert (deq - w).abs().max() <= w.abs().max() / 127


def test_int4_layer_is_its_dequantized_matmul():
    torch.manual_seed(1)
    w = torch.randn(64, 128) * 0.1
    q, scales, zeros = quantize_int4(w, 32)
    assert q.min() >= 0 and q.max() <= 15
    deq = ((q.float() - 8).view(64, 4, 32) * scales.unsqueeze(-1) + zeros.unsqueeze(-1)).view(64, 128)
    assert (deq - w).abs().max() <= (scales.max() / 2) * 1.001  # rounding: at most half a step
    layer = Int4Linear(q, scales, zeros, 32)
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), F.linear(x, deq), atol=0.05, rtol=0.02)
    assert layer(x.view(1, 3, 128)).shape == (1, 3, 64)
    assert not Int4Linear.fits((1005, 128)) and Int4Linear.fits((64, 128))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_model_stays_close_to_fp32(qwen2_dir, method, caplog):
    fp32 = load_model(EngineConfig(model=str(qwen2_dir), device="cpu", dtype="float32"))
    with caplog.at_level(logging.INFO, logger="chatserve.loader"):
        quant = load_model(EngineConfig(model=str(qwen2_dir), device="cpu", dtype="float32", quantization=method))
    layer = quant.model.model.layers[0]
    kind = Int8Linear if method == "int8" else Int4Linear
    assert isinstance(layer.self_attn.qkv_proj, kind) and isinstance(layer.mlp.down_proj, kind)
    assert layer.self_attn.qkv_proj.bias is not None  # Qwen2's biases came along
    torch.testing.assert_close(layer.self_attn.qkv_proj.bias, fp32.model.model.layers[0].self_attn.qkv_proj.bias)
    assert isinstance(quant.model.model.embed_tokens, Int8Embedding)
    # The tied head got its own quantized layer (int8 for int4 too: 1005 outputs do not tile by 16).
    assert isinstance(quant.model.lm_head, Int8Linear)
    (line,) = [r.getMessage() for r in caplog.records if "quantized weights" in r.getMessage()]
    assert f"{method}" in line and "MiB at float32 ->" in line
    before, after = (float(x.split()[0]) for x in line.split("weights ")[-1].split("->"))
    assert after < before / 2
    ref, got = fp32.model.score(TEXT_IDS), quant.model.score(TEXT_IDS)
    cosine = F.cosine_similarity(ref, got, dim=-1).min().item()
    assert cosine > (0.995 if method == "int8" else 0.85), cosine
    # The engine runs it: greedy decode (the kernel path, one row) matches the model's own scoring.
    engine = Engine(EngineConfig(model=quant.name, device="cpu", dtype="float32", num_kv_blocks=32), loaded=quant)
    rid = engine.add_request({"prompt_token_ids": TEXT_IDS}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    tokens = engine.run_to_completion([rid])[rid].token_ids
    assert tokens[0] == got[-1].argmax().item()


def test_quantization_is_checked_up_front():
    with pytest.raises(ValueError, match="int8, int4 or none"):
        EngineConfig(quantization="q4_k").validate()
    with pytest.raises(ValueError, match="runs on the CPU only"):
        check_supported("int4", torch.device("cuda"))
    check_supported("none", torch.device("cuda"))


def test_split_linear_and_embedding_are_the_plain_ones():
    torch.manual_seed(2)
    weight, bias = torch.randn(1006, 64), torch.randn(1006)
    blocks = SplitLinear.split(weight, 2)
    assert blocks.shape == (2, 64, 503)
    for rows in (1, 5):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(SplitLinear(blocks, bias)(x), F.linear(x, weight, bias))
    ids = torch.tensor([0, 502, 503, 1005, 7])
    assert torch.equal(SplitEmbedding(blocks)(ids), weight[ids])


@pytest.mark.parametrize("native_kernels", ["off", "on"])
def test_fp32_linears_are_split_per_thread_or_native(qwen2_dir, native_kernels):
    """With 2 threads an fp32 model keeps its Linear weights as SplitLinear blocks, or with the
    native kernels in their tiles (NativeFloatLinear); without either, plain Linears (the tests'
    default of 1 thread): same logits, same greedy tokens."""
    from chatserve.models.quantization import NativeFloatLinear

    plain = load_model(EngineConfig(model=str(qwen2_dir), device="cpu", dtype="float32", native_kernels="off"))
    assert isinstance(plain.model.model.layers[0].self_attn.qkv_proj, torch.nn.Linear)
    kind = NativeFloatLinear if native_kernels == "on" else SplitLinear
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        split = load_model(EngineConfig(model=str(qwen2_dir), device="cpu", dtype="float32",
                                        native_kernels=native_kernels))
        layer = split.model.model.layers[0]
        assert isinstance(layer.self_attn.qkv_proj, kind) and isinstance(layer.mlp.down_proj, kind)
        assert layer.self_attn.qkv_proj.bias is not None
        torch.testing.assert_close(split.model.score(TEXT_IDS), plain.model.score(TEXT_IDS), atol=1e-5, rtol=1e-5)
        if kind is NativeFloatLinear:  # the tied head's tiles serve the embedding's lookups
            ids = torch.tensor([0, 5, 17, split.config.vocab_size - 1])
            assert torch.equal(split.model.model.embed_tokens(ids), plain.model.model.embed_tokens(ids))
        tokens = []
        for loaded in (plain, split):
            engine = Engine(EngineConfig(model=loaded.name, device="cpu", dtype="float32", num_kv_blocks=32,
                                         native_kernels=native_kernels), loaded=loaded)
            rid = engine.add_request({"prompt_token_ids": TEXT_IDS},
                                     SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
            tokens.append(engine.run_to_completion([rid])[rid].token_ids)
        assert tokens[0] == tokens[1]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("native_kernels", ["off", "on"])
def test_packed_bf16_linear_is_the_plain_one(qwen2_dir, native_kernels):
    """bf16 Linears where the CPU has native bf16: oneDNN's packed layout, or the native kernel's
    (with the native kernels on); either multiplies as F.linear does."""
    from chatserve.models import native
    from chatserve.models.quantization import NativeFloatLinear

    loaded = load_model(EngineConfig(model=str(qwen2_dir), device="cpu", dtype="bfloat16",
                                     native_kernels=native_kernels))
    kind = PackedLinear
    if native_kernels == "on" and native.ops().float_kernels_available(torch.bfloat16):
        kind = NativeFloatLinear
    packed = isinstance(loaded.model.model.layers[0].self_attn.qkv_proj, kind)
    assert packed == cpu_has_native_bf16()  # only where the CPU has native bf16
    if not packed:
        pytest.skip("this CPU has no native bf16 (avx512_bf16/AMX): bf16 Linears stay plain")
    torch.manual_seed(3)
    weight, bias = torch.randn(96, 64, dtype=torch.bfloat16), torch.randn(96, dtype=torch.bfloat16)
    layer = kind(weight, torch.bfloat16, bias) if kind is NativeFloatLinear else kind(weight, bias)
    for shape in ((1, 64), (5, 64), (2, 3, 64)):
        x = torch.randn(shape, dtype=torch.bfloat16)
        torch.testing.assert_close(layer(x), F.linear(x, weight, bias))
    if kind is NativeFloatLinear and loaded.model.tie_word_embeddings:
        # The tied head on the native kernel serves the embedding's lookups from its own layout.
        ids = torch.tensor([0, 5, 17, loaded.config.vocab_size - 1])
        plain = load_model(EngineConfig(model=str(qwen2_dir), device="cpu", dtype="bfloat16", native_kernels="off"))
        torch.testing.assert_close(loaded.model.model.embed_tokens(ids), plain.model.model.embed_tokens(ids),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_a_bias_after_its_quantized_weight_is_kept(qwen2_dir, quantization):
    """GGUF files may list a projection's weight before its bias: the bias lands on the quantized
    layer that replaced the Linear."""
    from safetensors.torch import load_file

    from chatserve.models import ARCHITECTURES
    from chatserve.models.loader import WeightLoader, WeightSource, build_model, read_json

    tensors = load_file(qwen2_dir / "model.safetensors")
    raw = read_json(qwen2_dir / "config.json")
    cls = ARCHITECTURES[raw["architectures"][0]]
    model = build_model(cls, cls.read_config(raw), torch.device("cpu"))
    loader = WeightLoader(model, torch.device("cpu"), torch.float32, quantization)
    for name in sorted(tensors, key=lambda n: n.endswith(".bias")):  # every weight before any bias
        loader.put(name, WeightSource(tuple(tensors[name].shape), lambda t=tensors[name]: t))
    loader.finish("the test's tensors")
    qkv = model.model.layers[1].self_attn.qkv_proj
    assert isinstance(qkv, Int8Linear if quantization == "int8" else Int4Linear)
    expected = torch.cat([tensors[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv"])
    torch.testing.assert_close(qkv.bias, expected)
