"""What keeps a key spray cheap: a budget of store lookups, a bounded memory of unknown keys, and a per-address
throttle of failed authentications. Pure: the clock is injected, nothing here does I/O.

Every structure is bounded by a cap chosen at start-up, whatever clients send: a spray can evict entries, never grow
memory.
"""

from __future__ import annotations

from collections import OrderedDict

from shared.clock import Clock

UNKNOWN_KEYS_CAP = 10_000  # digests remembered as unknown (64 hex characters each: ~1.5 MB at the cap)
THROTTLED_ADDRESSES_CAP = 10_000  # client addresses with recent failures
FAILURE_WINDOW_S = 60.0


class LookupBudget:
    """A token bucket: at most `per_s` store lookups per second on average, `burst` at once (0: none at all)."""

    def __init__(self, per_s: float, clock: Clock, burst: float | None = None) -> None:
        self._rate = per_s
        self._burst = burst if burst is not None else max(1.0, per_s)
        self._clock = clock
        self._tokens = self._burst if per_s > 0 else 0.0
        self._at = clock.monotonic()
        self.spent = 0
        self.refused = 0

    def take(self) -> bool:
        now = self._clock.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._rate > 0 and self._tokens >= 1.0:
            self._tokens -= 1.0
            self.spent += 1
            return True
        self.refused += 1
        return False


class UnknownKeys:
    """Digests the store said it does not know, least recently seen evicted first once `cap` is reached."""

    def __init__(self, clock: Clock, ttl_s: float, cap: int = UNKNOWN_KEYS_CAP) -> None:
        self._clock = clock
        self._ttl_s = ttl_s
        self._cap = cap
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, digest: object) -> bool:
        at = self._seen.get(digest) if isinstance(digest, str) else None
        if at is None:
            return False
        if self._clock.monotonic() - at > self._ttl_s:
            del self._seen[digest]  # type: ignore[arg-type]
            return False
        return True

    def add(self, digest: str) -> None:
        self._seen[digest] = self._clock.monotonic()
        self._seen.move_to_end(digest)
        while len(self._seen) > self._cap:
            self._seen.popitem(last=False)

    def discard(self, digest: str) -> None:
        self._seen.pop(digest, None)

    def __len__(self) -> int:
        return len(self._seen)


class FailureThrottle:
    """Failed authentications per client address in a fixed window; past `limit`, the address waits out its window.

    At most `cap` addresses are tracked: when a spray from many addresses fills it, the oldest entries go, which at
    worst lets an evicted address start a fresh window (the lookup budget still bounds the store's load).
    """

    def __init__(self, limit: int, clock: Clock, window_s: float = FAILURE_WINDOW_S, cap: int = THROTTLED_ADDRESSES_CAP) -> None:
        self._limit = limit
        self._clock = clock
        self._window_s = window_s
        self._cap = cap
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def retry_after(self, address: str) -> float | None:
        """Seconds until `address` may try again, or None when it is not throttled."""
        entry = self._windows.get(address)
        if entry is None:
            return None
        started, failures = entry
        left = started + self._window_s - self._clock.monotonic()
        if left <= 0:
            del self._windows[address]
            return None
        return left if failures >= self._limit else None

    def failed(self, address: str) -> None:
        now = self._clock.monotonic()
        started, failures = self._windows.get(address, (now, 0))
        if now - started >= self._window_s:
            started, failures = now, 0
        self._windows[address] = (started, failures + 1)
        self._windows.move_to_end(address)
        while len(self._windows) > self._cap:
            self._windows.popitem(last=False)

    def __len__(self) -> int:
        return len(self._windows)
