"""chatserve's native CPU kernels (csrc/decode.cpp).

- Fused decode ops: RMSNorm with the residual add, SiLU-and-multiply, and decode attention over the
  paged KV cache with the q/k norms, RoPE and the K/V write: four calls a layer where PyTorch runs
  ~50 ops (on a small model dispatch was half the decode step: SmolLM2-135M, ~1700 ops, ~6 ms of
  14). CausalLM.forward_native runs them for every step: a decode-only step wholly, a step with
  prefill chunks its norms and SiLU, its rows' q/k norms, RoPE and K/V write (rope_kv_write) and
  its decode rows' attention (decode_attention).
- Matmuls: int4 and int8 with the activations quantized to int8 blocks of 32 and AVX-512 VNNI dot
  products, as llama.cpp's Q4/Q8 products; bf16 with vdpbf16ps; fp32 with FMAs. Each keeps its
  weights in a tiled layout of its own, taken when the kernels are loaded before the weights; the
  layers then run every step on them, prefill included.
- Prefill attention: causal flash attention of a prefill chunk over the paged KV cache (fp32, or
  bf16 with vdpbf16ps), for every step with prefills (Attention._native_prefill_span).

They are built with the machine's C++ compiler against the installed torch (no build step at
install time, no prebuilt binary), once: the library is cached under ~/.cache/chatserve/kernels,
keyed by the source, torch's version, the compiler flags and the CPU's flags (-march=native: the
VNNI and BF16 kernels exist where the CPU has those instructions). Modes (--native-kernels):
  auto  use the cached library; if there is none, build it in the background (about 20 s on two
        cores) while decode runs on PyTorch ops, and switch once it is loaded (the weights' layouts
        follow at the next start). No compiler: PyTorch ops.
  on    build now if needed (start-up waits) and fail if it cannot be built.
  off   PyTorch ops only.
CUDA, CausalLM.score and the oracle tests run the PyTorch path."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
import threading
import time
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("chatserve.native")

MODES = ("auto", "on", "off")
SOURCE = Path(__file__).with_name("csrc") / "decode.cpp"
CXXFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w"]

_lock = threading.Lock()
_state = "off"  # off | building | ready | failed
_builder: Optional[threading.Thread] = None


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chatserve" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def library_path() -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), " ".join(CXXFLAGS).encode(), _cpu_flags().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"decode-{key.hexdigest()[:16]}.so"


# Libraries of other sources, torch versions or CPUs that no process has loaded for this long go.
STALE_DAYS = 30


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def tidy(keep: Path) -> None:
    """Clear the cache's leftovers: the partial builds of processes that died while building (named
    after their pid), and libraries not loaded for STALE_DAYS (a loaded library's mtime is its last
    use), other than `keep`."""
    removed = []
    for f in cache_dir().glob("decode-*"):
        try:
            if f == keep:
                continue
            if f.suffix == ".tmp":
                if _alive(int(f.name.split(".")[1])):
                    continue
            elif f.suffix != ".so" or time.time() - f.stat().st_mtime < STALE_DAYS * 86400:
                continue
            f.unlink()
            removed.append(f.name)
        except (OSError, ValueError, IndexError):
            continue
    if removed:
        log.info("native kernel cache: removed %s", ", ".join(sorted(removed)))


def build(path: Path) -> None:
    """Compile the library to `path` (atomically: processes building at once each write their own
    file and the last rename wins)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [cxx, *CXXFLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", str(SOURCE), "-o", str(tmp),
           *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}",
           *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=lambda: os.nice(5))
        if done.returncode != 0:
            raise RuntimeError(f"building the native kernels failed ({' '.join(cmd[:2])} ...):\n{done.stderr[-4000:]}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load(path: Path) -> None:
    global _state
    torch.ops.load_library(str(path))
    _state = "ready"
    try:
        os.utime(path)  # its last use, for tidy()
    except OSError:
        pass


def _build_and_load(path: Path) -> None:
    global _state
    began = time.perf_counter()
    try:
        build(path)
        _load(path)
    except Exception as exc:  # a background build that fails leaves decode on PyTorch ops
        _state = "failed"
        log.warning("native decode kernels: %s; decode goes on with PyTorch ops", exc)
        return
    log.info("native decode kernels built in %.1f s and loaded (%s); decode steps use them from now on",
             time.perf_counter() - began, path)


def start(mode: str, device: torch.device) -> None:
    """Make the kernels available as `mode` says (see the module's doc). Idempotent per process."""
    global _state, _builder
    if mode not in MODES:
        raise ValueError(f"native_kernels must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off" or device.type != "cpu":
        return
    with _lock:
        if _state == "ready":
            return
        if _state == "building":
            if mode == "on":
                _builder.join()
                if _state != "ready":
                    raise RuntimeError("the native decode kernels could not be built: see the log above")
            return
        path = library_path()
        tidy(path)
        if path.exists():
            _load(path)
            log.info("native decode kernels loaded (%s)", path)
            return
        if mode == "on":
            began = time.perf_counter()
            log.info("building the native decode kernels (once; cached in %s) ...", path.parent)
            build(path)
            _load(path)
            log.info("native decode kernels built in %.1f s", time.perf_counter() - began)
            return
        if compiler() is None:
            log.info("no C++ compiler: decode runs on PyTorch ops alone (install g++ for the native "
                     "decode kernels, about 2x faster decode on small models)")
            _state = "failed"
            return
        _state = "building"
        log.info("building the native decode kernels in the background (once; cached in %s); decode "
                 "uses PyTorch ops until they are loaded", path.parent)
        _builder = threading.Thread(target=_build_and_load, args=(path,), name="chatserve-native-build", daemon=True)
        _builder.start()


def ops():
    """torch.ops.chatserve once the kernels are loaded, else None."""
    return torch.ops.chatserve if _state == "ready" else None


def wait(timeout: Optional[float] = None) -> bool:
    """Wait for a background build (tests, benchmarks); True when the kernels are loaded."""
    if _builder is not None:
        _builder.join(timeout)
    return _state == "ready"
