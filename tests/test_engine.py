"""The synchronous engine: KV block accounting, continuous batching and preemption, request
validation, prefix caching, sampling and the offline LLM API.

Models: the tiny random Qwen2 dir (varied greedy output, ~1 ms a step) where outputs are
compared, and the built-in dummy_model (whose greedy output is one token repeated) where the
task names it."""

from __future__ import annotations

import json
import random
import re
import shutil
from collections import Counter

import pytest

from chatserve import LLM, Engine, EngineConfig, SamplingParams
from chatserve.engine.request import FinishReason, RequestStatus
from chatserve.models.loader import load_model

BLOCK_SIZE = 16




@pytest.fixture(scope="module")
def qwen2_model(qwen2_dir):
    return load_model(EngineConfig(model=str(qwen2_dir), dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def dummy_model():
    return load_model(EngineConfig(model="dummy_model", dtype="float32", device="cpu"))


def make_engine(loaded, **kw) -> Engine:
    kw.setdefault("num_kv_blocks", 64)
    kw.setdefault("block_size", BLOCK_SIZE)
    return Engine(EngineConfig(model=loaded.name, dtype="float32", device="cpu", **kw), loaded=loaded)


def random_prompt(n: int, seed: int, vocab: int = 990) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab) for _ in range(n)]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=kw.pop("ignore_eos", True), **kw)


def check_blocks(engine: Engine) -> None:
    """Every block's ref count equals the number of live requests holding it, the free list
    is exactly the unreferenced blocks (no duplicates), and waiting requests hold nothing."""
    bm = engine.block_manager
    holders = Counter()
    for req in engine.scheduler.running:
        assert req.status is RequestStatus.RUNNING
        assert len(req.block_table) == len(set(req.block_table))
        holders.update(req.block_table)
    for req in engine.scheduler.waiting:
        assert req.block_table == [] and req.num_computed_tokens == 0
    assert {r.request_id for r in engine.scheduler.running} | {r.request_id for r in engine.scheduler.waiting} \
        == set(engine.requests)
    for block in bm.blocks:
        assert block.ref_count == holders[block.block_id], f"block {block.block_id}"
    free = list(bm.free)
    assert len(free) == len(set(free)), "a block is in the free list twice"
    # A tail (a kept partial block) is free, named once, and never also a full cached block.
    for h, block_id in bm.tails.items():
        block = bm.blocks[block_id]
        assert block.ref_count == 0 and block.tail_hash == h and block.hash is None
        assert 0 < len(block.token_ids) < bm.block_size
    assert set(free) == {b.block_id for b in bm.blocks if b.ref_count == 0}
    for h, block_id in bm.cached.items():
        assert bm.blocks[block_id].hash == h


def check_all_free(engine: Engine) -> None:
    check_blocks(engine)
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)


def drive(engine: Engine, max_steps: int = 5000) -> dict[str, list]:
    """Step until every request is done, checking block accounting after each step.
    Returns each request's outputs in order."""
    outputs: dict[str, list] = {}
    idle_steps = 0
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outputs
        before = (engine.block_manager.num_free_blocks, len(engine.scheduler.running))
        step_outputs = engine.step()
        check_blocks(engine)
        for out in step_outputs:
            outputs.setdefault(out.request_id, []).append(out)
        # A step that samples nothing is fine (a prefill chunk); many in a row with nothing
        # changing is a deadlock.
        after = (engine.block_manager.num_free_blocks, len(engine.scheduler.running))
        idle_steps = idle_steps + 1 if not step_outputs and before == after else 0
        assert idle_steps < 50, "the engine stopped making progress"
    raise AssertionError("requests did not finish")


def tokens_of(outs) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def run_alone(loaded, prompt, params, **kw) -> tuple[list[int], object]:
    engine = make_engine(loaded, **kw)
    rid = engine.add_request({"prompt_token_ids": prompt}, params)
    result = engine.run_to_completion([rid])[rid]
    check_all_free(engine)
    return result.token_ids, result


# -- 1. KV block accounting ---------------------------------------------------------------------


