"""Non-streaming responses: a body's engine requests run to their final outputs, unless the client leaves."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from starlette.requests import Request

from engine.outputs import RequestOutput

_DISCONNECT_POLL_S = 0.1


async def collect(request: Request, streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput] | None:
    """Each stream's final output, or None if the client disconnected first. Either way, and when one stream
    fails (its error is raised), every stream is closed before this returns, which aborts its request."""
    tasks = [asyncio.ensure_future(_last(s)) for s in streams]
    everything = asyncio.gather(*tasks)  # done when all are, or at the first error
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({everything, watch}, return_when=asyncio.FIRST_COMPLETED)
        finished = everything in done
    finally:
        for task in (*tasks, watch):
            task.cancel()
        await asyncio.gather(*tasks, watch, return_exceptions=True)
        await asyncio.gather(everything, return_exceptions=True)  # its outcome is read, so never logged as lost
    return everything.result() if finished else None


async def _last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    # aclosing: a cancelled consumer closes the engine stream, whose cleanup aborts the request
    async with contextlib.aclosing(stream):
        last = None
        async for out in stream:
            last = out
    assert last is not None  # a stream always ends with a finished output
    return last


async def _wait_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(_DISCONNECT_POLL_S)
