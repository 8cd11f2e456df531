"""The dummy tokenizer, and the tiny HF model dirs built by the conftest fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatserve.models import dummy
from chatserve.models.dummy import LLAMA3_ROPE_SCALING, build_dummy_tokenizer
from chatserve.models.dummy import write_hf_model_dir as make_tiny_model

MIXED = "Hello, world! 你好，世界！机器学习很有意思。 Emoji: 😀🦄👨‍👩‍👧‍👦🇨🇳 `x = [1, 22, 333]`\n## Title\n"
SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "一只敏捷的棕色狐狸跳过了懒狗。鬱龘齉",
    "🦄🦖🧬 party 🎉🎉 ❤️ 👍🏽",
    MIXED,
    "  leading and trailing spaces \t\n\n",
]


@pytest.fixture(scope="module")
def tok():
    return build_dummy_tokenizer()


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == text


def test_vocab_and_special_tokens(tok):
    assert len(tok) == 1000
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")}
    assert list(ids.values()) == [995, 996, 997, 998, 999]
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 997)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 995)
    assert set(tok.all_special_tokens) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    # Added tokens encode atomically; <think> is not special, so skipping specials keeps it.
    text = "<|im_start|>assistant\n<think>hmm</think>ok<|im_end|>"
    ids_ = tok.encode(text)
    assert ids_[0] == 996 and ids_[-1] == 997 and 998 in ids_ and 999 in ids_
    assert tok.decode(ids_, skip_special_tokens=True) == "assistant\n<think>hmm</think>ok"


def test_multibyte_chars_split_over_tokens(tok):
    def pieces(char):
        return tok.encode(char, add_special_tokens=False)

    split_chinese = [c for c in "鬱龘齉世界狐狸" if len(pieces(c)) > 1]
    assert len(split_chinese) >= 3
    for emoji in ("🦄", "🧬"):
        ids = pieces(emoji)
        assert len(ids) > 1
        # A lone piece of a split character is not valid UTF-8 on its own.
        assert "\ufffd" in tok.decode(ids[:1])
    assert len(pieces("你")) == 1  # frequent characters do get their own token


def test_build_is_fast_and_returns_fresh_objects():
    start = time.perf_counter()
    dummy._dummy_tokenizer_json.__wrapped__()  # the uncached training step
    assert time.perf_counter() - start < 1.0
    a, b = build_dummy_tokenizer(), build_dummy_tokenizer()
    assert a is not b
    a.padding_side = "left"  # mutating one copy must not leak into the next caller
    assert build_dummy_tokenizer().padding_side == b.padding_side


def test_identical_ids_across_processes(tok):
    # Fresh interpreters with different hash seeds must train the very same tokenizer. Running
    # the module file directly (plain `tokenizers`, no torch/transformers) keeps this fast.
    code = (
        "import json, runpy, sys; from tokenizers import Tokenizer; "
        "t = runpy.run_path(sys.argv[1])['_dummy_tokenizer_json'](); "
        f"print(json.dumps([t, Tokenizer.from_str(t).encode({MIXED!r}).ids]))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, dummy.__file__],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        for seed in ("1", "2")
    ]
    outputs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert outputs[0] == outputs[1] == [dummy._dummy_tokenizer_json(), tok.encode(MIXED)]


def test_chat_template(tok):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "你好 😀"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\n你好 😀<|im_end|>\n"
        "<|im_start|>assistant\nHi!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    with_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert with_prompt == expected + "<|im_start|>assistant\n"


# --- the tiny model dirs -------------------------------------------------------------------


def _load_dir_weights(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_model_dir_loads_with_transformers(tiny_model_dir, tok):
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
    )

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.vocab_size == len(tok)
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (64, 2, 16)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert (config.eos_token_id, config.bos_token_id, config.pad_token_id) == (997, 995, 995)

    gen = GenerationConfig.from_pretrained(tiny_model_dir)
    assert gen.eos_token_id == [997, 995]
    assert (gen.temperature, gen.top_p, gen.top_k) == (0.7, 0.8, 20)

    loaded_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert loaded_tok.encode(MIXED) == tok.encode(MIXED)
    assert loaded_tok.eos_token_id == 997
    assert loaded_tok.chat_template == tok.chat_template

    model, info = AutoModelForCausalLM.from_pretrained(tiny_model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32
    on_disk = _load_dir_weights(tiny_model_dir)
    state = model.state_dict()
    for name, tensor in on_disk.items():
        assert torch.equal(state[name], tensor), name
    if config.tie_word_embeddings:
        assert "lm_head.weight" not in on_disk
        assert torch.equal(state["lm_head.weight"], on_disk["model.embed_tokens.weight"])
    norms = [t for n, t in on_disk.items() if "norm" in n]
    assert norms and all(not torch.all(t == 1) for t in norms)

    with torch.no_grad():
        logits = model(torch.tensor([tok.encode(MIXED)])).logits
    assert logits.shape == (1, len(tok.encode(MIXED)), len(tok)) and torch.isfinite(logits).all()


def test_fixture_layouts(qwen2_dir, llama_dir, qwen3_dir):
    qwen2 = json.loads((qwen2_dir / "config.json").read_text())
    assert qwen2["architectures"] == ["Qwen2ForCausalLM"] and qwen2["tie_word_embeddings"] is True
    assert qwen2["rope_theta"] == 1e6 and qwen2["rope_scaling"] is None
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias"} <= set(
        _load_dir_weights(qwen2_dir)
    )

    llama = json.loads((llama_dir / "config.json").read_text())
    assert llama["architectures"] == ["LlamaForCausalLM"] and llama["tie_word_embeddings"] is False
    assert llama["rope_theta"] == 5e5 and llama["rope_scaling"] == LLAMA3_ROPE_SCALING
    assert "rope_parameters" not in llama and llama["torch_dtype"] == "float32"

    qwen3 = json.loads((qwen3_dir / "config.json").read_text())
    assert qwen3["architectures"] == ["Qwen3ForCausalLM"] and qwen3["head_dim"] == 16
    assert "model.layers.0.self_attn.q_norm.weight" in _load_dir_weights(qwen3_dir)
    index = json.loads((qwen3_dir / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in qwen3_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert not (qwen3_dir / "model.safetensors").exists()

    for d in (qwen2_dir, llama_dir, qwen3_dir):
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert (d / name).is_file()


def test_same_seed_same_weights(tmp_path):
    a = _load_dir_weights(make_tiny_model(tmp_path / "a", "qwen3", seed=7))
    b = _load_dir_weights(make_tiny_model(tmp_path / "b", "qwen3", seed=7, sharded=True))
    c = _load_dir_weights(make_tiny_model(tmp_path / "c", "qwen3", seed=8))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_hub_style_config_matches_transformers_style(tmp_path, tok):
    """The hub-style config.json (rope_theta + rope_scaling) means the same model to transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hub = make_tiny_model(tmp_path / "hub", "llama", rope_scaling=LLAMA3_ROPE_SCALING)
    native = make_tiny_model(tmp_path / "native", "llama", rope_scaling=LLAMA3_ROPE_SCALING, hub_style_config=False)
    assert "rope_parameters" in json.loads((native / "config.json").read_text())
    assert AutoConfig.from_pretrained(hub).rope_parameters == {**LLAMA3_ROPE_SCALING, "rope_theta": 5e5}

    ids = torch.tensor([tok.encode(" ".join(SAMPLES) * 3)])  # > original_max_position_embeddings
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(hub)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(native)(ids).logits
    assert ids.shape[1] > 64 and torch.equal(a, b)
