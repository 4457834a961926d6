"""The PTU summary row (issue 32): one row per PTU deployment that every instance point-reads and writes, on its ETag,
only with news, so a PTU's 429 reaches every instance within about a second at any number of instances. The tests
try to break it: concurrent writers losing races, stale contributions, a flood of 429s on hundreds of instances, a
throttled store, and gateways of the previous version that only write their own rows. Time is simulated (bench's
VirtualLoop and SimAccount: per-operation latency, real ETag races); nothing sleeps."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from bench.simtable import T0, SimAccount, SimCapacityStore, SimClock, VirtualLoop
from shared.clock import FakeClock
from shared.config import Backend
from shared.records.capacity import CapacityReport, CapacitySummary
from shared.routing.capacity import COALESCE_S, FRESH_S, HORIZON_S, PtuModel, merge_summary
from shared.routing.provisioned import (
    ROWS_TRUSTED_S,
    SUMMARY_MAX_PAUSE_S,
    SUMMARY_READS_PER_S,
    ProvisionedCapacity,
    summary_interval,
    sync_interval,
)
from shared.storage.memory import MemoryCapacityStore
from shared.storage.protocols import StoreBusy

D = "gpt-4o"
BACKENDS = (Backend("ptu", "https://ptu.example", "uksouth", {D: D}, ptu=True),)
T = TypeVar("T")


def run(coro_fn: Callable[[VirtualLoop], Awaitable[T]]) -> T:
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(coro_fn(loop))
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


def throttled_429(model: PtuModel, now: float, mono: float, wait_s: float = 0.8) -> None:
    """One call sent to the PTU and refused with a provisioned deployment's 429 (`wait_s` until it is at 100 %)."""
    model.refused(model.sent(230, now, mono), wait_s, now, mono)


def known(cap: ProvisionedCapacity) -> PtuModel:
    model = cap.model("ptu", D)
    assert model is not None
    return model


# ---- the merge, pure ------------------------------------------------------------------------------------------------


def test_a_merge_keeps_both_sides_instants_a_second_apart_and_the_rate_with_the_newer_basis() -> None:
    now = T0
    current = CapacitySummary("ptu", D, now - 5, (now - 30.0, now - 10.0), 400.0, now - 10.0, True, "i1")
    merged = merge_summary(current, "ptu", D, [now - 9.5, now - 20.0, now + 0.8], 500.0, now + 0.8, False, "i2", now)
    # -9.5 is within a second of -10: no news, not kept twice; the others are.
    assert merged.ready == (now - 30.0, now - 20.0, now - 10.0, now + 0.8)
    assert (merged.rate, merged.rate_from, merged.rate_learnt, merged.by, merged.at) == (500.0, now + 0.8, False, "i2", now)
    # An older basis loses to the row's; at the same instant, a rate learnt from two instants beats a first estimate.
    assert merge_summary(current, "ptu", D, [], 999.0, now - 20, True, "i3", now).rate == 400.0
    first = CapacitySummary("ptu", D, now, (now,), 900.0, now, False, "i1")
    assert merge_summary(first, "ptu", D, [], 450.0, now, True, "i2", now).rate == 450.0
    assert merge_summary(current, "ptu", D, [], None, 0.0, False, "i2", now).rate == 400.0  # no rate: the row's kept


def test_stale_contributions_expire_in_the_merge() -> None:
    now = T0
    stale = CapacitySummary("ptu", D, now - 70, (now - HORIZON_S - 5, now - 61.0), 400.0, now - FRESH_S - 1, True, "i1")
    merged = merge_summary(stale, "ptu", D, [now + 0.8], None, 0.0, False, "i2", now)
    assert merged.ready == (now + 0.8,)  # instants past the horizon are gone
    assert merged.rate is None and merged.rate_from == 0.0  # a rate no instant of the last minute confirms is gone
    # However many instants are told, the row keeps at most what spans the horizon, a second apart.
    flood = merge_summary(None, "ptu", D, [now - 59 + k * 0.01 for k in range(6000)], None, 0.0, False, "i3", now)
    assert len(flood.ready) <= HORIZON_S / COALESCE_S + 1
    assert all(b - a >= COALESCE_S - 1e-9 for a, b in zip(flood.ready, flood.ready[1:], strict=False))