def test_blocks_freed_after_max_tokens(qwen2_model):
    engine = make_engine(qwen2_model)
    rid = engine.add_request({"prompt_token_ids": random_prompt(40, 1)}, greedy(20))
    outs = drive(engine)[rid]
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert len(tokens_of(outs)) == 20
    check_all_free(engine)


def test_blocks_freed_after_stop_token(qwen2_model):
    prompt = random_prompt(30, 2)
    ref, _ = run_alone(qwen2_model, prompt, greedy(30))
    stop_id = ref[10]
    first = ref.index(stop_id)
    engine = make_engine(qwen2_model)
    rid = engine.add_request({"prompt_token_ids": prompt}, greedy(30, stop_token_ids=[stop_id]))
    outs = drive(engine)[rid]
    assert tokens_of(outs) == ref[: first + 1]  # the stop token is the last token
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop_id
    check_all_free(engine)


def test_blocks_freed_after_eos_from_generation_config(qwen2_dir, tmp_path):
    """The model's own eos ids (generation_config.json) end a request; ignore_eos overrides."""
    path = tmp_path / "eos_model"
    shutil.copytree(qwen2_dir, path)
    loaded = load_model(EngineConfig(model=str(path), dtype="float32", device="cpu"))
    prompt = random_prompt(25, 3)
    ref, _ = run_alone(loaded, prompt, greedy(30))
    eos = ref[6]
    gen_cfg_path = path / "generation_config.json"
    gen_cfg = json.loads(gen_cfg_path.read_text())
    gen_cfg["eos_token_id"] = [*gen_cfg["eos_token_id"], eos]
    gen_cfg_path.write_text(json.dumps(gen_cfg))
    loaded = load_model(EngineConfig(model=str(path), dtype="float32", device="cpu"))
    assert eos in loaded.eos_token_ids

    engine = make_engine(loaded)
    stops = engine.add_request({"prompt_token_ids": prompt}, greedy(30, ignore_eos=False))
    runs_on = engine.add_request({"prompt_token_ids": prompt}, greedy(30, ignore_eos=True))
    outs = drive(engine)
    assert tokens_of(outs[stops]) == ref[: ref.index(eos) + 1]
    assert outs[stops][-1].finish_reason == "stop" and outs[stops][-1].stop_reason == eos
    assert tokens_of(outs[runs_on]) == ref and outs[runs_on][-1].finish_reason == "length"
    check_all_free(engine)


