"""GGUF files, as llama.cpp and Ollama write them: the config and tokenizer from the file's metadata
(as transformers' own GGUF loader reads them), tensors read and dequantized with the `gguf` package
(llama.cpp's own reader), renamed to Hugging Face's names.

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
from gguf import GGUFReader, GGUFValueType, ReaderField

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


def read_config(reader: GGUFFile) -> dict:
    """A Hugging Face config dict from the file's metadata, as transformers' GGUF loader renames its
    keys (load_gguf_checkpoint), and what only the tensor list tells: tied embeddings, Llama 3.1's
    rope factors. From our one parse of the file: AutoConfig.from_pretrained(gguf_file=...) parses
    it again with gguf's full reader (+167 MiB peak, 3 s for SmolLM2's 49k-token vocabulary), and
    LlamaConfig's module imports transformers' model-loading stack (accelerate, DTensor: +65 MiB,
    1.4 s) for the defaults of fields a GGUF sets anyway. The one default that matters, Qwen3's
    head_dim of 128 (transformers drops qwen3.rope.dimension_count), is in the file as the key
    length."""
    from transformers.integrations import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    meta = reader.metadata
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{Path(reader.data.filename).name}: GGUF architecture {arch!r} is not supported; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}
    raw = {**GGUF_CONFIG_DEFAULTS_MAPPING.get(arch, {}), "architectures": [ARCHITECTURES[arch]],
           "tie_word_embeddings": "output.weight" not in tensors}
    for key, value in meta.items():  # one-element arrays unwrapped, as transformers does
        prefix, _, rest = key.partition(".")
        name = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if name is not None and name != -1:
            raw[name] = value[0] if isinstance(value, list) and len(value) == 1 else value
    raw.setdefault("vocab_size", meta.get("tokenizer.ggml.tokens"))  # a string array's length (GGUFFile)
    raw["head_dim"] = meta.get(f"{arch}.attention.key_length") or raw.get("head_dim")
    if "rope_freqs.weight" in tensors:
        # Llama 3.1+ files carry the rope scaling as per-frequency divisors instead of config values.
        factors = np.asarray(tensors["rope_freqs.weight"].data, np.float32)
        raw["rope_scaling"] = {"rope_type": "freq_factors", "factors": factors.tolist()}
    return raw


def load_tokenizer(path: Path, model_type: str):
    """The tokenizer AutoTokenizer.from_pretrained(gguf_file=...) builds: the class it picks for the
    model type (Qwen2Tokenizer for qwen2/qwen3, TokenizersBackend for llama), which converts the
    file's vocabulary itself with transformers' light metadata reader. AutoTokenizer would first make
    the config its own way (gguf's full reader again: +170 MiB peak, +92 MiB kept, 6 s for SmolLM2;
    this way +49 MiB peak, +24 MiB kept, 0.7 s). A tokenizer.json cached from it would load no
    smaller (+47 MiB kept) and, for Qwen2.5, not identical, so it is converted at every start."""
    from transformers import TokenizersBackend
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

    name = TOKENIZER_MAPPING_NAMES.get(model_type)
    cls = (tokenizer_class_from_name(name) if name else None) or TokenizersBackend
    return cls.from_pretrained(str(path.parent), gguf_file=path.name)


def stored_method(qtype_name: str) -> Optional[str]:
    """How a tensor stored as qtype runs when no --quantization is given: 4- and 5-bit blocks as
    int4, 6- and 8-bit as int8, floats as floats."""
    if qtype_name in ("F32", "F16", "BF16", "F64"):
        return None
    if qtype_name.startswith(("Q4", "Q5", "IQ4", "Q3", "Q2", "IQ3", "IQ2", "IQ1")):
        return "int4"
    return "int8"


class GGUFFile(GGUFReader):
    """gguf's reader, its metadata read into plain Python values as it parses (`metadata`)
    instead of kept as a numpy view per array element: `fields` holds the scalars and strings
    only. gguf's own fields for SmolLM2's vocabulary (tokens, scores, types, merges) are ~200k
    views: +159 MiB, and +67 MiB stayed with the allocator after they were freed. Arrays of
    strings (a vocabulary, its merges) are walked, not decoded: their value here is their
    length (the tokenizer reads them itself); numeric arrays are lists."""

    metadata: dict

    def _build_fields(self, offs: int, count: int) -> int:
        self.metadata = {}
        for _ in range(count):
            orig_offs = offs
            key_len, key_data = self._get_str(offs)
            offs += int(key_len.nbytes + key_data.nbytes)
            raw_type = self._get(offs, np.uint32)
            offs += int(raw_type.nbytes)
            key = str(bytes(key_data), encoding="utf-8")
            if raw_type[0] == GGUFValueType.ARRAY:
                self.metadata[key], offs = self._read_array(offs)
                continue
            size, parts, data, types = self._get_field_parts(offs, raw_type[0])
            field = ReaderField(orig_offs, key, [key_len, key_data, raw_type, *parts], [i + 3 for i in data], types)
            self._push_field(field, skip_sum=True)
            self.metadata[key] = field.contents()
            offs += size
        return offs

    def _read_array(self, offs: int) -> tuple:
        item_type, count = int(self._get(offs, np.uint32)[0]), int(self._get(offs + 4, np.uint64)[0])
        offs += 12
        np_type = self.gguf_scalar_to_np.get(GGUFValueType(item_type))
        if np_type is not None:
            values = self._get(offs, np_type, count)
            return values.tolist(), offs + int(values.nbytes)
        if item_type == GGUFValueType.STRING:
            for _ in range(count):
                offs += 8 + int(self._get(offs, np.uint64)[0])
            return count, offs
        if item_type == GGUFValueType.ARRAY:
            values = []
            for _ in range(count):
                value, offs = self._read_array(offs)
                values.append(value)
            return values, offs
        raise ValueError(f"GGUF metadata holds an array of type {item_type}, which this reader cannot read")


class GGUFTensor:
    """One tensor of the file: its raw blocks (a view of the file's pages) and how to read them."""

    def __init__(self, tensor, config: dict):
        self.name = tensor.name
        self.type = tensor.tensor_type
        self.type_name = tensor.tensor_type.name
        # GGUF lists dims innermost first; torch's shape is the reverse.
        self.shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        self.raw = np.asarray(tensor.data)
        self.file_range = (tensor.data_offset, tensor.data_offset + tensor.n_bytes)  # bytes of the file
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


def open_gguf(path: Path) -> GGUFFile:
    return GGUFFile(str(path))


def iter_tensors(reader, config: dict) -> Iterator[tuple[str, GGUFTensor]]:
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is not None:
            yield name, GGUFTensor(tensor, config)
