"""Served speed of chatserve: the real server under N concurrent streaming clients, beside the
engine's offline speed on exactly the same requests, in one run.

    python benchmarks/serving.py [--dtype auto|float32|bfloat16] [--quick] [--concurrency 1,8,32]
                                 [--prompt-tokens 128] [--output-tokens 64] [--model DIR]

1. Served: `python -m chatserve.cli serve` on the random-weight Qwen2.5-0.5B-shaped model of the
   engine benchmark (throughput.py), 2 threads. For each N (1, 8, 32): N streaming
   POST /v1/completions requests, sent at once, each a distinct random prompt of token ids,
   greedy, ignore_eos, so each produces exactly --output-tokens tokens. Per request: time to first
   token (request sent -> first chunk with text) and the gaps between successive text chunks
   (inter-token latency: one chunk is one token); per N: output tokens (from usage) / wall time
   from the first send to the last completion.
2. Offline, with the server stopped (the two never share the CPU): the same prompt ids through
   `LLM.generate` in this process, with the same engine settings. Output tokens / wall time.
3. The ratio served / offline: what HTTP, SSE and the async engine cost. Target >= 0.9 at N = 32.

Prefix caching stays on, as the server's default, on both sides; every prompt is distinct random
ids, so it never hits. The model's tokenizer is the engine benchmark's (1,000 tokens) extended
with a word for every other id of the model's vocabulary (same weights, linked), so that every
generated token streams text, as with a real tokenizer; with the small one, the random model's
tokens would mostly decode to nothing and no chunk would carry them.

The machine may be shared: every measurement records how much CPU other processes (not the
server this benchmark started) took meanwhile, and is run again (up to --tries times) when that
was more than a little.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import (
    NUM_THREADS,
    RESULTS_DIR,
    CpuShare,
    bench_dtype,
    dtype_name,
    ensure_model_dir,
    free_memory,
    random_prompt,
)

CONCURRENCY = (1, 8, 32)
QUICK_CONCURRENCY = (1, 4)
PROMPT_TOKENS = 128
OUTPUT_TOKENS, QUICK_OUTPUT_TOKENS = 64, 16
# Engine settings, the same on both sides.
MAX_NUM_SEQS = 64
MAX_BATCH_TOKENS = 512
KV_CACHE_GIB = 1.0
TARGET_N, TARGET_RATIO = 32, 0.9
TRIES = 2  # per measurement, when other processes disturbed one
LOAD_TIMEOUT_S = 600.0


# -- the model ---------------------------------------------------------------------------------------


def ensure_full_vocab_model_dir(dtype: torch.dtype) -> Path:
    """The engine benchmark's model (its files linked, not copied) with a tokenizer that has a word
    (" w1234") for every id of the model's vocabulary the benchmark tokenizer lacks."""
    base = ensure_model_dir(dtype)
    path = base.with_name(base.name + "-full-vocab")
    if (path / "tokenizer.json").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in base.iterdir():
        if f.name != "tokenizer.json":
            (tmp / f.name).symlink_to(f)
    tokenizer = json.loads((base / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    # The added (special) tokens join the model's vocabulary at their own ids, or tokenizers would
    # renumber them after the new words.
    vocab.update({t["content"]: t["id"] for t in tokenizer["added_tokens"]})
    used = set(vocab.values())
    size = json.loads((base / "config.json").read_text())["vocab_size"]
    vocab.update({f"\u0120w{i}": i for i in range(size) if i not in used})  # U+0120: byte-level BPE's space
    (tmp / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    tmp.rename(path)  # only a complete directory ever appears under the final name
    return path


def make_workload(concurrency: list[int], tries: int, prompt_tokens: int, vocab: int) -> dict:
    """Distinct random prompts for every N and every try, so the prefix cache never helps."""
    rng = random.Random(0)
    return {
        "prompts": {n: [[random_prompt(rng, prompt_tokens, vocab) for _ in range(n)] for _ in range(tries)]
                    for n in concurrency},
        "warmup": random_prompt(rng, 32, vocab),
    }


def engine_settings(model_dir: Path, dtype: torch.dtype) -> dict:
    return {"model": str(model_dir), "dtype": dtype_name(dtype), "device": "cpu", "num_threads": NUM_THREADS,
            "max_num_seqs": MAX_NUM_SEQS, "max_num_batched_tokens": MAX_BATCH_TOKENS,
            "kv_cache_memory_gib": KV_CACHE_GIB, "enable_prefix_caching": True}


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks, as numpy's default."""
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# -- served ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(settings: dict, extra_args: tuple[str, ...] = ()):
    """Start `chatserve serve` (with extra_args), wait until /health is 200; SIGTERM it on the way
    out, whatever happens. Yields (process, base url, served model name)."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "chatserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", settings["model"], "--dtype", settings["dtype"], "--device", settings["device"],
           "--num-threads", str(settings["num_threads"]), "--max-num-seqs", str(settings["max_num_seqs"]),
           "--max-num-batched-tokens", str(settings["max_num_batched_tokens"]),
           "--kv-cache-memory-gib", str(settings["kv_cache_memory_gib"]), "--log-level", "warning"]
    if not settings["enable_prefix_caching"]:
        cmd.append("--no-prefix-caching")
    cmd.extend(extra_args)
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

        def log_tail() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")[-3000:]

        try:
            deadline = time.perf_counter() + LOAD_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with status {proc.returncode}:\n{log_tail()}")
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"the server was not ready within {LOAD_TIMEOUT_S:.0f}s:\n{log_tail()}")
                try:
                    health = httpx.get(f"{url}/health", timeout=5)
                    if health.status_code == 200:
                        break
                except httpx.TransportError:
                    pass  # not listening yet
                time.sleep(0.5)
            yield proc, url, health.json()["model"]
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.returncode not in (0, -signal.SIGTERM):
                print(f"  warning: the server exited with status {proc.returncode}:\n{log_tail()}", flush=True)


@dataclass
class Stream:
    """One streamed completion, as the client saw it."""

    sent: float
    chunk_times: list[float] = field(default_factory=list)  # when each chunk with text arrived
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    done: float = 0.0


async def stream_completion(client, model: str, prompt: list[int], max_tokens: int) -> Stream:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    out = Stream(sent=time.perf_counter())
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"POST /v1/completions: {response.status_code} "
                               f"{(await response.aread()).decode(errors='replace')[:500]}")
        async for line in response.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data:"):
                continue  # the blank line between events
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                raise RuntimeError(f"the stream ended in an error: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    out.chunk_times.append(now)
                    out.text += choice["text"]
                out.finish_reason = choice.get("finish_reason") or out.finish_reason
            if chunk.get("usage"):
                out.completion_tokens = chunk["usage"]["completion_tokens"]
    out.done = time.perf_counter()
    return out


async def serve_batch(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> tuple[list[Stream], float]:
    """All requests at once, over connections already open (as long-lived clients have them)."""
    import httpx

    n = len(prompts)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n, keepalive_expiry=60)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None), limits=limits) as client:
        await asyncio.gather(*(client.get("/health") for _ in range(n)))
        start = time.perf_counter()
        streams = await asyncio.gather(*(stream_completion(client, model, p, max_tokens) for p in prompts))
    return streams, max(s.done for s in streams) - start


def summarize_served(streams: list[Stream], wall: float, max_tokens: int) -> dict:
    bad = [s for s in streams if not s.chunk_times or s.completion_tokens != max_tokens]
    if bad:
        print(f"  warning: {len(bad)} of {len(streams)} streams did not bring {max_tokens} tokens with text "
              f"(completion_tokens {sorted({s.completion_tokens for s in bad})}, "
              f"text chunks {sorted({len(s.chunk_times) for s in bad})})", flush=True)
    ttft = [s.chunk_times[0] - s.sent for s in streams if s.chunk_times]
    itl = [b - a for s in streams for a, b in zip(s.chunk_times, s.chunk_times[1:])]
    tokens = sum(s.completion_tokens for s in streams)
    chunks = sum(len(s.chunk_times) for s in streams)
    return {"ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
            "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "tokens_per_text_chunk": tokens / max(chunks, 1), "texts": [s.text for s in streams]}


def run_served(settings: dict, work: dict, concurrency: list[int], max_tokens: int, tries: int,
               cpu: CpuShare) -> dict[int, dict]:
    res = {}
    print("served: starting the server ...", flush=True)
    with running_server(settings) as (proc, url, model):
        cpu.own_pids = (proc.pid,)
        try:
            asyncio.run(serve_batch(url, model, [work["warmup"]], 8))
            for n in concurrency:
                print(f"served: {n} concurrent streams ...", flush=True)

                def batch(i: int, n=n) -> tuple[int, list[Stream], float]:
                    return i, *asyncio.run(serve_batch(url, model, work["prompts"][n][i], max_tokens))

                i, streams, wall = cpu.measure(f"served N={n}", batch, tries)
                res[n] = {"prompt_set": i, **summarize_served(streams, wall, max_tokens)}
        finally:
            cpu.own_pids = ()
    return res


# -- offline -----------------------------------------------------------------------------------------


def run_offline(settings: dict, work: dict, served: dict[int, dict], max_tokens: int, tries: int,
                cpu: CpuShare) -> dict[int, dict]:
    from chatserve.engine.engine import LLM
    from chatserve.engine.sampling import SamplingParams

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    model = settings["model"]
    llm = LLM(model, **{k: v for k, v in settings.items() if k != "model"})
    llm.generate({"prompt_token_ids": work["warmup"]}, greedy(8))
    res = {}
    for n, served_n in served.items():
        print(f"offline: batch of {n} ...", flush=True)
        sets = work["prompts"][n]
        first = served_n["prompt_set"]  # the served run kept; a retry takes another, unseen by this engine

        def batch(i: int, n=n, sets=sets, first=first) -> tuple[int, list, float]:
            k = (first + i) % len(sets)
            start = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in sets[k]], greedy(max_tokens))
            return k, outs, time.perf_counter() - start

        k, outs, elapsed = cpu.measure(f"offline N={n}", batch, tries)
        lengths = sorted({len(o.token_ids) for o in outs})
        if lengths != [max_tokens]:
            print(f"  warning: offline output lengths {lengths}, expected {max_tokens}", flush=True)
        tokens = sum(len(o.token_ids) for o in outs)
        same = sum(o.text == t for o, t in zip(outs, served_n["texts"])) if k == first else None
        res[n] = {"prompt_set": k, "output_tokens": tokens, "wall_s": elapsed, "tokens_per_s": tokens / elapsed,
                  "same_text_as_served": same}
    return res


# -- report ------------------------------------------------------------------------------------------


def build_rows(served: dict[int, dict], offline: dict[int, dict]) -> list[dict]:
    rows = []
    for n, s in served.items():
        o = offline[n]
        ratio = s["tokens_per_s"] / o["tokens_per_s"]
        target = f">= {TARGET_RATIO:g}" if n == TARGET_N else ""
        rows.append({"concurrency": n, **{k: v for k, v in s.items() if k != "texts"},
                     "offline_tokens_per_s": o["tokens_per_s"], "offline_wall_s": o["wall_s"],
                     "offline_prompt_set": o["prompt_set"], "same_text_as_served": o["same_text_as_served"],
                     "ratio": ratio, "target": target, "passed": ratio >= TARGET_RATIO if target else None})
    return rows


def print_rows(rows: list[dict], title: str) -> None:
    def ms(x: float) -> str:
        return f"{x * 1000:.1f}"

    header = ("N", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "served tok/s", "offline tok/s",
              "ratio", "target", "ok")
    lines = [(str(r["concurrency"]), ms(r["ttft_p50_s"]), ms(r["ttft_p99_s"]), ms(r["itl_p50_s"]),
              ms(r["itl_p99_s"]), f"{r['tokens_per_s']:.1f}", f"{r['offline_tokens_per_s']:.1f}",
              f"{r['ratio']:.3f}", r["target"] or "-", {True: "yes", False: "NO", None: "-"}[r["passed"]])
             for r in rows]
    widths = [max(len(c) for c in col) for col in zip(header, *lines)]
    print(f"\n{title}")
    for i, line in enumerate([header, *lines]):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def parse_concurrency(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"a comma-separated list of positive numbers, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: N = {','.join(map(str, QUICK_CONCURRENCY))}, "
                             f"{QUICK_OUTPUT_TOKENS} output tokens")
    parser.add_argument("--concurrency", type=parse_concurrency, default=None,
                        help=f"N values, comma-separated (default {','.join(map(str, CONCURRENCY))})")
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS, help="default %(default)s")
    parser.add_argument("--output-tokens", type=int, default=None, help=f"default {OUTPUT_TOKENS}")
    parser.add_argument("--tries", type=int, default=TRIES,
                        help="runs per measurement while other processes take the CPU (default %(default)s)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a model directory (default: the engine benchmark's model, with the full-vocabulary "
                             "tokenizer)")
    args = parser.parse_args()

    concurrency = args.concurrency or list(QUICK_CONCURRENCY if args.quick else CONCURRENCY)
    max_tokens = args.output_tokens or (QUICK_OUTPUT_TOKENS if args.quick else OUTPUT_TOKENS)
    tries = max(1, args.tries)
    torch.set_num_threads(NUM_THREADS)
    dtype = bench_dtype(args.dtype)
    model_dir = args.model or ensure_full_vocab_model_dir(dtype)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    work = make_workload(concurrency, tries, args.prompt_tokens, vocab)
    settings = engine_settings(model_dir, dtype)
    print(f"model {model_dir}; dtype {dtype_name(dtype)}; {NUM_THREADS} threads; N = {concurrency}; "
          f"{args.prompt_tokens}-token prompts, {max_tokens} output tokens", flush=True)

    started = time.perf_counter()
    cpu = CpuShare()
    served = run_served(settings, work, concurrency, max_tokens, tries, cpu)
    offline = run_offline(settings, work, served, max_tokens, tries, cpu)
    free_memory()

    rows = build_rows(served, offline)
    print_rows(rows, f"chatserve served (/v1/completions, streaming) vs offline (LLM.generate) -- Qwen2.5-0.5B "
                     f"shape, {dtype_name(dtype)}, {NUM_THREADS} threads; {args.prompt_tokens}-token prompts, "
                     f"{max_tokens} output tokens each")
    for r in rows:
        same = "-" if r["same_text_as_served"] is None else f"{r['same_text_as_served']}/{r['concurrency']}"
        print(f"N={r['concurrency']}: served {r['output_tokens']} tokens in {r['wall_s']:.2f}s, offline in "
              f"{r['offline_wall_s']:.2f}s; {r['tokens_per_text_chunk']:.2f} tokens per text chunk; "
              f"greedy text identical to offline: {same}")
    total = time.perf_counter() - started
    print(f"total run {total:.0f}s")
    print(cpu.report())

    out = RESULTS_DIR / f"serving-{dtype_name(dtype)}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "dtype": dtype_name(dtype), "quick": args.quick, "num_threads": NUM_THREADS, "model": str(model_dir),
        "prompt_tokens": args.prompt_tokens, "output_tokens": max_tokens, "engine": settings,
        "target": f"served / offline output tokens/s >= {TARGET_RATIO:g} at N = {TARGET_N}",
        "rows": rows, "total_seconds": total, "cpu_share_of_other_processes": cpu.shares,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
