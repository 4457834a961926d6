"""What a consumer whose requests outrun their reservations gets through, per minute (issue 24: an overrun is a debt).

    .venv/bin/python -m bench.overrun [--minutes 30] [--tpm 10000] [--instances 3]

A consumer sends a request every 0.5 s without `max_tokens` (each reserves the default 1,024 output tokens plus an
8-token prompt) and each generates for 20 s and uses 9,532 tokens, spread over `--instances` limiters sharing one
ledger, driven by a fake clock (no sleeping: a 30-minute run takes seconds). Reports the tokens charged per minute
over the run and over its steady state (after the first two minutes), against the limit. An accuracy figure, not a
speed: it does not depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from shared.clock import FakeClock
from shared.limits.limiter import LimitTicket, TokenLimiter
from shared.outcomes import RateLimited
from shared.records.consumers import Consumer, Limits
from shared.storage.memory import MemoryLedgerStore
from shared.telemetry.protocol import NullTelemetry

RESERVE = 8 + 1_024
USED = 9_532
GENERATION_S = 20.0
STEP_S = 0.5


async def run(minutes: int, tpm: int, instances: int) -> dict[str, object]:
    clock = FakeClock()
    store = MemoryLedgerStore()
    limiters = [TokenLimiter(store, clock, NullTelemetry(), background=False, instance_id=f"i{n}", instance_count=instances)
                for n in range(instances)]
    consumer = Consumer(id="app", name="app", key_hash="h", key_prefix="gw-x", limits=Limits(tpm, {}))
    start = clock.now()
    per_minute = [0] * minutes
    running: list[tuple[float, LimitTicket]] = []
    refused = 0
    for step in range(int(minutes * 60 / STEP_S)):
        try:
            ticket = await limiters[step % instances].admit(consumer, "gpt-4o", RESERVE)
        except RateLimited:
            refused += 1
        else:
            assert isinstance(ticket, LimitTicket)
            running.append((clock.now() + GENERATION_S, ticket))
        clock.advance(STEP_S)
        for done in [r for r in running if r[0] <= clock.now()]:
            running.remove(done)
            done[1].settle(USED)
            per_minute[min(minutes - 1, int((clock.now() - start) // 60))] += USED
        for limiter in limiters:
            await limiter.tick()
    steady = per_minute[2:]
    return {
        "limit": tpm, "minutes": minutes, "instances": instances, "requests_refused": refused,
        "tokens_per_minute_whole_run": round(sum(per_minute) / minutes),
        "tokens_per_minute_steady": round(sum(steady) / len(steady)) if steady else None,
        "steady_over_limit": round(sum(steady) / len(steady) / tpm, 3) if steady else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=30)
    parser.add_argument("--tpm", type=int, default=10_000)
    parser.add_argument("--instances", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.minutes, args.tpm, args.instances)), indent=2))


if __name__ == "__main__":
    main()
