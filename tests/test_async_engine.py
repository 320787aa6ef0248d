"""AsyncEngine on a tiny model: concurrency, streaming, aborts, responsiveness, validation, failures, shutdown."""
from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from engine import LLM, EngineConfig, SamplingParams
from engine.async_engine import AsyncEngine, EngineError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput

NUM_BLOCKS, BLOCK_SIZE = 512, 4
_WORDS = ("The quick brown fox jumps over the lazy dog. Paged attention stores keys and values in fixed-size "
          "blocks. Continuous batching keeps the accelerator busy. def add(a, b): return a + b").split()
LONG = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)


def _cases() -> list[tuple[str, SamplingParams]]:
    # Different lengths and limits; some prompts share prefixes, so the prefix cache is in play too.
    return [(" ".join(_WORDS[i % 5:i % 5 + 1 + (i * 7) % 17]),
             SamplingParams(temperature=0, max_tokens=2 + (i * 5) % 16, ignore_eos=i % 2 == 0)) for i in range(32)]


@pytest.fixture
def llm_engine(tiny_llama_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                                  quantization="none"))


@pytest.fixture(scope="module")
def alone_outputs(tiny_llama_dir) -> list[list[int]]:
    llm = LLM(str(tiny_llama_dir), num_kv_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, quantization="none")
    return [llm.generate([prompt], params)[0].outputs[0].token_ids for prompt, params in _cases()]


def run(coro):
    # A hang is a failure, not a stuck test run.
    async def bounded():
        return await asyncio.wait_for(coro, timeout=30)

    return asyncio.run(bounded())


def patch_calls(monkeypatch, obj, name: str, before=lambda n: None) -> list[int]:
    """Run before(call number) ahead of every call of obj.name (it may sleep or raise); returns the call log."""
    real, calls = getattr(obj, name), []

    def wrapped(*args):
        calls.append(len(calls) + 1)
        before(len(calls))
        return real(*args)

    monkeypatch.setattr(obj, name, wrapped)
    return calls


async def collect(engine: AsyncEngine, prompt, params, request_id=None) -> list[RequestOutput]:
    return [out async for out in engine.generate(prompt, params, request_id)]


