"""Budgets in currency per consumer: the book's check at admission, its spend, and its rows shared by instances."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shared.clock import FakeClock
from shared.edge.errors import GatewayError, render
from shared.limits.budget import BudgetBook, BudgetedLimiter, SpendingTelemetry
from shared.limits.tickets import NoLimits
from shared.outcomes import BudgetExceeded
from shared.records.consumers import Consumer, Limits
from shared.records.prices import Price, PriceTable
from shared.records.usage import TokenUsage
from shared.storage.memory import MemoryBudgetStore
from shared.telemetry.protocol import NullTelemetry, RequestRecord

PRICES = PriceTable("USD", {"gpt-4o": Price(2.0, 1.0, 8.0)})
START = 1_764_547_200.0  # 2025-12-01T00:00:00Z


def consumer(budget: float = 1.0, period: str | None = None, cid: str = "team-a") -> Consumer:
    return Consumer(cid, cid, "h", "gw-", limits=Limits(budget=budget, budget_period=period))


def record(cid: str = "team-a", prompt: int = 100_000, completion: int = 50_000, ptu: bool = False) -> RequestRecord:
    # 100k prompt at $2/M + 50k completion at $8/M = $0.60
    return RequestRecord(
        consumer_id=cid, client_ip="", api="openai-v1", operation="ChatCompletions_Create", user_id="",
        deployment="gpt-4o", status=200, duration_ms=1.0, ptu=ptu, usage=TokenUsage(prompt, completion, prompt + completion),
    )


def book(store: MemoryBudgetStore, clock: FakeClock, instance: str = "i1", **kw: Any) -> BudgetBook:
    return BudgetBook(store, clock, PRICES, instance, background=False, **kw)


def refused(coroutine: Any) -> GatewayError:
    with pytest.raises(BudgetExceeded) as caught:
        asyncio.run(coroutine)
    return render(caught.value)


def test_a_consumer_is_refused_once_its_spend_reaches_the_budget() -> None:
    store, clock = MemoryBudgetStore(), FakeClock(START)
    b = book(store, clock)
    c = consumer(budget=1.0)
    asyncio.run(b.check(c))
    b.spend(record())  # $0.60
    asyncio.run(b.check(c))
    b.spend(record())  # $1.20: over, with what was in flight (as API Management's quota)
    error = refused(b.check(c))
    assert (error.status, error.code) == (403, "budget_exceeded")
    assert "1.20 of 1.00 USD" in error.body().decode()
    assert b.spent("team-a") == pytest.approx(1.2)


def test_no_budget_means_no_check_and_no_spend_kept() -> None:
    store, clock = MemoryBudgetStore(), FakeClock(START)
    b = book(store, clock)
    for _ in range(3):
        asyncio.run(b.check(consumer(budget=0)))
        b.spend(record())
    asyncio.run(b.flush())
    assert store.rows == {} and store.reads == 0


def test_ptu_answers_cost_nothing_at_the_margin() -> None:
    store, clock = MemoryBudgetStore(), FakeClock(START)
    b = book(store, clock)
    asyncio.run(b.check(consumer(budget=0.5)))
    for _ in range(10):
        b.spend(record(ptu=True))
    asyncio.run(b.check(consumer(budget=0.5)))


def test_instances_share_spend_through_the_store_within_the_refresh_interval() -> None:
    store, clock = MemoryBudgetStore(), FakeClock(START)
    one, two = book(store, clock, "i1", refresh_s=5), book(store, clock, "i2", refresh_s=5)
    c = consumer(budget=1.0)
    asyncio.run(one.check(c))
    asyncio.run(two.check(c))
    one.spend(record())
    one.spend(record())
    asyncio.run(one.flush())
    asyncio.run(two.check(c))  # read less than refresh_s ago: not yet seen
    clock.advance(5)
    error = refused(two.check(c))
    assert error.code == "budget_exceeded"
    assert {(r.instance, r.nanos) for r in store.rows.values()} == {("i1", 1_200_000_000)}


def test_the_period_resets_the_spend() -> None:
    store, clock = MemoryBudgetStore(), FakeClock(START + 30 * 86400)  # 2025-12-31
    b = book(store, clock)
    c = consumer(budget=0.5)
    asyncio.run(b.check(c))
    b.spend(record())
    assert refused(b.check(c)).code == "budget_exceeded"
    clock.advance(86400)  # 2026-01-01
    asyncio.run(b.check(c))
    daily = consumer(budget=0.5, period="daily", cid="team-d")
    asyncio.run(b.check(daily))
    b.spend(record(cid="team-d"))
    assert refused(b.check(daily)).code == "budget_exceeded"
    clock.advance(86400)
    asyncio.run(b.check(daily))


def test_a_failed_save_is_carried_by_the_next_one_and_a_failed_read_fails_open() -> None:
    class Flaky(MemoryBudgetStore):
        down = True

        async def save(self, rows: list[Any]) -> None:
            if self.down:
                raise OSError("down")
            await super().save(rows)

        async def read(self, consumer: str, period: str) -> list[Any]:
            if self.down:
                raise OSError("down")
            return await super().read(consumer, period)

    store, clock = Flaky(), FakeClock(START)
    b = book(store, clock)
    asyncio.run(b.check(consumer(budget=100)))  # the store is down: admitted
    b.spend(record())
    asyncio.run(b.flush())
    b.spend(record())
    store.down = False
    asyncio.run(b.flush())
    assert [r.nanos for r in store.rows.values()] == [1_200_000_000]  # cumulative: nothing lost
    assert b.failures == 2


def test_the_budget_is_checked_before_the_limiter_and_spend_follows_telemetry() -> None:
    store, clock = MemoryBudgetStore(), FakeClock(START)
    b = book(store, clock)
    limiter, telemetry = BudgetedLimiter(NoLimits(), b), SpendingTelemetry(NullTelemetry(), b)
    c = consumer(budget=1.0)
    asyncio.run(limiter.admit(c, "gpt-4o", 0))
    telemetry.tokens_spent(record())  # an attempt whose body broke off is charged too
    telemetry.request_done(record())
    assert refused(limiter.admit(c, "gpt-4o", 0)).code == "budget_exceeded"
    asyncio.run(limiter.close())  # closing flushes the spend
    assert [r.nanos for r in store.rows.values()] == [1_200_000_000]
