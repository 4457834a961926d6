from __future__ import annotations

from shared.clock import FakeClock
from shared.edge.keyguard import FailureThrottle, LookupBudget, UnknownKeys


def test_the_budget_allows_its_rate_and_a_small_burst_never_more() -> None:
    clock = FakeClock()
    budget = LookupBudget(2.0, clock)
    assert [budget.take() for _ in range(5)] == [True, True, False, False, False]
    granted = 0
    for _ in range(4):
        clock.advance(0.25)
        granted += budget.take()
    assert granted == 2  # one second: two lookups
    clock.advance(3600)
    assert sum(budget.take() for _ in range(10)) == 2  # idle time does not bank more than the burst


def test_a_zero_budget_never_looks_up() -> None:
    clock = FakeClock()
    budget = LookupBudget(0.0, clock)
    clock.advance(100)
    assert not budget.take()


def test_unknown_keys_are_bounded_and_expire() -> None:
    clock = FakeClock()
    unknown = UnknownKeys(clock, ttl_s=60, cap=100)
    for i in range(1000):
        unknown.add(f"{i:064x}")
    assert len(unknown) == 100
    assert f"{999:064x}" in unknown and f"{0:064x}" not in unknown
    clock.advance(61)
    assert f"{999:064x}" not in unknown


def test_the_throttle_counts_per_address_forgets_after_its_window_and_is_bounded() -> None:
    clock = FakeClock()
    throttle = FailureThrottle(3, clock, window_s=60, cap=50)
    for _ in range(3):
        assert throttle.retry_after("a") is None
        throttle.failed("a")
    retry = throttle.retry_after("a")
    assert retry is not None and 59 <= retry <= 60
    assert throttle.retry_after("b") is None
    clock.advance(60)
    assert throttle.retry_after("a") is None
    for i in range(10_000):
        throttle.failed(f"addr-{i}")
    assert len(throttle) == 50
