"""The response-state store's contract, run against the in-memory twin and against Table Storage (Azurite)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from shared.config import load_settings
from shared.flow.pinning import RETENTION_S
from shared.records.responses import StoredResponse
from shared.storage.memory import MemoryResponseStore
from shared.storage.protocols import ResponseStore, StoreUnavailable
from shared.storage.response_table import TableResponseStore
from shared.storage.tables import Tables
from tests.conftest import unique
from tools import stack

NOW = 1_750_000_000.0


@pytest_asyncio.fixture(params=["memory", pytest.param("azurite", marks=pytest.mark.process)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ResponseStore]:
    if request.param == "memory":
        yield MemoryResponseStore()
        return
    azurite: stack.Child = request.getfixturevalue("azurite")
    env = {"GATEWAY_TABLE_CONNECTION_STRING": stack.table_connection_string(azurite.port),
           "GATEWAY_TABLE_PREFIX": unique("t").replace("-", "")}
    tables = Tables.from_settings(load_settings(env, require_backends=False), timeout_s=10)
    table_store = TableResponseStore(tables)
    yield table_store
    await table_store.close()
    await tables.close()


def record(response_id: str, **changes: object) -> StoredResponse:
    values: dict[str, object] = {"response_id": response_id, "backend_id": "uk-ptu", "consumer_id": "team-a",
                                 "deployment": "gpt-4o", "expires": NOW + RETENTION_S}
    values.update(changes)
    return StoredResponse(**values)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_put_get_replace_forget(store: ResponseStore) -> None:
    first = record("resp_1")
    assert await store.get("resp_1", NOW) is None
    await store.put(first)
    assert await store.get("resp_1", NOW) == first
    richer = record("resp_1", context_tokens=1234, unsettled=True, charged=77, held_until_ms=1_700_000_600_500,
                    held_places='[["app",["*","d:gpt-4o"],"2026-12"]]')
    await store.put(richer)
    assert await store.get("resp_1", NOW) == richer
    await store.forget("resp_1")
    assert await store.get("resp_1", NOW) is None
    await store.forget("resp_1")  # forgetting twice is fine


@pytest.mark.asyncio
async def test_expired_rows_read_as_absent_and_are_cleaned_up(store: ResponseStore) -> None:
    await store.put(record("resp_old", expires=NOW + 10))
    assert await store.get("resp_old", NOW + 9.999) is not None
    assert await store.get("resp_old", NOW + 10) is None
    await asyncio.sleep(0)  # the Table store deletes in the background
    if isinstance(store, TableResponseStore):
        await store.close()
    # Gone for good: even a reader whose clock is behind no longer finds it.
    assert await store.get("resp_old", NOW) is None


@pytest.mark.asyncio
async def test_many_ids_do_not_collide(store: ResponseStore) -> None:
    ids = [f"resp_{i:03d}{'x' * (i % 7)}" for i in range(20)]
    await asyncio.gather(*(store.put(record(i, consumer_id=f"c{n}")) for n, i in enumerate(ids)))
    found = await asyncio.gather(*(store.get(i, NOW) for i in ids))
    assert [r.consumer_id if r else None for r in found] == [f"c{n}" for n in range(20)]


@pytest.mark.asyncio
async def test_an_unreachable_table_is_store_unavailable() -> None:
    env = {"GATEWAY_TABLE_CONNECTION_STRING": stack.table_connection_string(stack.free_port())}
    tables = Tables.from_settings(load_settings(env, require_backends=False), timeout_s=0.5)
    try:
        with pytest.raises(StoreUnavailable):
            await TableResponseStore(tables).get("resp_1", NOW)
    finally:
        await tables.close()
    memory = MemoryResponseStore()
    memory.unavailable = True
    with pytest.raises(StoreUnavailable):
        await memory.put(record("resp_1"))


@pytest.mark.asyncio
async def test_settlement_is_claimed_exactly_once(store: ResponseStore) -> None:
    await store.put(record("resp_bg", unsettled=True, charged=50))
    await store.put(record("resp_fg"))
    claims = await asyncio.gather(*(store.settle("resp_bg") for _ in range(8)))
    assert claims.count(True) == 1
    settled = await store.get("resp_bg", NOW)
    assert settled is not None and not settled.unsettled and settled.charged == 50
    assert not await store.settle("resp_fg") and not await store.settle("resp_missing")


@pytest.mark.asyncio
async def test_a_hold_moves_only_while_unsettled_and_only_from_where_the_mover_saw_it(store: ResponseStore) -> None:
    await store.put(record("resp_held", unsettled=True, charged=50, held_until_ms=1_000, held_places='[["app",["*"],null]]'))
    moves = await asyncio.gather(*(store.rehold("resp_held", 2_000 + n, 1_000) for n in range(4)))
    assert moves.count(True) == 1  # four sweepers saw it at 1,000: one moves it
    moved = await store.get("resp_held", NOW)
    assert moved is not None and moved.held_until_ms in (2_000, 2_001, 2_002, 2_003) and "app" in moved.held_places
    assert await store.settle("resp_held")
    assert not await store.rehold("resp_held", 9_000, moved.held_until_ms)  # settled: a hold no longer moves
    assert not await store.rehold("resp_missing", 9_000, 0)


@pytest.mark.asyncio
async def test_unsettled_records_are_listed_for_any_sweeper_claimed_once_and_dropped_when_settled(
    store: ResponseStore,
) -> None:
    """The sweep's partition: an unsettled record with a hold is listed from its put; one query finds those due; a
    listed record is claimed by exactly one of the sweepers asking at once; a moved hold moves its row; settling,
    or unindexing, drops it. Records without a hold, settled ones and item rows are never listed."""
    await store.put(record("resp_soon", unsettled=True, charged=50, held_until_ms=1_000_000))
    await store.put(record("resp_late", unsettled=True, charged=50, held_until_ms=9_000_000))
    await store.put(record("resp_done", charged=50, held_until_ms=1_000_000))
    await store.put(record("resp_old", unsettled=True, charged=50))  # a record from before holds were kept
    await store.put(record("item:msg_1"))
    # Eight sweepers at once: the due one goes to exactly one of them.
    lists = await asyncio.gather(*(store.due(1_000_000, 500_000, 560_000, 100) for _ in range(8)))
    assert sorted(x for found in lists for x in found) == [("resp_soon", "team-a")]
    assert await store.due(1_000_000, 559_999, 620_000, 100) == []  # claimed: not offered again yet
    assert await store.due(1_000_000, 560_000, 620_000, 100) == [("resp_soon", "team-a")]  # the claim lapsed
    # A moved hold moves its row (and clears the claim).
    assert await store.rehold("resp_soon", 2_000_000, 1_000_000)
    assert await store.due(1_999_999, 700_000, 760_000, 100) == []
    assert await store.due(2_000_000, 700_000, 760_000, 100) == [("resp_soon", "team-a")]
    assert sorted(await store.due(9_000_000, 800_000, 860_000, 100)) == [("resp_late", "team-a"), ("resp_soon", "team-a")]
    # Settled: gone from the partition (the record stays, settled).
    assert await store.settle("resp_soon")
    assert await store.due(9_999_999, 900_000, 960_000, 100) == [("resp_late", "team-a")]
    await store.unindex("resp_late")
    await store.unindex("resp_late")  # twice is fine
    assert await store.due(9_999_999, 999_999_999, 999_999_999, 100) == []
    late = await store.get("resp_late", NOW)
    assert late is not None and late.unsettled  # unindexing touches only the partition


@pytest.mark.asyncio
async def test_one_query_lists_at_most_its_limit(store: ResponseStore) -> None:
    await asyncio.gather(*(store.put(record(f"resp_{i:03d}", unsettled=True, charged=1, held_until_ms=1_000 + i))
                           for i in range(30)))
    first = await store.due(10_000, 0, 60_000, 12)
    assert len(first) == 12
    second = await store.due(10_000, 0, 60_000, 100)  # the rest, not the claimed ones
    assert len(second) == 18 and not set(first) & set(second)
