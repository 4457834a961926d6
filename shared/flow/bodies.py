"""Large request bodies: how much memory a worker lets them take at once.

A parsed body costs far more than its bytes: every JSON value becomes a Python object of 30 to 100 bytes, so 7 MiB of
small messages parse to ~70 MiB, and a list of empty objects to 24 times its size (bench.bodies). A worker therefore
takes a body over offload.ON_LOOP_BYTES only within a budget of memory, estimated before the body is parsed: its bytes
twice (the text and what it parses to) plus STRUCT_BYTES for each `{`, `[` and `,` (at least one per JSON value past
the first). The share is held until the request ends, its stream included; a request that cannot have one within
`wait_s` is refused with a retryable 503, holding only its bytes meanwhile. One body larger than the whole budget may
still go, alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from shared.outcomes import BodiesBusy

STRUCT_BYTES = 128  # measured at most ~100 bytes per JSON value (a dict with its keys, a str, an int); room to spare
FIXED_BYTES = 4096  # the outermost objects' own headers
WAIT_S = 30.0


def estimate(raw: bytes) -> int:
    """An upper estimate of the memory `raw` takes with its parse (a C scan: ~10 ms for 8 MiB, so off the loop)."""
    return FIXED_BYTES + 2 * len(raw) + STRUCT_BYTES * (raw.count(b"{") + raw.count(b"[") + raw.count(b","))


class BodyBudget:
    """A first-come, first-served budget of bytes, in one worker's event loop."""

    def __init__(self, capacity: int, wait_s: float = WAIT_S) -> None:
        self.capacity = capacity
        self._wait_s = wait_s
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()
        self.refused = 0

    async def take(self, weight: int) -> int:
        """Hold `weight` bytes (at most the whole budget) and return what is held; BodiesBusy after `wait_s`."""
        weight = min(weight, self.capacity)
        if not self._waiting and self.used + weight <= self.capacity:
            self.used += weight
            return weight
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (weight, granted)
        self._waiting.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(granted), self._wait_s)
        except BaseException as stopped:
            if granted.done() and not granted.cancelled():
                self.give_back(weight)  # granted just as the wait ended
            else:
                granted.cancel()
                if entry in self._waiting:
                    self._waiting.remove(entry)
                self._grant()  # those behind it may fit now
            if isinstance(stopped, TimeoutError):
                self.refused += 1
                raise BodiesBusy(max(1, round(self._wait_s / 2))) from None
            raise
        return weight

    def give_back(self, weight: int) -> None:
        self.used -= weight
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            weight, granted = self._waiting[0]
            if granted.done():
                self._waiting.popleft()
                continue
            if self.used + weight > self.capacity:
                return
            self._waiting.popleft()
            self.used += weight
            granted.set_result(None)

    def __len__(self) -> int:
        return len(self._waiting)


class Held:
    """A request's share of the budget, given back once, whether the request ends in an answer, a refusal, an error,
    or at the end of its stream."""

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.weight = 0

    def give_back(self) -> None:
        if self.weight:
            self._budget.give_back(self.weight)
            self.weight = 0

    def until_done(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """`chunks`, giving the share back when they end, fail, are closed, or are dropped unread."""
        return _Releasing(self, chunks)


class _Releasing:
    """An async iterator, not a generator: a generator never started runs no `finally`, so a stream the framework
    dropped before its first chunk (the client gone before the answer started) would keep its share for good. Dropped,
    this object gives the share back on the event loop, whichever thread the collector ran in."""

    def __init__(self, held: Held, chunks: AsyncIterator[bytes]) -> None:
        self._held = held
        self._chunks = chunks
        self._loop = asyncio.get_running_loop()

    def __aiter__(self) -> _Releasing:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except BaseException:
            self._held.give_back()
            raise

    async def aclose(self) -> None:
        try:
            aclose = getattr(self._chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._held.give_back()

    def __del__(self) -> None:
        if self._held.weight and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._held.give_back)
