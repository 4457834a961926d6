"""The per-consumer read rate (shared/limits/local_rate.py): a token bucket per key, bounded in keys, on a fake clock."""

from __future__ import annotations

from shared.clock import FakeClock
from shared.limits.local_rate import PerKeyRate


def test_a_key_gets_its_burst_then_its_rate_and_a_wait_that_is_true() -> None:
    clock = FakeClock()
    rate = PerKeyRate(4.0, clock)  # burst 8
    assert [rate.take("a") for _ in range(8)] == [None] * 8
    assert rate.take("a") == 1 and rate.refused == 1
    clock.advance(0.25)  # one token back
    assert rate.take("a") is None and rate.take("a") == 1
    assert rate.take("b") is None  # keys are independent


def test_over_a_long_flood_the_key_gets_the_rate_and_no_more() -> None:
    clock = FakeClock()
    rate = PerKeyRate(2.0, clock, burst=4)
    allowed = 0
    for _ in range(6_000):  # 100 tries a second for 60 simulated seconds
        allowed += rate.take("flood") is None
        clock.advance(0.01)
    assert allowed <= 4 + 2 * 60


def test_a_slow_rate_says_how_long_to_wait() -> None:
    clock = FakeClock()
    rate = PerKeyRate(0.1, clock, burst=1)
    assert rate.take("a") is None
    assert rate.take("a") == 10
    clock.advance(4)
    assert rate.take("a") == 6


def test_many_keys_cannot_grow_memory_past_the_cap() -> None:
    clock = FakeClock()
    rate = PerKeyRate(1.0, clock, cap=100)
    for i in range(10_000):
        rate.take(f"consumer-{i}")
    assert len(rate) == 100
