"""The console's traffic rows: Table work per instance, not per request.

    .venv/bin/python -m bench.traffic

Drives TrafficCounter (the real one, over the in-memory traffic store, on a fake clock) with 1 and 4 instances at a
low and a high request rate for 10 simulated minutes, and prints the store operations: one upsert per instance per
10-s bucket with traffic (plus the deletes of its own hour-old rows), whatever the rate.
"""

from __future__ import annotations

import asyncio

from shared.clock import FakeClock
from shared.records.usage import TokenUsage
from shared.storage.memory import MemoryTrafficStore
from shared.telemetry.protocol import NullTelemetry, RequestRecord
from shared.telemetry.traffic import TrafficCounter


async def run(instances: int, per_second: int, minutes: int = 10) -> tuple[int, int]:
    clock, store = FakeClock(), MemoryTrafficStore()
    counters = [TrafficCounter(NullTelemetry(), store, clock, f"i{n}", background=False) for n in range(instances)]
    requests = 0
    for _ in range(minutes * 60):
        for n in range(per_second):
            counter = counters[n % instances]
            counter.request_done(RequestRecord("c", "", "chat", "chat", "", "gpt-4o", 200, 1.0, backend_id="ptu",
                                               attempts=1, usage=TokenUsage(10, 5, 15)))
            requests += 1
        clock.advance(1)
        for counter in counters:
            await counter.flush()
    return requests, store.calls


async def main() -> None:
    print(f"{'instances':>9} {'req/s':>6} {'requests':>9} {'store ops':>9} {'ops/instance/10 s':>18}")
    for instances in (1, 4):
        for rate in (10, 1000):
            requests, ops = await run(instances, rate)
            print(f"{instances:>9} {rate:>6} {requests:>9} {ops:>9} {ops / instances / 60:>18.2f}")


if __name__ == "__main__":
    asyncio.run(main())
