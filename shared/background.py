"""Background work an object starts itself, lazily, from inside the running event loop.

The gateway's stores, flushers and sharing loops are built before any loop runs (once per worker, and in synchronous
tests), so each starts its loop the first time it is used from a request; this is that one step, in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


async def repeat(work: Callable[[], Coroutine[Any, Any, None]], every_s: float) -> None:
    """`work()`, then again every `every_s`, for as long as the task runs."""
    while True:
        await work()
        await asyncio.sleep(every_s)


def keep_running(
    task: asyncio.Task[None] | None, work: Callable[[], Coroutine[Any, Any, None]]
) -> asyncio.Task[None] | None:
    """`task` while it still runs; else a new task running `work()` in the current event loop; None outside a running
    loop (nothing to start yet: the next call from inside one will)."""
    if task is not None and not task.done():
        return task
    try:
        loop = asyncio.get_running_loop()  # before work(): no coroutine is made that nothing would await
    except RuntimeError:
        return None
    return loop.create_task(work())