def test_blocks_freed_after_stop_string(qwen2_model):
    prompt = random_prompt(30, 4)
    _, ref = run_alone(qwen2_model, prompt, greedy(40))
    text = ref.text
    start = next(i for i in range(len(text) // 2, len(text) - 3) if "\ufffd" not in text[i:i + 3])
    stop = text[start:start + 3]
    cut = text.index(stop)

    for include in (False, True):
        engine = make_engine(qwen2_model)
        rid = engine.add_request({"prompt_token_ids": prompt},
                                 greedy(40, stop=[stop], include_stop_str_in_output=include))
        outs = drive(engine)[rid]
        got = "".join(o.text for o in outs)
        assert got == (text[:cut + len(stop)] if include else text[:cut])
        assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop
        toks = tokens_of(outs)
        assert toks == ref.token_ids[: len(toks)] and len(toks) < 40
        check_all_free(engine)


def test_blocks_freed_after_abort_while_waiting(qwen2_model):
    engine = make_engine(qwen2_model, max_num_seqs=1)
    running = engine.add_request({"prompt_token_ids": random_prompt(20, 5)}, greedy(10))
    waiting = engine.add_request({"prompt_token_ids": random_prompt(20, 6)}, greedy(10))
    engine.step()
    engine.step()
    assert engine.requests[waiting].status is RequestStatus.WAITING
    out = engine.abort_request(waiting)
    assert out.finished and out.finish_reason == "abort"
    assert engine.abort_request(waiting) is None  # a second abort is a no-op
    check_blocks(engine)
    outs = drive(engine)
    assert waiting not in outs and outs[running][-1].finish_reason == "length"
    check_all_free(engine)


def test_blocks_freed_after_abort_mid_prefill(qwen2_model):
    engine = make_engine(qwen2_model, max_num_batched_tokens=32)
    rid = engine.add_request({"prompt_token_ids": random_prompt(400, 7)}, greedy(5))
    for _ in range(3):
        assert engine.step() == []  # nothing sampled: the prompt is still prefilling
        check_blocks(engine)
    req = engine.requests[rid]
    assert req.status is RequestStatus.RUNNING and req.num_computed_tokens == 96
    assert len(req.block_table) == 6
    assert engine.block_manager.num_free_blocks == engine.num_blocks - 6
    out = engine.abort_request(rid)
    assert out.finished and out.finish_reason == "abort" and out.token_ids == []
    check_all_free(engine)


def test_blocks_freed_after_abort_mid_decode(qwen2_model):
    engine = make_engine(qwen2_model)
    rid = engine.add_request({"prompt_token_ids": random_prompt(50, 8)}, greedy(100))
    other = engine.add_request({"prompt_token_ids": random_prompt(50, 9)}, greedy(10))
    for _ in range(5):
        engine.step()
    assert engine.requests[rid].num_output_tokens == 5
    out = engine.abort_request(rid)
    assert out.finish_reason == "abort" and out.num_output_tokens == 5
    check_blocks(engine)
    assert drive(engine)[other][-1].finish_reason == "length"
    check_all_free(engine)


def test_blocks_freed_when_all_requests_error(qwen2_model):
    engine = make_engine(qwen2_model, max_num_batched_tokens=32, max_num_seqs=2)
    decoding = engine.add_request({"prompt_token_ids": random_prompt(10, 10)}, greedy(50))
    prefilling = engine.add_request({"prompt_token_ids": random_prompt(200, 11)}, greedy(50))
    waiting = engine.add_request({"prompt_token_ids": random_prompt(10, 12)}, greedy(50))
    for _ in range(3):
        engine.step()
    sched = engine.scheduler
    assert engine.requests[decoding].num_output_tokens > 0
    assert engine.requests[prefilling] in sched.running and engine.requests[prefilling].num_output_tokens == 0
    assert engine.requests[waiting] in sched.waiting
    outs = engine.finish_all(FinishReason.ERROR, "boom")
    assert {o.request_id for o in outs} == {decoding, prefilling, waiting}
    assert all(o.finished and o.finish_reason == "error" and o.error == "boom" for o in outs)
    check_all_free(engine)
    # The engine goes on serving.
    rid = engine.add_request({"prompt_token_ids": random_prompt(10, 13)}, greedy(3))
    assert len(engine.run_to_completion([rid])[rid].token_ids) == 3
    check_all_free(engine)


def test_a_request_that_breaks_the_step_fails_alone(qwen2_model):
    """A fault caused by one request (here: logprobs past the vocabulary, set behind validation's
    back, which makes the sampler's topk raise) fails that request only; the others in the batch
    go on and produce exactly what they produce alone."""
    engine = make_engine(qwen2_model)
    prompts = [random_prompt(12, 20), random_prompt(40, 21)]
    alone = [engine.run_to_completion([rid])[rid].token_ids
             for rid in (engine.add_request({"prompt_token_ids": p}, greedy(20)) for p in prompts)]
    bad_params = greedy(20, logprobs=0)
    bad_params.logprobs = 10**6
    first = engine.add_request({"prompt_token_ids": prompts[0]}, greedy(20))
    bad = engine.add_request({"prompt_token_ids": random_prompt(5, 22)}, bad_params)
    second = engine.add_request({"prompt_token_ids": prompts[1]}, greedy(20))
    results = engine.run_to_completion([first, bad, second])
    assert results[bad].finish_reason == "error" and "internal error" in results[bad].error
    assert results[bad].token_ids == []
    assert [results[first].token_ids, results[second].token_ids] == alone
    assert results[first].finish_reason == results[second].finish_reason == "length"
    check_all_free(engine)


def test_top_k_past_the_vocabulary_keeps_every_token(qwen2_model):
    engine = make_engine(qwen2_model)
    prompt = {"prompt_token_ids": random_prompt(8, 30)}
    outs = [generate_one(engine, prompt, SamplingParams(max_tokens=8, seed=5, top_k=k, ignore_eos=True))
            for k in (0, 10**6)]
    assert outs[0] == outs[1] and len(outs[0]) == 8
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        SamplingParams(temperature=float("inf"))
    # One definition of the ranges (SAMPLING_RANGES), OpenAI's: the server's request models share it.
    for name, value, allowed in (("temperature", 2.5, "[0, 2]"), ("top_p", 0, "(0, 1]"),
                                 ("repetition_penalty", 1e308, "(0, 2]"), ("presence_penalty", -3, "[-2, 2]")):
        with pytest.raises(ValueError, match=re.escape(f"{name} must be in {allowed}")):
            SamplingParams(**{name: value})
    with pytest.raises(ValueError, match="seed must fit in 64 bits"):
        SamplingParams(seed=10**30)
    check_all_free(engine)


def generate_one(engine, prompt, params) -> list[int]:
    rid = engine.add_request(prompt, params)
    return engine.run_to_completion([rid])[rid].token_ids


# -- 2. Continuous batching and preemption ------------------------------------------------------


def test_many_requests_small_pool_preempt_and_match_one_at_a_time(qwen2_model):
    rng = random.Random(0)
    lengths = [1, 300, 16, 250, 7, 200, 64, 120, 33, 280, 2, 150]
    requests = [(random_prompt(n, 100 + i), rng.randint(1, 60)) for i, n in enumerate(lengths)]
    # 24 blocks of 16 = 384 tokens: the pool holds one long request, or a few short ones.
    engine = make_engine(qwen2_model, num_kv_blocks=24, max_num_batched_tokens=128)
    assert engine.max_model_len == 384
    ids = [engine.add_request({"prompt_token_ids": p}, greedy(m)) for p, m in requests]
    outs = drive(engine)
    check_all_free(engine)
    assert engine.num_preemptions > 0
    assert engine.stats().num_preemptions == engine.num_preemptions

    alone = make_engine(qwen2_model, num_kv_blocks=64)
    for rid, (prompt, max_tokens) in zip(ids, requests):
        want = alone.run_to_completion([alone.add_request({"prompt_token_ids": prompt}, greedy(max_tokens))])
        got = tokens_of(outs[rid])
        assert len(got) == max_tokens and outs[rid][-1].finish_reason == "length"
        assert got == next(iter(want.values())).token_ids, f"prompt of {len(prompt)} tokens"
    check_all_free(alone)


def test_request_added_mid_run_joins_the_batch(qwen2_model):
    engine = make_engine(qwen2_model)
    first = engine.add_request({"prompt_token_ids": random_prompt(20, 20)}, greedy(30))
    for _ in range(4):
        assert [o.request_id for o in engine.step()] == [first]
    second = engine.add_request({"prompt_token_ids": random_prompt(12, 21)}, greedy(5))
    assert {o.request_id for o in engine.step()} == {first, second}
    assert {o.request_id for o in engine.step()} == {first, second}
    assert len(engine.scheduler.running) == 2
    drive(engine)
    check_all_free(engine)


def test_long_prefill_does_not_stall_running_decodes(qwen2_model):
    engine = make_engine(qwen2_model, max_num_batched_tokens=32)
    decoding = engine.add_request({"prompt_token_ids": random_prompt(10, 22)}, greedy(200))
    engine.step()
    long = engine.add_request({"prompt_token_ids": random_prompt(500, 23)}, greedy(5))
    steps = 0
    while True:
        outs = {o.request_id for o in engine.step()}
        steps += 1
        assert decoding in outs, f"the running request got no token in step {steps}"
        if long in outs:
            break
        req = engine.requests[long]
        # Each chunk gets what the decode leaves of the budget: 31 tokens.
        assert req.num_computed_tokens == 31 * steps
    assert steps == -(-500 // 31)
    engine.abort_request(decoding)
    drive(engine)
    check_all_free(engine)


# -- 3. Requests that can never fit, and bad parameters ------------------------------------------


def test_rotary_tables_cover_the_engines_context(qwen2_dir):
    """The rotary tables are made for the context an engine's KV cache holds, not the model's 4096
    positions; an engine with a longer context grows them, one with a shorter leaves them."""
    loaded = load_model(EngineConfig(model=str(qwen2_dir), dtype="float32", device="cpu"))
    assert loaded.model.rotary.length == 0  # nothing made at load
    engine = make_engine(loaded, num_kv_blocks=4)
    assert loaded.model.rotary.length == engine.max_model_len == 64
    out = generate_one(engine, {"prompt_token_ids": random_prompt(60, 3)}, greedy(4))  # up to position 63
    assert len(out) == 4
    make_engine(loaded, num_kv_blocks=8)
    assert loaded.model.rotary.length == 128
    make_engine(loaded, num_kv_blocks=2)
    assert loaded.model.rotary.length == 128
    assert loaded.config.max_position_embeddings > 128


def test_request_validation(qwen2_model):
    engine = make_engine(qwen2_model, num_kv_blocks=4)  # 64 tokens of context
    assert engine.max_model_len == 64
    with pytest.raises(ValueError, match=r"64 tokens.*at most 64"):
        engine.add_request({"prompt_token_ids": random_prompt(64, 30)}, greedy(1))
    with pytest.raises(ValueError, match=r"max_tokens=2 is too large.*at most 1 can be generated"):
        engine.add_request({"prompt_token_ids": random_prompt(63, 31)}, greedy(2))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("", greedy(1))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request({"prompt_token_ids": []}, greedy(1))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request({"prompt_token_ids": [1, 2, 10**6]}, greedy(1))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.add_request({"text": "hi"}, greedy(1))
    rid = engine.add_request({"prompt_token_ids": random_prompt(63, 31)}, greedy(1))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("hello", greedy(1), request_id=rid)
    assert len(engine.run_to_completion([rid])[rid].token_ids) == 1
    # No max_tokens: generate until the context is full.
    rid = engine.add_request({"prompt_token_ids": random_prompt(60, 32)}, SamplingParams(temperature=0, ignore_eos=True))
    out = engine.run_to_completion([rid])[rid]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    check_all_free(engine)


@pytest.mark.parametrize("bad", [
    {"max_tokens": 0}, {"temperature": -0.5}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2},
    {"min_p": 1.5}, {"min_p": -0.1}, {"repetition_penalty": 0.0}, {"presence_penalty": 2.5},
    {"frequency_penalty": -3.0}, {"logprobs": 21}, {"logprobs": -1}, {"stop": [""]},
])
def test_bad_sampling_params(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name if name != "stop" else "stop strings"):
        SamplingParams(**bad)


# -- 4. Prefix caching -----------------------------------------------------------------------------


@pytest.mark.parametrize("length, cached", [(100, 96), (96, 80), (16, 0), (17, 16)])
def test_same_prompt_twice_hits_the_prefix_cache(qwen2_model, length, cached):
    engine = make_engine(qwen2_model)
    prompt = random_prompt(length, 40)
    first = engine.run_to_completion([engine.add_request({"prompt_token_ids": prompt}, greedy(12))])
    second = engine.run_to_completion([engine.add_request({"prompt_token_ids": prompt}, greedy(12))])
    (first,), (second,) = first.values(), second.values()
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == cached  # full blocks only, and never the last token
    assert second.token_ids == first.token_ids
    stats = engine.stats()
    assert stats.prefix_cache_queried_tokens == 2 * length and stats.prefix_cache_hit_tokens == cached
    check_all_free(engine)


def test_next_conversation_turn_reuses_the_answer_blocks(qwen2_model):
    engine = make_engine(qwen2_model)
    prompt = random_prompt(50, 41)
    turn1 = engine.run_to_completion([engine.add_request({"prompt_token_ids": prompt}, greedy(25))])
    (turn1,) = turn1.values()
    history = prompt + turn1.token_ids  # 75 tokens: the first 64 sit in full blocks
    turn2_prompt = history + random_prompt(10, 42)
    rid = engine.add_request({"prompt_token_ids": turn2_prompt}, greedy(8))
    turn2 = engine.run_to_completion([rid])[rid]
    # Every token whose K/V turn 1 computed: its full blocks and its last, partial block (the
    # last answer token was sampled, never fed back, so turn 2 computes it).
    assert turn2.num_cached_tokens == len(history) - 1 == 74
    want, _ = run_alone(qwen2_model, turn2_prompt, greedy(8))
    assert turn2.token_ids == want
    check_all_free(engine)


def test_a_partial_block_is_taken_over_by_one_request_only(qwen2_model):
    engine = make_engine(qwen2_model)
    prompt = random_prompt(40, 44)
    rid = engine.add_request({"prompt_token_ids": prompt}, greedy(10))
    turn1 = engine.run_to_completion([rid])[rid]
    history = prompt + turn1.token_ids  # 50 tokens; 49 computed: 3 full blocks and a 1-token tail
    assert len(engine.block_manager.tails) == 1
    # Two continuations at once: one takes the tail over, the other recomputes those tokens.
    prompts = [history + random_prompt(5, 45 + i) for i in range(2)]
    ids = [engine.add_request({"prompt_token_ids": p}, greedy(6)) for p in prompts]
    outs = drive(engine)
    cached = sorted(engine_out[-1].num_cached_tokens for engine_out in outs.values())
    assert cached == [48, 49]
    for rid, p in zip(ids, prompts):
        want, _ = run_alone(qwen2_model, p, greedy(6))
        assert [t for o in outs[rid] for t in o.token_ids] == want
    check_all_free(engine)
    # Each finished request left its own tail; a chain is only ever named once.
    assert len(engine.block_manager.tails) == 2


def test_prefix_caching_disabled(qwen2_model):
    engine = make_engine(qwen2_model, enable_prefix_caching=False)
    prompt = random_prompt(100, 43)
    outs = [engine.run_to_completion([engine.add_request({"prompt_token_ids": prompt}, greedy(8))])
            for _ in range(2)]
    (first,), (second,) = outs[0].values(), outs[1].values()
    assert first.num_cached_tokens == second.num_cached_tokens == 0
    assert first.token_ids == second.token_ids
    assert not engine.block_manager.cached
    check_all_free(engine)


def test_prefix_cache_eviction_in_a_small_pool(qwen2_model):
    # 12 blocks; each request (70 prompt + 10 output tokens) takes 5, leaving 4 full blocks hashed
    # and a tail (79 computed tokens: 15 in the fifth block).
    engine = make_engine(qwen2_model, num_kv_blocks=12)
    prompts = [random_prompt(70, 50 + i) for i in range(3)]
    first = {}
    for i, p in enumerate(prompts):
        rid = engine.add_request({"prompt_token_ids": p}, greedy(10))
        first[i] = engine.run_to_completion([rid])[rid]
        check_all_free(engine)
    # The newest prompt's blocks are all still cached; the oldest lost some to the later requests.
    rid = engine.add_request({"prompt_token_ids": prompts[2]}, greedy(10))
    again = engine.run_to_completion([rid])[rid]
    assert again.num_cached_tokens == 64 and again.token_ids == first[2].token_ids
    # Least recently freed goes first, tail before head: the third request took the oldest
    # prompt's tail, fourth and third blocks, the rerun above its second; its first is still there.
    rid = engine.add_request({"prompt_token_ids": prompts[0]}, greedy(10))
    again = engine.run_to_completion([rid])[rid]
    assert again.num_cached_tokens == 16 and again.token_ids == first[0].token_ids
    # Many requests at once through the same small, fully cached pool still come out right.
    ids = [engine.add_request({"prompt_token_ids": p}, greedy(10)) for p in prompts * 2]
    outs = drive(engine)
    for i, rid in enumerate(ids):
        assert tokens_of(outs[rid]) == first[i % 3].token_ids
    check_all_free(engine)


# -- 5. Sampling ---------------------------------------------------------------------------------


def generate(loaded, params_list, prompts=None, **kw) -> list:
    engine = make_engine(loaded, **kw)
    prompts = prompts or [random_prompt(20, 60)] * len(params_list)
    ids = [engine.add_request({"prompt_token_ids": p}, sp) for p, sp in zip(prompts, params_list)]
    results = engine.run_to_completion(ids)
    check_all_free(engine)
    return [results[rid] for rid in ids]


def test_greedy_equivalents(qwen2_model):
    base = {"max_tokens": 20, "ignore_eos": True}
    outs = generate(qwen2_model, [
        SamplingParams(temperature=0, **base),
        SamplingParams(temperature=0, **base),
        SamplingParams(temperature=1.0, top_k=1, seed=1, **base),
        SamplingParams(temperature=1.0, top_p=1e-6, seed=2, **base),
        SamplingParams(temperature=1.0, min_p=1.0, seed=3, **base),
    ])
    ref = outs[0].token_ids
    assert len(set(ref)) > 3  # not a degenerate sequence
    for out in outs[1:]:
        assert out.token_ids == ref
    # Run alone, temperature 0 gives the same tokens again.
    assert generate(qwen2_model, [SamplingParams(temperature=0, **base)])[0].token_ids == ref


def test_seed_gives_same_tokens_alone_and_in_a_batch(qwen2_model):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=24, ignore_eos=True)
    prompt = random_prompt(20, 61)
    alone = generate(qwen2_model, [seeded], [prompt])[0].token_ids
    batch = generate(qwen2_model, [
        SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True),
        seeded,
        SamplingParams(temperature=0.7, top_p=0.9, seed=99, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True),
    ], [random_prompt(35, 62), prompt, random_prompt(7, 63), prompt])
    assert batch[1].token_ids == alone
    other_seed = generate(qwen2_model, [SamplingParams(temperature=1.0, seed=4321, max_tokens=24, ignore_eos=True)],
                          [prompt])[0].token_ids
    assert other_seed != alone
    # Unseeded requests differ from each other.
    assert batch[3].token_ids != alone


