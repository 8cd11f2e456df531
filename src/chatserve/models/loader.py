"""Find a model (local directory, hub id or the built-in dummy_model) and load its config,
weights and tokenizer."""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import mmap
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from ..config import EngineConfig
from . import ARCHITECTURES, native
from .layers import FUSED_LINEARS, CausalLM
from .model_config import ModelConfig
from .quantization import (INT4_GROUP_SIZE, Int4Linear, Int8Embedding, Int8Linear, NativeFloatEmbedding,
                           NativeFloatLinear, NativeInt8Embedding, PackedLinear, QuantizedLinear, StoredLinear,
                           SplitEmbedding, SplitLinear, check_supported, quantize_int8, quantize_linear)

log = logging.getLogger("chatserve.loader")

DUMMY_MODEL_NAME = "dummy_model"

# Files a model needs; everything else in a hub repo (other weight formats, images) is skipped.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.tiktoken", "*.model", "merges.txt", "vocab.txt"]


class ModelLoadError(RuntimeError):
    """The model cannot be found or read; the message says what to do about it."""


@dataclass
class LoadedModel:
    name: str
    model: CausalLM
    config: ModelConfig
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    # Default sampling values and stop ids from generation_config.json.
    generation_config: dict = field(default_factory=dict)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.generation_config.get("eos_token_id", self.config.eos_token_ids)
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but torch sees no CUDA device (is this a CPU build of torch?)")
    return dev


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def resolve_model_path(model: str, revision: Optional[str] = None) -> Path:
    """A local directory or .gguf file as it is; a hub id downloaded (with progress bars) into the
    HF cache: `org/name` is a model directory, `org/name/file.gguf` one GGUF file of a repo."""
    path = Path(model).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".gguf"):
        return path
    hub_gguf = model.count("/") == 2 and model.lower().endswith(".gguf") and not model.startswith((".", "/", "~"))
    if path.exists() or model.startswith((".", "/", "~")) or (model.count("/") > 1 and not hub_gguf):
        raise ModelLoadError(f"model path {model!r} is neither a directory holding config.json and weights "
                             f"nor a .gguf file")
    from huggingface_hub import hf_hub_download, snapshot_download

    def download(local_files_only: bool) -> Path:
        if hub_gguf:
            repo, filename = model.rsplit("/", 1)
            return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=local_files_only))
        return Path(snapshot_download(model, revision=revision, allow_patterns=HUB_PATTERNS,
                                      local_files_only=local_files_only))

    try:
        return download(local_files_only=False)
    except Exception as online_error:  # offline, unknown repo, gated, ...: fall back on the cache
        try:
            return download(local_files_only=True)
        except Exception:
            raise ModelLoadError(
                f"could not download {model!r} from the Hugging Face Hub and it is not in the local cache "
                f"({type(online_error).__name__}: {online_error}). If this machine is offline, pass a local "
                f"model directory or .gguf file instead, e.g. --model /path/to/{model.split('/')[-1]}"
            ) from None


