"""The simulator's capacity: a sliding 60 s window of tokens (and requests), moved by a fake clock; nothing sleeps."""

from __future__ import annotations

import pytest

from tools.simulator.capacity import NEVER_FITS_S, UNLIMITED_REQUESTS, WINDOW_S, LeakyBucket, SlidingWindow


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
    assert not refused.admitted and refused.retry_after_s == NEVER_FITS_S and refused.remaining_tokens == 1000
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


# ---- provisioned (PTU): utilisation as a leaky bucket -------------------------------------------------------------


def bucket(tpm: int = 6000, burst_s: float = 10.0) -> tuple[LeakyBucket, Clock]:
    clock = Clock()
    return LeakyBucket(tpm, clock, burst_s), clock  # 6000/min: 100 tokens/s drain; 100 % = 1000 tokens


def test_admitted_while_not_above_100_percent_and_one_call_may_take_it_over() -> None:
    ptu, _ = bucket()
    assert ptu.admit(900).admitted
    over = ptu.admit(300)  # at 90 %: admitted, and now at 120 %
    assert over.admitted and over.utilization == pytest.approx(1.2)
    refused = ptu.admit(1)
    assert not refused.admitted and refused.limited_by == "tokens"
    assert refused.retry_after_s == pytest.approx(2.0)  # 200 tokens over, draining 100 a second


def test_the_retry_after_is_exact_and_a_refused_call_is_not_charged() -> None:
    ptu, clock = bucket()
    assert ptu.admit(1500).admitted  # an idle deployment takes one call even larger than 100 %
    for _ in range(50):
        assert not ptu.admit(400).admitted
    wait = ptu.admit(400).retry_after_s
    assert wait == pytest.approx(5.0)  # 500 over at 100 tokens/s; the refusals added nothing
    clock.t += wait - 0.01
    assert not ptu.admit(400).admitted
    clock.t += 0.01
    verdict = ptu.admit(400)
    assert verdict.admitted and verdict.utilization == pytest.approx(1.4)


def test_utilisation_drains_continuously_at_the_provisioned_rate() -> None:
    ptu, clock = bucket()
    ptu.admit(800)
    clock.t += 2.5
    assert ptu.utilization == pytest.approx(0.55)  # 800 - 250
    clock.t += 100
    assert ptu.utilization == 0.0 and ptu.used_tokens == 0  # never below empty: idle time is not banked


def test_a_finished_call_is_corrected_to_what_it_used() -> None:
    ptu, _ = bucket()
    ptu.admit(1000)  # prompt + max_tokens
    assert ptu.admit(1).admitted is True and ptu.utilization == pytest.approx(1.001)  # at exactly 100 %: not above
    ptu.settle(1, 0)
    ptu.settle(1000, 400)  # it generated far fewer tokens than max_tokens
    assert ptu.used_tokens == 400 and ptu.admit(500).admitted
    ptu.settle(500, 900)  # and one that used more than was charged (a longer prompt than counted)
    assert ptu.used_tokens == 1300 and not ptu.admit(1).admitted


@pytest.mark.parametrize("call_tokens", [37, 230, 1900])
def test_under_a_flood_the_admitted_rate_is_the_drain_rate(call_tokens: int) -> None:
    ptu, clock = bucket(tpm=30_000, burst_s=60.0)  # 500 tokens/s
    admitted = 0
    for _ in range(60_000):  # a call every 10 ms for 600 s: ~10x the capacity
        if ptu.admit(call_tokens).admitted:
            admitted += call_tokens
        clock.t += 0.01
    drained = 500 * 600
    # Everything admitted was drained, plus what the bucket holds at the end (at most 100 % and one call).
    assert drained <= admitted <= drained + ptu.full + call_tokens


def test_a_new_ptu_count_drains_at_the_new_rate_from_now() -> None:
    ptu, clock = bucket()
    ptu.admit(1000)
    clock.t += 1.0  # 900 left
    ptu.resize(12_000, None)  # twice the PTUs: 200 tokens/s, and 100 % is now 2000 tokens
    clock.t += 1.0
    assert ptu.used_tokens == 700 and ptu.utilization == pytest.approx(0.35)
    with pytest.raises(ValueError):
        ptu.resize(12_000, 10)


def test_clear_empties_the_bucket() -> None:
    ptu, _ = bucket()
    ptu.admit(5000)
    ptu.clear()
    assert ptu.used_tokens == 0 and ptu.admit(1).admitted
