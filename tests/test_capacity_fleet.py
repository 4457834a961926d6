"""The PTU fleet's figures in the summary row (shared/routing/provisioned.py, issue 32): about once a second one instance
reads every per-instance row and writes the rate learnt from everyone's charges, their demand added up and how many
they are, so every instance paces to the PTU's rate and its own part of it at any number of instances, where each
alone reads a part of the rows fresh. Tried against hundreds of instances on the simulated account (real ETag races,
latency, throttling), uneven demand, the figures' maker gone, and gateways of the previous version. Nothing sleeps."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from bench.simtable import SimAccount, SimCapacityStore, SimClock, VirtualLoop
from shared.config import Backend
from shared.records.capacity import CapacitySummary
from shared.routing.capacity import INSTANT_MARGIN_S, PROBE, PtuModel, tokens_between
from shared.routing.provisioned import FLEET_ORPHANED, ProvisionedCapacity, fleet_interval
from shared.storage.memory import MemoryCapacityStore
from tests.test_capacity_summary import run

D = "gpt-4o"
BACKENDS = (Backend("ptu", "https://ptu.example", "uksouth", {D: D}, ptu=True),)


def known(cap: ProvisionedCapacity) -> PtuModel:
    model = cap.model("ptu", D)
    assert model is not None
    return model


def fleet(n: int, store: Any, clock: Any) -> list[ProvisionedCapacity]:
    caps = [ProvisionedCapacity(BACKENDS, clock, store, f"i{i}") for i in range(n)]
    for i, cap in enumerate(caps):
        cap._rng.seed(i)
    return caps


async def traffic(loop: VirtualLoop, clock: SimClock, caps: list[ProvisionedCapacity], seconds: float,
                  weights: list[float], rng: random.Random, ledger: list[tuple[float, float]]) -> None:
    """Each instance sends calls in proportion to its weight (100 tokens each, about 2 a second at weight 1) and
    offers twice as many (the PTU is overflowing): every charge also kept in `ledger`, the truth the rate is checked
    against."""
    end = loop.time() + seconds
    while loop.time() < end:
        await asyncio.sleep(0.05)
        now, mono = clock.now(), clock.monotonic()
        for cap, w in zip(caps, weights, strict=True):
            if rng.random() < 0.1 * w:
                model = known(cap)
                model.admits(100, False, now, mono)
                model.admits(100, False, now, mono)
                model.sent(100, now, mono)
                ledger.append((now, 100.0))


def exact_rate(ledger: list[tuple[float, float]], first: float, last: float) -> float:
    return tokens_between(ledger, first - INSTANT_MARGIN_S, last - INSTANT_MARGIN_S) / (last - first)


def test_every_one_of_256_instances_paces_to_the_rate_learnt_from_everyones_charges_and_its_own_part() -> None:
    async def scenario(loop: VirtualLoop) -> dict[str, Any]:
        clock = SimClock(loop)
        account = SimAccount(11)
        caps = fleet(256, SimCapacityStore(account), clock)
        rng = random.Random(11)
        weights = [3.0 if i % 3 == 0 else 1.0 for i in range(256)]  # a third of them get three times the others' calls
        for cap in caps:
            loop.call_later(rng.uniform(0, 1), cap.start)
        ledger: list[tuple[float, float]] = []
        await traffic(loop, clock, caps, 20, weights, rng, ledger)
        # The PTU names two instants 10 s apart, each to one instance (two 429s).
        first_at = clock.now()
        known(caps[7]).refused(0.0, 0.3, clock.now(), clock.monotonic())
        await traffic(loop, clock, caps, 10, weights, rng, ledger)
        known(caps[200]).refused(0.0, 0.3, clock.now(), clock.monotonic())
        last_at = clock.now()
        # Within the silence after which the pace is probed upward (at least 5 s: PROBE_AFTER_S), so that the rates
        # read are the learnt one, not a probe's step above it.
        await traffic(loop, clock, caps, 4, weights, rng, ledger)
        now = clock.now()
        figures = {
            "truth": exact_rate(ledger, first_at + 0.3, last_at + 0.3),
            "rates": [known(c).rate for c in caps],
            "complete": [known(c).rate_complete for c in caps],
            "shares": [known(c).share or 0.0 for c in caps],
            "makers": sum(1 for c in caps if c.fleet_reads),
            "queries": sum(c.fleet_reads for c in caps),
            "rows_peak": account.counts.partition_peak("capacity", int(now) - 20),
            "summary_peak": account.counts.partition_group_peak("capacity|", int(now) - 20),
            "busy": account.counts.busy,
        }
        for cap in caps:
            await cap.close()
        return figures

    f = run(scenario)
    assert f["truth"] > 0
    # Every instance's rate is the one learnt from every instance's charges, exactly (not a part's).
    assert all(r is not None and abs(r / f["truth"] - 1) < 1e-6 for r in f["rates"]), (f["truth"], f["rates"][:5])
    assert all(f["complete"])
    # The shares add up to what the pacing aims at, and each instance's is its part in proportion to its demand.
    total = f["truth"] * (1 + PROBE)
    assert abs(sum(f["shares"]) / total - 1) < 0.1
    # The instances getting three times the calls get about three times the share (each one's demand is a smoothed
    # few calls a second, so it is the groups that are compared, not each instance with its own).
    heavy = [s for i, s in enumerate(f["shares"]) if i % 3 == 0]
    light = [s for i, s in enumerate(f["shares"]) if i % 3]
    assert 2.6 < (sum(heavy) / len(heavy)) / (sum(light) / len(light)) < 3.4
    # One instance read every row for the figures, about once a second (not 256 instances each).
    assert f["makers"] <= 2 and f["queries"] <= 40
    assert f["rows_peak"] <= 1_000 and f["summary_peak"] <= 1_000 and f["busy"] == 0


def test_when_the_maker_of_the_figures_goes_another_takes_over_within_a_few_intervals() -> None:
    async def scenario(loop: VirtualLoop) -> tuple[str, str, float]:
        clock = SimClock(loop)
        store = MemoryCapacityStore()
        caps = fleet(20, store, clock)
        for cap in caps:
            known(cap).sent(100, clock.now(), clock.monotonic())
            cap.start()
        await asyncio.sleep(5)
        summary, _ = await store.read_summary("ptu", D)
        assert summary is not None and summary.members == 20
        maker = next(c for c in caps if c.instance == summary.fleet_by)
        await maker.close()  # gone (a scale-in)
        gone_at = clock.now()
        await asyncio.sleep(FLEET_ORPHANED * fleet_interval(20) + 3)
        after, _ = await store.read_summary("ptu", D)
        assert after is not None
        for cap in caps:
            await cap.close()
        return summary.fleet_by, after.fleet_by, after.fleet_at - gone_at

    before, after, made_since = run(scenario)
    assert after != before and made_since > 0


async def test_a_summary_written_by_the_previous_version_loses_no_figure_and_no_complete_rate() -> None:
    """The previous version writes the summary row without the fleet's figures (it knows none) and with the rate it
    learnt from the rows it read fresh (a part of the fleet). A new instance keeps the figures it heard and the
    complete rate it has; that version's rate is no news over it."""
    from tests.test_capacity_summary import FakeClock

    clock = FakeClock()
    now, mono = clock.now(), clock.monotonic()
    model = PtuModel("ptu", D, "i1")
    made = CapacitySummary("ptu", D, now, (now - 10, now - 1), 500.0, now - 1, True, "i0", 300, now,
                           rate_complete=True, fleet_at=now, fleet_by="i0", members=300, demand=900.0, demanders=300)
    model.hear(made, now, mono)
    assert model.rate == 500.0 and model.rate_complete
    old = CapacitySummary("ptu", D, now, (now - 10, now - 1), 80.0, now - 0.5, True, "old")  # no figures
    model.hear(old, now, mono)
    assert model.rate == 500.0 and model.fleet_fresh(now) is made  # the part's rate is not taken, the figures stay
    assert not model.covered(now)  # it has read nobody's row: what it would learn alone is a part's