class SafetensorsFile:
    """A memory-mapped .safetensors file: tensors are views of the file's pages, read once into
    their place (converted, on the device); release() hands a tensor's pages back to the kernel.
    A private (copy-on-write) mapping, so the views can never write to the file."""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(header_len))
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.path = path

    def keys(self) -> list[str]:
        return list(self.header)

    def tensor(self, name: str) -> torch.Tensor:
        info = self.header[name]
        dtype = self.DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelLoadError(f"{self.path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        count = (end - begin) // (torch.finfo(dtype).bits // 8 if dtype.is_floating_point else torch.iinfo(dtype).bits // 8)
        if count == 0:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(self.mm, dtype=dtype, count=count, offset=self.data_start + begin).view(info["shape"])

    def release(self, name: str) -> None:
        begin, end = (self.data_start + o for o in self.header[name]["data_offsets"])
        release_pages(self.mm, begin, end)


def release_pages(mm: mmap.mmap, begin: int, end: int) -> None:
    """Drop the file pages of bytes [begin, end) of a file mapping, a tensor that was copied
    elsewhere (keeps peak memory near one copy of the weights). Whole pages only: a page shared
    with the next tensor stays."""
    page = mmap.PAGESIZE
    first, last = -(-begin // page) * page, end // page * page
    if last > first and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)


try:
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim  # glibc's
except (AttributeError, OSError, TypeError):  # another C library, or no dlopen(NULL)
    _MALLOC_TRIM = None


def trim_heap() -> None:
    """Hand the C heap's free pages back to the kernel (glibc's malloc_trim; elsewhere nothing).
    A tensor's temporaries (dequantized fp32 values, int4 nibbles) are freed into the heap, which
    keeps their pages, and the next tensor's, of other sizes, do not all fit in them: Qwen2.5-0.5B's
    BF16 GGUF loaded at bf16 peaked at 1558 MiB and held 1500 after the load, with a trim after each
    tensor 1193 and 1032 (its Q4_0 file: 464 -> 436 after the load). A call takes ~0.1 ms."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {path} (other weight formats are not loaded)")
    return files


def iter_checkpoint(path: Path) -> Iterator[tuple[SafetensorsFile, str]]:
    files = [SafetensorsFile(f) for f in checkpoint_files(path)]
    total = sum(len(st.keys()) for st in files)
    # A progress bar on terminals (tqdm disables itself elsewhere).
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=None, leave=False) as bar:
        for st in files:
            for name in st.keys():
                yield st, name
                bar.update()


class ParametersOnMeta(TorchFunctionMode):
    """Modules built with torch.empty on the meta device and torch.nn.init skipped: parameters take
    no memory until the weights arrive, and what a module computes (the rotary tables) is computed
    for real. Not torch.device("meta"): random init and the rotary's arange on meta tensors run
    torch._refs, whose first call imports torch._dynamo (sympy, mpmath, ...) for the rest of the
    run: SmolLM2 Q4_0 served with it peaked at 648 MiB RSS, without it at 482."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        if func is torch.empty:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def build_model(cls: type[CausalLM], cfg: ModelConfig, device: torch.device) -> CausalLM:
    """The module tree with its parameters on the meta device: no memory until weights arrive."""
    with ParametersOnMeta():
        model = cls(cfg)
    model.rotary.to(device)  # the rotary tables are computed (when first used, or for the engine's context)
    return model


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, module)


def linear_weight_names(model: nn.Module) -> set[str]:
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def place(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype, column_major: bool) -> torch.Tensor:
    """A copy of tensor on device at dtype. column_major: a Linear weight on the CPU, stored as
    the transpose of a contiguous [in, out] matrix (same shape and values): MKL multiplies a
    batch of 32 by it ~10% faster than by the row-major [out, in] file layout (measured: 32-stream
    decode 116 vs 127 tokens/s on benchmarks/throughput.py's model; one stream and prefill alike)."""
    if column_major and device.type == "cpu" and tensor.dim() == 2:
        out = torch.empty(tensor.shape[::-1], dtype=dtype, device=device).t()
        return out.copy_(tensor)
    return tensor.to(device=device, dtype=dtype, copy=True)


@dataclass
class WeightSource:
    """One checkpoint tensor on its way into the model: its values (read lazily: a GGUF tensor is
    dequantized only when it runs as floats), how the file stores it, and exact int4 groups when
    the file's blocks are int4 groups already."""

    shape: tuple
    values: Callable[[], torch.Tensor]
    stored_as: str = "float"  # "float", or the GGUF block type (Q4_1, Q8_0, ...)
    stored_method: Optional[str] = None  # how it runs when no --quantization is given
    int4_groups: Optional[Callable[[], Optional[tuple]]] = None
    int8_blocks: Optional[Callable[[], Optional[tuple]]] = None  # exact int8 blocks of 32 (Q8_0)
    release: Callable[[], None] = lambda: None


