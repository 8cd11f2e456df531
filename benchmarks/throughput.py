"""Offline speed of chatserve beside Hugging Face transformers, on the same random-weight
Qwen2.5-0.5B-shaped model, in one run.

    python benchmarks/throughput.py [--dtype auto|float32|bfloat16] [--quick] [--skip-reference]

1. 32 requests (prompts of 64..512 tokens, 64 output tokens each) submitted at once: output tokens/s,
   against transformers `generate` one request at a time and `generate_batch` (its continuous batching).
2. One request, 128-token prompt, 128 output tokens: decode tokens/s, and the fraction of the
   memory-bandwidth limit (copy bandwidth / weight bytes read per token) it reaches.
3. Time to first token for 128- and 1,024-token prompts (median of a few).
4. Prefix caching: the same 1,024-token prompt twice; TTFT of the second over the first.

The machine may be shared: every measurement records how much CPU other processes took meanwhile,
and the short ones are run again (up to TRIES times) when that was more than a little.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from common import (
    NUM_THREADS,
    RESULTS_DIR,
    CpuShare,
    Row,
    bench_dtype,
    copy_bandwidth,
    dtype_name,
    ensure_model_dir,
    free_memory,
    median,
    print_table,
    random_prompt,
    weight_bytes,
    write_json,
)

BATCH_OUTPUT_TOKENS = 64
DECODE_PROMPT, DECODE_OUTPUT = 128, 128
TTFT_PROMPTS = (128, 1024)
PREFIX_PROMPT = 1024
MAX_BATCH_TOKENS = 512  # the per-step token budget, the same on both sides
KV_CACHE_GIB = 2.0
TRIES = 3  # for the short measurements, when other processes disturbed one


def make_workloads(quick: bool, vocab: int) -> dict:
    rng = random.Random(0)
    repeats = 1 if quick else 3

    def prompts(length: int, count: int) -> list[list[int]]:
        return [random_prompt(rng, length, vocab) for _ in range(count)]

    return {
        "batch": [random_prompt(rng, rng.randint(64, 512), vocab) for _ in range(8 if quick else 32)],
        "decode": random_prompt(rng, DECODE_PROMPT, vocab),
        # Fresh prompts for every repeat and try, so chatserve's prefix cache cannot help.
        "ttft": {n: [prompts(n, repeats) for _ in range(TRIES)] for n in TTFT_PROMPTS},
        "prefix": prompts(PREFIX_PROMPT, TRIES),
        "warmup": random_prompt(rng, 32, vocab),
    }


def decode_rate(token_times: list[float]) -> float:
    """Tokens/s after the first token: (n - 1) / (t_last - t_first)."""
    return (len(token_times) - 1) / (token_times[-1] - token_times[0])


# -- chatserve -------------------------------------------------------------------------------------


def run_chatserve(model_dir: Path, dtype: torch.dtype, work: dict, cpu: CpuShare) -> dict:
    from chatserve.engine.engine import LLM
    from chatserve.engine.sampling import SamplingParams

    llm = LLM(str(model_dir), dtype=dtype_name(dtype), device="cpu", kv_cache_memory_gib=KV_CACHE_GIB,
              max_num_batched_tokens=MAX_BATCH_TOKENS, num_threads=NUM_THREADS)
    engine = llm.engine

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    def run_one(prompt: list[int], max_tokens: int) -> dict:
        """One request through the step loop: when it started, when each token came out."""
        start = time.perf_counter()
        rid = engine.add_request({"prompt_token_ids": prompt}, greedy(max_tokens))
        times, tokens, cached = [], [], 0
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id == rid:
                    times += [time.perf_counter()] * len(out.token_ids)
                    tokens += out.token_ids
                    cached = out.num_cached_tokens
        return {"ttft": times[0] - start, "times": times, "tokens": tokens, "cached": cached}

    def batch(_: int) -> tuple[list, float]:
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in work["batch"]], greedy(BATCH_OUTPUT_TOKENS))
        return outs, time.perf_counter() - start

    def prefix(i: int) -> dict:
        first, second = run_one(work["prefix"][i], 1), run_one(work["prefix"][i], 1)
        return {"first_s": first["ttft"], "second_s": second["ttft"],
                "cached_tokens": [first["cached"], second["cached"]]}

    res = {"weight_bytes": weight_bytes(engine.loaded.model)}
    llm.generate({"prompt_token_ids": work["warmup"]}, greedy(8))

    print("chatserve: batch ...", flush=True)
    outs, elapsed = cpu.measure("chatserve batch", batch)
    lengths = sorted({len(o.token_ids) for o in outs})
    if lengths != [BATCH_OUTPUT_TOKENS]:
        print(f"  warning: chatserve output lengths {lengths}, expected {BATCH_OUTPUT_TOKENS}")
    res["batch_tps"] = sum(len(o.token_ids) for o in outs) / elapsed
    res["batch_s"], res["batch_preemptions"] = elapsed, engine.num_preemptions

    print("chatserve: decode ...", flush=True)
    decode = cpu.measure("chatserve decode", lambda _: run_one(work["decode"], DECODE_OUTPUT), TRIES)
    res["decode_tps"], res["decode_tokens"] = decode_rate(decode["times"]), decode["tokens"]

    print("chatserve: time to first token ...", flush=True)
    for n, sets in work["ttft"].items():
        res[f"ttft_{n}"] = cpu.measure(f"chatserve TTFT {n}",
                                       lambda i, sets=sets: median([run_one(p, 1)["ttft"] for p in sets[i]]), TRIES)

    print("chatserve: prefix caching ...", flush=True)
    res["prefix"] = cpu.measure("chatserve prefix", prefix, TRIES)
    return res


# -- transformers ----------------------------------------------------------------------------------


class TimingStreamer:
    """Records when generate() hands over each new token (its first put() is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.seen_prompt = False

    def put(self, value) -> None:
        if self.seen_prompt:
            self.times += [time.perf_counter()] * value.numel()
        self.seen_prompt = True

    def end(self) -> None:
        pass


def run_transformers(model_dir: Path, dtype: torch.dtype, work: dict, cpu: CpuShare) -> dict:
    import transformers
    from transformers import (
        AutoModelForCausalLM,
        ContinuousBatchingConfig,
        GenerationConfig,
    )

    transformers.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    pad = 0  # the model has no eos token, so every generation runs to its max_new_tokens
    gen_config = GenerationConfig(max_new_tokens=BATCH_OUTPUT_TOKENS, do_sample=False, pad_token_id=pad)
    cb_config = ContinuousBatchingConfig(num_blocks=128, max_batch_tokens=MAX_BATCH_TOKENS)

    def generate(prompt: list[int], max_new_tokens: int, streamer=None) -> list[int]:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, streamer=streamer)
        return out[0, len(prompt):].tolist()

    def generate_batch(prompts: list[list[int]], max_new_tokens: int) -> dict:
        return model.generate_batch(prompts, generation_config=gen_config, continuous_batching_config=cb_config,
                                    persistent_manager=True, max_new_tokens=max_new_tokens)

    def one_at_a_time(_: int) -> float:
        start = time.perf_counter()
        total = sum(len(generate(p, BATCH_OUTPUT_TOKENS)) for p in work["batch"])
        return total / (time.perf_counter() - start)

    def batched(_: int) -> tuple[dict, float]:
        start = time.perf_counter()
        outs = generate_batch(work["batch"], BATCH_OUTPUT_TOKENS)
        return outs, time.perf_counter() - start

    def decode(_: int) -> dict:
        streamer = TimingStreamer()
        return {"tokens": generate(work["decode"], DECODE_OUTPUT, streamer), "tps": decode_rate(streamer.times)}

    def ttft(prompts: list[list[int]]) -> float:
        times = []
        for p in prompts:
            start = time.perf_counter()
            generate(p, 1)
            times.append(time.perf_counter() - start)
        return median(times)

    res = {}
    generate(work["warmup"], 8)

    print("transformers: generate, one request at a time ...", flush=True)
    res["batch_generate_tps"] = cpu.measure("transformers generate x1", one_at_a_time)

    print("transformers: generate_batch (continuous batching) ...", flush=True)
    # The persistent manager is sized by its first call's number of requests: warm up with as many.
    generate_batch([work["warmup"]] * len(work["batch"]), 4)
    outs, elapsed = cpu.measure("transformers generate_batch", batched)
    lengths = sorted({len(o.generated_tokens) for o in outs.values()})
    if len(outs) != len(work["batch"]) or lengths != [BATCH_OUTPUT_TOKENS]:
        print(f"  warning: generate_batch returned {len(outs)} outputs of lengths {lengths}")
    res["batch_generate_batch_tps"] = sum(len(o.generated_tokens) for o in outs.values()) / elapsed
    model.destroy_cached_continuous_batching_manager()

    print("transformers: decode ...", flush=True)
    out = cpu.measure("transformers decode", decode, TRIES)
    res["decode_tps"], res["decode_tokens"] = out["tps"], out["tokens"]

    print("transformers: time to first token ...", flush=True)
    for n, sets in work["ttft"].items():
        res[f"ttft_{n}"] = cpu.measure(f"transformers TTFT {n}", lambda i, sets=sets: ttft(sets[i]), TRIES)
    return res


