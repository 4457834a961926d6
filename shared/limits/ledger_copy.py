"""This instance's copy of a consumer's ledger, and the conditional write that changes the shared one.

A write on the cached copy (with its ETag) saves the read; when other instances keep writing the same ledger the copy is
mostly stale, so how often it wins is tracked and below one in two the ledger is read first. A write that loses the
race is tried again on a fresh read after a random pause that grows with the lost races and with the instances holding
leases on the ledger (`conflict_pause`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.clock import Clock
from shared.limits.allowance import holders
from shared.limits.ledger import Ledger
from shared.storage.protocols import Conflict, LedgerStore, StoreUnavailable

CONFLICT_BACKOFF_S = 0.005  # the first pause's ceiling after a lost race, with up to CONTENDERS_PER_BACKOFF holders
CONTENDERS_PER_BACKOFF = 8  # past this many instances holding leases, the pauses grow with their number
MAX_CONFLICT_BACKOFF_S = 2.0
WRITE_ATTEMPTS = 6
# A copy this old, of a ledger other instances also hold leases on, is almost surely stale: read it first rather than
# lose a write on it (an allowance is renewed every minute or two; by then every other holder has written).
STALE_SHARED_S = 5.0


def conflict_pause(attempt: int, holders: int, rng: random.Random) -> float:
    """How long to wait after lost race number `attempt` (0: the first) on a ledger that `holders` instances hold leases
    on: a random pause (full jitter) whose ceiling doubles with each lost race and grows with the contenders, so the
    instances that lost together spread their retries over about the time the entity takes to serve them one after
    another (a conditional write wins only if no other lands between its read and its write). Issue 32: with pauses
    of 0-30 ms whatever the contenders, 256 instances lost 93 % of their writes to one another; the re-reads and
    retries took the partition past its target, and its latency, hence the races lost, grew with it."""
    ceiling = CONFLICT_BACKOFF_S * 2 ** attempt * max(1.0, holders / CONTENDERS_PER_BACKOFF)
    return rng.uniform(0, min(MAX_CONFLICT_BACKOFF_S, ceiling))


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
    holders: int = 1  # instances holding leases on it at the last sync (this one included): how long to back off
    rng: random.Random = field(default_factory=random.Random)
    changed_mono: float = 0.0  # when the copy was last read or written

    def forget(self) -> None:
        self.have = False

    async def commit(
        self, store: LedgerStore, consumer_id: str, clock: Clock, change: Callable[[Ledger, float], bool],
        counts: dict[str, int] | None = None,
    ) -> tuple[Ledger, float]:
        """Apply `change(copy, now)` to a copy of the ledger and write it on the ETag, again on a fresh read when another
        instance wrote first. `change` returns False when there is nothing to write; that answer is trusted only from
        a fresh read (other instances may have released tokens since the cached copy). Returns the ledger as changed
        and the time it was changed at; raises StoreUnavailable, or Contended when every attempt lost. `counts`
        (optional) adds up the reads, writes, lost races and writes found unneeded, for the scale bench."""
        tally = counts if counts is not None else {}
        try:
            for attempt in range(WRITE_ATTEMPTS):
                fresh = (not self.have or self.hits < 0.5
                         or (self.shared and clock.monotonic() - self.changed_mono > STALE_SHARED_S))
                if fresh:
                    tally["reads"] = tally.get("reads", 0) + 1
                    self.ledger, self.etag = await read_ledger(store, consumer_id)
                    self.have = True
                    self.changed_mono = clock.monotonic()
                    # The contenders as the ledger shows them now: an instance that never wrote it yet (all of them,
                    # when hundreds start together) would otherwise back off as if alone.
                    self.holders = max(self.holders, holders(self.ledger, int(clock.now() * 1000), ""))
                assert self.ledger is not None
                ledger = self.ledger.copy()
                now = clock.now()
                if not change(ledger, now):
                    tally["nothing"] = tally.get("nothing", 0) + 1
                    if fresh:
                        return ledger, now
                    self.have = False
                    continue
                try:
                    tally["writes"] = tally.get("writes", 0) + 1
                    self.etag = await store.write(consumer_id, ledger.to_entity(), self.etag)
                except Conflict:
                    tally["lost"] = tally.get("lost", 0) + 1
                    tally["lost_on_copy" if not fresh else "lost_on_read"] = \
                        tally.get("lost_on_copy" if not fresh else "lost_on_read", 0) + 1
                    self.have = False
                    if not fresh:
                        self.hits *= 0.7
                    # Other instances wrote first: wait, so that those that lost together do not collide again.
                    await asyncio.sleep(conflict_pause(attempt, self.holders, self.rng))
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

    def observe(self, ledger: Ledger, scopes: Callable[[], list[str]], now: float, holders: int) -> None:
        now_ms = int(now * 1000)
        self.occupancy = {s: ledger.occupancy(s, now_ms) for s in scopes()}
        self.quota_used = ledger.quota_used
        self.shared = holders > 1
        self.holders = holders
