"""The capacity models of every PTU backend and deployment of one instance, shared with the other instances.

Each instance publishes its report for each PTU deployment it has touched and reads everyone's every `sync_s` seconds
(one upsert per deployment and one query per round); a store that does not answer only delays what is learnt from the
others: each instance keeps learning from its own 429s, and paces with what it knew last.

The rows are one partition, and every instance reads all of them: N instances cost the partition about N x rows /
interval entities a second, N squared (issue 32: past about 31 instances it passed Table Storage's 2,000 entities/s and
the reads were throttled, so a PTU's 429s stopped reaching the others). So the interval grows with the rows read:
with R rows (about one per instance and PTU deployment) the instances together read about R x R / interval, kept
under ROWS_PER_S; a few dozen instances still sync every `sync_s`, 256 about every 45 s (a 429 then reaches every
instance within a minute, while its evidence still counts). A stretched interval is jittered so the instances stay
apart.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from shared.background import keep_running
from shared.clock import Clock
from shared.config import Backend
from shared.records.capacity import CapacityReport
from shared.routing.capacity import PtuModel
from shared.storage.protocols import CapacityStore

log = logging.getLogger(__name__)

# Entities a second all instances' reads may ask of the capacity partition together: under Table Storage's 2,000 per
# partition, with room for the publishes and the rows of instances gone lately.
ROWS_PER_S = 1_000.0
JITTER = 0.2  # each interval is drawn from +-20 % of its value
MAX_BACKOFF_S = 60.0  # after failed syncs, the pause doubles up to this


def sync_interval(sync_s: float, rows: int) -> float:
    """How long to wait between syncs when the last read returned `rows` rows: `sync_s`, or longer so that about
    `rows` instances reading `rows` rows each stay under ROWS_PER_S."""
    return max(sync_s, rows * (rows + 1) / ROWS_PER_S)


class ProvisionedCapacity:
    def __init__(
        self, backends: tuple[Backend, ...], clock: Clock, store: CapacityStore | None = None, instance: str = "local",
        sync_s: float = 0.5,
    ) -> None:
        self._clock = clock
        self._store = store
        self._sync_s = sync_s
        self.instance = instance
        self._models = {
            (b.id, d): PtuModel(b.id, d, instance, b.reserve_tokens, stated=_per_second(b.ptu_tokens_per_minute.get(d)))
            for b in backends if b.ptu for d in b.deployments
        }
        self._task: asyncio.Task[None] | None = None
        self.sync_failures = 0
        self.rows = 0  # rows the last read returned
        self._failed_in_row = 0
        self._rng = random.Random()

    def model(self, backend_id: str, deployment: str) -> PtuModel | None:
        return self._models.get((backend_id, deployment))

    def health(self, backend_id: str, deployment: str) -> dict[str, Any] | None:
        model = self._models.get((backend_id, deployment))
        if model is None or (model.rate is None and model.stated is None):
            return None
        if model.rate is None or not model.learnt:
            stated = model.stated or 0.0
            return {"stated_tokens_per_minute": round(stated * 60),
                    "instance_share_tokens_per_minute": round((model.share or stated) * 60), "diverted": model.diverted}
        return {
            "learnt_tokens_per_minute": round(model.rate * 60),
            "instance_share_tokens_per_minute": round((model.share or 0.0) * 60),
            "diverted": model.diverted,
            # Forgotten (and the PTU sent everything) once this passes a minute with no newer 429.
            "last_429_age_s": round(max(0.0, self._clock.now() - model.evidence_at), 1),
        }

    def start(self) -> None:
        """Start sharing (from the first request, inside the running loop)."""
        if self._store is not None and self._models:
            self._task = keep_running(self._task, self._sync_forever)

    def interval(self) -> float:
        """The pause before the next sync (see the module's docstring), jittered."""
        base = sync_interval(self._sync_s, self.rows)
        if self._failed_in_row:  # throttled or away: ask it less, not again at once (doubling, at most a minute)
            base = min(MAX_BACKOFF_S, base * 2 ** min(self._failed_in_row, 3))
        return base if base <= self._sync_s else base * self._rng.uniform(1 - JITTER, 1 + JITTER)

    async def _sync_forever(self) -> None:
        while True:
            await self.sync()
            await asyncio.sleep(self.interval())

    async def sync(self) -> None:
        """Publish this instance's reports, then take in everyone's."""
        if self._store is None:
            return
        now, mono = self._clock.now(), self._clock.monotonic()
        try:
            for model in self._models.values():
                if model.charges or model.ready or model.rate is not None:
                    await self._store.publish(model.report(now, mono))
            reports = await self._store.load()
        except Exception as exc:
            self.sync_failures += 1
            self._failed_in_row += 1
            log.warning("could not share PTU capacity (%s)", type(exc).__name__)
            return
        self.rows = len(reports)
        self._failed_in_row = 0
        now, mono = self._clock.now(), self._clock.monotonic()
        grouped: dict[tuple[str, str], list[CapacityReport]] = {}
        for report in reports:
            grouped.setdefault((report.backend_id, report.deployment), []).append(report)
        for key, model in self._models.items():
            model.merge(grouped.get(key, ()), now, mono)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _per_second(tokens_per_minute: int | None) -> float | None:
    return tokens_per_minute / 60 if tokens_per_minute else None
