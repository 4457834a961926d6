"""Allowances (shared/limits/allowance.py): quiet consumers admitted without a Table round trip per request, withdrawn
as a consumer nears its limit, and the limit held in every 60 s across many instances whatever the lifetimes.

Fake clock, in-memory ledger store (the same contract as the Table store: tests/test_stores.py); nothing sleeps."""

from __future__ import annotations

import random

import pytest

from bench.figures import most_in_any_window
from shared.clock import FakeClock
from shared.limits.allowance import allowance
from shared.limits.ledger import CONSUMER_SCOPE, Ledger, Quota, claim
from shared.limits.ledger_copy import read_ledger
from shared.limits.limiter import LimitTicket, TokenLimiter
from shared.outcomes import RateLimited, Refusal
from shared.records.consumers import Consumer, Limits
from shared.storage.memory import MemoryLedgerStore
from shared.telemetry.protocol import NullTelemetry

D = "gpt-4o"
T0 = 1_700_000_000.0
S = CONSUMER_SCOPE


def consumer(name: str, tpm: int) -> Consumer:
    return Consumer(id=name, name=name, key_hash=f"h-{name}", key_prefix="gw-x", limits=Limits(tokens_per_minute=tpm))


def instances(store: MemoryLedgerStore, clock: FakeClock, count: int) -> list[TokenLimiter]:
    return [TokenLimiter(store, clock, NullTelemetry(), background=False, instance_count=count, instance_id=f"i{i}")
            for i in range(count)]


async def quiet_traffic(count: int, gateways: int, seconds: int, measure_from: int) -> tuple[float, int]:
    """`count` consumers, one request every 2 s each, spread round robin over `gateways` instances; return the ledger
    round trips per request after `measure_from` seconds, and the requests refused."""
    clock = FakeClock(start=T0)
    store = MemoryLedgerStore()
    lims = instances(store, clock, gateways)
    consumers = [consumer(f"quiet-{n}", 100_000) for n in range(count)]
    sent = [0] * count
    refused = requests = 0
    base = 0
    for tenth in range(seconds * 10):
        clock.advance(0.1)
        if tenth == measure_from * 10:
            base, requests = store.reads + store.writes, 0
        for n, c in enumerate(consumers):
            if (tenth + n * 7) % 20 == 0:  # every 2 s, consumers out of step with one another
                lim = lims[sent[n] % gateways]
                sent[n] += 1
                requests += 1
                try:
                    (await lim.admit(c, D, 300)).settle(250)
                except Refusal:
                    refused += 1
        for lim in lims:
            await lim.tick()
    return (store.reads + store.writes - base) / requests, refused


async def test_quiet_consumers_on_one_instance_cost_a_fraction_of_a_round_trip_per_request() -> None:
    per_request, refused = await quiet_traffic(count=50, gateways=1, seconds=600, measure_from=120)
    assert refused == 0
    # Before allowances every request of a consumer seen every 2 s claimed a lease: about 2 round trips per request.
    assert per_request <= 0.1, per_request


async def test_quiet_consumers_on_four_instances_cost_a_fraction_of_a_round_trip_per_request() -> None:
    per_request, refused = await quiet_traffic(count=50, gateways=4, seconds=900, measure_from=240)
    assert refused == 0
    assert per_request <= 0.15, per_request


async def test_an_allowance_is_withdrawn_as_the_consumer_nears_its_limit_and_the_limit_holds() -> None:
    """Quiet for five minutes on four instances (each holds an allowance), then demand at twice the limit."""
    limit = 60_000
    clock = FakeClock(start=T0)
    store = MemoryLedgerStore()
    lims = instances(store, clock, 4)
    c = consumer("bursty", limit)
    rng = random.Random(3)
    admissions: list[tuple[float, int]] = []
    open_tickets: list[tuple[float, LimitTicket, int]] = []
    burst_at = 300.0
    withdrawn_at: float | None = None
    checked_before = False
    for step in range(int(600 / 0.05)):
        clock.advance(0.05)
        now = clock.now() - T0
        for _, ticket, actual in [t for t in open_tickets if t[0] <= clock.now()]:
            ticket.settle(actual)
        open_tickets = [t for t in open_tickets if t[0] > clock.now()]
        # 0.2 requests/s of ~275 tokens while quiet (~6% of the limit); then 8/s: over twice the limit.
        per_step = 0.01 if now < burst_at else 0.4
        for _ in range(int(per_step) + (rng.random() < per_step % 1)):
            reserve = rng.randint(200, 400)
            actual = rng.randint(150, reserve)
            lim = rng.choice(lims)
            try:
                ticket = await lim.admit(c, D, reserve)
            except Refusal:
                continue
            admissions.append((clock.now(), actual))
            assert isinstance(ticket, LimitTicket)
            open_tickets.append((clock.now() + rng.uniform(0.1, 3.0), ticket, actual))
        if step % 2 == 0:
            for lim in lims:
                await lim.tick()
        if not checked_before and now >= burst_at - 1:
            # Before the burst every instance admits from an allowance.
            checked_before = True
            assert all(lim._budgets["bursty"].held.current is not None and lim._budgets["bursty"].held.current.allowance
                       for lim in lims)
        if now > burst_at and withdrawn_at is None and all(
            (b := lim._budgets.get("bursty")) is None or b.held.current is None or not b.held.current.allowance
            for lim in lims
        ):
            withdrawn_at = now
    assert checked_before and withdrawn_at is not None and withdrawn_at - burst_at < 30, withdrawn_at
    assert most_in_any_window(admissions) <= limit
    # Once the burst's first minute is over, the consumer gets (nearly) its whole limit every minute.
    for start in (burst_at + 60, burst_at + 120, burst_at + 180):
        got = sum(a for t, a in admissions if T0 + start <= t < T0 + start + 60)
        assert got >= 0.9 * limit, (start, got)