def stacked(parts: list[WeightSource]) -> WeightSource:
    """The checkpoint weights of a fused Linear's parts as one source, rows stacked in order."""
    stored = {p.stored_as for p in parts}
    methods = [p.stored_method for p in parts]
    # Mixed storage (Q4_K_M files keep attn_v at Q6_K): the most precise part decides.
    method = None if None in methods else ("int8" if "int8" in methods else methods[0])

    def exact(kind: str) -> Callable[[], Optional[tuple]]:
        def read() -> Optional[tuple]:
            found = [getattr(p, kind)() if getattr(p, kind) else None for p in parts]
            return None if None in found else tuple(torch.cat(t) for t in zip(*found))
        return read

    def release() -> None:
        for p in parts:
            p.release()

    return WeightSource((sum(p.shape[0] for p in parts), *parts[0].shape[1:]),
                        lambda: torch.cat([p.values() for p in parts]), "+".join(sorted(stored)), method,
                        exact("int4_groups"), exact("int8_blocks"), release)


class WeightLoader:
    """Puts checkpoint tensors into the meta-built model by their Hugging Face names, as floats at
    the run dtype or as quantized Linear layers, and says what it did. The parts of a fused Linear
    (q/k/v, gate/up) wait for each other, then load as one."""

    def __init__(self, model: CausalLM, device: torch.device, dtype: torch.dtype, quantization: Optional[str],
                 native: Optional[set] = None):
        self.model, self.device, self.dtype, self.quantization = model, device, dtype, quantization
        # Layers the native kernels (models/native.py) take, in their layouts: of "integer", "bf16", "f32".
        self.native = native or set()
        self.native_integer = "integer" in self.native
        self.expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
        self.linear = linear_weight_names(model)
        # The checkpoint's own names and shapes, in an unfused model's parameter order, and for
        # each part of a fused Linear: (fused name, index, number of parts).
        self.checkpoint_shapes: dict[str, tuple] = {}
        self.parts: dict[str, tuple[str, int, int]] = {}
        for name, shape in self.expected.items():
            module_name, _, kind = name.rpartition(".")
            sizes = getattr(model.get_submodule(module_name), "part_sizes", None)
            if sizes is None:
                self.checkpoint_shapes[name] = shape
                continue
            if kind == "bias":
                continue  # listed with the weights, as each part's weight then bias
            parent, _, attr = module_name.rpartition(".")
            for i, (part, size) in enumerate(zip(FUSED_LINEARS[attr], sizes)):
                for part_kind, part_shape in (("weight", (size, *shape[1:])), ("bias", (size,))):
                    if f"{module_name}.{part_kind}" in self.expected:
                        self.checkpoint_shapes[f"{parent}.{part}.{part_kind}"] = part_shape
                        self.parts[f"{parent}.{part}.{part_kind}"] = (f"{module_name}.{part_kind}", i, len(sizes))
        self.pending: dict[str, list[Optional[WeightSource]]] = {}
        self.loaded: set[str] = set()
        self.float_bytes = 0  # what the weights would take at the run dtype
        self.kinds: Counter = Counter()  # "int4" / "int8" / "float" -> Linear layers
        self.notes: list[str] = []

    def method(self, source: WeightSource) -> Optional[str]:
        if self.quantization == "none":
            return None
        return self.quantization or source.stored_method

    def put(self, name: str, source: WeightSource) -> None:
        if name not in self.expected and name not in self.parts:
            return  # e.g. lm_head.weight of a tied model, rotary inv_freq buffers
        expected = self.checkpoint_shapes.get(name, self.expected.get(name))
        if tuple(source.shape) != expected:
            raise ModelLoadError(f"{name}: checkpoint shape {tuple(source.shape)} != config's {expected}")
        if name in self.parts:
            fused, index, count = self.parts[name]
            slots = self.pending.setdefault(fused, [None] * count)
            slots[index] = source
            if None not in slots:
                del self.pending[fused]
                self.put(fused, stacked(slots))
            return
        self.float_bytes += math.prod(source.shape) * self.dtype.itemsize
        method = self.method(source)
        parts = self.split_parts(source.shape)
        if name == "model.embed_tokens.weight" and method is not None:
            self._put_quantized_embedding(source, method)
        elif name in self.linear and method is not None:
            self._swap_linear(name.rpartition(".")[0], self._quantized_linear(source, method))
        elif name in self.linear and self.native_float(source.shape):
            # (The native layout converts as it packs: no copy of the source at the run dtype.)
            self._swap_linear(name.rpartition(".")[0], NativeFloatLinear(source.values(), self.dtype))
            self.kinds["float"] += 1
        elif name in self.linear and parts:
            self._swap_linear(name.rpartition(".")[0], SplitLinear(SplitLinear.split(source.values().to(self.dtype), parts)))
            self.kinds["float"] += 1
        elif name in self.linear and self.packs():
            self._swap_linear(name.rpartition(".")[0], PackedLinear(source.values().to(self.dtype)))
            self.kinds["float"] += 1
        elif (name == "model.embed_tokens.weight" and self.model.tie_word_embeddings
              and self.native_float(source.shape)):
            # The head on the native kernel, its layout serving the embedding's lookups too.
            self.model.lm_head = NativeFloatLinear(source.values(), self.dtype)
            self.model.model.embed_tokens = NativeFloatEmbedding(self.model.lm_head)
        elif name == "model.embed_tokens.weight" and self.model.tie_word_embeddings and parts:
            # The head's blocks serve the embedding's lookups too: one copy of the matrix.
            blocks = SplitLinear.split(source.values().to(self.dtype), parts)
            self.model.model.embed_tokens = SplitEmbedding(blocks)
            self.model.lm_head = SplitLinear(blocks)
        else:
            # Always a copy, even on the CPU at the file's dtype: weights used in place from the file
            # mapping decode ~15% slower than aligned anonymous memory (benchmarks/throughput.py's
            # model: 10.9 vs 12.6 tokens/s). The file pages go back to the kernel tensor by tensor,
            # so the peak stays near one copy of the weights.
            _set_param(self.model, name, place(source.values(), self.device, self.dtype, name in self.linear))
            if name in self.linear:
                self.kinds["float"] += 1
        source.release()
        trim_heap()
        self.loaded.add(name)

    def _quantized_linear(self, source: WeightSource, method: str, is_linear: bool = True) -> QuantizedLinear:
        """A quantized layer of the source (the file's int4/int8 blocks as they are where they fit);
        counted among the Linear layers unless is_linear is False (an embedding table)."""
        shape = tuple(source.shape)
        exact = None  # the file's own blocks, taken as they are
        if method == "int4" and source.int4_groups and Int4Linear.fits(shape):
            exact = source.int4_groups()
        elif method == "int8" and source.int8_blocks and self.native_integer and Int8Linear.fits(shape):
            exact = source.int8_blocks()
        if exact is None:
            layer = quantize_linear(method, source.values(), native=self.native_integer)
        elif method == "int4":
            layer = Int4Linear(*exact, INT4_GROUP_SIZE, native=self.native_integer)
        else:
            layer = Int8Linear(*exact, native=True)
        kind = "int4" if isinstance(layer, Int4Linear) else "int8"
        self.kinds[kind] += is_linear
        if source.stored_as != "float":
            how = "as it is" if exact is not None and kind == method else "dequantized and requantized"
            self.notes.append(f"{source.stored_as} -> {kind} {how}")
        return layer

    def split_parts(self, shape: tuple) -> int:
        """How many blocks a float matrix is kept in for SplitLinear (0: a plain Linear): one per
        thread, for fp32 on the CPU, when its outputs divide evenly."""
        parts = torch.get_num_threads()
        usable = self.device.type == "cpu" and self.dtype == torch.float32 and len(shape) == 2 and parts > 1
        return parts if usable and shape[0] % parts == 0 else 0

    def native_float(self, shape: tuple) -> bool:
        """Float Linear weights on the native kernel: fp32 ones, and bf16 ones where the CPU has
        native bf16 (as for PackedLinear), when the kernels are loaded and the shape fits its tiles."""
        kind = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(self.dtype)
        return (kind in self.native and NativeFloatLinear.fits(tuple(shape))
                and (kind == "f32" or cpu_has_native_bf16()))

    def packs(self) -> bool:
        """bf16 Linear weights on the CPU go into oneDNN's layout once (PackedLinear), where the CPU
        has native bf16: measured there only, and oneDNN's bf16 kernels need AVX-512 at least."""
        return (self.device.type == "cpu" and self.dtype == torch.bfloat16 and PackedLinear.available()
                and cpu_has_native_bf16())

    def _swap_linear(self, module_name: str, layer: StoredLinear) -> None:
        old = self.model.get_submodule(module_name)
        if getattr(old, "bias", None) is not None and not old.bias.is_meta:
            layer.bias = old.bias  # the bias came first in the file
        _set_module(self.model, module_name, layer)

    def _put_quantized_embedding(self, source: WeightSource, method: str) -> None:
        """The embedding as int8 rows (a lookup cannot use int4's packed layout); a tied model's
        head becomes a quantized Linear of the same values, sharing the int8 tensors when int8. On
        the native kernels the rows are the native int8 layout's (Q8_0 blocks as they are)."""
        tied = self.model.tie_word_embeddings
        if self.native_integer and Int8Linear.fits(tuple(source.shape)):
            table = self._quantized_linear(source, "int8", is_linear=False)
            self.model.model.embed_tokens = NativeInt8Embedding(table, self.dtype)
        else:
            qweight, scales = quantize_int8(source.values())
            table = Int8Linear(qweight, scales)
            self.model.model.embed_tokens = Int8Embedding(qweight, scales, self.dtype)
            if source.stored_as != "float":
                self.notes.append(f"{source.stored_as} -> int8 embedding")
        if tied:
            if method == "int8":
                self.model.lm_head = table
                self.kinds["int8"] += 1
            else:
                self.model.lm_head = self._quantized_linear(source, method)

    def finish(self, where: str) -> None:
        absent = set(self.expected) - self.loaded
        missing = []
        for name in self.checkpoint_shapes:  # named as the checkpoint names them
            fused, index, count = self.parts.get(name, (name, 0, 1))
            if fused in absent and self.pending.get(fused, [None] * count)[index] is None:
                missing.append(name)
        if missing:
            raise ModelLoadError(f"weights missing from {where}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if self.kinds["int4"] or self.kinds["int8"]:
            actual = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers())
                         if t is not self.model.rotary.inv_freq)
            layers = ", ".join(f"{n} {kind}" for kind, n in sorted(self.kinds.items()) if n)
            notes = "; ".join(f"{n} x {note}" for note, n in Counter(self.notes).items())
            log.info("quantized weights: Linear layers %s (head included), embedding int8%s; weights %.2f MiB at %s "
                     "-> %.2f MiB", layers, f"; {notes}" if notes else "", self.float_bytes / 2**20,
                     str(self.dtype).replace("torch.", ""), actual / 2**20)