def test_penalties_break_the_dummy_models_repetition(dummy_model):
    prompt = random_prompt(12, 64)
    plain = generate(dummy_model, [greedy(16)], [prompt])[0].token_ids
    assert len(set(plain)) == 1  # the random dummy model repeats one token greedily
    for penalty in ({"repetition_penalty": 1.3}, {"presence_penalty": 1.0}, {"frequency_penalty": 1.0}):
        out = generate(dummy_model, [greedy(16, **penalty)], [prompt])[0].token_ids
        assert out != plain and len(set(out)) > 1, penalty


def test_ignore_eos_and_stop_token_ids(dummy_model):
    prompt = random_prompt(12, 65)
    plain = generate(dummy_model, [greedy(10)], [prompt])[0]
    assert plain.finish_reason == "length" and len(plain.token_ids) == 10
    token = plain.token_ids[0]
    stopped, ignored = generate(dummy_model, [greedy(10, stop_token_ids=[token]), greedy(10)], [prompt, prompt])
    assert stopped.token_ids == [token] and stopped.finish_reason == "stop" and stopped.stop_reason == token
    assert ignored.token_ids == plain.token_ids


def test_logprobs(qwen2_model):
    k = 5
    greedy_out, sampled_out, off = generate(qwen2_model, [
        greedy(12, logprobs=k),
        SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True, logprobs=k),
        greedy(12),
    ])
    assert off.logprobs is None
    for out in (greedy_out, sampled_out):
        assert len(out.logprobs) == len(out.token_ids) == 12
        for token, lp in zip(out.token_ids, out.logprobs):
            assert lp.token_id == token and lp.logprob <= 0
            assert len(lp.top) == k
            values = [v for _, v in lp.top]
            assert values == sorted(values, reverse=True)
            assert lp.logprob <= values[0] + 1e-6
    for token, lp in zip(greedy_out.token_ids, greedy_out.logprobs):
        assert lp.top[0][0] == token and lp.top[0][1] == pytest.approx(lp.logprob)
    # Probabilities, not raw logits: the top k of a 1000-token softmax sum to at most 1.
    assert all(sum(2.718281828 ** v for _, v in lp.top) <= 1 + 1e-5 for lp in greedy_out.logprobs)
    zero = generate(qwen2_model, [greedy(3, logprobs=0)])[0]
    assert all(lp.top == [] and lp.logprob <= 0 for lp in zero.logprobs)