def test_a_429_is_told_at_once_not_at_the_next_interval_and_a_flood_of_them_at_most_once_a_second() -> None:
    """At 1,000 instances the summary row is read (and news written) every 2 s: the instance a PTU refused writes the
    instant at once, so the others have it within their one interval. A flood of 429s on that instance wakes it at
    most once a second, and not while the summary row is failing."""

    async def scenario(loop: VirtualLoop) -> tuple[float | None, int, int]:
        clock = SimClock(loop)
        store = MemoryCapacityStore()
        now = clock.now()
        told = CapacitySummary("ptu", D, now, (), None, 0.0, False, "o1", 1000, now,
                               fleet_at=now, fleet_by="o1", members=1000)
        await store.write_summary(told, None)  # 1,000 rows: the exchange interval is 2 s
        (cap,) = fleet(1, store, clock)
        cap.start()
        await asyncio.sleep(0.3)  # its first exchange is done; the next is 2 s away
        model = known(cap)
        model.refused(0.0, 0.2, clock.now(), clock.monotonic())
        cap.told("ptu", D)
        asked = clock.now()
        reads = store.summary_reads
        await asyncio.sleep(0.1)
        summary, _ = await store.read_summary("ptu", D)
        written = summary.ready[-1] - asked if summary is not None and summary.ready else None
        for _ in range(20):  # 20 more 429s within the next second: at most one more wake-up
            await asyncio.sleep(0.05)
            model.refused(0.0, 0.2, clock.now(), clock.monotonic())
            cap.told("ptu", D)
        extra = store.summary_reads - reads
        await cap.close()
        return written, extra, store.summary_writes

    written, extra, _ = run(scenario)
    assert written is not None and abs(written - 0.2) < 0.01  # the instant (now + 0.2 s) in the row within 0.1 s
    assert extra <= 3  # the wake-up, one more a second later, maybe the regular exchange: not one per 429


def test_an_instance_whose_share_is_less_than_a_call_a_second_still_sends_its_whole_share() -> None:
    """At 1,000 instances each one's share of a PTU can be half a call a second. Calls offered at random at twice the
    share (overflowing): what the instance sends over ten minutes is its share, not less (a bucket that held one call
    and a second of share lost part of the refill between calls, and the fleet sent less than its pace)."""
    from shared.clock import FakeClock

    clock = FakeClock()
    model = PtuModel("ptu", D, "i1", stated=150.0)  # tokens/s: half a 300-token call a second
    model.settled(model.sent(300, clock.now(), clock.monotonic()), 300, clock.now(), clock.monotonic())
    rng = random.Random(3)
    sent = 0.0
    start = clock.monotonic()
    for _ in range(600 * 20):
        clock.advance(0.05)
        if rng.random() < 0.05:  # about a call a second, at random
            now, mono = clock.now(), clock.monotonic()
            if model.admits(300, False, now, mono):
                sent += model.sent(300, now, mono)
    assert model.share is not None
    seconds = clock.monotonic() - start
    assert sent / (model.share * seconds) > 0.95, (sent, model.share * seconds)