async def wait_drained(engine: AsyncEngine, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == stats.kv_blocks_used == 0:
            return stats
        assert time.monotonic() < deadline, f"engine did not drain: {stats}"
        await asyncio.sleep(0.01)


def test_concurrent_greedy_matches_one_at_a_time(llm_engine, alone_outputs):
    async def main():
        async with AsyncEngine(llm_engine) as engine:
            most_running = 0

            async def one(prompt, params):
                nonlocal most_running
                outs = []
                async for out in engine.generate(prompt, params):
                    most_running = max(most_running, engine.stats().num_running)
                    outs.append(out)
                return outs

            results = await asyncio.gather(*(one(p, s) for p, s in _cases()))
            await wait_drained(engine)
        return results, most_running

    results, most_running = run(main())
    assert most_running > 1  # they really were batched
    for outs, expected, (_, params) in zip(results, alone_outputs, _cases()):
        final = outs[-1]
        assert final.finished and final.error is None
        assert final.outputs[0].token_ids == expected
        if params.ignore_eos:
            assert len(expected) == params.max_tokens and final.outputs[0].finish_reason == "length"
    assert llm_engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("n", [1, 2])
def test_stream_deltas_add_up_to_the_final_output(llm_engine, n):
    params = SamplingParams(n=n, temperature=0.8, seed=3, max_tokens=20, ignore_eos=True)

    async def main():
        async with AsyncEngine(llm_engine) as engine:
            return await collect(engine, "The quick brown fox", params)

    outs = run(main())
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    for index, final in enumerate(outs[-1].outputs):
        assert final.finish_reason == "length" and len(final.token_ids) == 20
        assert "".join(o.outputs[index].delta_text for o in outs) == final.text
        assert [t for o in outs for t in o.outputs[index].delta_token_ids] == final.token_ids


def test_aborts_free_every_block(llm_engine, monkeypatch):
    steps = patch_calls(monkeypatch, llm_engine, "step")

    def gone(request_id: str) -> bool:
        # A peek from the loop thread, fine for a test: once an abort is awaited the engine has dropped the id.
        return request_id not in llm_engine.outputs.parents

    async def take(gen, k: int) -> list[RequestOutput]:
        return [await anext(gen) for _ in range(k)]

    async def via_abort(engine):
        gen = engine.generate("The quick brown fox", LONG, "by-abort")
        await take(gen, 3)
        await engine.abort("by-abort")
        assert gone("by-abort")
        rest = [out async for out in gen]  # the stream goes on to its abort output, then ends
        return rest[-1]

    async def via_aclosing(engine):
        async with contextlib.aclosing(engine.generate("Paged attention", LONG, "by-aclose")) as gen:
            await take(gen, 3)
        assert gone("by-aclose")

    async def via_bare_break(engine):
        async for out in engine.generate("Continuous batching", LONG):
            if len(out.outputs[0].token_ids) >= 3:
                break

    async def via_cancel(engine, started: asyncio.Event):
        async for out in engine.generate("def add(a, b):", LONG, "by-cancel"):
            if len(out.outputs[0].token_ids) >= 3:
                started.set()

    async def main():
        async with AsyncEngine(llm_engine) as engine:
            started = asyncio.Event()
            cancelled = asyncio.create_task(via_cancel(engine, started))
            short = asyncio.create_task(collect(engine, "fox", SamplingParams(temperature=0, max_tokens=4)))
            aborted, *_ = await asyncio.gather(via_abort(engine), via_aclosing(engine), via_bare_break(engine),
                                               started.wait())
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            assert gone("by-cancel")
            await engine.abort("no-such-request")  # no-op
            short_outs = await short
            await engine.abort(short_outs[-1].request_id)  # finished already: no-op
            stats = await wait_drained(engine)
            return aborted, short_outs, stats

    aborted, short_outs, stats = run(main())
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert 3 <= len(aborted.outputs[0].token_ids) < LONG.max_tokens
    assert short_outs[-1].finished and short_outs[-1].error is None
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert len(steps) < LONG.max_tokens  # drained by the aborts, not by the streams running out
    assert llm_engine.block_manager.num_used_blocks == 0
    assert not llm_engine.has_unfinished_requests()


def test_event_loop_stays_responsive_while_steps_run(llm_engine, monkeypatch):
    step_seconds = 0.2  # a slow step; were it run on the loop, no tick could land inside it
    patch_calls(monkeypatch, llm_engine.runner, "execute", lambda n: time.sleep(step_seconds))

    async def main():
        async with AsyncEngine(llm_engine) as engine:
            ticks = [time.monotonic()]
            request = asyncio.create_task(collect(engine, "The quick brown fox",
                                                  SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
            while not request.done():
                await asyncio.sleep(0.01)
                ticks.append(time.monotonic())
            return await request, ticks

    outs, ticks = run(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 4
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > 4 * step_seconds / 0.01 / 3
    assert max(gaps) < step_seconds * 0.7, f"the loop stalled for {max(gaps):.3f}s"


def test_idle_engine_thread_sleeps(llm_engine):
    async def main():
        async with AsyncEngine(llm_engine) as engine:
            await collect(engine, "fox", SamplingParams(temperature=0, max_tokens=2))
            await asyncio.sleep(0.1)  # let torch's worker threads go quiet after the step
            cpu = time.process_time()
            await asyncio.sleep(0.5)
            return time.process_time() - cpu

    assert run(main()) < 0.2  # a busy-waiting engine thread would burn about 0.5 s here


def test_bad_requests_raise_before_anything_is_queued(llm_engine):
    vocab = llm_engine.model_config.vocab_size

    async def main():
        async with AsyncEngine(llm_engine) as engine:
            with pytest.raises(ValueError, match="empty"):
                await anext(engine.generate([], SamplingParams(), "r1"))
            with pytest.raises(ValueError, match="context"):
                await anext(engine.generate("hello", SamplingParams(max_tokens=10_000), "r1"))
            with pytest.raises(ValueError, match="token ids"):
                await anext(engine.generate([1, vocab], SamplingParams(), "r1"))
            assert engine.stats().num_waiting == 0
            # nothing of the rejected "r1" was kept, so the id is free
            ok = await collect(engine, "hello", SamplingParams(temperature=0, max_tokens=3), "r1")
            long_run = engine.generate("hello", LONG, "busy")
            await anext(long_run)
            with pytest.raises(ValueError, match="already in use"):
                await anext(engine.generate("hello", SamplingParams(), "busy"))
            await long_run.aclose()
            return ok

    assert run(main())[-1].finished
    with pytest.raises(EngineError):  # not started
        run(anext(AsyncEngine(llm_engine).generate("hello", SamplingParams())))


def test_a_failing_runner_fails_its_request_and_serving_goes_on(llm_engine, monkeypatch):
    def fail_first(n: int) -> None:
        if n == 1:
            raise RuntimeError("injected runner fault")

    patch_calls(monkeypatch, llm_engine.runner, "execute", fail_first)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def main():
        async with AsyncEngine(llm_engine) as engine:
            failed = await collect(engine, "The quick brown fox", params)
            later = await collect(engine, "The quick brown fox", params)
            stats = await wait_drained(engine)
            return failed, later, stats, engine.is_running

    failed, later, stats, healthy = run(main())
    assert failed[-1].finished and "injected runner fault" in failed[-1].error
    assert failed[-1].outputs[0].finish_reason == "error"
    assert later[-1].error is None and len(later[-1].outputs[0].token_ids) == 6
    assert stats.kv_blocks_used == 0 and healthy


def test_a_failing_step_fails_requests_in_flight_and_serving_goes_on(llm_engine, monkeypatch):
    raised = []

    def fail_once_both_run(n: int) -> None:
        running = llm_engine.scheduler.running
        # Mid-generation, once both requests hold blocks (they arrive at slightly different times).
        if not raised and len(running) == 2 and all(r.output_token_ids for r in running):
            raised.append(n)
            raise RuntimeError("injected step fault")

    patch_calls(monkeypatch, llm_engine, "step", fail_once_both_run)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def main():
        async with AsyncEngine(llm_engine) as engine:
            failed = await asyncio.gather(collect(engine, "The quick", LONG), collect(engine, "Paged", LONG))
            later = await collect(engine, "Continuous batching", params)
            stats = await wait_drained(engine)
            return failed, later, stats

    failed, later, stats = run(main())
    for outs in failed:
        assert outs[-1].finished and "injected step fault" in outs[-1].error
        assert outs[-1].outputs[0].finish_reason == "error"
    assert later[-1].error is None and len(later[-1].outputs[0].token_ids) == 8
    assert stats.kv_blocks_used == 0


def test_shutdown_ends_open_streams_with_abort(llm_engine):
    async def main():
        engine = AsyncEngine(llm_engine)
        await engine.start()
        assert engine.is_running
        streams = [engine.generate(p, LONG) for p in ("The quick", "Paged", "fox")]
        firsts = await asyncio.gather(*(anext(s) for s in streams))
        await engine.shutdown()
        lasts = [[out async for out in s][-1] for s in streams]
        with pytest.raises(EngineError):
            await anext(engine.generate("hello", SamplingParams()))
        return firsts, lasts, engine.is_running

    firsts, lasts, running = run(main())
    assert not any(out.finished for out in firsts)
    assert all(out.finished and out.outputs[0].finish_reason == "abort" for out in lasts)
    assert not running
    assert llm_engine.block_manager.num_used_blocks == 0 and not llm_engine.has_unfinished_requests()