# -- 6. The LLM API ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm():
    return LLM("dummy_model", device="cpu", dtype="float32", num_kv_blocks=64)


def test_llm_generate(llm):
    tok = llm.tokenizer
    params = SamplingParams(temperature=0, max_tokens=8)
    outs = llm.generate(["Hello there!", "The capital of France is"], params)
    assert len(outs) == 2
    for prompt, out in zip(["Hello there!", "The capital of France is"], outs):
        assert out.prompt_token_ids == tok.encode(prompt)
        assert 1 <= len(out.token_ids) <= 8 and out.finish_reason in ("length", "stop")
        assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
        assert out.num_cached_tokens == 0
    # Token-id prompts, one SamplingParams per prompt, and the prefix cache on a repeat.
    ids = random_prompt(40, 70)
    outs2 = llm.generate([{"prompt_token_ids": ids}, {"prompt_token_ids": ids}],
                         [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                          SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)])
    assert [len(o.token_ids) for o in outs2] == [3, 5]
    assert outs2[0].prompt_token_ids == ids and outs2[1].token_ids[:3] == outs2[0].token_ids
    again = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(again) == 1 and again[0].num_cached_tokens == 32 and again[0].token_ids == outs2[0].token_ids
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(["a", "b"], [params])
    check_all_free(llm.engine)