def test_a_reader_takes_nothing_stale_from_the_row() -> None:
    clock = FakeClock()
    now, mono = clock.now(), clock.monotonic()
    model = PtuModel("ptu", D, "i9")
    model.hear(CapacitySummary("ptu", D, now - 70, (now - 61.0,), 400.0, now - 61.0, True, "i1"), now, mono)
    assert model.rate is None and model.pacer is None and model.evidence_at < now - FRESH_S
    # Fresh instants but a rate whose instant is older than a minute: the evidence counts, the rate does not.
    model.hear(CapacitySummary("ptu", D, now, (now - 62.0, now - 1.0), 400.0, now - 62.0, True, "i1"), now, mono)
    assert model.evidence_at == now - 1.0 and model.rate is None
    # A fresh rate is a newcomer's start, and its basis is not news to write back.
    summary = CapacitySummary("ptu", D, now, (now - 1.0,), 400.0, now - 1.0, True, "i1")
    model.hear(summary, now, mono)
    assert model.rate == 400.0 and model.pacer is not None
    assert model.news(summary, now) is None


def test_the_read_interval_keeps_every_summary_row_under_its_target_up_to_flex_s_1000_instances() -> None:
    for n in (1, 16, 64, 256, 500, 1000, 4000):
        interval = summary_interval(0.5, n)
        assert interval >= 0.5 and n / interval <= SUMMARY_READS_PER_S
    assert summary_interval(0.5, 250) == 0.5 and summary_interval(0.5, 1000) == 2.0  # a 429 reaches all in 1-3 s


# ---- instances on the simulated account -------------------------------------------------------------------------------


def fleet(n: int, store: Any, clock: Any) -> list[ProvisionedCapacity]:
    caps = [ProvisionedCapacity(BACKENDS, clock, store, f"i{i}") for i in range(n)]
    for i, cap in enumerate(caps):
        cap._rng.seed(i)
    return caps


def test_concurrent_writers_losing_etag_races_lose_no_news() -> None:
    """30 instances each told a different instant (1.5 s apart), all exchanging at the same moments: most writes lose
    the race, and every instant still ends in the row."""

    async def scenario(loop: VirtualLoop) -> tuple[ProvisionedCapacity, list[float], CapacitySummary | None, int]:
        clock = SimClock(loop)
        store = SimCapacityStore(SimAccount(3))
        caps = fleet(30, store, clock)
        instants = []
        for k, cap in enumerate(caps):
            model = known(cap)
            throttled_429(model, clock.now(), clock.monotonic(), wait_s=0.5 + 1.5 * k)
            instants.append(max(model.ready))

        async def exchanging(cap: ProvisionedCapacity) -> None:
            for _ in range(40):
                await asyncio.sleep(await cap.exchange())

        await asyncio.gather(*(exchanging(c) for c in caps))
        summary, _ = await store.twin.read_summary("ptu", D)
        return caps[0], instants, summary, sum(c.summary_races for c in caps)

    _, instants, summary, races = run(scenario)
    assert races > 0  # the race was real: writers lost to one another
    assert summary is not None
    assert all(any(abs(t - s) < 0.001 for s in summary.ready) for t in instants)  # and no instant was lost


def flood(n: int, spread_s: float, every_s: float | None) -> dict[str, Any]:
    """`n` instances sharing through the simulated account (started apart, as they are); from 5 s on, each told a
    PTU's 429 at a random moment of `spread_s`, then (with `every_s`) again about every `every_s`, for 10 s."""

    async def scenario(loop: VirtualLoop) -> dict[str, Any]:
        clock = SimClock(loop)
        account = SimAccount(5)
        caps = fleet(n, SimCapacityStore(account), clock)
        rng = random.Random(5)
        for cap in caps:
            loop.call_later(rng.uniform(0, 1), cap.start)
        await asyncio.sleep(5)
        flood_at = clock.now()
        writes_before = sum(c.summary_writes for c in caps)  # the start's: the count of rows, growing

        def refuse(cap: ProvisionedCapacity) -> None:
            throttled_429(known(cap), clock.now(), clock.monotonic())
            if every_s is not None and loop.time() < 15:
                loop.call_later(rng.uniform(0.5, 1.5) * every_s, refuse, cap)

        for cap in caps:
            loop.call_later(rng.uniform(0, spread_s), refuse, cap)
        await asyncio.sleep(12)
        figures = {
            "writes": sum(c.summary_writes for c in caps) - writes_before, "races": sum(c.summary_races for c in caps),
            "heard_by_all": all(known(c).evidence_at >= flood_at for c in caps),
            # The summary rows' failures (the per-instance rows' partition is still warming up: 200 instances started
            # at once query it, bench.scale's trip shape waits a minute for that).
            "busy": sum(c.summary_failures for c in caps),
            "summary_peak": account.counts.partition_group_peak("capacity|", 6),
        }
        for cap in caps:
            await cap.close()
        return figures

    return run(scenario)


