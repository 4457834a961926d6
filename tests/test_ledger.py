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


def test_a_holding_moves_to_when_usage_is_learnt() -> None:
    from shared.limits.ledger import Holding

    now_ms = int(T0 * 1000)
    e0 = bucket_expiry(now_ms)
    holding = Holding(600, e0)
    # 30 s in, 150 tokens delivered: they are charged now, and the unused 450 of the reservation move with them.
    step = holding.step(150, now_ms + 30_000, final=False)
    e1 = bucket_expiry(now_ms + 30_000)
    assert step == {e0: -600, e1: 600}
    assert (holding.hold, holding.served) == (450, 150)
    # 85 s in: the admission bucket has left the window; only the newer buckets matter.
    step = holding.step(700, now_ms + 85_000, final=False)
    e2 = bucket_expiry(now_ms + 85_000)
    assert step == {e1: -450, e2: 550}
    assert (holding.hold, holding.served) == (0, 700)
    # The end: what was reported beyond what was charged is charged now, nothing is held any more.
    step = holding.step(720, now_ms + 95_000, final=True)
    assert step == {bucket_expiry(now_ms + 95_000): 20}


def test_a_holding_settled_once_refunds_the_unused_reservation_and_charges_the_usage_at_settle_time() -> None:
    from shared.limits.ledger import Holding

    now_ms = int(T0 * 1000) + 1
    e0 = bucket_expiry(now_ms)
    assert Holding(1000, e0).step(300, now_ms + 200, final=True) == {e0: -700}  # the same bucket
    late = bucket_expiry(now_ms + 70_000)
    assert Holding(100, e0).step(900, now_ms + 70_000, final=True) == {late: 900}


def test_usage_of_an_ended_quota_period_is_carried_into_the_current_one() -> None:
    from shared.limits.ledger import begin_period

    hour = 3600 * (int(T0) // 3600)
    quota = Quota(10_000, "hourly")
    ledger = Ledger()
    claim(ledger, "a:1", {S: 100}, {S: 100}, {S: 0}, quota, hour + 3599.5, 2000)
    assert ledger.quota_used == 100
    old_key = ledger.quota_key
    begin_period(ledger, quota, hour + 3601)
    assert ledger.quota_key > old_key and ledger.quota_used == 0
    report(ledger, "a:1", {S: {bucket_expiry(int((hour + 3601) * 1000)): 900}}, None, old_key, 900, 100, 0, hour + 3601)
    assert ledger.quota_used == 800


# ---- debt: an overrun is carried until it is paid (issue 24) ---------------------------------------------------------


def test_tokens_above_the_limit_stay_in_the_window_until_the_debt_is_paid() -> None:
    ledger = Ledger()
    now_ms = int(T0 * 1000)
    claim(ledger, "a:1", {S: 1}, {S: 1}, {S: 10_000}, None, T0, 2000)  # records the scope's limit
    e = bucket_expiry(now_ms)
    report(ledger, "a:1", {S: {e: 95_000}}, None, None, 0, 0, 0, T0)  # ten requests ran far past their reservations
    # It leaves the window at the limit's pace: 10,000 a minute, not all 60 s later.
    assert ledger.occupancy(S, e - 1) == 95_000
    assert ledger.occupancy(S, e) == 85_000
    assert ledger.occupancy(S, e + 7 * 60_000) == 15_000
    assert ledger.occupancy(S, e + 8 * 60_000) == 5_000
    assert ledger.occupancy(S, e + 9 * 60_000) == 0
    # The scope stays closed until its occupancy falls back under the limit; the wait says so.
    assert ledger.wait_ms(S, 1_000, 10_000, now_ms) == e + 8 * 60_000 - now_ms
    refused = claim(ledger, "b:1", {S: 1_000}, {S: 1_000}, {S: 10_000}, None, T0 + 300, 2000)
    assert refused.tokens == {} and refused.refused[S].wait_ms == e + 8 * 60_000 - int((T0 + 300) * 1000)
    granted = claim(ledger, "c:1", {S: 1_000}, {S: 5_000}, {S: 10_000}, None, (e + 8 * 60_000) / 1000, 2000)
    assert granted.tokens == {S: 5_000}


def test_the_debt_is_the_same_however_often_the_ledger_is_written_and_read_back() -> None:
    now_ms = int(T0 * 1000)
    e = bucket_expiry(now_ms)
    seen: list[list[int]] = []
    for step_ms in (500, 7_000, 61_000, 300_000):
        ledger = Ledger(limits={S: 1_000})
        report(ledger, None, {S: {e: 3_600, e + 20_000: 700}}, None, None, 0, 0, 0, T0)
        profile = []
        for at in range(now_ms, e + 6 * 60_000, step_ms):
            ledger = Ledger.from_entity(ledger.to_entity())
            ledger.prune(at)  # every write prunes (and rolls) first
        for at in range(e + 6 * 60_000, e + 8 * 60_000, 30_000):
            profile.append(ledger.occupancy(S, at))
        seen.append(profile)
    assert all(p == seen[0] for p in seen)
    # 4,300 tokens against a 1,000 limit leave at 1,000 a minute: the last 300 of them 4 min 20 s after the first bucket.
    fresh = Ledger(limits={S: 1_000}, windows={S: {e: 3_600, e + 20_000: 700}})
    fresh.prune(now_ms)
    for minute in range(5):
        left = [fresh.occupancy(S, at) for at in range(e + minute * 60_000 - 60_000, e + minute * 60_000, 500)]
        assert left[0] - left[-1] <= 1_000
    assert fresh.occupancy(S, e + 4 * 60_000) == 300
    assert fresh.occupancy(S, e + 4 * 60_000 + 20_000) == 0


def test_without_a_known_limit_or_under_it_nothing_is_carried() -> None:
    now_ms = int(T0 * 1000)
    e = bucket_expiry(now_ms)
    for ledger in (Ledger(windows={S: {e: 5_000}}), Ledger(limits={S: 10_000}, windows={S: {e: 5_000, e + 1_000: 5_000}})):
        before = ledger.copy()
        ledger.prune(now_ms)
        assert ledger.windows == before.windows


def test_a_huge_debt_is_carried_in_bounded_steps_and_space() -> None:
    now_ms = int(T0 * 1000)
    e = bucket_expiry(now_ms)
    ledger = Ledger(limits={S: 1}, windows={S: {e: 10**12}})
    ledger.prune(now_ms)
    assert len(ledger.windows[S]) <= 241 and sum(ledger.windows[S].values()) == 10**12
    later = now_ms + 3_600_000
    ledger.prune(later)  # an hour later it is still owed, laid out again from then
    assert ledger.occupancy(S, later) == 10**12 - 60 and len(ledger.windows[S]) <= 241


def test_leases_are_spread_over_properties_each_a_whole_json_object_under_the_property_limit() -> None:
    import orjson

    from shared.limits.ledger import LEASE_PROPERTY_CHARS, Lease, lease_properties, read_lease_properties

    leases = {f"{i:012x}:{i}": Lease({"*": 300 + i, "d:gpt-4o": 7}, 1_700_000_000_000 + i, i % 3) for i in range(3_000)}
    props = lease_properties(leases)
    assert list(props) == ["leases"] + [f"leases_{i}" for i in range(1, len(props))] and len(props) > 3
    for text in props.values():
        assert len(text) <= LEASE_PROPERTY_CHARS
        orjson.loads(text)  # whole entries: each property parses alone
    assert Ledger.from_entity(Ledger(leases=leases).to_entity()).leases == leases
    assert lease_properties({}) == {"leases": "{}"}
    assert read_lease_properties({}) == {}
