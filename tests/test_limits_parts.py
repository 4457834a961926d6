"""The limiter's parts on their own: leases, the ledger copy, pacing, blocks and the store fallback."""

from __future__ import annotations

import pytest

from shared.clock import FakeClock
from shared.edge.errors import render
from shared.limits.fallback import Fallback
from shared.limits.leases import Holdings, LeaseState
from shared.limits.ledger import CONSUMER_SCOPE, Grant, Ledger, Refusal
from shared.limits.ledger_copy import Contended, LedgerCopy, read_ledger
from shared.limits.pacing import Pacing
from shared.limits.refused_scopes import Blocks
from shared.limits.scopes import Scopes
from shared.outcomes import Refusal as Refused
from shared.storage.memory import MemoryLedgerStore
from shared.storage.protocols import Conflict, StoreUnavailable

S = CONSUMER_SCOPE
T0 = 1_700_000_000.0


def lease(available: int = 1000, expires: float = T0 + 2) -> LeaseState:
    return LeaseState("i:1", {S: available}, expires, None, False, 0)


def test_a_failed_write_puts_every_token_back_where_it_was() -> None:
    held = Holdings(current=lease(), closing=lease(0), pending={S: {61_000: 7}})
    assert held.current is not None and held.closing is not None
    held.current.take((S,), 100, 61_500, T0)
    held.closing.unreported = {S: {60_500: 40}}
    out = held.detach(True, True, T0, typical=100)
    assert held.pending == {} and held.current.unreported == {} and out.anything
    held.restore(out, mono=5.0)
    assert held.current.unreported == {S: {61_500: 100}}
    assert held.closing.unreported == {S: {60_500: 40}}
    assert held.pending == {S: {61_000: 7}}


def test_a_lease_too_small_for_a_request_is_released_by_the_write_not_kept() -> None:
    held = Holdings(current=lease(available=50))
    out = held.detach(True, True, T0, typical=100)
    assert held.current is None and out.old_keep is None
    ledger = Ledger()
    out.report(ledger, T0)
    assert held.committed(out, 1.0) is False and out.old is not None and out.old.released


def test_a_correction_after_its_lease_was_released_becomes_pending_usage() -> None:
    held = Holdings()
    released = lease()
    released.released = True
    held.settle(released, (S,), 61_500, -30, "2026-12-01", mono=3.0)
    assert held.pending == {S: {61_500: -30}} and held.pending_quota_key == "2026-12-01" and held.pending_since == 3.0


class Flaky(MemoryLedgerStore):
    def __init__(self, conflicts: int) -> None:
        super().__init__()
        self.left = conflicts

    async def write(self, consumer_id: str, ledger: dict[str, object], etag: str | None) -> str:
        if self.left:
            self.left -= 1
            self.writes += 1
            raise Conflict("someone else")
        return await super().write(consumer_id, ledger, etag)


async def test_the_copy_rereads_after_a_conflict_and_gives_up_as_contended() -> None:
    clock = FakeClock(start=T0)
    copy = LedgerCopy()
    store = Flaky(conflicts=2)
    ledger, _ = await copy.commit(store, "c", clock, lambda led, now: True)
    assert store.reads == 3 and store.writes == 3 and copy.have
    # The next write goes on the cached copy: no read.
    await copy.commit(store, "c", clock, lambda led, now: True)
    assert store.reads == 3 and store.writes == 4
    with pytest.raises(Contended):
        await copy.commit(Flaky(conflicts=100), "c", clock, lambda led, now: True)


async def test_nothing_to_write_on_a_cached_copy_is_confirmed_on_a_fresh_read() -> None:
    clock = FakeClock(start=T0)
    store = MemoryLedgerStore()
    copy = LedgerCopy()
    await copy.commit(store, "c", clock, lambda led, now: True)
    reads = store.reads
    await copy.commit(store, "c", clock, lambda led, now: False)
    assert store.reads == reads + 1 and store.writes == 1


async def test_an_unavailable_store_forgets_the_copy() -> None:
    store = MemoryLedgerStore()
    copy = LedgerCopy(ledger=Ledger(), have=True)
    store.unavailable = True
    with pytest.raises(StoreUnavailable):
        await copy.commit(store, "c", FakeClock(), lambda led, now: True)
    assert not copy.have


def test_blocks_hold_a_refused_scope_until_its_wait_and_a_grant_lifts_them() -> None:
    blocks = Blocks()
    scopes = Scopes({S: 1000}, None)
    blocks.record(Grant({}, 0, {S: Refusal(S, 4_000)}), T0)
    assert blocks.refusal(scopes, T0 + 3.9) is not None and blocks.refusal(scopes, T0 + 4.0) is None
    blocks.record(Grant({S: 10}, 0), T0 + 1)
    assert blocks.refusal(scopes, T0 + 2) is None


def test_pacing_wants_a_lifetime_at_the_recent_rate_within_a_share_of_the_limit() -> None:
    pace = Pacing(rate=100.0, typical=50.0)
    needs, wants = pace.wants({S: 100_000}, None, Blocks(), 50, (S,), T0, 2.0, 0.1)
    assert needs == {S: 50} and wants == {S: 200}  # 2 s at 100 tokens/s
    pace.rate = 1_000_000.0
    assert pace.wants({S: 100_000}, None, Blocks(), 50, (S,), T0, 2.0, 0.1)[1] == {S: 10_000}


def test_fallback_admits_this_instances_share_then_429s_with_the_true_wait() -> None:
    fallback = Fallback()
    scopes = Scopes({S: 1000}, None)
    for _ in range(5):
        fallback.admit(scopes, 50, T0, instances=4)
    with pytest.raises(Refused) as caught:
        fallback.admit(scopes, 50, T0, instances=4)
    assert render(caught.value).status == 429 and int(render(caught.value).headers["retry-after-ms"]) > 59_000



class CountingDown(MemoryLedgerStore):
    """Switched off, and counting every attempt to use it."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0
        self.unavailable = True

    async def read(self, consumer_id: str) -> tuple[dict[str, object] | None, str | None]:
        self.attempts += 1
        return await super().read(consumer_id)

    async def write(self, consumer_id: str, ledger: dict[str, object], etag: str | None) -> str:
        self.attempts += 1
        return await super().write(consumer_id, ledger, etag)


async def test_a_store_outage_is_probed_once_per_retry_interval_not_once_per_consumer() -> None:
    from shared.limits.limiter import TokenLimiter
    from shared.records.consumers import Consumer, Limits
    from shared.telemetry.protocol import NullTelemetry

    clock = FakeClock(start=T0)
    store = CountingDown()
    limiter = TokenLimiter(store, clock, NullTelemetry(), background=False, store_retry_s=1.0)
    people = [Consumer(f"c{n}", f"c{n}", f"h{n}", "gw-x", limits=Limits(tokens_per_minute=10_000)) for n in range(200)]
    for person in people:  # every consumer admitted from the local fallback window, within one retry interval
        (await limiter.admit(person, "gpt-4o", 100)).settle(100)
        await limiter.tick()
    assert store.attempts == 1 and limiter.fallback_admissions == 200
    clock.advance(1.5)
    store.unavailable = False
    await limiter.tick()  # back: what the fallback admitted is written
    ledger, _ = await read_ledger(store, "c7")
    assert sum(ledger.windows[S].values()) == 100
