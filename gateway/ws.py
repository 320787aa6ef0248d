"""The WebSocket API at /v1/ws: several chat requests at once over one socket, as JSON text frames.

client:  {"type": "request", "id": ID, "body": <chat completions body>}    ID: a string or an integer
         {"type": "cancel", "id": ID}                                    a no-op once ID has ended
server:  {"type": "chunk", "id": ID, "chunk": <the chat.completion.chunk SSE would send>}
         {"type": "done", "id": ID, "finish_reason": ..., "usage": {...}}   "cancelled" after a cancel
         {"type": "error", "id": ID or null, "status": 400, "error": {"message", "type", "param", "code"}}

Every request ends with exactly one `done` or `error` frame with its id. A frame that starts nothing (bad
JSON, unknown type, no id, an id already in flight, a binary frame) gets an error with id null, and the
socket stays open. Errors are the HTTP API's, status included. The body always streams.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway.errors import APIError, bad_request
from gateway.formatting import Call, ChunkStream, aborted, dumps, shutdown_error, usage
from gateway.protocol import check_unicode

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("sluice.gateway")

Id = str | int
_POLICY_VIOLATION = 1008  # the close code for a refused (unauthorized) socket
_GOING_AWAY = 1001  # the close code when the server shuts down


@dataclass
class _Job:
    id: Id
    task: asyncio.Task[None] = field(init=False)
    cancelled: bool = False  # by the client's cancel frame (not by the socket closing)


class Session:
    """One socket: a reader that starts a task per request, and one sender that writes every frame.

    Request tasks never write to the socket themselves: they queue frames for the sender, so frames of
    concurrent requests never interleave mid-write. The queue is unbounded, as the engine's per-request
    queues are: a slow reader makes frames wait here instead of there.
    """

    def __init__(self, gw: Gateway, ws: WebSocket):
        self.gw = gw
        self.ws = ws
        self.jobs: dict[Id, _Job] = {}
        self.outbox: asyncio.Queue[dict | None] = asyncio.Queue()  # None: flush and stop

    async def run(self) -> None:
        # Accept before refusing: a browser's WebSocket shows no HTTP status, only frames and close codes.
        await self.ws.accept()
        try:
            self.gw.authorize(self.ws, query_key=True)
        except APIError as exc:
            with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):  # the client may be gone
                await self.ws.send_text(dumps(_error_frame(None, exc)))
                await self.ws.close(_POLICY_VIOLATION, exc.message)
            return
        self.gw.open_sockets += 1
        sender = asyncio.create_task(self._send_loop())
        reader = asyncio.create_task(self._read_loop())
        closing = asyncio.create_task(self.gw.closing.wait())
        try:
            await asyncio.wait({sender, reader, closing}, return_when=asyncio.FIRST_COMPLETED)
            if closing.done() and not reader.done() and not sender.done():
                await self._shut_down(reader, sender)
        finally:
            # The client is gone (or shutdown ran out of time): abort what is left, and wait for it,
            # so every request's blocks are free before this handler returns.
            tasks = [reader, closing, *(job.task for job in self.jobs.values())]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            self.gw.open_sockets -= 1

    async def _shut_down(self, reader: asyncio.Task[None], sender: asyncio.Task[None]) -> None:
        """Server shutdown: take no more frames, let each request end (the engine is stopping, so each
        gets its server_shutdown error), send what is queued, then close."""
        reader.cancel()
        if self.jobs:
            await asyncio.wait([job.task for job in self.jobs.values()])
        self.outbox.put_nowait(None)
        await sender
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await self.ws.close(_GOING_AWAY, "the server is shutting down")

    # ---- the one writer ----
    def _send(self, frame: dict) -> None:
        self.outbox.put_nowait(frame)

    async def _send_loop(self) -> None:
        try:
            while (frame := await self.outbox.get()) is not None:
                await self.ws.send_text(dumps(frame))
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the client is gone: run() sees this task end and cleans up

    # ---- frames in ----
    async def _read_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                self._send(_error_frame(None, _bad_frame("binary frames are not supported; send JSON text")))
            else:
                self._on_frame(text)

    def _on_frame(self, text: str) -> None:
        if len(text.encode()) > self.gw.max_body_bytes:
            self._send(_error_frame(None, APIError(413, f"the frame is larger than {self.gw.max_body_bytes} bytes",
                                                   code="body_too_large")))
            return
        try:
            frame = json.loads(text)
        except (ValueError, RecursionError):
            self._send(_error_frame(None, _bad_frame("the frame is not valid JSON")))
            return
        if not isinstance(frame, dict):
            self._send(_error_frame(None, _bad_frame("a frame must be a JSON object")))
            return
        try:
            check_unicode(frame)  # before its id is echoed: a lone surrogate in a frame cannot be sent
        except APIError as exc:
            self._send(_error_frame(None, exc))
            return
        kind, rid = frame.get("type"), frame.get("id")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            self._send(_error_frame(None, _bad_frame("a frame needs an id: a string or an integer", "id")))
        elif kind == "request":
            self._start(rid, frame.get("body"))
        elif kind == "cancel":
            job = self.jobs.get(rid)
            if job is not None:  # else it has just ended (its done frame is on its way), or never was
                job.cancelled = True
                job.task.cancel()
        else:
            self._send(_error_frame(None, _bad_frame(f"unknown frame type {kind!r}: 'request' or 'cancel'", "type")))

    def _start(self, rid: Id, body: Any) -> None:
        if rid in self.jobs:
            # id null: an error with this id would read as the end of the request already running under it
            self._send(_error_frame(None, _bad_frame(f"id {rid!r} is already in flight on this socket", "id",
                                                     "duplicate_id")))
            return
        job = self.jobs[rid] = _Job(rid)
        job.task = asyncio.create_task(self._serve(job, body))
        job.task.add_done_callback(lambda _: self._ended(job))

    def _ended(self, job: _Job) -> None:
        # A task cancelled before its first step never runs _serve, whose end says "cancelled" and drops the job:
        # a cancel frame right behind its request frame (read in the same go) does that.
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
            if job.cancelled:
                self._send(_done_frame(job.id, "cancelled", None))

    # ---- one request ----
    async def _serve(self, job: _Job, body: Any) -> None:
        chunks: ChunkStream | None = None
        admitted = False
        try:
            call = await self._admit(body)
            admitted = True  # this job holds an in-flight slot until its end
            chunks = ChunkStream(self.gw.tokens, call)
            async with contextlib.aclosing(chunks.chunks(self.gw.stream(call))) as stream:
                async for chunk in stream:
                    self._send({"type": "chunk", "id": job.id, "chunk": chunk})
            if chunks.last is not None and aborted(chunks.last):
                end = _error_frame(job.id, shutdown_error())
            else:
                end = _done_frame(job.id, chunks.finish_reason, chunks)
        except APIError as exc:
            end = _error_frame(job.id, exc)
        except asyncio.CancelledError:
            if not job.cancelled:
                raise  # the socket is closing: there is nobody to tell
            # The client's cancel: the engine stream's cleanup has aborted the request by now; say so.
            asyncio.current_task().uncancel()
            end = _done_frame(job.id, "cancelled", chunks)
        except Exception as exc:  # noqa: BLE001 - a bug fails this request, not the other ones on the socket
            log.exception("WebSocket request %r failed", job.id, exc_info=exc)
            end = _error_frame(job.id, APIError(500, "internal server error", type="server_error"))
        finally:
            if admitted:
                self.gw.release(1)
            del self.jobs[job.id]
        self._send(end)

    async def _admit(self, body: Any) -> Call:
        if not isinstance(body, dict):
            raise bad_request("a request frame needs a body: a chat completions request object", "body")
        self.gw.check_model(body)
        # Every WebSocket request streams, so a body written for SSE (stream_options and all) is valid as is.
        req = self.gw.parse_chat({**body, "stream": True})
        return await self.gw.admit(req, chat=True)


def _bad_frame(message: str, param: str | None = None, code: str = "invalid_frame") -> APIError:
    return bad_request(message, param, code)


def _error_frame(rid: Id | None, err: APIError) -> dict:
    return {"type": "error", "id": rid, "status": err.status, **err.body()}


def _done_frame(rid: Id, finish_reason: str | None, chunks: ChunkStream | None) -> dict:
    return {"type": "done", "id": rid, "finish_reason": finish_reason,
            "usage": chunks.usage() if chunks is not None else usage([])}
