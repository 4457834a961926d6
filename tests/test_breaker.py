from __future__ import annotations

import pytest

from shared.config import BreakerRule
from shared.routing.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from shared.waits import retry_after_s

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "Tue, 14 Nov 2023 22:13:40 GMT"}, 20.0),
        ({"x-ratelimit-reset-requests": "1m30s"}, 90.0),
        ({"x-ratelimit-reset-tokens": "20ms"}, 0.02),
        ({"x-ratelimit-reset-tokens": "6m0s"}, 360.0),
        ({"retry-after-ms": "nan", "retry-after": "3"}, 3.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after-ms": "-5"}, None),
        ({}, None),
    ],
)
def test_retry_after_parsing(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_s(headers, NOW) == (pytest.approx(expected) if expected is not None else None)


def test_trip_length_takes_the_backends_word_within_the_cap() -> None:
    breaker = Breaker(BreakerRule(trip_s=10, max_trip_s=300))
    assert breaker.trip_length(429, {"retry-after": "86400"}, NOW) == 300
    assert breaker.trip_length(429, {"retry-after-ms": "2500"}, NOW) == 2.5
    assert breaker.trip_length(429, {}, NOW) == 10
    ignoring = Breaker(BreakerRule(trip_s=10, accept_retry_after=False))
    assert ignoring.trip_length(429, {"retry-after": "2"}, NOW) == 10


def test_trips_after_the_configured_failures_within_the_interval() -> None:
    breaker = Breaker(BreakerRule(failures=3, interval_s=10))
    assert breaker.on_failure(NOW, "500", 5) is None
    assert breaker.on_failure(NOW + 11, "500", 5) is None  # the first one has left the interval
    assert breaker.on_failure(NOW + 12, "500", 5) is None
    transition = breaker.on_failure(NOW + 13, "500", 5)
    assert transition is not None and transition.state == OPEN and transition.until == NOW + 18
    assert not breaker.usable(NOW + 17.9)


def test_half_open_lets_one_probe_through_and_success_closes() -> None:
    breaker = Breaker(BreakerRule())
    breaker.on_failure(NOW, "429", 5)
    assert breaker.acquire(NOW + 4) == (False, None)
    allowed, transition = breaker.acquire(NOW + 5)
    assert allowed and transition is not None and transition.state == HALF_OPEN
    assert breaker.acquire(NOW + 5.1) == (False, None)  # the probe is out
    closed = breaker.on_success(NOW + 5.2)
    assert closed is not None and closed.state == CLOSED
    assert breaker.acquire(NOW + 5.3) == (True, None)


def test_a_failed_probe_trips_again() -> None:
    breaker = Breaker(BreakerRule(failures=5))
    for i in range(5):
        breaker.on_failure(NOW + i * 0.1, "503", 5)
    breaker.acquire(NOW + 6)
    transition = breaker.on_failure(NOW + 6.1, "503", 5)
    assert transition is not None and transition.state == OPEN and transition.until == pytest.approx(NOW + 11.1)


def test_a_lost_probe_frees_the_slot_after_a_while() -> None:
    breaker = Breaker(BreakerRule())
    breaker.on_failure(NOW, "429", 1)
    assert breaker.acquire(NOW + 1)[0]
    assert not breaker.acquire(NOW + 2)[0]
    assert breaker.acquire(NOW + 40)[0]


def test_adopting_shared_state_only_when_newer() -> None:
    breaker = Breaker(BreakerRule())
    transition = breaker.adopt(OPEN, NOW + 30, NOW, "429", NOW + 0.2)
    assert transition is not None and transition.state == OPEN and not breaker.usable(NOW + 1)
    assert breaker.adopt(OPEN, NOW + 10, NOW - 5, "429", NOW + 1) is None  # older news
    closed = breaker.adopt(CLOSED, 0, NOW + 2, "", NOW + 2.5)  # another instance's probe succeeded
    assert closed is not None and closed.state == CLOSED and breaker.usable(NOW + 3)
    assert breaker.adopt(OPEN, NOW + 30, NOW, "429", NOW + 4) is None  # the old trip does not come back


def test_timeouts_from_one_caller_never_trip_the_breaker() -> None:
    breaker = Breaker(BreakerRule(failures=1, timeout_failures=3, timeout_callers=2))
    for i in range(20):
        assert breaker.on_timeout(NOW + i, "one-caller", 10.0) is None
    assert breaker.state == CLOSED


def test_timeouts_trip_as_a_rate_across_callers_within_the_interval() -> None:
    breaker = Breaker(BreakerRule(interval_s=60, timeout_failures=3, timeout_callers=2))
    assert breaker.on_timeout(NOW, "a", 10.0) is None
    assert breaker.on_timeout(NOW + 1, "a", 10.0) is None
    # Out of the interval before the third: no trip.
    assert breaker.on_timeout(NOW + 100, "b", 10.0) is None
    assert breaker.on_timeout(NOW + 101, "a", 10.0) is None
    transition = breaker.on_timeout(NOW + 102, "c", 10.0)
    assert transition is not None and transition.state == OPEN and transition.reason == "timeout"


def test_a_half_open_probe_that_times_out_re_trips() -> None:
    breaker = Breaker(BreakerRule(timeout_failures=3, timeout_callers=2))
    breaker.trip(NOW, "500", 5.0)
    assert breaker.acquire(NOW + 6)[0] and breaker.state == HALF_OPEN
    assert breaker.on_timeout(NOW + 7, "a", 5.0) is not None and breaker.state == OPEN


def test_a_last_resort_is_a_backend_out_on_the_gateways_judgement_only() -> None:
    breaker = Breaker(BreakerRule(trip_s=2, max_trip_s=20))
    assert not breaker.last_resort(0.0)  # closed: an ordinary candidate
    breaker.on_failure(0.0, "500", 2.0)
    assert breaker.last_resort(1.0)  # a trip the gateway chose: the backend might serve
    breaker.begin(2.5)  # the trip is over and a probe is out: nothing else may go, except as a last resort
    assert breaker.state == HALF_OPEN and not breaker.usable(2.6) and breaker.last_resort(2.6)
    breaker.on_failure(3.0, "429", 20.0)
    breaker.asked(3.0, 23.0)  # the backend asked for 20 s (a Retry-After): no last resort until then
    assert not breaker.last_resort(10.0) and not breaker.last_resort(22.9)
    assert breaker.usable(23.0)
    breaker.on_success(23.1)
    assert breaker.asked_until == 0.0
    # A probe or a last resort that fails again: no last resort until the trip it brings is over.
    breaker.on_failure(23.2, "500", 2.0)
    assert breaker.last_resort(23.5)  # one failure from closed: still only a guess
    breaker.on_failure(23.6, "500", 2.0)  # a last resort that failed as well
    assert not breaker.last_resort(24.0) and breaker.open_until == 25.6
    assert breaker.last_resort(25.6) is False and breaker.usable(25.6)  # its trip is over: an ordinary probe again
    breaker.begin(25.7)
    breaker.on_timeout(27.7, "caller", 2.0)  # the probe timed out
    assert breaker.state == OPEN and not breaker.last_resort(28.0)
    refused = Breaker(BreakerRule())
    refused.trip(0.0, "401", 60.0)  # the gateway's credential refused: every request would fail
    assert not refused.last_resort(1.0)
