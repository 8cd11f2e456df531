"""The model loader: memory-mapped weights, dtype conversion, --load-format dummy, and clear
errors for what cannot be loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatserve import Engine, EngineConfig, SamplingParams
from chatserve.models import ARCHITECTURES
from chatserve.models.dummy import build_dummy_tokenizer
from chatserve.models.loader import ModelLoadError, load_model, resolve_dtype

SRC = str(Path(__file__).resolve().parents[1] / "src")




def load(path, **kw):
    kw.setdefault("dtype", "float32")
    return load_model(EngineConfig(model=str(path), device="cpu", **kw))


def prompt_logits(loaded, ids: list[int]) -> torch.Tensor:
    return loaded.model.score(ids)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


PROMPT = [17, 250, 3, 999, 42, 640, 77, 5, 310, 128, 64, 900, 11, 12, 13, 500, 501, 2, 760, 33]


# -- memory-mapped weights -----------------------------------------------------------------------

RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import psutil, torch
    from transformers import AutoTokenizer
    from chatserve.config import EngineConfig
    from chatserve.models.loader import load_model

    def peak_rss():
        # VmHWM is this process's own peak. ru_maxrss is not, in a child started by
        # vfork/exec: the kernel seeds it with the parent's peak (here, pytest's).
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    path, dtype, tiny_path = sys.argv[1:4]
    torch.set_num_threads(1)
    # Pay the one-time costs (imports, torch's meta-device kernels, the tokenizer) on a tiny
    # model through the same path, so what is measured next is the weights alone.
    load_model(EngineConfig(model=tiny_path, dtype=dtype, device="cpu"))
    AutoTokenizer.from_pretrained(path)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak to the current RSS
    except OSError:
        pass  # the peak then also covers the warm-up, which only makes the bound stricter
    base = psutil.Process().memory_info().rss
    loaded = load_model(EngineConfig(model=path, dtype=dtype, device="cpu"))
    # Touch every weight, as the first forward pass will.
    total = sum(float(p.float().sum()) for p in loaded.model.parameters())
    peak = max(peak_rss(), psutil.Process().memory_info().rss)
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].endswith(".safetensors"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                maps.append((lo, hi))
    params = list(loaded.model.parameters())
    mapped = sum(any(lo <= p.data_ptr() < hi for lo, hi in maps) for p in params)
    print(json.dumps({"base": base, "peak": peak, "growth": peak - base, "mapped": mapped,
                      "params": len(params), "dtypes": sorted({str(p.dtype) for p in params}),
                      "finite": total == total}))
""")