def load_weights(model: CausalLM, path: Path, device: torch.device, dtype: torch.dtype,
                 quantization: Optional[str] = None, native: Optional[set] = None) -> None:
    loader = WeightLoader(model, device, dtype, quantization, native)
    for st, name in iter_checkpoint(path):
        shape = tuple(st.header[name]["shape"])
        loader.put(name, WeightSource(shape, lambda st=st, name=name: st.tensor(name),
                                      release=lambda st=st, name=name: st.release(name)))
    loader.finish(str(path))


def load_gguf_weights(model: CausalLM, reader, raw_config: dict, path: Path, device: torch.device,
                      dtype: torch.dtype, quantization: Optional[str], native: Optional[set] = None) -> None:
    from . import gguf

    loader = WeightLoader(model, device, dtype, quantization, native)
    tensors = list(gguf.iter_tensors(reader, raw_config))
    for name, tensor in tqdm(tensors, desc="Loading weights", unit="tensor", disable=None, leave=False):
        loader.put(name, WeightSource(tensor.shape, tensor.dequantize, tensor.type_name,
                                      gguf.stored_method(tensor.type_name), tensor.int4_groups, tensor.int8_blocks,
                                      lambda tensor=tensor: release_pages(reader.data.base, *tensor.file_range)))
    loader.finish(str(path))


