"""The simulator's capacity: a sliding 60 s window of tokens (and requests), moved by a fake clock; nothing sleeps."""

from __future__ import annotations

import pytest

from tools.simulator.capacity import UNLIMITED_REQUESTS, WINDOW_S, SlidingWindow


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def window(tpm: int, rpm: int | None = None) -> tuple[SlidingWindow, Clock]:
    clock = Clock()
    return SlidingWindow(tpm, rpm, clock), clock


def test_no_double_burst_at_a_minute_boundary() -> None:
    limiter, clock = window(1000)
    clock.t = 1059.0  # the last second of a fixed minute
    assert limiter.admit(1000).admitted
    clock.t = 1061.0  # a fixed-minute limiter would have reset at 1060 and let another 1000 through
    refused = limiter.admit(1)
    assert not refused.admitted
    assert refused.retry_after_s == pytest.approx(58.0)
    assert refused.remaining_tokens == 0 and refused.limited_by == "tokens"
    clock.t = 1059.0 + WINDOW_S
    assert limiter.admit(1000).admitted


@pytest.mark.parametrize(
    ("request_tokens", "expected_wait"),
    [
        (1, 30.0),  # the t=0 entry (300) is enough: 0 + 60 - 30
        (300, 30.0),
        (301, 40.0),  # needs the t=0 and t=10 entries
        (600, 40.0),
        (601, 50.0),  # all three
        (1000, 50.0),  # exactly the capacity: fits once the window is empty
    ],
)
def test_retry_after_is_the_time_until_enough_tokens_leave_the_window(request_tokens: int, expected_wait: float) -> None:
    limiter, clock = window(1000)
    for at, tokens in ((1000.0, 300), (1010.0, 300), (1020.0, 400)):
        clock.t = at
        assert limiter.admit(tokens).admitted
    clock.t = 1030.0
    refused = limiter.admit(request_tokens)
    assert not refused.admitted and refused.retry_after_s == pytest.approx(expected_wait)
    clock.t = 1030.0 + expected_wait - 0.001
    assert not limiter.admit(request_tokens).admitted
    clock.t = 1030.0 + expected_wait
    assert limiter.admit(request_tokens).admitted


def test_a_refused_request_is_not_charged() -> None:
    limiter, _ = window(1000)
    assert limiter.admit(900).admitted
    assert not limiter.admit(200).admitted
    verdict = limiter.admit(100)
    assert verdict.admitted and verdict.remaining_tokens == 0
    assert limiter.used_tokens == 1000


def test_a_request_larger_than_the_whole_capacity_is_refused_even_when_idle() -> None:
    limiter, _ = window(1000)
    refused = limiter.admit(1001)
    assert not refused.admitted and refused.retry_after_s == WINDOW_S and refused.remaining_tokens == 1000
    assert limiter.admit(1000).admitted


def test_remaining_tokens_count_down_and_come_back() -> None:
    limiter, clock = window(1000)
    assert limiter.admit(250).remaining_tokens == 750
    clock.t += 20
    assert limiter.admit(250).remaining_tokens == 500
    clock.t += 40  # the first charge has left the window
    assert limiter.admit(0).remaining_tokens == 750
    assert limiter.admit(0).remaining_requests == UNLIMITED_REQUESTS


def test_requests_per_minute_slide_too() -> None:
    limiter, clock = window(100_000, rpm=2)
    assert limiter.admit(1).remaining_requests == 1
    clock.t += 5
    assert limiter.admit(1).remaining_requests == 0
    clock.t += 5
    refused = limiter.admit(1)
    assert not refused.admitted and refused.limited_by == "requests"
    assert refused.retry_after_s == pytest.approx(50.0)  # until the first request leaves
    clock.t += 50
    assert limiter.admit(1).admitted


def test_when_tokens_and_requests_both_bind_the_later_wins() -> None:
    limiter, clock = window(1000, rpm=3)
    for tokens in (100, 800, 100):
        assert limiter.admit(tokens).admitted
        clock.t += 10
    # One request slot frees when the first entry leaves (t+60), 850 tokens only when the second does (t+70).
    refused = limiter.admit(850)
    assert not refused.admitted and refused.limited_by == "tokens"
    assert refused.retry_after_s == pytest.approx(40.0)


def test_live_capacity_change_applies_to_what_the_window_holds() -> None:
    limiter, clock = window(1000)
    assert limiter.admit(600).admitted
    clock.t += 10
    assert limiter.admit(300).admitted
    limiter.resize(500, None)  # now over the new limit: nothing fits until enough has left
    refused = limiter.admit(1)
    assert not refused.admitted and refused.retry_after_s == pytest.approx(50.0)
    limiter.resize(5000, 1)
    assert not limiter.admit(1).admitted  # 2 requests in the window, 1 allowed
    limiter.resize(5000, None)
    assert limiter.admit(4000).admitted


def test_clear_empties_the_window() -> None:
    limiter, _ = window(1000, rpm=1)
    assert limiter.admit(1000).admitted
    limiter.clear()
    assert limiter.admit(1000).admitted
