"""Bridging event loops: work that must run on another thread's event loop (the engine's, an
engine backend's), consumed as an async iterator on the caller's loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable


async def relay(produce: Callable[[Callable[[object], None]], Awaitable[None]], loop: asyncio.AbstractEventLoop,
                last: Callable[[object], bool]) -> AsyncIterator:
    """Run `produce(put)` on `loop` and yield, on the running loop, each item it puts, until one
    for which `last` holds; an exception it puts is raised here. Closing the iterator (or
    cancelling its consumer) cancels the producer on its loop."""
    caller = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()

    def put(item: object) -> None:
        caller.call_soon_threadsafe(items.put_nowait, item)

    work = asyncio.run_coroutine_threadsafe(produce(put), loop)
    try:
        while True:
            item = await items.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if last(item):
                return
    finally:
        work.cancel()
