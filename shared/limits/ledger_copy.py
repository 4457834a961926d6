"""This instance's copy of a consumer's ledger, and the conditional write that changes the shared one.

A write on the cached copy (with its ETag) saves the read; when other instances keep writing the same ledger the copy is
mostly stale, so how often it wins is tracked and below one in two the ledger is read first.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.clock import Clock
from shared.limits.ledger import Ledger
from shared.storage.protocols import Conflict, LedgerStore, StoreUnavailable

CONFLICT_BACKOFF_S = 0.005
WRITE_ATTEMPTS = 6
# A copy this old, of a ledger other instances also hold leases on, is almost surely stale: read it first rather than
# lose a write on it (an allowance is renewed every minute or two; by then every other holder has written).
STALE_SHARED_S = 5.0


async def read_ledger(store: LedgerStore, consumer_id: str) -> tuple[Ledger, str | None]:
    """The consumer's ledger and its ETag; an empty ledger and None when there is none yet."""
    row, etag = await store.read(consumer_id)
    return (Ledger() if row is None else Ledger.from_entity(row)), etag


class Contended(Exception):
    """Every conditional write lost to another instance's."""


@dataclass(eq=False)
class LedgerCopy:
    ledger: Ledger | None = None  # last copy read or written, to write without reading first
    etag: str | None = None
    have: bool = False
    hits: float = 1.0  # how often a write on the cached copy succeeded (smoothed): below 1/2, read first
    occupancy: dict[str, int] = field(default_factory=dict)  # per scope, as of the last sync
    quota_used: int = 0
    shared: bool = False  # other instances held leases on it at the last sync
    changed_mono: float = 0.0  # when the copy was last read or written

    def forget(self) -> None:
        self.have = False

    async def commit(
        self, store: LedgerStore, consumer_id: str, clock: Clock, change: Callable[[Ledger, float], bool]
    ) -> tuple[Ledger, float]:
        """Apply `change(copy, now)` to a copy of the ledger and write it on the ETag, again on a fresh read when another
        instance wrote first. `change` returns False when there is nothing to write; that answer is trusted only from
        a fresh read (other instances may have released tokens since the cached copy). Returns the ledger as changed
        and the time it was changed at; raises StoreUnavailable, or Contended when every attempt lost."""
        try:
            for attempt in range(WRITE_ATTEMPTS):
                fresh = (not self.have or self.hits < 0.5
                         or (self.shared and clock.monotonic() - self.changed_mono > STALE_SHARED_S))
                if fresh:
                    self.ledger, self.etag = await read_ledger(store, consumer_id)
                    self.have = True
                    self.changed_mono = clock.monotonic()
                assert self.ledger is not None
                ledger = self.ledger.copy()
                now = clock.now()
                if not change(ledger, now):
                    if fresh:
                        return ledger, now
                    self.have = False
                    continue
                try:
                    self.etag = await store.write(consumer_id, ledger.to_entity(), self.etag)
                except Conflict:
                    self.have = False
                    if not fresh:
                        self.hits *= 0.7
                    # Other instances wrote first; a short random pause keeps them from colliding again in step.
                    await asyncio.sleep(random.uniform(0, CONFLICT_BACKOFF_S * (attempt + 1)))
                    continue
                if not fresh:
                    self.hits = 0.7 * self.hits + 0.3
                else:
                    self.hits = min(1.0, self.hits + 0.05)  # try the cached copy again now and then
                self.ledger = ledger
                self.changed_mono = clock.monotonic()
                return ledger, now
            raise Contended()
        except (StoreUnavailable, Contended):
            self.have = False
            raise

    def observe(self, ledger: Ledger, scopes: Callable[[], list[str]], now: float, others: bool) -> None:
        now_ms = int(now * 1000)
        self.occupancy = {s: ledger.occupancy(s, now_ms) for s in scopes()}
        self.quota_used = ledger.quota_used
        self.shared = others
