"""Interleave several async streams into one, as items arrive: a completions request with a batch of
prompts streams all of its engine requests' chunks over one SSE response."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, TypeVar

T = TypeVar("T")
_DONE = object()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Items of every stream, each stream's in order. The first stream to raise ends the merge with its
    error; closing the merge (or an error) closes every stream, and waits until each has closed."""
    if len(streams) == 1:  # the common case pays no task or queue per item
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    await queue.put((item, None))
            await queue.put((_DONE, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await queue.put((_DONE, exc))

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is _DONE:
                running -= 1
            else:
                yield item
    finally:
        for task in tasks:  # cancelling a pump closes its stream (aclosing), which aborts its request
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
