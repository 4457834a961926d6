"""The capacity models of every PTU backend and deployment of one instance, shared with the other instances.

Each instance publishes its report for each PTU deployment it has touched and reads everyone's every `sync_s` seconds
(one upsert per deployment and one query per round); a store that does not answer only delays what is learnt from the
others: each instance keeps learning from its own 429s, and paces with what it knew last.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from shared.background import keep_running, repeat
from shared.clock import Clock
from shared.config import Backend
from shared.routing.capacity import CapacityReport, PtuModel
from shared.storage.protocols import CapacityStore

log = logging.getLogger(__name__)


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
            self._task = keep_running(self._task, lambda: repeat(self.sync, self._sync_s))

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
            log.warning("could not share PTU capacity (%s)", type(exc).__name__)
            return
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
