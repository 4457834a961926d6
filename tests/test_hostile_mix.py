"""The hostile mix against the real limiter, on a fake clock: requests that ask no max_tokens, n=4 choices, each
generating for longer than a minute, from a 10,000 TPM consumer on four instances sharing one ledger. Tokens are
served as the streams deliver them, charged every 5 s (Ticket.progress) and settled at the end.

With the output cap on, no request can run past its reservation: tokens served in any 60 s stay within the limit.
Without it, each request admitted can run past its reservation, and nothing can stop it once admitted: the worst case
is the limit plus the overrun of the requests in flight together, which the window (charged as they deliver) keeps
to what fitted beside each other: at most limit / reservation of them."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from shared.clock import FakeClock
from shared.edge.errors import GatewayError
from shared.limits.limiter import TokenLimiter
from shared.limits.tickets import Ticket
from shared.outcomes import Refusal
from shared.records.consumers import Consumer, Limits
from shared.storage.memory import MemoryLedgerStore
from shared.telemetry.protocol import NullTelemetry

LIMIT = 10_000
PROMPT = 30
CHOICES = 4
DEFAULT_CAP = 1_024  # the gateway's reservation per choice when a request asks none
GENERATED = 8_000  # what the backend generates per choice when nothing caps it: 64 s at 125 tokens/s
# Every generation runs past a minute: a capped one (1,024 tokens) at 60 ms a token, an uncapped one at 8 ms.
SECONDS_PER_TOKEN = {True: 0.06, False: 0.008}
INSTANCES = 4
STEP_S = 0.5
SETTLE_EVERY_S = 5.0


@dataclass
class Stream:
    ticket: Ticket
    started: float
    tokens: int  # what it will deliver per choice
    delivered: int = 0
    last_settle: float = 0.0


def consumer() -> Consumer:
    return Consumer(id="hostile", name="hostile", key_hash="h", key_prefix="gw-h", limits=Limits(tokens_per_minute=LIMIT))


async def run(cap: bool, seconds: float = 400.0) -> tuple[int, int]:
    """(most tokens served in any 60 s, most requests in flight at once)."""
    clock = FakeClock()
    store = MemoryLedgerStore()
    instances = [TokenLimiter(store, clock, NullTelemetry(), background=False, instance_count=INSTANCES,
                              instance_id=f"i{i}") for i in range(INSTANCES)]
    c = consumer()
    reserve = PROMPT + CHOICES * DEFAULT_CAP
    per_choice = DEFAULT_CAP if cap else GENERATED
    served: list[tuple[float, int]] = []
    streams: list[Stream] = []
    most_in_flight = 0
    rng = random.Random(7)
    t = 0.0
    while t < seconds:
        # Every instance's clients try again every step (the demand is far above the limit).
        for limiter in rng.sample(instances, len(instances)):
            try:
                ticket = await limiter.admit(c, "gpt-4o", reserve)
            except (GatewayError, Refusal):
                continue
            streams.append(Stream(ticket, clock.now(), per_choice, last_settle=clock.now()))
            served.append((clock.now(), PROMPT))
        most_in_flight = max(most_in_flight, len(streams))
        clock.advance(STEP_S)
        t += STEP_S
        for stream in list(streams):
            due = min(stream.tokens, int((clock.now() - stream.started) / SECONDS_PER_TOKEN[cap]))
            if due > stream.delivered:
                served.append((clock.now(), CHOICES * (due - stream.delivered)))
                stream.delivered = due
            so_far = PROMPT + CHOICES * stream.delivered
            if stream.delivered == stream.tokens:
                stream.ticket.settle(so_far)
                streams.remove(stream)
            elif clock.now() - stream.last_settle >= SETTLE_EVERY_S:
                stream.ticket.progress(so_far)
                stream.last_settle = clock.now()
        for limiter in instances:
            await limiter.tick()
    return worst_minute(served), most_in_flight


def worst_minute(served: list[tuple[float, int]]) -> int:
    worst = total = 0
    start = 0
    for i, (at, tokens) in enumerate(served):
        total += tokens
        while served[start][0] <= at - 60:
            total -= served[start][1]
            start += 1
        worst = max(worst, total)
        del i
    return worst


async def test_with_the_output_cap_any_minute_is_within_the_limit() -> None:
    worst, _ = await run(cap=True)
    assert worst <= 1.02 * LIMIT, worst


async def test_without_the_output_cap_the_worst_case_is_the_overrun_of_the_requests_in_flight() -> None:
    worst, in_flight = await run(cap=False)
    reserve = PROMPT + CHOICES * DEFAULT_CAP
    overrun = CHOICES * (GENERATED - DEFAULT_CAP)
    # What fits beside each other in the window is all that can be in flight...
    assert in_flight <= LIMIT // reserve
    # ...and each of them can run past its reservation once: that is the bound, and the mix reaches past the limit.
    assert LIMIT < worst <= LIMIT + (LIMIT // reserve) * overrun, (worst, in_flight)


@pytest.mark.parametrize("cap", [True, False])
async def test_the_limit_is_used_while_demand_exceeds_it(cap: bool) -> None:
    worst, in_flight = await run(cap=cap, seconds=200.0)
    assert in_flight >= 1 and worst >= 0.7 * LIMIT
