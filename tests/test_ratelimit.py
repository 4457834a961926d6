"""The distributed limiter against its in-memory store twin, with a fake clock: no sleeping."""

from __future__ import annotations

import random
from typing import Any

import pytest

from shared.clock import FakeClock
from shared.edge.errors import GatewayError, render
from shared.limits.ledger import CONSUMER_SCOPE
from shared.limits.ledger_copy import read_ledger
from shared.limits.limiter import LimitTicket, TokenLimiter
from shared.outcomes import RateLimited, Refusal
from shared.records.consumers import Consumer, Limits
from shared.storage.memory import MemoryLedgerStore
from shared.telemetry.protocol import NullTelemetry

DEPLOYMENT = "gpt-4o"


def consumer(tpm: int = 1000, quota: int = 0, period: str | None = None, per_deployment: int = 0) -> Consumer:
    return Consumer(
        id="team-a",
        name="Team A",
        key_hash="h",
        key_prefix="gw-x",
        limits=Limits(
            tokens_per_minute=tpm,
            deployment_tokens_per_minute={DEPLOYMENT: per_deployment} if per_deployment else {},
            quota=quota,
            quota_period=period,
        ),
    )


def limiter(store: MemoryLedgerStore, clock: FakeClock, **options: object) -> TokenLimiter:
    return TokenLimiter(store, clock, NullTelemetry(), background=False, **options)  # type: ignore[arg-type]


async def admit_all(lim: TokenLimiter, c: Consumer, reserve: int, count: int) -> tuple[int, GatewayError | None]:
    admitted = 0
    for _ in range(count):
        try:
            ticket = await lim.admit(c, DEPLOYMENT, reserve)
        except Refusal as refusal:
            error = render(refusal)
            return admitted, error
        ticket.settle(reserve)
        admitted += reserve
    return admitted, None


