"""A per-key token bucket kept in one instance's memory: how often one consumer may make this instance do work that
no admission charges (reads of the responses table for follow-ups and continuations). Pure: the clock is injected.

Local on purpose: it bounds what one consumer costs the store per instance at no store cost of its own. At most `cap`
keys are tracked (least recently used evicted), so many consumers cannot grow memory; an evicted key starts full.
"""

from __future__ import annotations

from collections import OrderedDict

from shared.clock import Clock
from shared.waits import whole_seconds

KEYS_CAP = 10_000


class PerKeyRate:
    """At most `per_s` operations a second per key on average, `burst` at once."""

    def __init__(self, per_s: float, clock: Clock, burst: float | None = None, cap: int = KEYS_CAP) -> None:
        self._rate = per_s
        self._burst = burst if burst is not None else max(1.0, 2 * per_s)
        self._clock = clock
        self._cap = cap
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, as of)
        self.refused = 0

    def take(self, key: str) -> int | None:
        """None when `key` may go ahead (one token taken); else the whole seconds until it may."""
        now = self._clock.monotonic()
        tokens, at = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            self._buckets.move_to_end(key)
            while len(self._buckets) > self._cap:
                self._buckets.popitem(last=False)
            return None
        self._buckets[key] = (tokens, now)
        self.refused += 1
        return whole_seconds((1.0 - tokens) / self._rate) if self._rate > 0 else 60

    def __len__(self) -> int:
        return len(self._buckets)
