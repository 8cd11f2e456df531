"""Decode speed with and without a JSON-schema constraint (structured output), side by side in one
run, at batch 1 and batch 32.

    python benchmarks/constrained.py [--model dummy_model] [--quick]

Each request has a short prompt and decodes OUTPUT_TOKENS tokens; the constrained run asks for an
array of integers long enough that the grammar never completes first, so both sides decode the
same number of tokens and only the per-step mask (xgrammar's bitmask filled per request, applied to
the batch's logits in one op, and each matcher advanced by its token) differs. On the tiny
dummy_model a step costs well under a millisecond, so the mask's cost shows at its largest; on a
real model it is a smaller share of each step. Target: constrained decode at least 0.9x unconstrained.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from common import CpuShare, Row, print_table

from chatserve import Engine, EngineConfig, SamplingParams
from chatserve.engine.structured import StructuredOutput
from chatserve.models.loader import load_model

BATCHES = (1, 32)
PROMPT_TOKENS = 8
SCHEMA = {"type": "object", "properties": {"values": {"type": "array", "minItems": 1000,
                                                      "items": {"type": "integer", "minimum": 0, "maximum": 999}}},
          "required": ["values"]}


def decode_rate(engine: Engine, batch: int, output_tokens: int, constrained: bool) -> float:
    """Output tokens per second of `batch` requests decoding together."""
    rng = random.Random(batch)
    spec = StructuredOutput.from_json_schema(SCHEMA, "benchmark") if constrained else None
    vocab = engine.loaded.config.vocab_size
    ids = [engine.add_request({"prompt_token_ids": [rng.randrange(10, vocab - 10) for _ in range(PROMPT_TOKENS)]},
                              SamplingParams(max_tokens=output_tokens, ignore_eos=True, seed=i, structured_output=spec))
           for i in range(batch)]
    while any(engine.requests[r].num_output_tokens == 0 for r in ids):  # prefill and the first token: not timed
        engine.step()
    start = time.perf_counter()
    results = engine.run_to_completion(ids)
    elapsed = time.perf_counter() - start
    assert all(len(results[r].token_ids) == output_tokens - 1 for r in ids), "a request ended early"
    return batch * (output_tokens - 1) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy_model", help="model to decode with (default: dummy_model)")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and one repeat: under a minute")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: 1; the tiny dummy_model gains nothing from more)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    output_tokens, repeats = (33, 3) if args.quick else (257, 5)
    loaded = load_model(EngineConfig(model=args.model, device="cpu"))

    def measure(batch: int, constrained: bool) -> float:
        # A fresh engine (same weights) each time: one that has run other batches before decodes
        # them at another speed (1812 against 2902 tok/s unconstrained, measured), which is no
        # difference between the two sides.
        engine = Engine(EngineConfig(model=args.model, device="cpu", num_kv_blocks=32 * (output_tokens // 16 + 4),
                                     max_num_seqs=max(BATCHES)), loaded=loaded)
        decode_rate(engine, 1, 9, constrained)  # warm up (and compile the grammar)
        return decode_rate(engine, batch, output_tokens, constrained)

    share = CpuShare()
    rows = []
    for batch in BATCHES:
        rates = {False: 0.0, True: 0.0}
        # Alternating, best of each: a busy moment on a shared machine hits both sides alike.
        # (Not share.measure: that waits for a quiet machine, which --quick must not.)
        with share.track(f"batch {batch}"):
            for _ in range(repeats):
                for constrained in (False, True):
                    rates[constrained] = max(rates[constrained], measure(batch, constrained))
        ratio = rates[True] / rates[False]
        rows.append(Row(f"decode, batch {batch}, json_schema", "tok/s", rates[True], rates[False], "unconstrained",
                        ratio, ">= 0.9", ratio >= 0.9))
    print_table(rows, f"constrained decoding on {args.model} ({output_tokens - 1} decoded tokens per request)")
    print(share.report())


if __name__ == "__main__":
    main()
