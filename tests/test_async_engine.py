"""AsyncEngine: the engine on its own thread, one asyncio stream per request."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from chatserve import AsyncEngine, Engine, EngineConfig, SamplingParams
from chatserve.models.loader import load_model

WAIT_S = 10.0  # generous bound for the engine thread to react, on a loaded 2-core machine




@pytest.fixture(scope="module")
def qwen2_model(qwen2_dir):
    return load_model(EngineConfig(model=str(qwen2_dir), dtype="float32", device="cpu"))


@pytest.fixture
def async_engine(qwen2_model):
    engine = AsyncEngine(Engine(EngineConfig(model=qwen2_model.name, dtype="float32", device="cpu",
                                             num_kv_blocks=64, block_size=16), loaded=qwen2_model))
    try:
        yield engine
    finally:
        engine.shutdown()
    assert engine._thread is None


def prompt(n: int, seed: int) -> dict:
    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randrange(10, 990) for _ in range(n)]}


def long_params(**kw) -> SamplingParams:
    # Far more tokens than any test waits for: a request that ends early was aborted.
    return SamplingParams(temperature=0, max_tokens=400, ignore_eos=True, **kw)


async def collect(stream) -> list:
    """Every output of a stream; a dead engine thread fails the test rather than hanging it."""
    async def drain():
        return [out async for out in stream]

    return await asyncio.wait_for(drain(), WAIT_S)


async def first_output(stream):
    return await asyncio.wait_for(stream.__anext__(), WAIT_S)


async def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def all_blocks_free(engine: AsyncEngine) -> bool:
    e = engine.engine
    return not e.requests and e.block_manager.num_free_blocks == e.num_blocks


def test_stream_deltas_add_up_to_the_final_text(async_engine, qwen2_model):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def main():
        return await collect(async_engine.generate(prompt(20, 1), params))

    outs = asyncio.run(main())
    assert len(outs) == 40 and all(len(o.token_ids) == 1 for o in outs)
    assert [o.finished for o in outs] == [False] * 39 + [True]
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 40
    token_ids = [t for o in outs for t in o.token_ids]
    text = "".join(o.text for o in outs)
    assert text == qwen2_model.tokenizer.decode(token_ids, skip_special_tokens=True)
    # The same request offline gives the same tokens.
    offline = Engine(EngineConfig(model=qwen2_model.name, dtype="float32", device="cpu", num_kv_blocks=64),
                     loaded=qwen2_model)
    rid = offline.add_request(prompt(20, 1), params)
    ref = offline.run_to_completion([rid])[rid]
    assert ref.token_ids == token_ids and ref.text == text
    assert all_blocks_free(async_engine)


def test_concurrent_streams_interleave(async_engine):
    events: list[tuple[str, bool]] = []

    async def consume(name: str, seed: int):
        async for out in async_engine.generate(prompt(10, seed), SamplingParams(temperature=0, max_tokens=80,
                                                                               ignore_eos=True),
                                               request_id=name):
            events.append((name, out.finished))
        return name

    async def main():
        return await asyncio.wait_for(asyncio.gather(consume("a", 2), consume("b", 3), consume("c", 4)), WAIT_S)

    assert asyncio.run(main()) == ["a", "b", "c"]
    first_finish = next(i for i, (_, finished) in enumerate(events) if finished)
    assert {name for name, _ in events[:first_finish]} == {"a", "b", "c"}
    assert sorted(name for name, _ in events) == ["a"] * 80 + ["b"] * 80 + ["c"] * 80
    assert all_blocks_free(async_engine)


def test_breaking_out_of_the_stream_aborts_the_request(async_engine):
    async def main():
        # A witness admitted first with the same length: if "gone" ended before the witness,
        # it was aborted, not finished.
        witness = async_engine.generate(prompt(10, 5), long_params(), request_id="witness")
        await first_output(witness)
        async for out in async_engine.generate(prompt(10, 6), long_params(), request_id="gone"):
            assert not out.finished
            break
        await wait_until(lambda: "gone" not in async_engine.engine.requests, "the abort")
        assert "witness" in async_engine.engine.requests
        await witness.aclose()
        await wait_until(lambda: all_blocks_free(async_engine), "all blocks to be free")

    asyncio.run(main())


def test_cancelling_the_consumer_aborts_the_request(async_engine):
    async def main():
        witness = async_engine.generate(prompt(10, 7), long_params(), request_id="witness")
        await first_output(witness)
        got_one = asyncio.Event()

        async def consume():
            async for _ in async_engine.generate(prompt(10, 8), long_params(), request_id="cancelled"):
                got_one.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_one.wait(), WAIT_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: "cancelled" not in async_engine.engine.requests, "the abort")
        assert "witness" in async_engine.engine.requests
        await witness.aclose()
        await wait_until(lambda: all_blocks_free(async_engine), "all blocks to be free")

    asyncio.run(main())


def test_abort_by_id_ends_the_stream(async_engine):
    async def main():
        outs = []
        async for out in async_engine.generate(prompt(10, 9), long_params(), request_id="x"):
            outs.append(out)
            if len(outs) == 3:
                async_engine.abort("x")
        return outs

    outs = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert 3 <= len(outs) < 400
    assert all(not o.finished for o in outs[:-1])
    async_engine.abort("no-such-request")  # harmless
    assert all_blocks_free(async_engine)


def test_bad_request_raises_and_the_engine_keeps_serving(async_engine):
    async def main():
        with pytest.raises(ValueError, match="empty"):
            async for _ in async_engine.generate({"prompt_token_ids": []}, SamplingParams(max_tokens=4)):
                pass
        with pytest.raises(ValueError, match="max_tokens"):
            async for _ in async_engine.generate(prompt(10, 10), SamplingParams(max_tokens=10_000)):
                pass
        with pytest.raises(ValueError, match="temperature"):
            async for _ in async_engine.generate(prompt(10, 10), SamplingParams(temperature=-1)):
                pass
        # A request id that is in use is refused without disturbing the request that has it.
        first = async_engine.generate(prompt(10, 11), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                                      request_id="dup")
        outs = [await first_output(first)]
        with pytest.raises(ValueError, match="already in use"):
            await collect(async_engine.generate(prompt(10, 12), SamplingParams(max_tokens=4), request_id="dup"))
        outs += await collect(first)
        assert sum(len(o.token_ids) for o in outs) == 20 and outs[-1].finish_reason == "length"
        good = await collect(async_engine.generate(prompt(10, 13), SamplingParams(temperature=0, max_tokens=5)))
        assert good[-1].finished and sum(len(o.token_ids) for o in good) >= 1

    asyncio.run(main())
    assert async_engine._thread is not None and async_engine._thread.is_alive()
    assert all_blocks_free(async_engine)


def test_shutdown_ends_in_flight_streams(async_engine):
    async def main():
        outs = {"a": [], "b": []}

        async def consume(name):
            async for out in async_engine.generate(prompt(10, 14), long_params(), request_id=name):
                outs[name].append(out)

        tasks = [asyncio.create_task(consume(n)) for n in outs]
        await wait_until(lambda: all(outs.values()), "the first tokens")
        async_engine.shutdown()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
        with pytest.raises(RuntimeError, match="shutting down"):
            async for _ in async_engine.generate(prompt(10, 15), SamplingParams(max_tokens=2)):
                pass
        return outs

    outs = asyncio.run(main())
    for stream in outs.values():
        assert stream[-1].finished and stream[-1].finish_reason == "abort"
        assert "shutting down" in stream[-1].error
        assert len(stream) < 400
    assert all_blocks_free(async_engine)
