"""GGUF files, as llama.cpp and Ollama write them: the config and tokenizer from the file's metadata
(through transformers, which reads them as its own GGUF loader does), tensors read and dequantized
with the `gguf` package (llama.cpp's own reader), renamed to Hugging Face's names.

Q4_0 and Q4_1 blocks (32 weights, a scale, and a min for Q4_1) are int4 groups of 32 as they are:
they become Int4Linear without requantizing. Everything else is dequantized, then kept at the run
dtype or requantized (see `stored_method`)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

ROWS_PER_SLAB = 4096
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf" and path.is_file()


def hf_name(name: str) -> Optional[str]:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; None for tensors the model
    computes itself (rope_freqs)."""
    base, _, kind = name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{kind}"
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{kind}"
    return None


def read_config(path: Path) -> dict:
    """A Hugging Face config dict from the GGUF metadata, as transformers reads it."""
    from transformers import AutoConfig

    raw = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    arch = raw.get("model_type")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path.name}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(ARCHITECTURES)}")
    raw["architectures"] = [ARCHITECTURES[arch]]
    return raw


def complete_config(raw: dict, reader) -> None:
    """What only the tensor list tells: tied embeddings, Llama 3.1's rope factors."""
    tensors = {t.name: t for t in reader.tensors}
    raw["tie_word_embeddings"] = "output.weight" not in tensors
    if "rope_freqs.weight" in tensors:
        # Llama 3.1+ files carry the rope scaling as per-frequency divisors instead of config values.
        factors = np.asarray(tensors["rope_freqs.weight"].data, np.float32)
        raw["rope_scaling"] = {"rope_type": "freq_factors", "factors": factors.tolist()}


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def stored_method(qtype_name: str) -> Optional[str]:
    """How a tensor stored as qtype runs when no --quantization is given: 4- and 5-bit blocks as
    int4, 6- and 8-bit as int8, floats as floats."""
    if qtype_name in ("F32", "F16", "BF16", "F64"):
        return None
    if qtype_name.startswith(("Q4", "Q5", "IQ4", "Q3", "Q2", "IQ3", "IQ2", "IQ1")):
        return "int4"
    return "int8"


class GGUFTensor:
    """One tensor of the file: its raw blocks (a view of the file's pages) and how to read them."""

    def __init__(self, tensor, config: dict):
        self.name = tensor.name
        self.type = tensor.tensor_type
        self.type_name = tensor.tensor_type.name
        # GGUF lists dims innermost first; torch's shape is the reverse.
        self.shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        self.raw = np.asarray(tensor.data)
        self._rows = _unpermute_rows(self.name, self.shape, config)

    def _ordered(self, array: np.ndarray) -> np.ndarray:
        return array if self._rows is None else array[self._rows]

    def dequantize(self) -> torch.Tensor:
        """Float32 values, dequantized a slab of rows at a time: gguf's numpy dequantization makes
        several full-size temporaries, which for a large embedding would be gigabytes."""
        from gguf.quants import dequantize

        raw = self._ordered(self.raw)
        if raw.ndim == 1:
            return torch.from_numpy(np.array(dequantize(raw, self.type), dtype=np.float32)).reshape(self.shape)
        out = torch.empty(self.shape, dtype=torch.float32)
        flat = out.view(raw.shape[0], -1)
        for start in range(0, raw.shape[0], ROWS_PER_SLAB):
            rows = np.asarray(dequantize(raw[start:start + ROWS_PER_SLAB], self.type), dtype=np.float32)
            if not rows.flags.writeable:  # F32 tensors come back as views of the read-only file map
                rows = rows.copy()
            flat[start:start + len(rows)] = torch.from_numpy(rows.reshape(len(rows), -1))
        return out

    def int4_groups(self) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(q [out, in] in 0..15, scales, zeros [out, in / 32]) in Int4Linear's terms, for Q4_0 and
        Q4_1 blocks, exactly; None for other types. Block layout (ggml-common.h): an fp16 scale d,
        for Q4_1 an fp16 min m, then 16 bytes whose low nibbles are weights 0..15 and high nibbles
        16..31; Q4_0 weights are d * (q - 8), Q4_1 weights d * q + m."""
        if self.type_name not in ("Q4_0", "Q4_1"):
            return None
        out_features, in_features = self.shape
        header = 2 if self.type_name == "Q4_0" else 4
        blocks = self._ordered(self.raw).reshape(out_features, in_features // 32, header + 16)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        packed = blocks[..., header:]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(out_features, in_features)
        if self.type_name == "Q4_0":
            zeros = np.zeros_like(d)
        else:
            zeros = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) + 8 * d
        return torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(zeros)


    def int8_blocks(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(q [out, in / 32, 32] int8, scales [out, in / 32]) in Int8Linear's terms, for Q8_0 blocks,
        exactly; None for other types. Block layout (ggml-common.h): an fp16 scale d, then 32 int8
        weights: w = d * q. q is a view of the file's pages (Int8Linear copies it a slab at a time)."""
        if self.type_name != "Q8_0":
            return None
        out_features, in_features = self.shape
        blocks = self._ordered(self.raw).reshape(out_features, in_features // 32, 34)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        with warnings.catch_warnings():  # a read-only view of the file map: never written
            warnings.simplefilter("ignore", UserWarning)
            q = torch.from_numpy(blocks[..., 2:].view(np.int8))
        return q, torch.from_numpy(d)


def _unpermute_rows(name: str, shape: tuple, config: dict) -> Optional[np.ndarray]:
    """llama.cpp's converter reorders the rows of Llama's q and k projections (rotary pairs
    interleaved instead of halves); this row order undoes it, for any storage type."""
    if config.get("model_type") != "llama" or not re.search(r"\.attn_[qk]\.(weight|bias)$", name):
        return None
    heads = config["num_attention_heads"] if ".attn_q." in name else config["num_key_value_heads"]
    rows = shape[0]
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(rows)


def open_gguf(path: Path):
    from gguf import GGUFReader

    return GGUFReader(str(path))


def iter_tensors(reader, config: dict) -> Iterator[tuple[str, GGUFTensor]]:
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is not None:
            yield name, GGUFTensor(tensor, config)
