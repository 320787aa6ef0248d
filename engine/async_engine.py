"""AsyncEngine: an asyncio front for LLMEngine, which steps in one background thread.

Only the engine thread touches the LLMEngine (add, abort, step). The event loop talks to it through
a thread-safe command queue, and each request's outputs come back on its own asyncio.Queue via
`loop.call_soon_threadsafe`, so a running batch never blocks the loop.

Errors: a request that fails inside the engine (the runner raised, `step()` itself raised, or the
engine could not admit it) ends with a RequestOutput whose `finished` is True, `error` holds the
message and `finish_reason` is "error"; the iterator does not raise. That is the shape LLMEngine
already gives runner failures, so a consumer checks one thing. Shutdown ends open streams with
finish_reason "abort". `generate` raises only ValueError (a bad request, before anything is queued)
and EngineError (the engine is not running).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, PreparedRequest
from engine.outputs import CompletionOutput, RequestOutput
from engine.platform import release_openmp_workers
from engine.request import RequestStatus
from engine.sampling_params import SamplingParams
from engine.stats import SchedulerStats

log = logging.getLogger("sluice.async_engine")


class EngineError(RuntimeError):
    """The engine is not running (not started, shut down, or its thread died)."""


@dataclass
class _Stream:
    """One request's way back to its consumer, on the consumer's event loop."""

    prepared: PreparedRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)
    added: bool = False  # the engine thread has handed it to the LLMEngine

    def put(self, out: RequestOutput) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, out)
        except RuntimeError:  # the consumer's loop is closed: nobody is left to tell
            pass


@dataclass
class _Add:
    stream: _Stream


@dataclass
class _Abort:
    request_id: str
    done: concurrent.futures.Future[None]


@dataclass
class _Stop:
    pass


_Command = _Add | _Abort | _Stop


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams and the accepting flag against the engine thread
        self._accepting = False
        self._thread: threading.Thread | None = None
        self._stats: SchedulerStats = engine.stats()  # replaced whole by the engine thread, never mutated
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        return cls(LLMEngine(config))

    # ---- lifecycle (event loop side) ----
    async def start(self) -> None:
        if self._thread is None:
            self._accepting = True
            # Model loading ran OpenMP on this thread; its idle workers would slow every engine step.
            release_openmp_workers()
            self._thread = threading.Thread(target=self._run, name="sluice-engine", daemon=True)
            self._thread.start()
        elif not self.is_running:
            raise EngineError("this AsyncEngine has stopped; it cannot be restarted")

    async def shutdown(self) -> None:
        """Stop the engine thread after its current step; open streams end with finish_reason "abort"."""
        if self._thread is None:
            return
        self._submit(_Stop())
        # In a worker thread, so the loop keeps serving the streams that _close is ending.
        await asyncio.to_thread(self._thread.join)

    async def __aenter__(self) -> "AsyncEngine":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.shutdown()

    @property
    def is_running(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    def stats(self) -> SchedulerStats:
        """The scheduler stats as of the engine thread's latest step (or command batch)."""
        return self._stats

    # ---- requests (event loop side) ----
    async def generate(self, prompt: str | list[int] | PreparedRequest, params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; the last has finished=True.

        Validation runs before anything is queued, so a bad request raises ValueError from the first
        `__anext__`; a PreparedRequest (`LLMEngine.prepare_request`, which the gateway calls to answer a bad
        request with a 400 before its stream opens) is queued as it is, its id and params taken from it. Leaving early (break, cancel, aclose) aborts the request and waits until the
        engine thread has freed its blocks. After a bare `break` that wait happens when the loop
        finalizes the generator; wrap it in `contextlib.aclosing` to have it happen at the break.
        """
        if isinstance(prompt, PreparedRequest):
            prepared = prompt
        else:
            request_id = request_id if request_id is not None else f"async-{next(self._ids)}"
            # Tokenizing a long prompt takes a while; keep it off the loop.
            prepared = await asyncio.to_thread(self.engine.prepare_request, request_id, prompt,
                                             params or SamplingParams(), priority)
        request_id = prepared.request_id
        stream = self._register(prepared)
        finished = False
        try:
            while not finished:
                out = await stream.queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """End a request; on return its blocks are free and its stream got a finish_reason "abort" output.

        Unknown or finished ids are a no-op, as is aborting once the engine has stopped.
        """
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self._submit(_Abort(request_id, done)):
            # The command is already queued, so even if this wait is cancelled the abort still happens.
            await asyncio.wrap_future(done)

    def _register(self, prepared: PreparedRequest) -> _Stream:
        stream = _Stream(prepared, asyncio.get_running_loop())
        with self._lock:
            if not self.is_running:
                raise EngineError("the engine is not running")
            if prepared.request_id in self._streams:
                raise ValueError(f"request id {prepared.request_id!r} is already in use")
            self._streams[prepared.request_id] = stream
            self._commands.put(_Add(stream))
        return stream

    def _submit(self, command: _Command) -> bool:
        with self._lock:
            if self._accepting:
                self._commands.put(command)
            return self._accepting

    # ---- engine thread ----
    def _run(self) -> None:
        try:
            while self._serve_once():
                pass
        except BaseException:  # noqa: BLE001 - _serve_once guards itself; this is the last resort
            log.exception("engine thread died")
        finally:
            self._close()

    def _serve_once(self) -> bool:
        """One round: apply queued commands, then one step if there is work. False once told to stop."""
        try:
            keep_going = self._apply_commands(block=not self.engine.has_unfinished_requests())
            if keep_going and self.engine.has_unfinished_requests():
                self._step()
        except Exception as exc:  # noqa: BLE001 - fail what is in flight, keep serving new requests
            log.exception("engine loop failed")
            self._fail_in_flight(f"{type(exc).__name__}: {exc}")
            keep_going = True
        self._stats = self.engine.stats()
        return keep_going

    def _apply_commands(self, block: bool) -> bool:
        # Idle: sleep on the queue until a command comes. Busy: take what is there and go on stepping.
        commands = [self._commands.get()] if block else []
        keep_going = True
        for command in commands + self._drain_commands():
            if isinstance(command, _Add):
                self._add(command.stream)
            elif isinstance(command, _Abort):
                self._abort(command)
            else:
                keep_going = False  # the rest still applies; _close aborts whatever is then in flight
        return keep_going

    def _drain_commands(self) -> list[_Command]:
        commands = []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _add(self, stream: _Stream) -> None:
        try:
            self.engine.add_prepared(stream.prepared)
            stream.added = True
        except Exception as exc:  # noqa: BLE001 - a request the engine refuses fails alone
            self._deliver([_closed_output(stream.prepared, "error", f"{type(exc).__name__}: {exc}")])

    def _abort(self, command: _Abort) -> None:
        try:
            out = self.engine.abort_request(command.request_id)
            if out is not None:
                self._deliver([out])
        except Exception:  # noqa: BLE001 - must not cut short the other commands of this batch
            log.exception("abort of %s failed", command.request_id)
            with self._lock:
                stream = self._streams.get(command.request_id)
            if stream is not None:  # its consumer must not wait forever
                self._deliver([self._end(stream, RequestStatus.FINISHED_ABORTED)])
        finally:
            _resolve(command.done)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - LLMEngine already catches runner errors; this is the backstop
            log.exception("engine step failed")
            self._fail_in_flight(f"{type(exc).__name__}: {exc}")
            return
        self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._lock:
                stream = self._streams.pop(out.request_id) if out.finished else self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)

    def _fail_in_flight(self, message: str) -> None:
        with self._lock:
            in_flight = [s for s in self._streams.values() if s.added]
        self._deliver([self._end(s, RequestStatus.FINISHED_ERROR, message) for s in in_flight])

    def _end(self, stream: _Stream, status: RequestStatus, error: str | None = None) -> RequestOutput:
        """Finish a request in the engine (freeing its blocks) and give its last output."""
        request_id = stream.prepared.request_id
        out = None
        try:
            out = self.engine.finish_request(request_id, status, error)
        except Exception:  # noqa: BLE001 - the engine is in a bad way; the consumer still gets an end
            log.exception("could not finish request %s", request_id)
        return out if out is not None and out.finished else _closed_output(stream.prepared, status.value, error)

    def _close(self) -> None:
        """Stop taking commands, settle the ones left, and end every open stream."""
        with self._lock:
            self._accepting = False
        for command in self._drain_commands():
            if isinstance(command, _Abort):
                _resolve(command.done)
        with self._lock:
            open_streams = list(self._streams.values())
        self._deliver([self._end(s, RequestStatus.FINISHED_ABORTED) if s.added
                       else _closed_output(s.prepared, "abort") for s in open_streams])
        self._stats = self.engine.stats()


def _resolve(future: concurrent.futures.Future[None]) -> None:
    # A waiter that was cancelled cancels the future too (asyncio.wrap_future), and set_result would raise.
    if future.set_running_or_notify_cancel():
        future.set_result(None)


def _closed_output(prepared: PreparedRequest, reason: str, error: str | None = None) -> RequestOutput:
    """A final output for a request the engine has no record of (never admitted, or its state is lost)."""
    completions = [CompletionOutput(index=i, text="", token_ids=[], finish_reason=reason)
                   for i in range(prepared.params.n)]
    return RequestOutput(prepared.request_id, prepared.prompt, prepared.token_ids, completions, True, error=error)