def test_a_ptus_429s_on_200_instances_at_once_are_a_write_or_two_not_200() -> None:
    figures = flood(200, spread_s=0.5, every_s=None)
    assert figures["heard_by_all"]
    # One instant is news once, whoever has it; the other writes tell the count of per-instance rows, which doubles
    # several times here (the instances publish their first report with their first 429): about log2(200) writes.
    assert 1 <= figures["writes"] <= 1 + math.log2(200) + 2 and figures["races"] <= 20
    assert figures["busy"] == 0 and figures["summary_peak"] <= 2_000


def test_a_flood_of_429s_on_every_instance_every_second_is_writes_by_the_second_not_by_the_instance() -> None:
    # 200 instances each refused about once a second for 10 s: about 2,000 429s, each an instant.
    figures = flood(200, spread_s=1.0, every_s=1.0)
    assert figures["heard_by_all"]
    assert figures["writes"] <= 12 / COALESCE_S + math.log2(200) + 2  # a new instant a second, and the count of rows
    assert figures["races"] <= 20
    assert figures["busy"] == 0 and figures["summary_peak"] <= 2_000


class ThrottledStore(MemoryCapacityStore):
    """A store whose summary partition answers 503 ServerBusy while `busy` (with the service's Retry-After, if set)."""

    def __init__(self) -> None:
        super().__init__()
        self.busy = True
        self.retry_after_s: float | None = None
        self.asked = 0

    async def read_summary(self, backend_id: str, deployment: str) -> tuple[CapacitySummary | None, str | None]:
        self.asked += 1
        if self.busy:
            raise StoreBusy("503 ServerBusy", self.retry_after_s)
        return await super().read_summary(backend_id, deployment)


def test_a_throttled_summary_row_means_a_pause_doubling_not_a_retry_storm() -> None:
    async def scenario(loop: VirtualLoop) -> tuple[int, int, int]:
        store = ThrottledStore()
        (cap,) = fleet(1, store, SimClock(loop))
        cap.start()
        await asyncio.sleep(120)
        throttled = store.asked
        store.busy = False
        before = store.asked
        await asyncio.sleep(20)
        recovered = store.asked - before
        await cap.close()
        return throttled, recovered, cap.summary_failures

    throttled, recovered, failures = run(scenario)
    # Every 0.5 s would be 240 reads in 120 s; doubling to SUMMARY_MAX_PAUSE_S (jittered: at least half) asks far less.
    assert failures == throttled and throttled <= 8 + 120 / (SUMMARY_MAX_PAUSE_S / 2)
    assert recovered >= (20 - SUMMARY_MAX_PAUSE_S) / 0.5  # back to every 0.5 s once it answers (after one pause)


async def test_the_stores_retry_after_is_waited_at_least() -> None:
    store = ThrottledStore()
    store.retry_after_s = 30.0
    (cap,) = fleet(1, store, FakeClock())
    assert await cap.exchange() >= 30.0
    store.busy = False
    assert await cap.exchange() == 0.5


