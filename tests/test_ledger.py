from __future__ import annotations

import calendar

import pytest

from shared.limits.ledger import (
    CONSUMER_SCOPE,
    Grant,
    Ledger,
    Quota,
    bucket_expiry,
    claim,
    quota_period,
    report,
)

T0 = 1_700_000_000.0
S = CONSUMER_SCOPE


def test_bucket_expiry_rounds_up_to_the_bucket_and_adds_a_minute() -> None:
    assert bucket_expiry(1_000) == 61_000
    assert bucket_expiry(1_001) == 61_500
    assert bucket_expiry(1_500) == 61_500


def test_claim_grants_up_to_what_is_free_and_holds_it_past_the_lease_lifetime() -> None:
    ledger = Ledger()
    grant = claim(ledger, "a:1", {S: 10}, {S: 600}, {S: 1000}, None, T0, 2000)
    assert grant == Grant({S: 600}, 0, {})
    now_ms = int(T0 * 1000)
    assert ledger.occupancy(S, now_ms) == 600
    # The hold lasts until the lease's last possible admission has left the window.
    assert ledger.occupancy(S, now_ms + 61_999) == 600
    assert ledger.occupancy(S, now_ms + 62_000) == 0
    second = claim(ledger, "b:1", {S: 10}, {S: 600}, {S: 1000}, None, T0, 2000)
    assert second == Grant({S: 400}, 0, {})


def test_claim_refuses_below_need_and_says_when_it_would_fit() -> None:
    ledger = Ledger()
    claim(ledger, "a:1", {S: 1}, {S: 900}, {S: 1000}, None, T0, 2000)
    grant = claim(ledger, "b:1", {S: 200}, {S: 200}, {S: 1000}, None, T0, 2000)
    assert grant.tokens == {} and "b:1" not in ledger.leases
    refusal = grant.refused[S]
    assert refusal.wait_ms == 62_000
    assert not refusal.quota_exhausted


def test_report_replaces_the_hold_with_real_usage_by_admission_time() -> None:
    ledger = Ledger()
    claim(ledger, "a:1", {S: 1}, {S: 900}, {S: 1000}, None, T0, 2000)
    now_ms = int(T0 * 1000)
    used = {S: {bucket_expiry(now_ms + 100): 300}}
    report(ledger, "a:1", used, None, None, 300, 0, 0, T0 + 1)
    assert ledger.leases == {}
    assert ledger.occupancy(S, now_ms + 1000) == 300
    # It leaves the window a minute after it was admitted (rounded up to the bucket), not a minute after the report.
    assert ledger.occupancy(S, now_ms + 60_499) == 300
    assert ledger.occupancy(S, now_ms + 60_500) == 0
    assert ledger.wait_ms(S, 800, 1000, now_ms + 1000) == 59_500


def test_report_can_trim_a_lease_to_what_it_still_holds() -> None:
    ledger = Ledger()
    claim(ledger, "a:1", {S: 1}, {S: 900}, {S: 1000}, None, T0, 2000)
    now_ms = int(T0 * 1000)
    report(ledger, "a:1", {S: {bucket_expiry(now_ms): 500}}, {S: 400}, None, 500, 0, 0, T0)
    assert ledger.leases["a:1"].tokens == {S: 400}
    assert ledger.occupancy(S, now_ms) == 900


def test_corrections_can_refund_and_never_go_negative() -> None:
    ledger = Ledger()
    now_ms = int(T0 * 1000)
    e = bucket_expiry(now_ms)
    report(ledger, None, {S: {e: 500}}, None, None, 0, 0, 0, T0)
    report(ledger, None, {S: {e: -400}}, None, None, 0, 0, 0, T0)
    assert ledger.occupancy(S, now_ms) == 100
    report(ledger, None, {S: {e: -400}}, None, None, 0, 0, 0, T0)
    assert ledger.occupancy(S, now_ms) == 0
    assert S not in ledger.windows


