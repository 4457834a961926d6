"""The scale bench's simulated Table Storage account (bench/simtable.py): time is simulated, a partition and the account
answer 503 ServerBusy past their targets and not below them, and conditional writes conflict exactly when another
write landed between a read and the write."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.simtable import SimAccount, SimLedgerStore, VirtualLoop
from shared.limits.ledger import Ledger
from shared.storage.protocols import Conflict, StoreUnavailable


def run(coro_fn):  # type: ignore[no-untyped-def]
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(coro_fn(loop))
    finally:
        loop.close()


def test_the_loop_jumps_time_instead_of_sleeping() -> None:
    async def main(loop: VirtualLoop) -> float:
        await asyncio.gather(asyncio.sleep(3600), asyncio.sleep(10))
        return loop.time()

    started = time.monotonic()
    assert run(main) == pytest.approx(3600)
    assert time.monotonic() - started < 30  # an hour of simulated time is not an hour


async def _load(loop: VirtualLoop, account: SimAccount, per_s: int, seconds: int, partitions: int) -> tuple[int, int]:
    store = SimLedgerStore(account)
    served = busy = 0

    async def one(n: int) -> None:
        nonlocal served, busy
        await asyncio.sleep(n / per_s)
        try:
            await store.read(f"c{n % partitions}")
            served += 1
        except StoreUnavailable as exc:
            assert "ServerBusy" in str(exc)
            busy += 1

    await asyncio.gather(*(one(n) for n in range(per_s * seconds)))
    return served, busy


@pytest.mark.parametrize("per_s, partitions, throttled", [
    (150, 1, False),  # under the partition's 200/s
    (400, 1, True),  # twice the partition's target
    (400, 4, False),  # the same load over four partitions: 100/s each
    (1500, 30, True),  # 50/s a partition, but 1.5 times the account's 1,000/s
])
def test_server_busy_past_a_partitions_or_the_accounts_target_only(per_s: int, partitions: int, throttled: bool) -> None:
    account = SimAccount(partition_rate=200, account_rate=1000, timeout_s=10)
    served, busy = run(lambda loop: _load(loop, account, per_s, 5, partitions))
    assert served + busy == per_s * 5
    if not throttled:
        assert busy == 0
    else:
        # Served about the target (plus the one second of burst), the rest refused.
        target = 200 if partitions == 1 else 1000
        assert served <= target * 6 * 1.02
        assert served >= target * 5 * 0.95
        assert account.counts.busy == busy


def test_a_conditional_write_conflicts_only_when_another_landed_between_its_read_and_write() -> None:
    async def main(loop: VirtualLoop) -> tuple[int, int, int]:
        account = SimAccount(timeout_s=10)
        store = SimLedgerStore(account)

        async def rmw(delay: float) -> bool:
            await asyncio.sleep(delay)
            ledger, etag = await store.read("c")
            try:
                await store.write("c", Ledger().to_entity(), etag)
                return True
            except Conflict:
                return False

        together = await asyncio.gather(rmw(0), rmw(0))  # both read the same version: exactly one wins
        apart = await asyncio.gather(rmw(0), rmw(2.0))  # the second reads after the first wrote: both win
        many = await asyncio.gather(*(rmw(0.0005 * n) for n in range(20)))  # overlapping cycles
        return together.count(True), apart.count(True), account.counts.conflicts - 1 - sum(not w for w in many)

    together, apart, unexplained = run(main)
    assert together == 1
    assert apart == 2
    assert unexplained == 0  # every Conflict the account counted was a loser's answer


def test_many_overlapping_writers_lose_in_proportion_to_their_overlap() -> None:
    async def main(loop: VirtualLoop) -> int:
        account = SimAccount(timeout_s=10)
        store = SimLedgerStore(account)
        wins = 0

        async def rmw(delay: float) -> None:
            nonlocal wins
            await asyncio.sleep(delay)
            _, etag = await store.read("c")
            try:
                await store.write("c", Ledger().to_entity(), etag)
                wins += 1
            except Conflict:
                pass

        # 200 cycles a second, each about 12 ms long: several overlap, so many lose; never more than one a version.
        await asyncio.gather(*(rmw(n / 200) for n in range(400)))
        assert wins == store.twin._version
        return wins

    wins = run(main)
    assert 0 < wins < 400
