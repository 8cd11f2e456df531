"""Find a model (local directory, hub id or the built-in dummy_model) and load its config,
weights and tokenizer."""

from __future__ import annotations

import json
import logging
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import EngineConfig
from . import ARCHITECTURES
from .layers import CausalLM, RotaryEmbedding
from .model_config import ModelConfig

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
    """A local directory as it is, or a hub id downloaded (with progress bars) into the HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model path {model!r} is not a directory holding config.json and weights")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as online_error:  # offline, unknown repo, gated, ...: fall back on the cache
        try:
            return Path(snapshot_download(model, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True))
        except Exception:
            raise ModelLoadError(
                f"could not download {model!r} from the Hugging Face Hub and it is not in the local cache "
                f"({type(online_error).__name__}: {online_error}). If this machine is offline, pass a local "
                f"model directory instead, e.g. --model /path/to/{model.split('/')[-1]}"
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
        """Drop the file pages of a tensor that was copied elsewhere (keeps peak memory near 1x)."""
        begin, end = (self.data_start + o for o in self.header[name]["data_offsets"])
        page = mmap.PAGESIZE
        first, last = -(-begin // page) * page, end // page * page
        if last > first and hasattr(self.mm, "madvise"):
            self.mm.madvise(mmap.MADV_DONTNEED, first, last - first)


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


def build_model(cls: type[CausalLM], cfg: ModelConfig, device: torch.device) -> CausalLM:
    """The module tree with parameters on the meta device: no memory until weights arrive."""
    with torch.device("meta"):
        model = cls(cfg)
    # The rotary tables are computed, not loaded: build them for real.
    model.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling).to(device)
    return model


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


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


def load_weights(model: CausalLM, path: Path, device: torch.device, dtype: torch.dtype) -> None:
    expected = dict(model.named_parameters())
    linear = linear_weight_names(model)
    loaded = set()
    for st, name in iter_checkpoint(path):
        if name not in expected:
            continue  # e.g. lm_head.weight of a tied model, rotary inv_freq buffers
        tensor = st.tensor(name)
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)} != config's {tuple(expected[name].shape)}")
        # Always a copy, even on the CPU at the file's dtype: weights used in place from the file
        # mapping decode ~15% slower than aligned anonymous memory (benchmarks/throughput.py's
        # model: 10.9 vs 12.6 tokens/s). The file pages go back to the kernel tensor by tensor,
        # so the peak stays near one copy of the weights.
        _set_param(model, name, place(tensor, device, dtype, name in linear))
        st.release(name)
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise ModelLoadError(f"weights missing from {path}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def init_random_weights(model: CausalLM, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """--load-format dummy: the real architecture's shapes, random values (deterministic per seed)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    linear = linear_weight_names(model)
    for name, param in list(model.named_parameters()):
        if name.endswith("norm.weight"):
            value = torch.ones(param.shape, dtype=dtype, device=device)
        else:
            value = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
            value = place(value, device, dtype, name in linear)
        _set_param(model, name, value)


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
    if config.model == DUMMY_MODEL_NAME:
        from .dummy import build_dummy_tokenizer

        tokenizer = build_dummy_tokenizer()
        raw = dummy_config_dict(tokenizer)
        path, load_format, gen_cfg = None, "dummy", {"eos_token_id": raw["eos_token_id"]}
    else:
        path = resolve_model_path(config.model, config.revision)
        raw = read_json(path / "config.json")
        if not raw:
            raise ModelLoadError(f"{path} has no config.json: is it a Hugging Face model directory?")
        from transformers import AutoTokenizer

        # Never run code shipped in a model directory.
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        load_format = config.load_format
        gen_cfg = read_json(path / "generation_config.json")

    arch = (raw.get("architectures") or [""])[0]
    cls = ARCHITECTURES.get(arch)
    if cls is None:
        raise ModelLoadError(f"architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    model_cfg = cls.read_config(raw)
    dtype = resolve_dtype(config.dtype, device)
    model = build_model(cls, model_cfg, device)
    if load_format == "dummy":
        init_random_weights(model, device, dtype, config.seed)
    else:
        load_weights(model, path, device, dtype)
    model.eval()
    name = config.model if path is None else config.model.rstrip("/")
    log.info("loaded %s (%s) on %s in %s", name, arch, device, str(dtype).replace("torch.", ""))
    return LoadedModel(name=name, model=model, config=model_cfg, tokenizer=tokenizer, device=device,
                       dtype=dtype, generation_config=gen_cfg)
