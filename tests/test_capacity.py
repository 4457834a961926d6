"""The learnt PTU capacity and the pace to it: the pure parts, then whole fleets of routers driven by a fake clock
against the simulator's provisioned deployment (a leaky bucket), sharing through the in-memory store. Nothing sleeps."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import pytest

from shared.clock import FakeClock
from shared.config import Backend, BreakerRule
from shared.routing.capacity import FRESH_S, Pacer, PtuModel, learnt_rate, share_of, utilisation_wait
from shared.routing.provisioned import ProvisionedCapacity
from shared.routing.router import Router
from shared.storage.memory import MemoryBreakerStore, MemoryCapacityStore
from shared.telemetry.protocol import NullTelemetry
from tools.simulator.capacity import LeakyBucket

D = "gpt-4o"


# ---- the rate, from the instants a PTU names ---------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(230,), (37, 1900, 400), (5000, 12)])
def test_the_rate_is_exact_between_two_instants_however_bursty_the_traffic(sizes: tuple[int, ...]) -> None:
    clock = FakeClock()
    ptu = LeakyBucket(30_000, clock.monotonic, burst_s=60)  # 500 tokens/s
    charges: list[tuple[float, float]] = []
    ready: list[float] = []
    for step in range(20_000):  # ~200 s of calls every 7 to 13 ms, in bursts and lulls
        if (step // 700) % 3 != 2:
            size = sizes[step % len(sizes)]
            verdict = ptu.admit(size)
            if verdict.admitted:
                charges.append((clock.now(), size))
            else:
                ready.append(clock.now() + verdict.retry_after_s)
        clock.advance(0.01 + 0.003 * math.sin(step))
    assert len(ready) > 10
    assert learnt_rate(charges, ready, clock.now()) == pytest.approx(500, rel=0.01)


def test_only_instants_everyone_has_reported_up_to_count_and_a_long_gap_starts_a_new_run() -> None:
    charges = [(t, 100.0) for t in (10.0, 11.0, 12.0, 13.0)]
    assert learnt_rate(charges, [9.5, 12.5], known_until=20) == pytest.approx(300 / 3)
    assert learnt_rate(charges, [9.5, 12.5], known_until=12) is None  # 12.5 is beyond what all instances reported
    assert learnt_rate(charges, [9.5, 9.6], known_until=20) is None  # nothing added in between: no statement
    # 60 s without a 429: the deployment may have idled; only the run after the gap counts.
    late = charges + [(80.0, 50.0), (81.0, 50.0)]
    assert learnt_rate(late, [9.5, 12.5, 79.9, 81.9], known_until=90) == pytest.approx(100 / 2)


def test_shares_give_unused_capacity_to_whoever_wants_it_and_split_in_proportion_when_all_want_more() -> None:
    assert share_of(1000, 100, [200, 100]) == 700  # the others use 300 of 1000
    assert share_of(1000, 3000, [1000]) == pytest.approx(750)  # all want more: in proportion to demand
    assert share_of(1000, 0, []) == 1000


def test_the_pacer_keeps_the_reserve_for_high_priority_and_lets_one_call_through_when_quiet() -> None:
    pacer = Pacer(rate=100, cap=1500, tokens=1200, at=0.0)
    assert pacer.allows(200, reserve=1000, quiet=False, now=0.0)
    pacer.take(200, 0.0)
    assert not pacer.allows(200, reserve=1000, quiet=False, now=0.0)  # would dig into the reserve
    assert pacer.allows(200, reserve=0, quiet=False, now=0.0)  # high priority may
    pacer.take(1000, 0.0)  # now at 0
    assert not pacer.allows(200, reserve=0, quiet=False, now=0.0)
    assert pacer.allows(200, reserve=0, quiet=True, now=0.0)  # not overflowing: owes it, refills later
    pacer.take(200, 0.0)
    assert not pacer.allows(200, reserve=0, quiet=True, now=1.99)  # still owing
    assert pacer.allows(200, reserve=0, quiet=True, now=2.0)


def test_a_model_that_was_never_throttled_does_not_pace() -> None:
    model = PtuModel("ptu", D, "i1")
    assert all(model.admits(500, False, float(t), float(t)) for t in range(100))
    assert model.pacer is None and model.rate is None


# What a PTU's own 429 looks like (tools/simulator/server.py, provisioned_429) and what other 429s look like.
PTU_429 = {"retry-after": "1", "retry-after-ms": "420"}
QUOTA_429 = {"retry-after": "2", "retry-after-ms": "2000", "x-ratelimit-remaining-tokens": "0",
             "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-tokens": "2s"}  # the simulator's "429" fault


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        (PTU_429, 0.42),
        ({"retry-after-ms": "1"}, 0.001),
        ({"retry-after-ms": "60000"}, 60.0),
        (QUOTA_429, None),  # a per-minute quota's 429 (pay-as-you-go), or an injected fault shaped as one
        ({"retry-after-ms": "500", "x-ratelimit-limit-tokens": "30000"}, None),
        ({"retry-after": "86400", "retry-after-ms": "86400000"}, None),  # a day: a policy, not a bucket draining
        ({"retry-after": "3"}, None),  # no retry-after-ms: no instant to the millisecond
        ({}, None),  # bare
        ({"retry-after-ms": "0"}, None),
        ({"retry-after-ms": "-5"}, None),
        ({"retry-after-ms": "nan"}, None),
        ({"retry-after-ms": "inf"}, None),
        ({"retry-after-ms": "soon"}, None),
    ],
)
def test_only_a_429_shaped_as_a_provisioned_deployments_is_a_statement_about_utilisation(
    headers: dict[str, str], wait: float | None
) -> None:
    assert utilisation_wait(headers) == (pytest.approx(wait) if wait is not None else None)


def test_429s_that_say_nothing_about_utilisation_never_move_a_call_off_the_ptu() -> None:
    """The failure that reverted the first version: an e2e test's injected 429s (a quota's shape) were learnt as a
    tiny capacity, and calls the idle PTU would have served went elsewhere."""
    clock = FakeClock()
    ptu, sweden = backends()
    router = Router((ptu, sweden), clock, NullTelemetry())
    model = router.capacity.model("ptu", D)
    assert model is not None
    for _ in range(10):  # the model knows what a call costs
        assert router.acquire(ptu, D)
        router.settled(ptu, D, 300)
    for headers, trip_s in [(QUOTA_429, 2.5)] * 5 + [({"retry-after-ms": "86400000"}, 301.0), ({}, 11.0)]:
        assert router.candidates(D, 300, "normal")[0] is ptu
        assert router.acquire(ptu, D)
        router.record_failure(ptu, D, 429, headers)
        clock.advance(trip_s)  # the breaker's trip (as long as the 429 asked, within its bounds) is over
    for _ in range(500):  # then a heavy burst: 50 calls a second
        assert [b.id for b in router.candidates(D, 300, "normal")] == ["ptu", "sweden"]
        assert router.acquire(ptu, D)
        router.record_success(ptu, D, {})
        router.settled(ptu, D, 300)
        clock.advance(0.02)
    assert model.rate is None and model.pacer is None and model.diverted == 0 and not model.ready


def test_a_follow_up_that_reads_a_stored_response_is_not_charged_to_the_ptu() -> None:
    clock = FakeClock()
    ptu, sweden = backends()
    router = Router((ptu, sweden), clock, NullTelemetry())
    model = router.capacity.model("ptu", D)
    assert model is not None
    assert router.acquire(ptu, D, generates=False)
    router.record_failure(ptu, D, 429, PTU_429, generates=False)
    assert not model.charges and not model.ready and model.rate is None
    clock.advance(1.0)  # the breaker honoured the 429's 420 ms
    assert router.acquire(ptu, D)  # a generation is
    assert len(model.charges) == 1


# ---- fleets of routers against a simulated PTU -------------------------------------------------------------------


def backends(reserve: int = 0, stated: int | None = None) -> tuple[Backend, ...]:
    rule = BreakerRule(trip_s=10)
    return (
        Backend("ptu", "https://ptu.example", "uksouth", {D: D}, priority=1, ptu=True, reserve_tokens=reserve, breaker=rule,
                ptu_tokens_per_minute={D: stated} if stated else {}),
        Backend("sweden", "https://se.example", "swedencentral", {D: D}, priority=2, breaker=rule),
    )


@dataclass
class Fleet:
    """`n` gateway instances (routers sharing breakers and capacity through in-memory stores) in front of one
    simulated PTU, with a fake clock: every call takes `latency_s`, 429s take nothing."""

    n: int = 4
    tpm: int = 30_000
    reserve: int = 0
    latency_s: float = 0.05
    clock: FakeClock = field(default_factory=FakeClock)
    stated: int | None = None  # the PTU's stated capacity (ptu_tokens_per_minute)
    burst_s: float = 60  # the PTU's 100 %: this many seconds of its rate

    def __post_init__(self) -> None:
        self.ptu = LeakyBucket(self.tpm, self.clock.monotonic, burst_s=self.burst_s)
        breakers, capacity = MemoryBreakerStore(), MemoryCapacityStore()
        self.backends = backends(self.reserve, self.stated)
        self.routers = [
            Router(self.backends, self.clock, NullTelemetry(), breakers,
                   capacity=ProvisionedCapacity(self.backends, self.clock, capacity, f"i{i}"))
            for i in range(self.n)
        ]
        self.pending: list[tuple[float, Router, int]] = []  # (ends at, router, tokens): calls the PTU is serving
        self.ptu_tokens: Counter[int] = Counter()  # second -> tokens the PTU admitted
        self.served: list[tuple[float, str, str]] = []  # (time, backend, priority)
        self.ptu_429 = 0
        self.throttled_at: list[float] = []
        self.attempts_after_ptu_429 = 0
        self.requests = 0
        self.next_sync = 0.0

    async def run(self, seconds: float, rate: float, tokens: int = 230, high_rate: float = 0.0) -> None:
        """Calls at `rate` per second (round robin over the instances), plus `high_rate` high-priority ones."""
        end = self.clock.monotonic() + seconds
        step = 0.01
        owed = owed_high = 0.0
        turn = 0
        while self.clock.monotonic() < end:
            await self._sync_due()
            self._finish_due()
            owed += rate * step
            owed_high += high_rate * step
            while owed >= 1:
                owed -= 1
                self._call(self.routers[turn % self.n], tokens, "normal")
                turn += 1
            while owed_high >= 1:
                owed_high -= 1
                self._call(self.routers[turn % self.n], tokens, "high")
                turn += 1
            self.clock.advance(step)

    def _call(self, router: Router, tokens: int, priority: str) -> None:
        self.requests += 1
        for backend in router.candidates(D, 0, priority):
            if not router.acquire(backend, D):
                continue
            if backend.id == "ptu":
                verdict = self.ptu.admit(tokens)
                if not verdict.admitted:
                    self.ptu_429 += 1
                    self.throttled_at.append(self.clock.monotonic())
                    router.record_failure(backend, D, 429, {"retry-after-ms": str(math.ceil(verdict.retry_after_s * 1000))})
                    continue
                self.ptu_tokens[int(self.clock.monotonic() - 1000)] += tokens
                self.pending.append((self.clock.monotonic() + self.latency_s, router, tokens))
            router.record_success(backend, D, {})
            if backend.id != "ptu":
                router.settled(backend, D, tokens)
            self.served.append((self.clock.monotonic(), backend.id, priority))
            return
        raise AssertionError("no backend served the call")

    def _finish_due(self) -> None:
        now = self.clock.monotonic()
        for item in [p for p in self.pending if p[0] <= now]:
            self.pending.remove(item)
            self.ptu.settle(item[2], item[2])
            item[1].settled(self.backends[0], D, item[2])

    async def _sync_due(self) -> None:
        if self.clock.monotonic() >= self.next_sync:
            self.next_sync = self.clock.monotonic() + 0.5
            for router in self.routers:
                await router.capacity.sync()
                await router.capacity.exchange()  # the summary row: the news, beside the reports
                await router.sync()

    def utilisation(self, first_s: int, last_s: int, tpm: int | None = None) -> float:
        """PTU tokens admitted in [first_s, last_s) over its capacity in that time."""
        admitted = sum(self.ptu_tokens[s] for s in range(first_s, last_s))
        return admitted / ((tpm or self.tpm) / 60 * (last_s - first_s))


async def test_a_fleet_keeps_the_ptu_full_sends_the_overflow_on_and_comes_back_at_once() -> None:
    fleet = Fleet()
    await fleet.run(30, rate=1.5)  # light: the PTU (2.2 calls/s) takes everything
    assert {b for _, b, _ in fleet.served} == {"ptu"}
    requests_before = fleet.requests
    await fleet.run(180, rate=12)  # heavy: five times what the PTU takes
    # The bucket's 100 % (a minute of capacity) absorbs the first seconds; from then on, minute by minute:
    for minute in range(3):
        start = 30 + 60 * minute
        assert fleet.utilisation(start, start + 60) >= 0.95, minute
    assert fleet.utilisation(90, 210) <= 1.02  # and not more: the PTU itself caps it
    heavy = fleet.requests - requests_before
    assert fleet.ptu_429 <= 0.02 * heavy, (fleet.ptu_429, heavy)
    # Once learnt, the overflow goes on without asking the PTU: most calls never met a 429.
    assert sum(1 for t, b, _ in fleet.served if t > 1000 + 60 and b == "sweden") > 0.9 * 9 * 120
    ended = fleet.clock.monotonic()
    await fleet.run(20, rate=1.5)
    late = [b for t, b, _ in fleet.served if t >= ended + 1.0]
    assert late and set(late) == {"ptu"}  # everything back on the PTU within a second of the overflow ending


async def test_capacity_added_while_paced_is_found_by_probing() -> None:
    fleet = Fleet()
    await fleet.run(60, rate=12)
    learnt = fleet.routers[0].capacity.model("ptu", D)
    assert learnt is not None and learnt.rate == pytest.approx(500, rel=0.05)  # (a probe step may be on it)
    fleet.ptu.resize(60_000, None)  # twice the PTUs: no 429 says so, the PTU just takes what it is sent
    before = (fleet.requests, fleet.ptu_429)
    await fleet.run(90, rate=12)
    # Quiet for PROBE_AFTER_S, then the pace rises step by step until the PTU says it is full, and is learnt again.
    assert fleet.utilisation(120, 150, tpm=60_000) >= 0.95
    assert learnt.rate == pytest.approx(1000, rel=0.02)
    assert fleet.ptu_429 - before[1] <= 0.02 * (fleet.requests - before[0])


async def test_high_priority_keeps_its_share_when_the_ptu_is_full() -> None:
    fleet = Fleet(reserve=3000)
    await fleet.run(120, rate=12, high_rate=1.0)  # high wants less than half the PTU; normal wants far more
    after = [(b, p) for t, b, p in fleet.served if t > 1000 + 40]
    high = [b for b, p in after if p == "high"]
    normal = [b for b, p in after if p == "normal"]
    # All but the calls that met the PTU's (shared) breaker in the instants after a 429 it sent.
    assert high.count("ptu") >= 0.95 * len(high)
    assert 0.08 * len(normal) <= normal.count("ptu") <= 0.12 * len(normal)  # the rest of the PTU: (2.2 - 1) / 12
    assert fleet.utilisation(60, 120) >= 0.95


async def test_a_rate_no_429_confirms_is_probed_upward_and_forgotten_a_minute_after_the_last() -> None:
    fleet = Fleet()
    await fleet.run(60, rate=12)  # learnt: 500 tokens/s, most calls paced elsewhere
    model = fleet.routers[0].capacity.model("ptu", D)
    assert model is not None and model.rate == pytest.approx(500, rel=0.05)
    last_429 = fleet.clock.monotonic()
    fleet.ptu.resize(3_000_000, None)  # now it takes everything: it never refuses again, so nothing confirms the pace
    await fleet.run(FRESH_S + 15, rate=12)
    assert fleet.ptu_429 > 0 and fleet.clock.monotonic() - last_429 > FRESH_S
    rates = [r.capacity.model("ptu", D) for r in fleet.routers]
    assert all(m is not None and m.rate is None and m.pacer is None for m in rates)  # forgotten on every instance
    # Bounded: from a minute after the last 429 (plus one sync) every call is served by the PTU.
    late = [b for t, b, _ in fleet.served if t >= last_429 + FRESH_S + 1.0]
    assert late and set(late) == {"ptu"}
    # And before that the silence was probed: the pace had risen above what was learnt.
    early = [b for t, b, _ in fleet.served if last_429 + 40 <= t < last_429 + 55]
    assert early.count("ptu") > 1.5 * 0.1 * len(early)  # more than 1.5 x the 2.2 of 12 calls a second


async def test_one_429_shaped_as_a_ptus_from_an_idle_ptu_paces_it_for_at_most_a_minute() -> None:
    """A 429 the gateway cannot tell from a PTU's (a proxy's, an injected 429-ptu) on a PTU that takes everything:
    believed only until it is a minute old."""
    fleet = Fleet(tpm=3_000_000)
    await fleet.run(5, rate=12)
    router = fleet.routers[0]
    assert router.acquire(fleet.backends[0], D)
    router.record_failure(fleet.backends[0], D, 429, {"retry-after-ms": "2000"})
    start = fleet.clock.monotonic()
    await fleet.run(FRESH_S + 10, rate=12)
    assert fleet.ptu_429 == 0
    late = [b for t, b, _ in fleet.served if t >= start + 2.0 + FRESH_S + 0.5]  # a minute after the instant it named
    assert late and set(late) == {"ptu"}
    assert "sweden" in [b for t, b, _ in fleet.served if t < start + FRESH_S]  # (believed until then)


# ---- a stated capacity: paced before the first 429 ---------------------------------------------------------------


@pytest.mark.parametrize("instances", [1, 4])
async def test_a_stated_capacity_paces_a_cold_burst_with_no_learning_phase(instances: int) -> None:
    cold = Fleet(n=instances, burst_s=10)
    await cold.run(60, rate=12)  # five times what the PTU takes, from cold
    stated = Fleet(n=instances, burst_s=10, stated=30_000)
    await stated.run(60, rate=12)
    # Learning costs a run of 429s at the start (two instants at least 1 s apart teach the rate); stated, the pace is
    # right from the first call, and a 429 comes only when the probe looks for more than was stated.
    assert cold.ptu_429 >= 5 and stated.ptu_429 <= min(4, cold.ptu_429 / 4), (cold.ptu_429, stated.ptu_429)
    assert all(t > 1000 + 30 for t in stated.throttled_at)  # none before the probe's first step
    assert stated.utilisation(5, 60) >= 0.95  # and the PTU is kept full all the same
    model = stated.routers[0].capacity.model("ptu", D)
    assert model is not None and model.stated == pytest.approx(500)


async def test_a_stated_capacity_above_the_truth_is_corrected_by_the_429s_it_brings() -> None:
    fleet = Fleet(burst_s=10, stated=60_000)  # twice what the PTU takes
    await fleet.run(90, rate=12)
    model = fleet.routers[0].capacity.model("ptu", D)
    assert model is not None and model.learnt and model.rate == pytest.approx(500, rel=0.08)
    requests = fleet.requests
    before = fleet.ptu_429
    await fleet.run(60, rate=12)
    assert fleet.ptu_429 - before <= 0.02 * (fleet.requests - requests)
    assert fleet.utilisation(95, 150) >= 0.95


async def test_a_stated_capacity_below_the_truth_is_probed_upward() -> None:
    fleet = Fleet(burst_s=10, stated=15_000)  # half what the PTU takes: it never refuses at that pace
    await fleet.run(150, rate=12)
    assert fleet.utilisation(120, 150) >= 0.95  # the probe found the rest


async def test_when_the_evidence_is_gone_the_pace_is_the_stated_capacity_again_not_nothing() -> None:
    fleet = Fleet(n=1, burst_s=10, stated=30_000, tpm=30_000)
    model = fleet.routers[0].capacity.model("ptu", D)
    assert model is not None
    fleet.ptu.resize(20_000, None)  # fewer PTUs than stated: 429s teach the smaller rate
    await fleet.run(60, rate=12)
    assert model.learnt and model.rate == pytest.approx(333, rel=0.1)
    last = fleet.ptu_429
    fleet.ptu.resize(3_000_000, None)  # then it takes everything: no 429 again
    await fleet.run(FRESH_S + 10, rate=12)
    assert fleet.ptu_429 == last and not model.learnt
    assert model.pacer is not None and model.rate is not None and model.rate >= 500  # paced (stated, or probed above)


def test_health_shows_a_stated_capacity_until_one_is_learnt() -> None:
    clock = FakeClock()
    capacity = ProvisionedCapacity(backends(stated=30_000), clock)
    assert capacity.health("ptu", D) == {"stated_tokens_per_minute": 30_000,
                                         "instance_share_tokens_per_minute": 30_000, "diverted": 0}
    assert ProvisionedCapacity(backends(), clock).health("ptu", D) is None


# ---- how often the rows are read, as instances grow (issue 32) -----------------------------------------------------


async def test_the_sync_interval_grows_with_the_rows_read_so_all_instances_stay_under_the_partition_target() -> None:
    from shared.records.capacity import CapacityReport
    from shared.routing.provisioned import ROWS_PER_S, sync_interval

    clock = FakeClock()
    for n in (4, 16, 64, 256, 1000):
        store = MemoryCapacityStore()
        for i in range(n):  # one row per instance that has sent to the PTU lately
            await store.publish(CapacityReport("ptu", D, f"i{i}", clock.now(), ((clock.now(), 10.0),), (), 1.0, None))
        capacity = ProvisionedCapacity(backends(), clock, store, f"i{n}")
        await capacity.sync()
        assert capacity.rows == n
        intervals = [capacity.interval() for _ in range(50)]
        # n instances each reading n rows every interval: entities a second asked of the partition.
        assert n * n / min(intervals) <= ROWS_PER_S * (1 + 0.25)
        assert min(intervals) >= 0.5  # never more often than GATEWAY_BREAKER_SYNC_S
        assert max(intervals) <= sync_interval(0.5, n) * 1.2 + 1e-9
    assert sync_interval(0.5, 15) == 0.5  # a few instances: unchanged


async def test_a_failed_sync_waits_longer_before_the_next_not_less() -> None:
    clock = FakeClock()
    store = MemoryCapacityStore()
    capacity = ProvisionedCapacity(backends(), clock, store, "i0")
    await capacity.sync()
    calm = capacity.interval()
    store.unavailable = True
    await capacity.sync()
    await capacity.sync()
    assert capacity.sync_failures == 2
    assert min(capacity.interval() for _ in range(20)) > calm
    store.unavailable = False
    await capacity.sync()
    assert capacity.interval() == calm
