"""GrammarCompiler: the one object the engine and gateway hold. Picks a backend, caches compiled grammars
(LRU, thread-safe) and compiles in a few worker threads under a time limit, so a slow or hostile spec
never stalls the caller.

Workers are a fixed number of daemon threads: a compile that outlives its caller's timeout keeps its
worker busy (native code cannot be interrupted) but never blocks interpreter exit, and never makes
the compiler start more threads. When every worker is busy, new specs queue (up to max_pending); a
queued spec whose callers have all given up is dropped unstarted; beyond the queue, compile refuses.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from grammar.backend import CompiledGrammar, GrammarBackend, Matcher
from grammar.bitmask import allocate_bitmask
from grammar.spec import GrammarError, GrammarSpec
from grammar.vocab import TokenVocab

BACKENDS = ("llguidance", "outlines")
# llguidance (benchmarks/structured.py, SmolLM2 tokenizer): cold compile p50 0.8 ms vs outlines' 350 ms (p99
# 2 ms vs 3.3 s), every suite schema enforced (outlines ignores numeric bounds and mangles some formats),
# and Lark grammars. outlines' masks are cheaper once built (table lookups: 6 vs 32 us p50), but both are
# far below a decode step.
DEFAULT_BACKEND = "llguidance"
DEFAULT_COMPILE_TIMEOUT_S = 5.0


def make_backend(name: str, tokenizer: Any, vocab: TokenVocab) -> GrammarBackend:
    # imported on demand: a compiler only loads the native library it uses
    if name == "llguidance":
        from grammar.llguidance_backend import LLGuidanceBackend

        return LLGuidanceBackend(tokenizer, vocab)
    if name == "outlines":
        from grammar.outlines_backend import OutlinesBackend

        return OutlinesBackend(tokenizer, vocab)
    raise ValueError(f"unknown grammar backend {name!r}; expected one of {', '.join(BACKENDS)}")


@dataclass
class _Job:
    spec: GrammarSpec
    future: Future  # Future[CompiledGrammar], shared by every caller waiting for this spec
    deadline: float  # monotonic; the latest of its callers' deadlines: past it nobody waits


class GrammarCompiler:
    """Compiles GrammarSpecs for one tokenizer with one backend; share one instance per engine."""

    def __init__(self, tokenizer: Any, *, backend: str = DEFAULT_BACKEND, vocab_size: int | None = None,
                 eos_token_ids: Sequence[int] | None = None, cache_size: int = 256, max_workers: int = 2,
                 max_pending: int = 32, timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
                 grammar_backend: GrammarBackend | None = None):
        """tokenizer: the model's HF fast tokenizer; vocab_size: the model's logits width (config.vocab_size,
        default len(tokenizer)); eos_token_ids: every id that ends generation (default the tokenizer's EOS).
        grammar_backend: a ready backend instance instead of `backend` (tests)."""
        if grammar_backend is not None:
            self.vocab, self.backend = grammar_backend.vocab, grammar_backend
        else:
            self.vocab = TokenVocab.from_hf(tokenizer, vocab_size, eos_token_ids)
            self.backend = make_backend(backend, tokenizer, self.vocab)
        self.backend_name = self.backend.name
        self.cache_size, self.max_workers, self.max_pending = cache_size, max_workers, max_pending
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, CompiledGrammar | GrammarError] = OrderedDict()  # errors are cached too
        self._inflight: dict[str, _Job] = {}  # queued or compiling, by spec key
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self.hits = self.misses = 0

    @property
    def vocab_size(self) -> int:
        return self.vocab.vocab_size

    def compile(self, spec: GrammarSpec, timeout_s: float | None = None) -> CompiledGrammar:
        """The compiled grammar for `spec`, from the cache or compiled within timeout_s (default self.timeout_s).
        Raises GrammarError for a bad spec, a timeout, or a saturated compiler."""
        done, future, timeout = self._start(spec, timeout_s)
        try:
            return done or future.result(timeout)
        except TimeoutError:
            raise _timed_out(spec, timeout) from None

    async def compile_async(self, spec: GrammarSpec, timeout_s: float | None = None) -> CompiledGrammar:
        """compile() for an event loop: waits without blocking it."""
        done, future, timeout = self._start(spec, timeout_s)
        if done is not None:
            return done
        try:
            # shield: timing out must not cancel the shared future other callers may be waiting on
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
        except TimeoutError:
            raise _timed_out(spec, timeout) from None

    def matcher(self, spec: GrammarSpec, timeout_s: float | None = None) -> Matcher:
        """compile(spec).matcher(): a fresh matcher for one request."""
        return self.compile(spec, timeout_s).matcher()

    def allocate_bitmask(self, batch: int) -> torch.Tensor:
        """A bitmask [batch, vocab.width] int32, every token allowed, for this compiler's vocabulary."""
        return allocate_bitmask(batch, self.vocab.vocab_size)

    def cache_clear(self) -> None:
        with self._lock:
            self._cache.clear()

    # -- internals ---------------------------------------------------------------------------------

    def _start(self, spec: GrammarSpec, timeout_s: float | None) -> tuple[CompiledGrammar | None, Future | None, float]:
        """(the cached grammar, None, timeout), or (None, the future of its compile, timeout)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        cached = self._lookup(spec)
        return (cached, None, timeout) if cached is not None else (None, self._submit(spec, timeout), timeout)

    def _lookup(self, spec: GrammarSpec) -> CompiledGrammar | None:
        with self._lock:
            entry = self._cache.get(spec.key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._cache.move_to_end(spec.key)
        if isinstance(entry, GrammarError):
            raise GrammarError(str(entry))
        return entry

    def _submit(self, spec: GrammarSpec, timeout: float) -> Future:
        deadline = time.monotonic() + timeout
        with self._lock:
            done = self._cache.get(spec.key)
            if done is not None:  # finished since _lookup
                future: Future = Future()
                if isinstance(done, GrammarError):
                    future.set_exception(GrammarError(str(done)))
                else:
                    future.set_result(done)
                return future
            job = self._inflight.get(spec.key)
            if job is not None:  # someone asked for the same spec: wait for the same compile
                job.deadline = max(job.deadline, deadline)
                return job.future
            if len(self._inflight) >= self.max_workers + self.max_pending:
                self._drop_abandoned()
            if len(self._inflight) >= self.max_workers + self.max_pending:
                raise GrammarError(f"grammar compiler is saturated ({len(self._inflight)} compiles running or "
                                   "queued); try again later")
            job = _Job(spec, Future(), deadline)
            self._inflight[spec.key] = job
            if len(self._workers) < self.max_workers:
                worker = threading.Thread(target=self._work, name=f"grammar-compile-{len(self._workers)}",
                                          daemon=True)
                self._workers.append(worker)
                worker.start()
        self._jobs.put(job)
        return job.future

    def _drop_abandoned(self) -> None:
        """Forget queued jobs whose callers have all given up (under the lock). Their queue entries stay
        behind; the worker that pops one sees it is done and skips it."""
        now = time.monotonic()
        for job in [j for j in self._inflight.values() if not j.future.running() and now > j.deadline]:
            self._drop(job)

    def _drop(self, job: _Job) -> None:
        del self._inflight[job.spec.key]
        job.future.set_exception(GrammarError("grammar compilation timed out waiting for a worker"))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            key = job.spec.key
            with self._lock:
                if job.future.done():  # dropped while it queued
                    continue
                if time.monotonic() > job.deadline:  # every caller timed out while it queued: skip it
                    self._drop(job)
                    continue
                job.future.set_running_or_notify_cancel()
            outcome: CompiledGrammar | BaseException
            try:
                outcome = self.backend.compile(job.spec)
            except BaseException as e:  # noqa: BLE001 - handed to the callers, not swallowed
                outcome = e
            with self._lock:
                del self._inflight[key]
                # a compile that finishes after its caller gave up still lands in the cache: a retry is instant
                if isinstance(outcome, (CompiledGrammar, GrammarError)):
                    self._cache[key] = outcome
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)


def _timed_out(spec: GrammarSpec, timeout: float) -> GrammarError:
    return GrammarError(f"{spec.kind} compilation timed out after {timeout:g} s (too large or complex)")