# -- report ----------------------------------------------------------------------------------------


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def build_rows(cs: dict, ref: dict, bandwidth: float, num_requests: int) -> list[Row]:
    def rate(metric: str, key: str, ref_key: str, ref_name: str, target: float) -> Row:
        r = ref.get(ref_key)
        ratio = None if r is None else cs[key] / r
        return Row(metric, "tok/s", cs[key], r, ref_name, ratio, f">= {target:g}x",
                   None if ratio is None else ratio >= target)

    def ttft(n: int) -> Row:
        r = ref.get(f"ttft_{n}")
        ratio = None if r is None else r / cs[f"ttft_{n}"]
        return Row(f"TTFT, {n}-token prompt (median)", "s", cs[f"ttft_{n}"], r, "generate", ratio,
                   ">= 1x (no slower)", None if ratio is None else ratio >= 1)

    limit = bandwidth / cs["weight_bytes"]
    prefix_ratio = cs["prefix"]["second_s"] / cs["prefix"]["first_s"]
    return [
        rate(f"batch of {num_requests}: output tokens/s", "batch_tps", "batch_generate_tps", "generate x1", 8),
        rate(f"batch of {num_requests}: output tokens/s", "batch_tps", "batch_generate_batch_tps", "generate_batch", 2),
        rate("decode tokens/s, 1 request", "decode_tps", "decode_tps", "generate", 2),
        Row("decode: fraction of bandwidth limit", "-", cs["decode_tps"] / limit,
            ref["decode_tps"] / limit if "decode_tps" in ref else None, "generate", None, "info"),
        ttft(128),
        ttft(1024),
        Row(f"prefix cache: TTFT 2nd/1st, {PREFIX_PROMPT} tokens", "ratio", prefix_ratio, None, "", None, "<= 0.1",
            prefix_ratio <= 0.1),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="8 requests in workload 1, fewer repeats")
    parser.add_argument("--skip-reference", action="store_true", help="skip transformers")
    args = parser.parse_args()

    torch.set_num_threads(NUM_THREADS)
    dtype = bench_dtype(args.dtype)
    model_dir = ensure_model_dir(dtype)
    from transformers import AutoTokenizer

    # Prompts are random ids the small benchmark tokenizer knows; outputs range over the model's vocab.
    work = make_workloads(args.quick, len(AutoTokenizer.from_pretrained(str(model_dir))))
    started = time.perf_counter()
    cpu = CpuShare()
    bandwidth = cpu.measure("bandwidth", lambda _: copy_bandwidth(), TRIES)
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s; dtype {dtype_name(dtype)}; "
          f"{NUM_THREADS} threads", flush=True)

    cs = run_chatserve(model_dir, dtype, work, cpu)
    free_memory()  # each side's model goes when its function returns
    ref = {} if args.skip_reference else run_transformers(model_dir, dtype, work, cpu)
    free_memory()

    rows = build_rows(cs, ref, bandwidth, len(work["batch"]))
    limit = bandwidth / cs["weight_bytes"]
    title = (f"chatserve vs transformers{' (skipped)' if args.skip_reference else ''} -- Qwen2.5-0.5B shape, "
             f"{dtype_name(dtype)}, {NUM_THREADS} threads; bandwidth limit {limit:.1f} tok/s "
             f"({bandwidth / 1e9:.1f} GB/s / {cs['weight_bytes'] / 1e9:.2f} GB of weights)")
    print_table(rows, title)
    prefix = cs["prefix"]
    print(f"prefix cache: first {prefix['first_s']:.3f}s, second {prefix['second_s']:.3f}s, "
          f"cached prompt tokens {prefix['cached_tokens']}")
    if ref:
        same = common_prefix(cs["decode_tokens"], ref["decode_tokens"])
        print(f"decode: greedy tokens identical to transformers' for the first {same}/{DECODE_OUTPUT}")
    total = time.perf_counter() - started
    print(f"chatserve batch: {cs['batch_s']:.1f}s, {cs['batch_preemptions']} preemptions; total run {total:.0f}s")
    print(cpu.report())

    out = RESULTS_DIR / f"throughput-{dtype_name(dtype)}.json"
    write_json(rows, out, dtype=dtype_name(dtype), quick=args.quick, num_threads=NUM_THREADS,
               copy_bandwidth_bytes_per_s=bandwidth, weight_bytes=cs["weight_bytes"],
               bandwidth_limit_tokens_per_s=limit, prefix_cache=prefix, total_seconds=total,
               cpu_share_of_other_processes=cpu.shares)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
