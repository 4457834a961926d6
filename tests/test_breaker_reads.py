"""Shared breaker state costs one read per instance per interval, whatever the number of backends and requests."""

from __future__ import annotations

import asyncio

from shared.clock import FakeClock
from shared.config import Backend, BreakerRule
from shared.records.breaker import BreakerRecord
from shared.routing.router import Router
from shared.storage.memory import MemoryBreakerStore
from shared.telemetry.protocol import NullTelemetry

DEPLOYMENTS = ("gpt-4o", "gpt-4o-mini", "text-embedding-3-small")


def backends(count: int) -> tuple[Backend, ...]:
    return tuple(
        Backend(id=f"b{i}", endpoint=f"https://b{i}.example", region=f"r{i}", deployments={d: d for d in DEPLOYMENTS},
                breaker=BreakerRule(trip_s=10))
        for i in range(count)
    )


class GatedStore(MemoryBreakerStore):
    """Each load waits for the test to open one interval."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Semaphore(0)

    async def load(self) -> list[BreakerRecord]:
        await self.gate.acquire()
        return await super().load()


async def test_one_read_per_interval_for_forty_backends_and_thousands_of_requests() -> None:
    clock = FakeClock()
    store = GatedStore()
    for i in range(40):
        for d in DEPLOYMENTS:
            store.records[f"b{i}|{d}"] = BreakerRecord(f"b{i}", d, "open", clock.now() + 30, clock.now(), "429")
    router = Router(backends(40), clock, NullTelemetry(), store, sync_s=0)
    intervals = 5
    for _ in range(intervals):
        for _ in range(300):
            for d in DEPLOYMENTS:
                router.candidates(d, 100, "normal")
        store.gate.release()
        for _ in range(10):
            await asyncio.sleep(0)
    assert store.loads == intervals
    # That one read carried every backend's state: all 120 breakers adopted the shared trips.
    assert all(router.candidates(d, 100, "normal") == [] for d in DEPLOYMENTS)
    await router.close()