def test_llm_chat(llm):
    tok = llm.tokenizer
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    (out,) = llm.chat(messages, SamplingParams(temperature=0, max_tokens=10))
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert out.prompt_token_ids == want
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert want == tok.encode(rendered, add_special_tokens=False)
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
    # Several conversations at once, in order.
    outs = llm.chat([messages, messages[1:]], SamplingParams(temperature=0, max_tokens=4))
    assert len(outs) == 2 and outs[0].prompt_token_ids == want and outs[1].prompt_token_ids != want
    check_all_free(llm.engine)


def test_prompt_logprobs_chunked_preempted_and_cached_equal_the_models_own(qwen2_model):
    """prompt_logprobs: every prompt token's logprob given those before it, exactly once, whether
    the prompt is prefilled in chunks, preempted and recomputed, or already in the prefix cache."""
    import torch

    prompt = random_prompt(200, 7)
    want = torch.log_softmax(qwen2_model.model.score(prompt).float(), -1)
    want_top = want.topk(2, -1)
    # A small pool and budget: chunks of 48, and a second long request to preempt it.
    engine = make_engine(qwen2_model, num_kv_blocks=20, max_num_batched_tokens=48)
    engine.add_request({"prompt_token_ids": prompt}, greedy(4))  # fills the prefix cache
    drive(engine)
    rid = engine.add_request({"prompt_token_ids": prompt}, greedy(30, prompt_logprobs=2))
    other = engine.add_request({"prompt_token_ids": random_prompt(150, 8)}, greedy(30))
    outs = drive(engine)
    check_all_free(engine)
    firsts = [o for o in outs[rid] if o.prompt_logprobs is not None]
    assert len(firsts) == 1 and firsts[0] is outs[rid][0]
    entries = firsts[0].prompt_logprobs
    assert [e.token_id for e in entries] == prompt and entries[0].logprob is None
    got = torch.tensor([e.logprob for e in entries[1:]])
    torch.testing.assert_close(got, want[torch.arange(199), torch.tensor(prompt[1:])], atol=1e-4, rtol=0)
    assert [[t for t, _ in e.top] for e in entries[1:]] == want_top.indices[:-1].tolist()
    assert outs[rid][0].num_cached_tokens == 0  # scored whole, not read from the cache
    assert engine.num_preemptions > 0
    assert len(tokens_of(outs[other])) == 30