def init_random_weights(model: CausalLM, device: torch.device, dtype: torch.dtype, seed: int,
                        quantization: Optional[str] = None, native: Optional[set] = None) -> None:
    """--load-format dummy: the real architecture's shapes, random values (deterministic per seed)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    loader = WeightLoader(model, device, dtype, quantization, native)
    for name, shape in list(loader.checkpoint_shapes.items()):
        if name.endswith("norm.weight"):
            value = torch.ones(shape)
        else:
            value = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
        loader.put(name, WeightSource(shape, lambda value=value: value))
    loader.finish("the random initialisation")


def dummy_config_dict(tokenizer) -> dict:
    """The built-in dummy_model: a small Qwen2 shape (random weights) around the dummy tokenizer."""
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": len(tokenizer),
        "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": True, "eos_token_id": eos,
        "bos_token_id": eos[1],
    }


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def load_model(config: EngineConfig) -> LoadedModel:
    device = resolve_device(config.device)
    quantization = config.quantization
    check_supported(quantization, device)
    reader = None
    if config.model == DUMMY_MODEL_NAME:
        from .dummy import build_dummy_tokenizer

        tokenizer = build_dummy_tokenizer()
        raw = dummy_config_dict(tokenizer)
        path, load_format, gen_cfg = None, "dummy", {"eos_token_id": raw["eos_token_id"]}
    else:
        path = resolve_model_path(config.model, config.revision)
        load_format = config.load_format
        if path.is_file():
            from . import gguf

            try:
                # One parse of the file for the config and the tensors; the tokenizer converts the
                # vocabulary from the file itself (gguf.py says what each way costs).
                reader = gguf.open_gguf(path)
                raw = gguf.read_config(reader)
                tokenizer = gguf.load_tokenizer(path, raw["model_type"])
            except Exception as exc:  # a truncated or foreign file fails deep inside the readers
                raise ModelLoadError(f"cannot load the GGUF file {path}: {type(exc).__name__}: {exc}") from None
            gen_cfg = {}
            if quantization is None and device.type != "cpu":
                log.info("GGUF on %s: quantized tensors are dequantized (the int4/int8 kernels are the CPU's)", device)
                quantization = "none"
        else:
            raw = read_json(path / "config.json")
            if not raw:
                raise ModelLoadError(f"{path} has no config.json: is it a Hugging Face model directory?")
            from transformers import AutoTokenizer

            # Never run code shipped in a model directory.
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
            gen_cfg = read_json(path / "generation_config.json")

    arch = (raw.get("architectures") or [""])[0]
    cls = ARCHITECTURES.get(arch)
    if cls is None:
        raise ModelLoadError(f"architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    model_cfg = cls.read_config(raw)
    dtype = resolve_dtype(config.dtype, device)
    model = build_model(cls, model_cfg, device)
    # The native kernels (when cached, or built now with --native-kernels on) load before the
    # weights: int4 and bf16 layers then take the native kernels' layouts.
    native.start(config.native_kernels, device)
    ops = native.ops() if config.native_kernels != "off" and device.type == "cpu" else None
    native_layers = set() if ops is None else (
        {kind for kind, ok in (("integer", ops.integer_kernels_available()),
                               ("bf16", ops.float_kernels_available(torch.bfloat16)),
                               ("f32", ops.float_kernels_available(torch.float32))) if ok})
    if load_format == "dummy":
        init_random_weights(model, device, dtype, config.seed, quantization, native_layers)
    elif reader is not None:
        load_gguf_weights(model, reader, raw, path, device, dtype, quantization, native_layers)
    else:
        load_weights(model, path, device, dtype, quantization, native_layers)
    model.eval()
    # What the tokenizer's conversion and the skeleton left in the heaps, back to the kernel
    # (SmolLM2's Q4_0 file: -6 MiB held).
    gc.collect()
    trim_heap()
    name = config.model if path is None else config.model.rstrip("/")
    log.info("loaded %s (%s) on %s in %s", name, arch, device, str(dtype).replace("torch.", ""))
    return LoadedModel(name=name, model=model, config=model_cfg, tokenizer=tokenizer, device=device,
                       dtype=dtype, generation_config=gen_cfg)
