"""Token usage per consumer and deployment, kept in Table Storage for reports.

Each gateway instance owns its own rows (one per consumer, deployment and UTC hour) and writes *cumulative* totals,
so a write that fails is simply repeated later with larger numbers: no update can be lost or counted twice, and no two
instances ever write the same row.

A row is written when it is new and then at most once per `flush_s` (a minute by default) while it changes, so the
writes grow with consumers x minutes, not with requests; the Table store batches up to 100 rows of one instance and
hour per round trip, whatever their consumers. What a crash loses is at most the last `flush_s` of usage (a clean
shutdown writes everything).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid

from shared.background import keep_running
from shared.clock import Clock
from shared.records.usage import TokenUsage, UsageRow
from shared.storage.protocols import UsageStore

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 60.0  # each row at most this often
FLUSH_TICK_S = 5.0  # how often due rows are looked for


_last_hour: tuple[int, str] = (-1, "")


def hour_key(now_s: float) -> str:
    global _last_hour
    hour = int(now_s // 3600)
    if _last_hour[0] != hour:  # formatted once an hour, not per request
        _last_hour = (hour, time.strftime("%Y-%m-%dT%H", time.gmtime(hour * 3600)))
    return _last_hour[1]


class UsageRecorder:
    """Adds each request's usage in memory (no I/O on the request path) and saves changed rows every few seconds."""

    def __init__(self, store: UsageStore, clock: Clock, instance_id: str | None = None, background: bool = True,
                 flush_s: float = FLUSH_INTERVAL_S) -> None:
        self._store = store
        self._clock = clock
        self.instance = instance_id or uuid.uuid4().hex[:12]
        self._flush_s = flush_s
        self._rows: dict[tuple[str, str, str], UsageRow] = {}
        self._dirty: set[tuple[str, str, str]] = set()
        self._written: dict[tuple[str, str, str], float] = {}  # monotonic time of the row's last write
        self._background = background
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

    def record(self, consumer_id: str, deployment: str, usage: TokenUsage | None, requests: int = 1,
               saved: TokenUsage | None = None, cost: float = 0.0) -> None:
        """Add a request's usage (and its cost); `requests=0` adds tokens settled later for a request already counted;
        `saved`: a response-cache hit, which used no backend tokens and saved these."""
        hour = hour_key(self._clock.now())
        key = (consumer_id, hour, deployment)
        row = self._rows.get(key) or UsageRow(consumer_id, hour, deployment, self.instance)
        self._rows[key] = row.plus(usage, requests, saved, round(cost * 1_000_000_000))
        self._dirty.add(key)
        if self._background:
            self._task = keep_running(self._task, self._flush_forever)

    def totals(self) -> dict[str, int]:
        return {"requests": sum(r.requests for r in self._rows.values()), "total": sum(r.total for r in self._rows.values())}

    async def flush(self, everything: bool = False) -> None:
        """Write the changed rows that are due: new ones, and those last written `flush_s` ago or more (all of them
        with `everything`, at shutdown)."""
        if not self._dirty:
            return
        mono = self._clock.monotonic()
        keys = [k for k in self._dirty if everything or mono - self._written.get(k, -math.inf) >= self._flush_s]
        if not keys:
            return
        self._dirty.difference_update(keys)
        try:
            await self._store.save([self._rows[k] for k in keys])
        except Exception as exc:
            self._dirty.update(keys)  # cumulative rows: the next save carries these too
            self.failures += 1
            log.warning("could not save usage rows (%s); will retry", type(exc).__name__)
            return
        for key in keys:
            self._written[key] = mono
        current = hour_key(self._clock.now())
        for key in [k for k in self._rows if k[1] < current and k not in self._dirty]:
            del self._rows[key]  # an hour that is over and saved will not change again
            self._written.pop(key, None)

    async def _flush_forever(self) -> None:
        while self._rows:
            await asyncio.sleep(min(FLUSH_TICK_S, self._flush_s))
            await self.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.flush(everything=True)
