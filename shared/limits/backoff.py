"""How long one ledger is left alone after the store throttled it (503 ServerBusy).

A throttled partition asked again at once only stays throttled: every instance serving the consumer keeps its requests
coming, and each retry is one more request past the partition's target. So after a ServerBusy this instance makes no
write to that ledger for a while: the store's Retry-After if it sent one, else an exponential pause with jitter (so
the instances that were refused together do not come back together), bounded. Requests meanwhile are admitted from the
lease still held, or refused with 429 and Retry-After until the pause ends; nothing falls back to a local window (the
leases already admitted their share).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

BUSY_BASE_S = 0.2  # the first pause (before jitter)
BUSY_MAX_S = 5.0  # no pause is longer, whatever Retry-After says or how often it was refused


@dataclass(eq=False)
class BusyBackoff:
    until: float = 0.0  # wall clock: no write to the ledger before this
    strikes: int = 0  # ServerBusy answers since the last write that went through
    rng: random.Random = field(default_factory=random.Random)

    def active(self, now: float) -> bool:
        return self.until > now

    def busy(self, now: float, retry_after_s: float | None = None) -> float:
        """The store answered ServerBusy at `now`: return when the next write may be tried."""
        self.strikes += 1
        if retry_after_s is not None and retry_after_s > 0:
            pause = min(BUSY_MAX_S, retry_after_s)
        else:
            ceiling = min(BUSY_MAX_S, BUSY_BASE_S * 2 ** min(self.strikes - 1, 16))
            pause = self.rng.uniform(ceiling / 2, ceiling)  # equal jitter: at least half, spread over the rest
        self.until = max(self.until, now + pause)
        return self.until

    def cleared(self) -> None:
        self.strikes = 0
