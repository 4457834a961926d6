"""bench.scale on small shapes: the real limiters of several instances on the simulated clock and account keep the
limit in every 60 s, and a trip and a PTU's 429 reach every instance through the shared rows (simulated time)."""

from __future__ import annotations

from bench.scale import run_shape


def test_one_busy_consumer_over_eight_instances_is_held_to_its_limit() -> None:
    figures = run_shape("one", 200, 8, 70.0, seed=3)
    assert figures["admitted"] > 0 and figures["refused_429"] > 0  # demand is twice the limit
    assert figures["max_any_60s_over_limit"] <= 1.0 and figures["tokens_over_limit_in_any_60s"] == 0
    assert figures["server_busy_503"] == 0  # far below every target
    assert figures["fallback_admissions"] == 0
    assert figures["ledger_ops_per_request"] > 0


def test_a_trip_and_a_ptu_429_reach_every_instance_within_a_few_sync_intervals() -> None:
    figures = run_shape("trip", 0, 8, 0.0, seed=3)
    assert figures["trip_reaches_all_s"] is not None and figures["trip_reaches_all_s"] <= 1.5
    assert figures["ptu_429_reaches_all_s"] is not None and figures["ptu_429_reaches_all_s"] <= 1.5
    assert figures["server_busy_503_after_trip"] == 0


def test_past_31_instances_the_capacity_rows_stay_under_the_partition_target() -> None:
    # 64 instances each reading every instance's capacity row every 0.5 s asked ~8,000 entities/s of one partition and
    # were throttled (issue 32); the interval now grows with the rows read.
    figures = run_shape("trip", 0, 64, 0.0, seed=3)
    assert figures["capacity_partition_peak_per_s"] <= 2_000
    assert figures["server_busy_503_after_trip"] == 0 and figures["capacity_sync_failures"] == 0
    assert figures["ptu_429_reaches_all_s"] is not None and figures["ptu_429_reaches_all_s"] <= 10


def test_a_change_reaches_every_simulated_instance_for_a_point_read_per_row_changed() -> None:
    figures = run_shape("change", 3_000, 8, 0.0, seed=3)
    assert figures["instances_with_it"] == 8  # every instance refuses the disabled key and has the lowered limit
    assert figures["listing_entities_read"] == 2 * 8  # two rows changed, one point read each per instance
    assert figures["ops_by_kind"].get("consumers.list", 0) == 0 and figures["server_busy_503"] == 0


def test_ledgers_over_two_accounts_leave_the_tables_account_and_share_the_ledger_traffic() -> None:
    # GATEWAY_LEDGER_ACCOUNTS as bench.scale simulates it: each ledger on the account its key hashes to.
    one = run_shape("many", 400, 8, 3.0, seed=3)
    two = run_shape("many", 400, 8, 3.0, seed=3, ledger_accounts=2)
    assert len(one["per_account_peak_per_s"]) == 1 and len(two["per_account_peak_per_s"]) == 3
    tables, *ledgers = two["per_account_peak_per_s"]
    assert tables < 0.2 * one["per_account_peak_per_s"][0]  # only the shared rows are left on it
    assert all(0 < peak < one["per_account_peak_per_s"][0] for peak in ledgers)
    assert two["refused_429"] == 0 and two["max_any_60s_over_limit"] <= 1.0


def test_128_instances_on_one_ledger_back_off_their_lost_races_and_keep_the_limit() -> None:
    # Issue 32: every instance's claims go to one entity with ETag-conditional writes. With fixed 0-30 ms pauses after
    # a lost race, 128 instances lost about 7 races per write that went through and 903 claims lost every attempt
    # (this shape, seed 11); the pause now grows with the contenders. Whatever the contention, never over the limit.
    figures = run_shape("one", 1000, 128, 20.0, seed=11)
    assert figures["tokens_over_limit_in_any_60s"] == 0
    ops = figures["ledger_by_purpose"]
    won = ops["writes"] - ops["lost"]
    assert won > 0 and ops["lost"] < 3 * won
    assert figures["limiter_contended"] < 300
    assert figures["admitted"] > 0.9 * figures["requests"]  # the window is not full yet: nearly every request fits


def test_256_instances_starting_with_two_claims_a_request_leave_no_admission_uncounted() -> None:
    """The start of bench.scale's one:1000:256 with 2 claims a request at most (seed 7), checked by the oracle at every
    ledger write: every instance's admissions of the last 60 s within what the ledger keeps for it. Before the fix
    (tests/test_limiter_state.py) the oracle found an instance out of its keep in these 4 s (on the code of dac9df2:
    i135 at 3.3 s, 728 tokens admitted in the minute, 300 kept for it); whole 130 s runs went up to 40,939 tokens over
    the limit (docs/scale.md)."""
    figures = run_shape("one", 1000, 256, 4.0, seed=7, oracle=True, max_claims=2)
    oracle = figures["oracle"]
    assert oracle["writes_seen"] > 500 and figures["admitted"] > 1000
    assert oracle["first_deficit"] is None, oracle.get("history")
    assert oracle["foreign_lease_changes"] == []
    assert figures["tokens_over_limit_in_any_60s"] == 0


def test_instances_starting_cold_read_the_snapshot_not_the_listing_and_refuse_no_valid_key() -> None:
    """bench.scale `cold`: N instances starting at once, each answering valid keys from its start. With the snapshot a
    few entities each (and the rows changed after it, a point read each), no listing page; `coldlist` (as before the
    snapshot) reads the listing on every instance."""
    after = run_shape("cold", 3_000, 8, 0.0, seed=3)
    assert after["all_answer_s"] is not None and after["instances_answering"] == 8
    assert after["valid_keys_refused"] == {} and after["snapshot_loads"] == 8 and after["snapshot_fallbacks"] == 0
    assert after["ops_by_kind"].get("consumers.list", 0) == 0 and after["listing_entities_read"] <= 8 * 3
    before = run_shape("coldlist", 3_000, 8, 0.0, seed=3)
    assert before["listing_entities_read"] >= 8 * 3_000 and before["snapshot_loads"] == 0