async def test_admits_up_to_the_limit_then_answers_429_with_the_true_wait() -> None:
    clock = FakeClock()
    lim = limiter(MemoryLedgerStore(), clock)
    admitted, error = await admit_all(lim, consumer(), 100, 20)
    assert admitted == 1000
    assert error is not None and error.status == 429 and error.code == "rate_limit_exceeded"
    # Everything was admitted now, so room returns a minute from now (rounded up to the half-second bucket).
    wait_ms = int(error.headers["retry-after-ms"])
    assert 60_000 <= wait_ms <= 61_000
    assert error.headers["retry-after"] == str(-(-wait_ms // 1000))
    assert error.headers["x-ratelimit-limit-tokens"] == "1000"


async def test_the_window_slides_so_a_boundary_burst_is_not_admitted_twice() -> None:
    clock = FakeClock(start=1_700_000_040.0)
    lim = limiter(MemoryLedgerStore(), clock)
    clock.advance(19.9)  # just before a whole minute
    assert (await admit_all(lim, consumer(), 100, 10))[0] == 1000
    clock.advance(0.2)  # a fixed per-minute window would reset here
    admitted, error = await admit_all(lim, consumer(), 100, 1)
    assert admitted == 0 and error is not None
    clock.advance(61)
    await lim.tick()
    assert (await admit_all(lim, consumer(), 100, 10))[0] == 1000


async def test_refunds_after_the_response_make_room_at_once() -> None:
    lim = limiter(MemoryLedgerStore(), FakeClock())
    c = consumer()
    for _ in range(5):
        ticket = await lim.admit(c, DEPLOYMENT, 500)  # reserve prompt + max_tokens ...
        ticket.settle(100)  # ... charge what the backend reported
    admitted, error = await admit_all(lim, c, 100, 10)
    assert admitted == 500 and error is not None  # 5 x 100 charged, so 500 more fit


async def test_a_request_larger_than_the_whole_limit_is_refused_without_retry() -> None:
    lim = limiter(MemoryLedgerStore(), FakeClock())
    with pytest.raises(Refusal) as caught:
        await lim.admit(consumer(tpm=1000), DEPLOYMENT, 1001)
    assert render(caught.value).status == 429 and render(caught.value).code == "tokens_exceed_limit"
    assert render(caught.value).headers["x-should-retry"] == "false"


async def test_per_deployment_limit_applies_beside_the_consumer_limit() -> None:
    lim = limiter(MemoryLedgerStore(), FakeClock())
    c = consumer(tpm=10_000, per_deployment=300)
    admitted, error = await admit_all(lim, c, 100, 10)
    assert admitted == 300 and error is not None and error.headers["x-ratelimit-limit-tokens"] == "300"
    other = await lim.admit(c, "gpt-4o-mini", 100)
    other.settle(100)


async def test_quota_exhaustion_answers_403_with_the_reset_time() -> None:
    clock = FakeClock(start=1_700_000_000.0)
    lim = limiter(MemoryLedgerStore(), clock)
    c = consumer(tpm=0, quota=500, period="hourly")
    admitted, error = await admit_all(lim, c, 100, 10)
    assert admitted == 500
    assert error is not None and error.status == 403 and error.code == "quota_exceeded"
    assert error.headers["x-ratelimit-remaining-quota-tokens"] == "0"
    hour_end = 1_700_000_000 - 1_700_000_000 % 3600 + 3600
    assert error.headers["x-ratelimit-reset-quota-tokens"] == f"{hour_end - 1_700_000_000}s"
    clock.advance(hour_end - clock.now() + 1)
    await lim.tick()
    assert (await admit_all(lim, c, 100, 3))[0] == 300


async def test_quota_is_charged_what_the_backend_reported() -> None:
    clock = FakeClock()
    store = MemoryLedgerStore()
    lim = limiter(store, clock)
    c = consumer(tpm=0, quota=10_000, period="daily")
    for _ in range(5):
        (await lim.admit(c, DEPLOYMENT, 1000)).settle(123)
    clock.advance(10)
    await lim.tick()  # idle: the lease is released
    await lim.tick()
    ledger, _ = await read_ledger(store, "team-a")
    assert ledger.quota_used == 5 * 123
    assert ledger.leases == {}


async def test_headers_report_the_consumers_own_remaining_tokens() -> None:
    lim = limiter(MemoryLedgerStore(), FakeClock())
    c = consumer(tpm=1000, quota=5000, period="daily")
    ticket = await lim.admit(c, DEPLOYMENT, 100)
    assert ticket.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(ticket.headers["x-ratelimit-remaining-tokens"]) == 900
    assert int(ticket.headers["x-ratelimit-remaining-quota-tokens"]) == 4900


async def test_room_is_what_the_remaining_headers_say_and_none_without_limits() -> None:
    lim = limiter(MemoryLedgerStore(), FakeClock())
    assert lim.room(consumer(tpm=0), DEPLOYMENT) is None
    c = consumer(tpm=1000, quota=5000, period="daily", per_deployment=800)
    assert lim.room(c, DEPLOYMENT) == 800  # nothing known yet: the tightest scope, whole
    ticket = await lim.admit(c, DEPLOYMENT, 100)
    assert lim.room(c, DEPLOYMENT) == 700 == int(ticket.headers["x-ratelimit-remaining-tokens"])
    assert lim.room(c, "gpt-4o-mini") == 900  # the deployment's own limit does not apply there
    other = limiter(MemoryLedgerStore(), FakeClock())
    quota_only = consumer(tpm=0, quota=300, period="daily")
    (await other.admit(quota_only, DEPLOYMENT, 100)).settle(100)
    assert other.room(quota_only, DEPLOYMENT) == 200


async def test_store_outage_fails_open_to_this_instances_share_and_reconciles_later() -> None:
    clock = FakeClock()
    store = MemoryLedgerStore()
    lim = limiter(store, clock, instance_count=4)
    c = consumer(tpm=1000, quota=100_000, period="daily")
    store.unavailable = True
    admitted, error = await admit_all(lim, c, 50, 10)
    assert admitted == 250  # a quarter of the limit
    assert error is not None and error.status == 429
    assert lim.fallback_admissions == 5
    store.unavailable = False
    clock.advance(2)
    await lim.tick()
    ledger, _ = await read_ledger(store, "team-a")
    held = sum(lease.quota_tokens for lease in ledger.leases.values())
    assert ledger.quota_used - held == 250  # what was admitted during the outage is charged to the quota
    assert sum(ledger.windows[CONSUMER_SCOPE].values()) == 250  # and counted in the window
    # Counting resumes against the shared ledger, without a restart.
    assert (await admit_all(lim, c, 50, 100))[0] == 750


async def test_store_outage_fails_closed_when_configured() -> None:
    store = MemoryLedgerStore()
    store.unavailable = True
    lim = limiter(store, FakeClock(), fail_closed=True)
    with pytest.raises(Refusal) as caught:
        await lim.admit(consumer(), DEPLOYMENT, 10)
    assert render(caught.value).status == 503 and render(caught.value).code == "limiter_unavailable"


async def test_limits_changed_by_the_admin_apply_to_the_next_request() -> None:
    lim = limiter(MemoryLedgerStore(), FakeClock())
    assert (await admit_all(lim, consumer(tpm=500), 100, 10))[0] == 500
    assert (await admit_all(lim, consumer(tpm=800), 100, 10))[0] == 300


@pytest.mark.parametrize(
    ("limit", "requests_per_step", "max_round_trips"),
    [
        # ~1.5 admitted requests a second: capacity frees a request at a time, so claims are frequent.
        (20_000, (0, 3), 3.0),
        # ~35 admitted requests a second, demand twice that: a claim serves many requests. (0.16 before a remembered
        # refusal was checked with a write whenever the instance's own lease rest and refunds would fit the request:
        # ~25% more writes at saturation, ~1% more of the limit admitted; issue 24.)
        (600_000, (2, 5), 0.22),
    ],
)
async def test_many_instances_never_admit_more_than_the_limit_in_any_minute(
    limit: int, requests_per_step: tuple[int, int], max_round_trips: float
) -> None:
    """Four instances share one ledger; random demand above the limit; every 60-second span is checked."""
    rng = random.Random(7)
    clock = FakeClock(start=1_700_000_000.0)
    store = MemoryLedgerStore()
    instances = [limiter(store, clock, instance_count=4, instance_id=f"i{i}") for i in range(4)]
    c = consumer(tpm=limit)
    admissions: list[tuple[float, int]] = []
    open_tickets: list[tuple[float, LimitTicket, int]] = []
    for step in range(6000):  # 0.05 s per step: five minutes
        clock.advance(0.05)
        now = clock.now()
        for _, ticket, actual in [t for t in open_tickets if t[0] <= now]:
            ticket.settle(actual)
        open_tickets = [t for t in open_tickets if t[0] > now]
        for _ in range(rng.randint(*requests_per_step)):
            lim = rng.choice(instances)
            reserve = rng.randint(50, 400)
            actual = rng.randint(reserve // 4, reserve)
            try:
                ticket = await lim.admit(c, DEPLOYMENT, reserve)
            except Refusal:
                continue
            admissions.append((now, actual))
            open_tickets.append((now + rng.uniform(0.05, 2.0), ticket, actual))
        if step % 2 == 0:
            for lim in instances:
                await lim.tick()
    times = [t for t, _ in admissions]
    worst = total = j = 0
    for t, tokens in admissions:
        total += tokens
        while times[j] <= t - 60:
            total -= admissions[j][1]
            j += 1
        worst = max(worst, total)
    assert worst <= limit
    # Budget is not stranded: over the full minutes after the first, nearly the whole limit is used.
    per_minute = [sum(a for t, a in admissions if start <= t - 1_700_000_000 < start + 60) for start in (60, 120, 180, 240)]
    assert min(per_minute) >= 0.9 * limit, per_minute
    round_trips = (store.reads + store.writes) / len(admissions)
    assert round_trips <= max_round_trips, (store.reads, store.writes, len(admissions))


async def test_a_burst_of_concurrent_first_requests_is_admitted_not_refused() -> None:
    """A fresh instance, many requests at once, ample limit: they share the claims, none is refused for arriving
    together (each write is slow here, so they all pile up behind the first)."""
    import asyncio

    class SlowStore(MemoryLedgerStore):
        async def write(self, consumer_id: str, ledger: Any, etag: str | None) -> str:
            await asyncio.sleep(0.01)
            return await super().write(consumer_id, ledger, etag)

    store = SlowStore()
    lim = limiter(store, FakeClock())
    c = consumer(tpm=10_000_000)
    tickets = await asyncio.gather(*(lim.admit(c, DEPLOYMENT, 200) for _ in range(64)))
    assert len(tickets) == 64
    assert store.writes <= 4, store.writes


async def test_losing_every_write_to_other_instances_is_not_a_store_outage() -> None:
    """Contention must not switch an instance to its local fallback share, which would admit beyond the shared limit."""

    class AlwaysBeaten(MemoryLedgerStore):
        async def write(self, consumer_id: str, ledger: Any, etag: str | None) -> str:
            self.writes += 1
            from shared.storage.protocols import Conflict

            raise Conflict("someone else wrote first")

    lim = limiter(AlwaysBeaten(), FakeClock(), instance_count=1)
    with pytest.raises(Refusal) as caught:
        await lim.admit(consumer(tpm=1000), DEPLOYMENT, 100)
    assert render(caught.value).status == 429
    assert lim.fallback_admissions == 0 and lim.contended > 0


# ---- what is learnt late is charged when it is learnt (issue 13) ---------------------------------------------------


async def settle_and_sync(lim: TokenLimiter, clock: FakeClock) -> None:
    clock.advance(5)  # idle past the lease lifetime: the next ticks release the lease with its usage
    await lim.tick()
    await lim.tick()


async def test_an_overrun_learnt_after_a_minute_is_charged_to_the_next_minute() -> None:
    clock = FakeClock()
    store = MemoryLedgerStore()
    lim = limiter(store, clock)
    c = consumer(tpm=1000)
    ticket = await lim.admit(c, DEPLOYMENT, 100)
    clock.advance(70)  # a long generation: its admission bucket has left the window
    ticket.settle(900)
    await settle_and_sync(lim, clock)
    ledger, _ = await read_ledger(store, "team-a")
    assert ledger.occupancy(CONSUMER_SCOPE, int(clock.now() * 1000)) == 900
    with pytest.raises(RateLimited):
        await lim.admit(c, DEPLOYMENT, 200)


async def test_a_stream_settled_as_it_goes_stays_in_the_window_while_it_runs() -> None:
    clock = FakeClock()
    store = MemoryLedgerStore()
    lim = limiter(store, clock)
    c = consumer(tpm=1000)
    ticket = await lim.admit(c, DEPLOYMENT, 600)  # prompt 100 + a cap of 500
    delivered = 100
    for _ in range(40):  # three minutes of a slow stream, a step every 4.5 s
        clock.advance(4.5)
        delivered += 5
        ticket.progress(delivered)
        await lim.tick()
    # 180 s after admission, the stream's last minute (65 tokens) and the unused part of its reservation (300) are
    # in the window: what fits beside them is admitted, and not a token more.
    other = await lim.admit(c, DEPLOYMENT, 600)
    other.settle(600)
    with pytest.raises(RateLimited):
        await lim.admit(c, DEPLOYMENT, 100)

    async def occupancy() -> int:
        await settle_and_sync(lim, clock)
        ledger, _ = await read_ledger(store, "team-a")
        return ledger.occupancy(CONSUMER_SCOPE, int(clock.now() * 1000))

    before = await occupancy()
    # Going past the reservation (600) is charged while the stream runs, not only at its end. (Each check moves the
    # clock 5 s, so one or two steps of the stream's oldest 5 tokens may leave the window meanwhile.)
    ticket.progress(900)
    after = await occupancy()
    assert before + 300 - 10 <= after <= before + 300
    ticket.settle(950)
    assert after + 50 - 10 <= await occupancy() <= after + 50


async def test_usage_settled_just_after_the_quota_period_resets_is_charged_to_the_new_period() -> None:
    hour_end = 1_700_000_000 - 1_700_000_000 % 3600 + 3600
    clock = FakeClock(start=hour_end - 1.0)
    store = MemoryLedgerStore()
    lim = limiter(store, clock)
    c = consumer(tpm=0, quota=100_000, period="hourly")
    ticket = await lim.admit(c, DEPLOYMENT, 100)
    held, _ = await read_ledger(store, "team-a")
    old_hour = held.quota_used  # what the old hour counted: the instance's lease, at least the 100 reserved
    assert old_hour >= 100
    clock.advance(3)  # the hour turns while the request runs
    ticket.settle(5_000)
    await settle_and_sync(lim, clock)
    ledger, _ = await read_ledger(store, "team-a")
    # What the old hour did not count is charged to the new hour, never dropped.
    assert ledger.quota_key == time_key(hour_end) and ledger.quota_used == 5_000 - old_hour


def time_key(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H", time.gmtime(t))


# ---- an overrun is debt, carried until it is paid (issue 24) -------------------------------------------------------


async def sustained_use(lim: TokenLimiter, clock: FakeClock, c: Consumer, reserve: int, used: int, minutes: int) -> int:
    """Tokens a consumer that keeps asking (every 0.5 s) gets through in `minutes`, each request reserving `reserve`
    (no max_tokens: the default output estimate), generating for 20 s and using `used`."""
    total = 0
    running: list[tuple[float, LimitTicket]] = []
    for _ in range(minutes * 120):
        try:
            ticket = await lim.admit(c, DEPLOYMENT, reserve)
        except RateLimited:
            pass
        else:
            assert isinstance(ticket, LimitTicket)
            running.append((clock.now() + 20, ticket))
        clock.advance(0.5)
        for done in [r for r in running if r[0] <= clock.now()]:
            running.remove(done)
            done[1].settle(used)
            total += used
        await lim.tick()
    for _, ticket in running:
        ticket.settle(used)
        total += used
    return total


@pytest.mark.parametrize("instances", [1, 3])
async def test_requests_that_outrun_their_reservation_cannot_sustain_more_than_the_limit(instances: int) -> None:
    clock = FakeClock()
    store = MemoryLedgerStore()
    lims = [limiter(store, clock, instance_id=f"i{n}") for n in range(instances)]
    c = consumer(tpm=10_000)
    total = 0
    for lim in lims:  # each instance in turn: the debt is in the shared ledger, not in one instance's memory
        total += await sustained_use(lim, clock, c, 1_032, 9_532, 10 // instances)
    minutes = 10 // instances * instances
    # The issue measured ~95,000 a minute. Now: the limit a minute, plus what was in flight at the end (<= the limit's
    # worth of reservations, each outrunning it).
    assert total <= 10_000 * minutes + 10 * 9_532
    assert total >= 10_000 * (minutes - 1)  # and the consumer is not shut out once the debt is paid


# ---- near the limit: finished requests' reservations do not refuse (issue 24) ------------------------------------


async def test_a_finished_requests_reservation_neither_refuses_nor_counts_as_used() -> None:
    """The issue's sequence: 1,500 TPM, a call every 0.2 s reserving 1,032 (no max_tokens) and using 48, each done in
    0.15 s. Every call that fits beside what was really used is admitted; the first that does not is told the real use
    and the real wait."""
    clock = FakeClock()
    lim = limiter(MemoryLedgerStore(), clock)
    c = consumer(tpm=1500)
    used = 0
    first_at = clock.now()
    for call in range(1, 11):
        ticket = await lim.admit(c, DEPLOYMENT, 1_032)
        assert ticket.headers["x-ratelimit-remaining-tokens"] == str(1500 - used - 1_032), call
        clock.advance(0.15)
        ticket.settle(48)
        used += 48
        assert ticket.headers["x-ratelimit-remaining-tokens"] == str(1500 - used), call
        assert lim.room(c, DEPLOYMENT) == 1500 - used
        clock.advance(0.05)
        await lim.tick()
    assert used == 480
    with pytest.raises(RateLimited) as refused:
        await lim.admit(c, DEPLOYMENT, 1_032)
    error = render(refused.value)
    assert error.headers["x-ratelimit-remaining-tokens"] == "1020"
    assert "1020 of its 1500 tokens per minute left" in error.message and "1032" in error.message
    # 12 more tokens are needed: the first call's 48 leave the window a minute after it (rounded up to the bucket).
    wait_s = int(error.headers["retry-after-ms"]) / 1000
    assert first_at + 60 <= clock.now() + wait_s <= first_at + 61
    clock.advance(wait_s)
    await lim.tick()
    (await lim.admit(c, DEPLOYMENT, 1_032)).settle(48)


async def test_a_refusal_learnt_before_requests_ended_is_checked_again_by_one_write() -> None:
    clock = FakeClock()
    store = MemoryLedgerStore()
    lim = limiter(store, clock)
    c = consumer(tpm=1500)
    running = [await lim.admit(c, DEPLOYMENT, 700), await lim.admit(c, DEPLOYMENT, 700)]
    with pytest.raises(RateLimited):
        await lim.admit(c, DEPLOYMENT, 700)  # both still running: a true refusal, remembered
    writes = lim.syncs
    with pytest.raises(RateLimited):
        await lim.admit(c, DEPLOYMENT, 700)
    assert lim.syncs == writes  # repeated from memory, no write
    for ticket in running:
        ticket.settle(50)
    (await lim.admit(c, DEPLOYMENT, 700)).settle(50)  # the refunds reach the ledger with the next write
    assert lim.syncs == writes + 1


# ---- a throttled ledger partition is not a store outage (issue 32) ------------------------------------------------


class Throttled(MemoryLedgerStore):
    """Another instance's view of a shared ledger store: every call raises `error` while it is set."""

    def __init__(self, shared: MemoryLedgerStore) -> None:
        super().__init__()
        self.shared = shared
        self.error: Exception | None = None

    async def read(self, consumer_id: str) -> Any:
        if self.error is not None:
            raise self.error
        return await self.shared.read(consumer_id)

    async def write(self, consumer_id: str, ledger: Any, etag: str | None) -> str:
        if self.error is not None:
            raise self.error
        return await self.shared.write(consumer_id, ledger, etag)


async def over_two_instances(error: Exception) -> tuple[int, int, TokenLimiter]:
    """Instance A admits the whole limit through its lease; then instance B, whose ledger calls fail with `error`,
    is asked for more in the same minute (fail mode open, the default). Returns what A and B admitted."""
    clock = FakeClock()
    shared = MemoryLedgerStore()
    a = limiter(shared, clock, instance_count=2)
    view = Throttled(shared)
    b = limiter(view, clock, instance_count=2)
    c = consumer(tpm=1000)
    by_a, _ = await admit_all(a, c, 50, 40)
    await a.tick()
    view.error = error
    by_b, error_b = await admit_all(b, c, 50, 40)
    assert error_b is not None and error_b.status == 429  # bounded either way; the question is where it stops
    assert "retry-after" in error_b.headers
    return by_a, by_b, b


async def test_a_throttled_ledger_partition_admits_nothing_beyond_the_shared_ledger() -> None:
    """503 ServerBusy on the ledger: the leases already admitted the limit, so no fallback window on top of it."""
    from shared.storage.protocols import StoreBusy

    by_a, by_b, b = await over_two_instances(StoreBusy("503 ServerBusy"))
    assert by_a == 1000
    assert by_a + by_b <= 1000, (by_a, by_b)
    assert b.fallback_admissions == 0 and b.busy > 0


async def test_a_store_that_is_down_still_fails_open_to_the_fallback_window() -> None:
    """Unchanged: any other StoreUnavailable (timeout, 500, connection refused) admits this instance's share."""
    from shared.storage.protocols import StoreUnavailable

    by_a, by_b, b = await over_two_instances(StoreUnavailable("timeout"))
    assert by_a == 1000 and by_b == 500  # limit / GATEWAY_INSTANCE_COUNT, on top: the documented open-mode cost
    assert b.fallback_admissions == 10 and b.busy == 0
