"""After a 503 ServerBusy on a consumer's ledger, an instance leaves that ledger alone for a pause (issue 32): the
store's Retry-After when it sent one, else a jittered exponential pause, bounded; requests meanwhile are refused with
429 and a Retry-After reaching the pause's end, and no write is tried. Simulated too: many instances on one throttled
partition ask it less."""

from __future__ import annotations

import random
from typing import Any

import pytest

from shared.clock import FakeClock
from shared.limits.backoff import BUSY_BASE_S, BUSY_MAX_S, BusyBackoff
from shared.limits.limiter import TokenLimiter
from shared.outcomes import RateLimited
from shared.records.consumers import Consumer, Limits
from shared.storage.memory import MemoryLedgerStore
from shared.storage.protocols import StoreBusy
from shared.telemetry.protocol import NullTelemetry


def test_the_pause_doubles_with_each_busy_answer_within_its_jitter_and_bound() -> None:
    backoff = BusyBackoff(rng=random.Random(3))
    now = 100.0
    for strike in range(1, 12):
        until = backoff.busy(now)
        ceiling = min(BUSY_MAX_S, BUSY_BASE_S * 2 ** (strike - 1))
        assert ceiling / 2 <= until - now <= ceiling
        now = until
    assert backoff.strikes == 11
    backoff.cleared()
    assert backoff.busy(now) - now <= BUSY_BASE_S  # a write that went through starts again from the first pause


def test_jitter_spreads_instances_refused_together() -> None:
    pauses = {round(BusyBackoff(rng=random.Random(seed)).busy(0.0), 4) for seed in range(20)}
    assert len(pauses) > 10


@pytest.mark.parametrize(("retry_after", "expected"), [(1.5, 1.5), (600.0, BUSY_MAX_S)])
def test_retry_after_is_honoured_within_the_bound(retry_after: float, expected: float) -> None:
    assert BusyBackoff().busy(10.0, retry_after) == 10.0 + expected


class Busy(MemoryLedgerStore):
    """A ledger store whose partition is throttled while `busy` is set; counts the calls that reached it."""

    def __init__(self, retry_after_s: float | None = None) -> None:
        super().__init__()
        self.busy = True
        self.calls = 0
        self.retry_after_s = retry_after_s

    async def read(self, consumer_id: str) -> Any:
        self.calls += 1
        if self.busy:
            raise StoreBusy("503 ServerBusy", self.retry_after_s)
        return await super().read(consumer_id)

    async def write(self, consumer_id: str, ledger: Any, etag: str | None) -> str:
        self.calls += 1
        if self.busy:
            raise StoreBusy("503 ServerBusy", self.retry_after_s)
        return await super().write(consumer_id, ledger, etag)


def consumer() -> Consumer:
    return Consumer(id="c", name="c", key_hash="h", key_prefix="gw-x", limits=Limits(tokens_per_minute=100_000))


def limiter(store: MemoryLedgerStore, clock: FakeClock) -> TokenLimiter:
    return TokenLimiter(store, clock, NullTelemetry(), background=False)


async def refused(lim: TokenLimiter) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        await lim.admit(consumer(), "gpt-4o", 100)
    return caught.value


async def test_no_write_to_a_throttled_ledger_until_the_pause_ends() -> None:
    clock = FakeClock()
    store = Busy()
    lim = limiter(store, clock)
    await refused(lim)
    first = store.calls
    assert first >= 1 and lim.busy >= 1 and lim.fallback_admissions == 0
    for _ in range(20):  # requests during the pause: refused from memory, the partition is not asked
        error = await refused(lim)
        assert error.wait_ms > 0
    assert store.calls == first
    clock.advance(BUSY_MAX_S)
    store.busy = False
    (await lim.admit(consumer(), "gpt-4o", 100)).settle(100)  # the pause over, the next write goes through
    assert store.calls > first


async def test_the_stores_retry_after_sets_the_pause_and_the_clients_retry_after() -> None:
    clock = FakeClock()
    store = Busy(retry_after_s=3.0)
    lim = limiter(store, clock)
    await refused(lim)
    calls = store.calls
    error = await refused(lim)
    assert 2_900 <= error.wait_ms <= 3_000
    clock.advance(2.9)
    await refused(lim)
    assert store.calls == calls  # still within the store's Retry-After
    clock.advance(0.2)
    await refused(lim)
    assert store.calls > calls  # asked again once it has passed