def test_unlimited_scope_is_granted_without_holding_anything() -> None:
    ledger = Ledger()
    grant = claim(ledger, "a:1", {"d:x": 5}, {"d:x": 50}, {"d:x": 0}, None, T0, 2000)
    assert grant == Grant({"d:x": 50}, 0, {})
    assert ledger.leases == {}


def test_quota_counts_holds_and_usage_and_returns_what_was_not_used() -> None:
    ledger = Ledger()
    quota = Quota(1000, "daily")
    grant = claim(ledger, "a:1", {S: 10}, {S: 600}, {S: 0}, quota, T0, 2000)
    assert grant.quota_tokens == 600
    assert ledger.quota_used == 600
    key = quota_period("daily", T0)[0]
    report(ledger, "a:1", {S: {bucket_expiry(int(T0 * 1000)): 250}}, None, key, 250, 600, 0, T0 + 1)
    assert ledger.quota_used == 250
    grant = claim(ledger, "b:1", {S: 10}, {S: 2000}, {S: 0}, quota, T0 + 2, 2000)
    assert grant.quota_tokens == 750
    refusal = claim(ledger, "c:1", {S: 10}, {S: 10}, {S: 0}, quota, T0 + 3, 2000).refused[S]
    assert refusal.quota_exhausted
    assert refusal.quota_reset_s == quota_period("daily", T0)[1]


def test_quota_resets_with_the_period() -> None:
    ledger = Ledger()
    quota = Quota(100, "hourly")
    start = 1_700_000_000 - 1_700_000_000 % 3600
    assert claim(ledger, "a:1", {S: 100}, {S: 100}, {S: 0}, quota, start + 10, 2000).tokens == {S: 100}
    assert claim(ledger, "a:2", {S: 1}, {S: 1}, {S: 0}, quota, start + 20, 2000).refused[S].quota_exhausted
    assert claim(ledger, "a:3", {S: 100}, {S: 100}, {S: 0}, quota, start + 3600, 2000).tokens == {S: 100}


@pytest.mark.parametrize(
    ("period", "now", "key", "reset"),
    [
        ("hourly", "2026-11-26T17:46:55", "2026-11-26T17", "2026-11-26T18:00:00"),
        ("daily", "2026-11-26T17:46:55", "2026-11-26", "2026-11-27T00:00:00"),
        ("weekly", "2026-11-26T17:46:55", "2026-W48", "2026-11-30T00:00:00"),
        ("monthly", "2026-12-31T23:59:59", "2026-12", "2027-01-01T00:00:00"),
        ("yearly", "2026-11-26T17:46:55", "2026", "2027-01-01T00:00:00"),
    ],
)
def test_quota_periods_are_fixed_utc_windows(period: str, now: str, key: str, reset: str) -> None:
    def parse(text: str) -> float:
        date, clock = text.split("T")
        return float(calendar.timegm(tuple(map(int, date.split("-") + clock.split(":"))) + (0, 0, 0)))  # type: ignore[arg-type]

    assert quota_period(period, parse(now)) == (key, parse(reset))


def test_expired_lease_keeps_its_quota_charged_until_reported() -> None:
    ledger = Ledger()
    quota = Quota(1000, "yearly")
    claim(ledger, "a:1", {S: 1}, {S: 100}, {S: 0}, quota, T0, 2000)
    key = quota_period("yearly", T0)[0]
    # The instance could not report for longer than the hold: the lease is gone from the ledger, its grant stays charged.
    later = T0 + 70
    ledger.prune(int(later * 1000))
    assert ledger.leases == {} and ledger.quota_used == 100
    report(ledger, "a:1", {}, None, key, 40, 100, 0, later)
    assert ledger.quota_used == 40


def test_entity_round_trip() -> None:
    ledger = Ledger()
    claim(ledger, "a:1", {S: 1}, {S: 100, "d:x": 50}, {S: 1000, "d:x": 500}, Quota(10_000, "daily"), T0, 2000)
    report(ledger, None, {S: {bucket_expiry(int(T0 * 1000)): 7}}, None, None, 0, 0, 0, T0)
    again = Ledger.from_entity(ledger.to_entity())
    assert again == ledger