@pytest.fixture(scope="module")
def big_model_dir(tmp_path_factory) -> Path:
    """A ~50 MB fp32 Qwen2 directory: large enough that a copy of the weights shows in RSS."""
    path = tmp_path_factory.mktemp("big_qwen2")
    tokenizer = build_dummy_tokenizer()
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": len(tokenizer),
        "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": False, "torch_dtype": "float32",
        "eos_token_id": tokenizer.eos_token_id,
    }
    (path / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(path)
    cls = ARCHITECTURES["Qwen2ForCausalLM"]
    with torch.device("meta"):  # names and shapes only
        model = cls(cls.read_config(config))
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(p.shape, generator=gen) * 0.02 for name, p in model.named_parameters()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def run_rss_script(path: Path, dtype: str, tiny_path: Path) -> dict:
    pytest.importorskip("psutil")
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc to read the peak RSS")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), dtype, str(tiny_path)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fp32_weights_load_at_one_copy_of_memory(big_model_dir, qwen2_dir):
    weight_bytes = (big_model_dir / "model.safetensors").stat().st_size
    assert 40e6 < weight_bytes < 80e6
    result = run_rss_script(big_model_dir, "float32", qwen2_dir)
    assert result["dtypes"] == ["torch.float32"] and result["finite"]
    # Copied out of the file mapping (aligned memory decodes faster), whose pages were released
    # as each tensor was copied: the peak is one copy of the weights, not two.
    assert result["mapped"] == 0
    assert result["growth"] <= 1.3 * weight_bytes, f"peak RSS grew {result['growth'] / weight_bytes:.2f}x the weights"


def test_bf16_conversion_does_not_keep_the_fp32_pages(big_model_dir, qwen2_dir):
    weight_bytes = (big_model_dir / "model.safetensors").stat().st_size
    result = run_rss_script(big_model_dir, "bfloat16", qwen2_dir)
    assert result["dtypes"] == ["torch.bfloat16"] and result["finite"]
    assert result["mapped"] == 0  # converted copies
    # Half the bytes, plus file pages of the tensor being converted; not the fp32 file as well.
    assert result["growth"] <= 0.8 * weight_bytes, f"peak RSS grew {result['growth'] / weight_bytes:.2f}x the weights"


SKELETON_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from chatserve.models import ARCHITECTURES
    from chatserve.models.layers import RotaryEmbedding
    from chatserve.models.loader import build_model

    raw = json.loads(sys.argv[1])
    cls = ARCHITECTURES[raw["architectures"][0]]
    cfg = cls.read_config(raw)
    model = build_model(cls, cfg, torch.device("cpu"))
    rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
    print(json.dumps({
        "meta": sorted(n for n, p in model.named_parameters() if p.is_meta),
        "real": sorted(n for n, p in model.named_parameters() if not p.is_meta),
        "rotary": all(map(torch.equal, model.rotary.tables(), rotary.tables())),
        "dynamo": "torch._dynamo" in sys.modules}))
""")


def test_model_skeleton_is_built_without_memory_or_torch_dynamo():
    """Parameters on the meta device until the weights arrive, without running anything on meta
    tensors: that imports torch._dynamo (sympy, mpmath, ...), ~145 MiB of RSS for the whole run."""
    raw = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
           "rope_theta": 1000000.0, "max_position_embeddings": 256, "tie_word_embeddings": False}
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", SKELETON_SCRIPT, json.dumps(raw)], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "model.embed_tokens.weight" in result["meta"] and "lm_head.weight" in result["meta"]
    assert "model.layers.1.self_attn.qkv_proj.bias" in result["meta"]
    assert all(name.endswith("norm.weight") for name in result["real"])  # ones, a few KB
    assert result["rotary"]
    assert not result["dynamo"]


# -- dtypes ----------------------------------------------------------------------------------------


def test_bf16_load_gives_close_logits(qwen2_dir):
    fp32, bf16 = load(qwen2_dir), load(qwen2_dir, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    # Parameters that stay parameters (the bf16 Linear weights are packed for oneDNN: PackedLinear,
    # checked against F.linear in test_quantization.py) are the fp32 ones converted.
    bf16_params = dict(bf16.model.named_parameters())
    for name, a in fp32.model.named_parameters():
        if name in bf16_params:
            assert torch.equal(a.to(torch.bfloat16), bf16_params[name]), name
    want, got = prompt_logits(fp32, PROMPT), prompt_logits(bf16, PROMPT)
    assert got.dtype == torch.float32 and got.shape == want.shape == (len(PROMPT), fp32.config.vocab_size)
    scale = want.abs().max()
    assert (got - want).abs().max() <= 0.05 * scale
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.99


def test_resolve_dtype_auto_follows_the_cpu():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native_bf16 else torch.float32)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32


# -- --load-format dummy --------------------------------------------------------------------------


def test_dummy_load_format_needs_no_weight_files(qwen3_dir, tmp_path):
    path = copy_model(qwen3_dir, tmp_path / "no_weights")
    for f in path.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load(path)
    real = load(qwen3_dir)
    dummy = load(path, load_format="dummy")
    real_params = dict(real.model.named_parameters())
    dummy_params = dict(dummy.model.named_parameters())
    assert real_params.keys() == dummy_params.keys()
    for name, p in dummy_params.items():
        assert p.shape == real_params[name].shape and p.device.type == "cpu" and p.dtype == torch.float32, name
        if not name.endswith("norm.weight"):
            assert p.std() > 0 and not torch.equal(p, real_params[name]), name
    # Deterministic per seed, and the engine runs on it.
    again = load(path, load_format="dummy")
    assert all(torch.equal(p, dict(again.model.named_parameters())[n]) for n, p in dummy_params.items())
    engine = Engine(EngineConfig(model=str(path), device="cpu", dtype="float32", num_kv_blocks=16), loaded=dummy)
    rid = engine.add_request("Hello!", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(engine.run_to_completion([rid])[rid].token_ids) == 4


# -- errors ----------------------------------------------------------------------------------------


def test_unsupported_architecture(qwen2_dir, tmp_path):
    path = copy_model(qwen2_dir, tmp_path / "gpt2")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as err:
        load(path)
    message = str(err.value)
    assert "GPT2LMHeadModel" in message and "not supported" in message
    for arch in ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM"):
        assert arch in message


def test_missing_weight_is_named(qwen2_dir, tmp_path):
    path = copy_model(qwen2_dir, tmp_path / "missing")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load(path)


def test_wrong_weight_shape_is_named(qwen2_dir, tmp_path):
    path = copy_model(qwen2_dir, tmp_path / "shape")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight.*\(3,\)"):
        load(path)


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="neither a directory holding config.json and weights nor a .gguf file"):
        load(tmp_path / "does-not-exist")


def test_hub_id_offline_and_not_cached(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelLoadError) as err:
        load("some-org/some-model-7b")
    message = str(err.value)
    assert "some-org/some-model-7b" in message and "not in the local cache" in message
    assert "pass a local model directory" in message and "--model /path/to/some-model-7b" in message
    # org/name/file.gguf names one GGUF file of a hub repo: fetched alone, same fallback and message.
    with pytest.raises(ModelLoadError) as err:
        load("some-org/some-model-GGUF/some-model-Q4_0.gguf")
    assert "not in the local cache" in str(err.value) and "--model /path/to/some-model-Q4_0.gguf" in str(err.value)


@pytest.mark.parametrize("load_format", ["auto", "dummy"])
def test_linear_weights_are_stored_column_major_on_the_cpu(qwen2_dir, load_format):
    # (The plain layout: with the native kernels the weights take their tiles, tests/test_quantization.py.)
    loaded = load_model(EngineConfig(model=str(qwen2_dir), device="cpu", dtype="float32", load_format=load_format,
                                     native_kernels="off"))
    model = loaded.model
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    # Same shape and values as the file's [out, in] matrices stacked, laid out as its contiguous transpose.
    assert qkv.shape == (64 + 2 * 32, 64) and qkv.t().is_contiguous() and not qkv.is_contiguous()
    assert model.model.layers[1].mlp.down_proj.weight.t().is_contiguous()
    assert model.model.embed_tokens.weight.is_contiguous()  # rows are looked up: row-major stays
    if load_format == "auto":
        from safetensors.torch import load_file

        on_file = load_file(qwen2_dir / "model.safetensors")
        assert torch.equal(qkv, torch.cat([on_file[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]))
