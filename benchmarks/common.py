"""Shared pieces of the benchmarks: the benchmark model directory, prompts, memory bandwidth and
the results table."""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch

from chatserve.models.loader import resolve_dtype

CACHE_DIR = Path("~/.cache/chatserve/bench").expanduser()
RESULTS_DIR = Path(__file__).resolve().parent / "results"
NUM_THREADS = 2
# Measurements during which other processes took more of the CPU than this are flagged (or retried).
QUIET = 0.05
T = TypeVar("T")

# Qwen2.5-0.5B's shape, with random weights.
QWEN25_05B_SHAPE = {
    "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}, "tie_word_embeddings": True,
    "initializer_range": 0.02,
}


def bench_dtype(name: str) -> torch.dtype:
    return resolve_dtype(name, torch.device("cpu"))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def ensure_model_dir(dtype: torch.dtype) -> Path:
    """The Qwen2.5-0.5B-shaped random model at `dtype`, written once and reused."""
    path = CACHE_DIR / f"qwen2.5-0.5b-shape-{dtype_name(dtype)}"
    if (path / "config.json").exists():
        return path
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from chatserve.models.dummy import build_dummy_tokenizer

    print(f"writing the benchmark model to {path} ...", flush=True)
    config = Qwen2Config(**QWEN25_05B_SHAPE)
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(dtype).eval()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    build_dummy_tokenizer().save_pretrained(tmp)
    tmp.rename(path)  # only a complete directory ever appears under the final name
    del model
    free_memory()
    return path


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(length)]


def free_memory() -> None:
    gc.collect()


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s moved by `dst.copy_(src)` over a large tensor, counting the read and the write."""
    src = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    free_memory()
    return nbytes / min(times)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes read per decoded token: every parameter once (a tied embedding counts once, as lm_head)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())  # parameters() skips tied duplicates


def _process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) of another process; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # the name in parentheses may hold spaces
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _cpu_snapshot(pids: tuple[int, ...] = ()) -> tuple[float, float, float]:
    """(wall time, CPU seconds the whole machine was busy, CPU seconds of this process and `pids`)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is already in user.
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]
    own = time.process_time() + sum(_process_cpu_seconds(pid) for pid in pids)
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own


def wait_for_quiet(max_wait: float = 60.0, window: float = 1.0, pids: tuple[int, ...] = ()) -> None:
    """Wait (up to max_wait seconds) for a window in which other processes use under QUIET of the CPU."""
    deadline = time.perf_counter() + max_wait
    while time.perf_counter() < deadline:
        wall0, busy0, own0 = _cpu_snapshot(pids)
        time.sleep(window)
        wall1, busy1, own1 = _cpu_snapshot(pids)
        if (busy1 - busy0) - (own1 - own0) <= QUIET * (wall1 - wall0) * (os.cpu_count() or 1):
            return


class CpuShare:
    """The share of the machine's CPU other processes took while each measurement ran. The
    benchmark machine may be shared: timings are only comparable while this stays near zero.
    Processes in `own_pids` (a server this benchmark started) count as the benchmark's own."""

    def __init__(self):
        self.shares: dict[str, float] = {}
        self.own_pids: tuple[int, ...] = ()

    @contextmanager
    def track(self, label: str):
        wall0, busy0, own0 = _cpu_snapshot(self.own_pids)
        yield
        wall1, busy1, own1 = _cpu_snapshot(self.own_pids)
        other = max(0.0, (busy1 - busy0) - (own1 - own0))
        self.shares[label] = other / max((wall1 - wall0) * (os.cpu_count() or 1), 1e-9)

    def measure(self, label: str, fn: Callable[[int], T], tries: int = 1, quiet: float = QUIET) -> T:
        """fn(try_index), run again (up to `tries` times) while other processes took more than
        `quiet` of the CPU; the result of the quietest run."""
        best: tuple[float, T] | None = None
        for i in range(tries):
            wait_for_quiet(pids=self.own_pids)
            with self.track(label):
                result = fn(i)
            if best is None or self.shares[label] < best[0]:
                best = (self.shares[label], result)
            if best[0] <= quiet:
                break
        self.shares[label] = best[0]
        return best[1]

    def report(self, threshold: float = QUIET) -> str:
        text = "CPU taken by other processes: " + ", ".join(f"{k} {v:.0%}" for k, v in self.shares.items())
        noisy = [k for k, v in self.shares.items() if v > threshold]
        if noisy:
            text += f"\nWARNING: other processes competed for the CPU during {', '.join(noisy)}: rerun on a quiet machine"
        return text


def cpu_description() -> str:
    """The CPU model, and whether it has native bf16 (avx512_bf16) and AMX, from /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "CPU unknown (no /proc/cpuinfo)"

    def value(key: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == key), "")

    flags = set(value("flags").split())
    amx = sorted(f for f in flags if f.startswith("amx"))
    return (f"{value('model name') or 'CPU unknown'}, {os.cpu_count()} CPUs; "
            f"avx512_bf16: {'yes' if 'avx512_bf16' in flags else 'no'}; amx: {' '.join(amx) if amx else 'no'}")


def rss_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (VmHWM)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib * 1024


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Row:
    metric: str
    unit: str
    chatserve: float | None
    reference: float | None = None
    reference_name: str = ""
    # ratio: chatserve over reference for rates (higher is better), reference over chatserve for times.
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None


def format_number(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def print_grid(header: tuple[str, ...], lines: list[tuple], title: str) -> None:
    """A plain-text table: a title, a header row, a rule, then the lines, columns padded to fit."""
    lines = [tuple(str(c) for c in line) for line in lines]
    widths = [max(len(c) for c in col) for col in zip(header, *lines)]
    print(f"\n{title}")
    for i, line in enumerate([header, *lines]):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_table(rows: list[Row], title: str) -> None:
    header = ("metric", "unit", "chatserve", "reference", "ratio", "target", "ok")
    lines = [(r.metric, r.unit, format_number(r.chatserve), format_number(r.reference) + (f" ({r.reference_name})" if r.reference_name and r.reference is not None else ""),
              format_number(r.ratio), r.target, {True: "yes", False: "NO", None: "-"}[r.passed]) for r in rows]
    print_grid(header, lines, title)


def write_json(rows: list[Row], path: Path, **meta) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
