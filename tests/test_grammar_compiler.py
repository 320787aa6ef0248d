"""GrammarCompiler: the LRU cache, the compile time limit, the bounded worker pool, and the async front."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from grammar import GrammarBackend, GrammarCompiler, GrammarError, GrammarSpec
from grammar.backend import CompiledGrammar
from tests.test_grammar import BACKENDS, tiny_tokenizer  # noqa: F401 - the session fixture


class FakeGrammar(CompiledGrammar):
    backend = "fake"

    def matcher(self):
        raise NotImplementedError


class FakeBackend(GrammarBackend):
    """Compiles instantly, or blocks on `gate` for specs whose value starts with "slow"; counts compiles."""

    name = "fake"
    kinds = frozenset({"regex"})

    def __init__(self, vocab):
        super().__init__(None, vocab)
        self.gate = threading.Event()
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def compile(self, spec):
        with self.lock:
            self.calls.append(spec.value)
        if spec.value.startswith("slow"):
            self.gate.wait(10)
        if spec.value.startswith("bad"):
            raise GrammarError(f"invalid regex: {spec.value}")
        return FakeGrammar(spec, self.vocab)


@pytest.fixture
def fake(tiny_tokenizer):  # noqa: F811
    from grammar import TokenVocab

    backend = FakeBackend(TokenVocab.from_hf(tiny_tokenizer))
    yield backend
    backend.gate.set()  # let any blocked worker finish


def compiler_for(backend, **kwargs) -> GrammarCompiler:
    return GrammarCompiler(None, grammar_backend=backend, **kwargs)


# ---------------------------------------------------------------- cache


def test_cache_hit_returns_the_same_object(fake):
    compiler = compiler_for(fake)
    first = compiler.compile(GrammarSpec.regex("a+"))
    assert compiler.compile(GrammarSpec.regex("a+")) is first
    assert compiler.compile(GrammarSpec.regex("b+")) is not first
    assert fake.calls == ["a+", "b+"] and compiler.hits == 1


def test_cache_is_lru_and_bounded(fake):
    compiler = compiler_for(fake, cache_size=2)
    a = compiler.compile(GrammarSpec.regex("a"))
    compiler.compile(GrammarSpec.regex("b"))
    assert compiler.compile(GrammarSpec.regex("a")) is a  # a is now the most recent
    compiler.compile(GrammarSpec.regex("c"))  # evicts b
    assert compiler.compile(GrammarSpec.regex("a")) is a
    compiler.compile(GrammarSpec.regex("b"))
    assert fake.calls == ["a", "b", "c", "b"]


def test_errors_are_cached_too(fake):
    compiler = compiler_for(fake)
    for _ in range(3):
        with pytest.raises(GrammarError, match="invalid regex: bad"):
            compiler.compile(GrammarSpec.regex("bad"))
    assert fake.calls == ["bad"]


def test_concurrent_callers_share_one_compile(fake):
    compiler = compiler_for(fake)
    spec = GrammarSpec.regex("slow-shared")
    results: list[CompiledGrammar] = []

    def call():
        results.append(compiler.compile(spec, timeout_s=5))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    fake.gate.set()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert fake.calls == ["slow-shared"]


# ---------------------------------------------------------------- time limit and saturation


def test_a_slow_compile_times_out_and_lands_in_the_cache_later(fake):
    compiler = compiler_for(fake)
    spec = GrammarSpec.regex("slow-1")
    start = time.monotonic()
    with pytest.raises(GrammarError, match="timed out after 0.1 s"):
        compiler.compile(spec, timeout_s=0.1)
    assert time.monotonic() - start < 1
    fake.gate.set()
    compiled = compiler.compile(spec, timeout_s=5)  # the background compile finished: no second compile
    assert compiled.spec == spec and fake.calls == ["slow-1"]


def test_a_saturated_compiler_refuses_at_once(fake):
    compiler = compiler_for(fake, max_workers=1, max_pending=1)
    with pytest.raises(GrammarError, match="timed out"):
        compiler.compile(GrammarSpec.regex("slow-running"), timeout_s=0.05)  # keeps the one worker busy
    queued = threading.Thread(target=compiler.compile, args=(GrammarSpec.regex("slow-queued"), 5))
    queued.start()  # a caller still waiting for it: the queue is full
    time.sleep(0.05)
    start = time.monotonic()
    with pytest.raises(GrammarError, match="saturated"):
        compiler.compile(GrammarSpec.regex("third"), timeout_s=5)
    assert time.monotonic() - start < 0.5
    assert len(compiler._workers) == 1  # never more threads than max_workers
    fake.gate.set()
    queued.join()
    assert fake.calls == ["slow-running", "slow-queued"]


def test_a_queued_spec_nobody_waits_for_is_never_compiled(fake):
    compiler = compiler_for(fake, max_workers=1, max_pending=1)
    with pytest.raises(GrammarError, match="timed out"):
        compiler.compile(GrammarSpec.regex("slow-running"), timeout_s=0.05)
    with pytest.raises(GrammarError, match="timed out"):
        compiler.compile(GrammarSpec.regex("slow-abandoned"), timeout_s=0.05)  # queued, then given up
    # the full queue holds only an abandoned spec: it is dropped to make room
    late = threading.Thread(target=compiler.compile, args=(GrammarSpec.regex("late"), 5))
    late.start()
    time.sleep(0.05)
    fake.gate.set()
    late.join()
    assert fake.calls == ["slow-running", "late"]


def test_cache_hits_do_not_wait_for_busy_workers(fake):
    compiler = compiler_for(fake, max_workers=1)
    ready = compiler.compile(GrammarSpec.regex("a"))
    with pytest.raises(GrammarError):
        compiler.compile(GrammarSpec.regex("slow-x"), timeout_s=0.05)
    start = time.monotonic()
    assert compiler.compile(GrammarSpec.regex("a"), timeout_s=0.01) is ready
    assert time.monotonic() - start < 0.05


@pytest.mark.parametrize("backend, spec, timeout", [
    # outlines builds the whole automaton: 2^16 DFA states here, seconds even for the tiny vocabulary
    ("outlines", GrammarSpec.regex("[ab]*a[ab]{16}"), 0.3),
    # llguidance: 2000 optional properties (52 KB) make a large grammar, ~0.5 s to build
    ("llguidance", GrammarSpec.json_schema(
        {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(2000)}}), 0.03),
])
def test_pathological_specs_time_out_within_the_limit(tiny_tokenizer, backend, spec, timeout):  # noqa: F811
    compiler = GrammarCompiler(tiny_tokenizer, backend=backend)
    start = time.monotonic()
    with pytest.raises(GrammarError, match="timed out"):
        compiler.compile(spec, timeout_s=timeout)
    assert time.monotonic() - start < timeout + 0.5


# ---------------------------------------------------------------- async


def test_compile_async_returns_the_cached_object_and_does_not_block_the_loop(fake):
    compiler = compiler_for(fake)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(ticker())
        asyncio.get_running_loop().call_later(0.2, fake.gate.set)
        compiled = await compiler.compile_async(GrammarSpec.regex("slow-async"), timeout_s=5)
        task.cancel()
        assert ticks >= 10  # the loop kept running while the worker compiled
        assert await compiler.compile_async(GrammarSpec.regex("slow-async")) is compiled
        with pytest.raises(GrammarError, match="invalid regex"):
            await compiler.compile_async(GrammarSpec.regex("bad-async"))

    asyncio.run(main())


def test_compile_async_times_out_without_cancelling_other_waiters(fake):
    compiler = compiler_for(fake)
    spec = GrammarSpec.regex("slow-shared-async")

    async def main():
        patient = asyncio.create_task(compiler.compile_async(spec, timeout_s=5))
        with pytest.raises(GrammarError, match="timed out"):
            await compiler.compile_async(spec, timeout_s=0.05)
        fake.gate.set()
        return await patient

    assert asyncio.run(main()).spec == spec


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_backends_through_the_front(tiny_tokenizer, backend):  # noqa: F811
    compiler = GrammarCompiler(tiny_tokenizer, backend=backend)
    compiled = compiler.compile(GrammarSpec.regex("[0-9]+"))
    assert compiled.backend == backend and compiler.compile(GrammarSpec.regex("[0-9]+")) is compiled
    assert compiler.matcher(GrammarSpec.regex("[0-9]+")).num_accepted == 0
    with pytest.raises(ValueError, match="unknown grammar backend"):
        GrammarCompiler(tiny_tokenizer, backend="xgrammar")