async def test_an_instance_of_the_previous_version_is_heard_through_the_rows_and_relayed_into_the_summary() -> None:
    """Rolling deploy: an old instance only publishes and reads the per-instance rows. Its 429 reaches a new instance
    through them, which writes it into the summary, where a new instance that never read the rows hears it."""
    clock = FakeClock()
    store = MemoryCapacityStore()
    old, relay, newcomer = fleet(3, store, clock)
    throttled_429(known(old), clock.now(), clock.monotonic())
    await old.sync()  # the old version: its row only
    assert store.summaries == {}
    await relay.sync()
    await relay.exchange()
    await newcomer.exchange()
    assert known(newcomer).evidence_at == max(known(old).ready)
    # And a new instance's 429 still reaches an old one: new instances keep publishing their rows.
    throttled_429(known(newcomer), clock.now() + 5, clock.monotonic() + 5)
    await newcomer.sync()
    await old.sync()
    assert known(old).evidence_at == max(known(newcomer).ready)


async def test_reports_are_still_published_and_read_beside_the_summary() -> None:
    # The summary carries the news; the charges and demand the rate and the shares are computed from stay in the rows.
    clock = FakeClock()
    store = MemoryCapacityStore()
    a, b = fleet(2, store, clock)
    throttled_429(known(a), clock.now(), clock.monotonic())
    await a.sync()
    await a.exchange()
    await b.sync()
    reports: list[CapacityReport] = await store.load()
    assert [r.instance for r in reports] == ["i0"] and reports[0].charges
    # One write of news (with the claim to make the fleet's figures), then the figures themselves.
    assert store.summary_writes - a.fleet_writes == 1 and a.summary_writes == 1 and b.rows == 1


@pytest.mark.parametrize("n", [4, 16])
async def test_news_written_once_is_not_written_again(n: int) -> None:
    clock = FakeClock()
    store = MemoryCapacityStore()
    caps = fleet(n, store, clock)
    throttled_429(known(caps[0]), clock.now(), clock.monotonic())
    for _ in range(5):
        for cap in caps:
            await cap.sync()
            await cap.exchange()
        clock.advance(0.5)
    # The news once; beside it, the fleet's figures (made by one instance, about once a second, with no claim after
    # its first) are the only other writes.
    fleet_writes = sum(c.fleet_writes for c in caps)
    assert store.summary_writes - fleet_writes == 1 and store.summary_conflicts == 0
    assert sum(c.summary_writes for c in caps) == 1 and 1 <= fleet_writes <= 2.5 / 1.0 + 1
    assert [c.fleet_reads > 0 for c in caps].count(True) == 1  # one instance read every row for them
    assert all(known(c).evidence_at == max(known(caps[0]).ready) for c in caps)


def test_a_newcomer_reads_how_many_rows_there_are_before_querying_them_and_does_not_trust_an_old_count() -> None:
    """256 instances' rows: a newcomer told so by the summary row makes its first query of them at a random moment of
    their interval (about 66 s), not at once with every other instance starting; a count older than
    ROWS_TRUSTED_S says nothing (instances may have gone), and it queries at once."""

    async def scenario(loop: VirtualLoop, counted_s_ago: float, made_s_ago: float = 0.0) -> tuple[int, int]:
        clock = SimClock(loop)
        store = MemoryCapacityStore()
        now = clock.now()
        for i in range(256):
            await store.publish(CapacityReport("ptu", D, f"o{i}", now, ((now, 10.0),), (), 1.0, None))
        # The count, and the fleet's figures another instance (o1) made a moment ago: it makes them, not a newcomer.
        told = CapacitySummary("ptu", D, now, (), None, 0.0, False, "o1", 256, now - counted_s_ago,
                               fleet_at=now - made_s_ago, fleet_by="o1", members=256)
        await store.write_summary(told, None)
        (cap,) = fleet(1, store, clock)
        cap._rng.seed(1)
        cap.start()
        await asyncio.sleep(1)
        early = store.loads
        await asyncio.sleep(sync_interval(0.5, 256) * 1.2)
        await cap.close()
        return early, store.loads

    early, later = run(lambda loop: scenario(loop, 10.0))
    assert early == 0 and later >= 1
    # The figures made by o1 until a while ago, and o1 gone: the newcomer makes them (one query) at once.
    early, _ = run(lambda loop: scenario(loop, 10.0, made_s_ago=60.0))
    assert early == 1
    # And with figures long gone and a count too old to trust: the same, at once.
    early, _ = run(lambda loop: scenario(loop, ROWS_TRUSTED_S + 1, made_s_ago=1e9))
    assert early == 1
