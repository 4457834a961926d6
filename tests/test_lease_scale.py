"""Leases last longer when many instances serve one consumer (issue 32): every instance renews its lease on the
consumer's one ledger entity about every 3/4 of a lifetime, so at 256 instances the entity was written hundreds of times
a second and most writes lost ETag races. Past 32 instances holding leases the lifetime (and the spacing of claims while
the window is full) grows with their number, up to 4 times."""

from __future__ import annotations

from shared.clock import FakeClock
from shared.limits.ledger import Lease, Ledger
from shared.limits.limiter import TokenLimiter
from shared.limits.pacing import HOLDERS_PER_LEASE, MAX_LEASE_SCALE, SHARES_AT_MOST, Pacing, lease_lifetime
from shared.limits.refused_scopes import Blocks
from shared.records.consumers import Consumer, Limits
from shared.storage.memory import MemoryLedgerStore
from shared.telemetry.protocol import NullTelemetry


def test_the_lifetime_is_the_base_up_to_32_holders_then_grows_to_four_times() -> None:
    assert [lease_lifetime(2.0, n) for n in (1, 16, HOLDERS_PER_LEASE)] == [2.0, 2.0, 2.0]
    assert lease_lifetime(2.0, 64) == 4.0
    assert lease_lifetime(2.0, 256) == lease_lifetime(2.0, 10_000) == 2.0 * MAX_LEASE_SCALE


async def lease_seconds(others: int) -> float:
    clock = FakeClock()
    store = MemoryLedgerStore()
    now_ms = int(clock.now() * 1000)
    ledger = Ledger(leases={f"i{k}:1": Lease({"*": 10}, now_ms + 61_000) for k in range(others)})
    await store.write("c", ledger.to_entity(), None)
    lim = TokenLimiter(store, clock, NullTelemetry(), background=False, instance_count=4)
    consumer = Consumer(id="c", name="c", key_hash="h", key_prefix="gw-x", limits=Limits(tokens_per_minute=10_000_000))
    (await lim.admit(consumer, "gpt-4o", 100)).settle(100)
    lease = lim._budgets["c"].held.current
    assert lease is not None
    return lease.expires_s - clock.now()


async def test_a_lease_claimed_among_many_holders_lasts_longer() -> None:
    assert await lease_seconds(3) == 2.0
    assert await lease_seconds(127) == 8.0  # 128 holders: four times the 2 s lease


async def first_lease_tokens(others: int, limit: int = 10_000_000) -> int:
    """The tokens of a cold instance's first lease (a consumer with a quota: not a quiet claim, allowance.py)."""
    clock = FakeClock()
    store = MemoryLedgerStore()
    now_ms = int(clock.now() * 1000)
    ledger = Ledger(leases={f"i{k}:1": Lease({"*": 10}, now_ms + 61_000) for k in range(others)})
    await store.write("c", ledger.to_entity(), None)
    lim = TokenLimiter(store, clock, NullTelemetry(), background=False, instance_count=4)
    consumer = Consumer(id="c", name="c", key_hash="h", key_prefix="gw-x",
                        limits=Limits(tokens_per_minute=limit, quota=10**12, quota_period="monthly"))
    ticket = await lim.admit(consumer, "gpt-4o", 100)
    lease = lim._budgets["c"].held.current
    assert lease is not None
    tokens = lease.available["*"] + 100
    ticket.settle(100)
    return tokens


async def test_a_cold_instance_among_many_holders_claims_its_even_share_not_a_request_or_two() -> None:
    # No rate measured yet: with a few holders the first lease is two requests' worth, as before.
    assert await first_lease_tokens(3) == 200
    # 128 holders: 8 s leases, and at least the limit's even share over them (10,000,000 x 8 / 60 / 128), so hundreds of
    # instances starting together do not each claim a request or two at a time.
    assert await first_lease_tokens(127) == 10_000_000 * 8 // 60 // 128
    # A small limit's even share (20 tokens here) is less than two requests: two requests, as before.
    assert await first_lease_tokens(127, limit=20_000) == 200


def test_among_many_holders_a_claim_asks_at_most_a_few_even_shares_whatever_its_rate_says() -> None:
    """Right after an instance admits its waiting requests at once, the rate it measures is a spike; a lease lifetime of
    it, on 256 instances, held 0.78-0.86 of the limit while 0.09-0.17 was admitted (bench.scale one:20000:256). With
    many holders a claim asks at most SHARES_AT_MOST (4) even shares (never less than two requests); with few, as
    before."""
    limit = 135_000_000
    pace = Pacing(rate=1_000_000.0, typical=300)  # tokens a second: a spike
    _, wants = pace.wants({"*": limit}, None, Blocks(), 300, ("*",), 0.0, 8.0, 0.1, holders=256)
    share = limit * 8 // 60 // 256
    assert wants["*"] == SHARES_AT_MOST * share
    _, few = pace.wants({"*": limit}, None, Blocks(), 300, ("*",), 0.0, 2.0, 0.1, holders=8)
    assert few["*"] == 2_000_000  # few holders: a lifetime of the rate measured, as before
    small = Pacing(rate=1_000_000.0, typical=300)
    _, tiny = small.wants({"*": 20_000}, None, Blocks(), 300, ("*",), 0.0, 8.0, 0.1, holders=256)
    assert tiny["*"] == 600  # two requests, though four shares are 40 tokens