async def test_the_limit_holds_in_every_minute_across_eight_instances_through_quiet_and_busy_spells() -> None:
    limit = 40_000
    clock = FakeClock(start=T0)
    store = MemoryLedgerStore()
    lims = instances(store, clock, 1)  # configured as one: the count seen in the ledger must size the allowances
    lims += [TokenLimiter(store, clock, NullTelemetry(), background=False, instance_id=f"x{i}") for i in range(7)]
    c = consumer("spells", limit)
    rng = random.Random(11)
    admissions: list[tuple[float, int]] = []
    for step in range(int(900 / 0.05)):
        clock.advance(0.05)
        minute = int((clock.now() - T0) // 60)
        busy = minute % 3 == 2  # two quiet minutes, then a minute at ~3x the limit
        chance = 0.8 if busy else 0.02
        if rng.random() < chance:
            lim = rng.choice(lims)
            reserve = rng.randint(100, 600)
            try:
                ticket = await lim.admit(c, D, reserve)
            except Refusal:
                continue
            actual = rng.randint(0, reserve)
            ticket.settle(actual)
            admissions.append((clock.now(), actual))
        if step % 2 == 0:
            for lim in lims:
                await lim.tick()
    assert sum(lim.allowances for lim in lims) > 0  # the quiet spells did run on allowances
    assert most_in_any_window(admissions) <= limit


def test_allowance_sizes_from_the_rate_and_the_instances_and_stops_near_the_limit() -> None:
    ledger = Ledger()
    plan = allowance(ledger, T0, {S: 100_000}, None, rate=31.0, request_rate=0.125, typical=300, instances=4,
                     base_lifetime_s=2.0)
    assert plan is not None
    assert plan.tokens[S] <= 0.3 * 100_000 / 4  # a share of the limit per instance
    assert 60 <= plan.lifetime_s <= 256  # minutes of this consumer's requests
    # Others hold most of the window: near the limit, no allowance.
    claim(ledger, "other:1", {S: 1}, {S: 55_000}, {S: 100_000}, None, T0, 2000)
    assert allowance(ledger, T0, {S: 100_000}, None, 31.0, 0.125, 300, 4, 2.0) is None
    # A busy consumer: an allowance would not last longer than a few normal leases.
    assert allowance(Ledger(), T0, {S: 100_000}, None, 3000.0, 10.0, 300, 4, 2.0) is None
    # No history yet.
    assert allowance(Ledger(), T0, {S: 100_000}, None, 0.0, 0.0, 300, 4, 2.0) is None


def test_an_allowance_never_holds_much_of_a_quota_that_is_running_out() -> None:
    ledger = Ledger(quota_key="2023-11-14", quota_used=990_000)
    assert allowance(ledger, T0, {S: 0}, Quota(1_000_000, "daily"), 31.0, 0.125, 300, 4, 2.0) is None
    assert allowance(Ledger(), T0, {S: 0}, Quota(1_000_000, "daily"), 31.0, 0.125, 300, 4, 2.0) is not None


async def test_an_allowance_stops_at_once_when_the_admin_lowers_the_limit() -> None:
    clock = FakeClock(start=T0)
    store = MemoryLedgerStore()
    lim = instances(store, clock, 1)[0]
    before = consumer("shrinking", 100_000)
    for _ in range(60):  # one request every 2 s: the consumer is quiet, far from its limit
        clock.advance(2)
        (await lim.admit(before, D, 300)).settle(300)
        await lim.tick()
    lease = lim._budgets["shrinking"].held.current
    assert lease is not None and lease.allowance and lease.available[S] > 2_000
    # The admin lowers the limit below what the last minute used (30 requests x 300 tokens).
    after = consumer("shrinking", 2_000)
    clock.advance(2)
    with pytest.raises(RateLimited):  # not admitted from an allowance sized for the old limit
        await lim.admit(after, D, 300)
    ledger, _ = await read_ledger(store, "shrinking")
    assert not ledger.leases  # the allowance was released, its unused tokens with it
