"""Work too large for the event loop: parsing and counting a large body, in one worker thread.

One thread: parsing and counting hold the GIL, so more threads would only take more of it from the loop, not work
faster. Counting hands the GIL back after every piece it encodes (tokens.count_off_loop), so the loop never waits for
more than one piece; parsing is one C call (orjson) and holds it throughout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

from shared.flow import tokens

# Bodies up to this size are parsed and counted on the event loop (well under a millisecond); larger ones off it.
ON_LOOP_BYTES = 64 * 1024
_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-count")

T = TypeVar("T")


async def run(work: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(_WORKER, work)


async def count(work: Callable[[], int]) -> int:
    return await run(partial(tokens.count_off_loop, work))
