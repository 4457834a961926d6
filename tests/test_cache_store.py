"""The response cache's store (Blob Storage on Azurite, and its in-memory twin, under one contract) and its layers:
memory bounded in bytes, entries expired by their age, never handed to another scope, writes that never wait."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest
from azure.storage.blob.aio import BlobServiceClient

from shared.cache.entry import BadEntry, CachedAnswer, decode, encode
from shared.cache.layer import AnswerCache
from shared.clock import FakeClock
from shared.records.usage import TokenUsage
from shared.storage.blobs import BlobAnswerStore, container_name, names_blob_service
from shared.storage.memory import MemoryAnswerStore
from shared.storage.protocols import AnswerStore, StoreUnavailable
from tools import stack

_containers = itertools.count(1)
USAGE = TokenUsage(7, 0, 7)


def answer(key: str = "a" * 64, scope: str = "consumer:app", body: bytes = b'{"data":[]}', at: float = 1_700_000_000.0,
           ) -> CachedAnswer:
    return CachedAnswer(scope, key, at, USAGE, "text-embedding-3-small", body)


@pytest.fixture(params=["memory", pytest.param("azurite", marks=pytest.mark.process)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[AnswerStore]:
    if request.param == "memory":
        yield MemoryAnswerStore()
        return
    azurite = request.getfixturevalue("azurite")
    connection = stack.table_connection_string(azurite.port)
    assert "BlobEndpoint=" in connection or connection == stack.DEVSTORE_CONNECTION
    blobs = BlobAnswerStore(lambda: BlobServiceClient.from_connection_string(connection, retry_total=0),
                            f"contract{next(_containers)}x{id(request) % 10_000}", timeout_s=10)
    try:
        yield blobs
    finally:
        await blobs.close()


# ---- the store's contract ----------------------------------------------------------------------------------------------

async def test_an_absent_entry_reads_as_none_even_before_the_container_exists(store: AnswerStore) -> None:
    assert await store.get("0" * 64) is None


async def test_an_entry_reads_back_byte_for_byte_and_is_replaced(store: AnswerStore) -> None:
    body = bytes(range(256)) * 40  # not text: the body is kept as bytes
    await store.put("b" * 64, body)
    assert await store.get("b" * 64) == body
    await store.put("b" * 64, b"second")
    assert await store.get("b" * 64) == b"second"
    assert await store.get("c" * 64) is None


async def test_many_entries_written_at_once_all_read_back(store: AnswerStore) -> None:
    keys = [f"{i:064x}" for i in range(20)]
    await asyncio.gather(*(store.put(k, k.encode()) for k in keys))
    assert [await store.get(k) for k in keys] == [k.encode() for k in keys]


async def test_a_blob_service_that_does_not_answer_is_unavailable() -> None:
    port = stack.free_port()  # nothing listens there
    connection = stack.table_connection_string(stack.free_port(), blob_port=port)
    blobs = BlobAnswerStore(lambda: BlobServiceClient.from_connection_string(connection, retry_total=0), "x-cache", 0.5)
    try:
        with pytest.raises(StoreUnavailable):
            await blobs.get("0" * 64)
        with pytest.raises(StoreUnavailable):
            await blobs.put("0" * 64, b"x")
    finally:
        await blobs.close()


def test_which_connection_strings_reach_a_blob_service() -> None:
    assert names_blob_service("UseDevelopmentStorage=true")
    assert names_blob_service("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=k;EndpointSuffix=core.windows.net")
    assert names_blob_service(stack.table_connection_string(11111, blob_port=11112))
    assert not names_blob_service(stack.table_connection_string(11113))  # a proxy in front of the tables only
    assert container_name("Gateway2") == "gateway2-cache"


# ---- the entry ---------------------------------------------------------------------------------------------------------

def test_an_entry_round_trips_and_a_damaged_one_is_refused() -> None:
    original = answer(body=b'{"a":"\n\n"}')
    assert decode(encode(original)) == original
    data = encode(original)
    for damaged in (b"", b"{}", data.replace(b'"format":1', b'"format":2'), data.split(b"\n")[0],
                    data.replace(b'"usage":[7', b'"usage":[-7'), b"not json\n{}"):
        with pytest.raises(BadEntry):
            decode(damaged)


# ---- the layers --------------------------------------------------------------------------------------------------------

def cache(store: AnswerStore | None = None, memory: int = 1_000_000, clock: FakeClock | None = None,
          **options: int) -> AnswerCache:
    return AnswerCache(store, clock or FakeClock(), memory_bytes=memory, max_entry_bytes=options.pop("max_entry", 100_000),
                       background=False, **options)


async def test_an_entry_is_served_to_its_scope_only_and_until_its_ttl() -> None:
    clock = FakeClock()
    layer = cache(MemoryAnswerStore(), clock=clock)
    layer.put(answer(at=clock.now()))
    assert await layer.get("a" * 64, "consumer:app", 60) is not None
    assert await layer.get("a" * 64, "consumer:other", 60) is None  # a digest collision would still not cross
    clock.advance(59.9)
    assert await layer.get("a" * 64, "consumer:app", 60) is not None
    clock.advance(0.2)
    assert await layer.get("a" * 64, "consumer:app", 60) is None
    assert await layer.get("a" * 64, "consumer:app", 3600) is None  # forgotten in memory; not yet written to the store


async def test_another_instance_reads_the_entry_from_the_store_once_and_then_from_memory() -> None:
    shared = MemoryAnswerStore()
    writer, reader = cache(shared), cache(shared)
    writer.put(answer(at=FakeClock().now()))
    assert shared.writes == 0  # the write is queued: the request did not wait for it
    await writer.flush()
    assert shared.writes == 1
    assert await reader.get("a" * 64, "consumer:app", 60) is not None
    assert await reader.get("a" * 64, "consumer:app", 60) is not None
    assert shared.reads == 1 and reader.stats.store_hits == 1 and reader.stats.memory_hits == 1


async def test_a_store_entry_of_another_scope_or_damaged_is_a_miss() -> None:
    shared = MemoryAnswerStore()
    shared.entries["a" * 64] = encode(answer(scope="consumer:other", at=FakeClock().now()))
    shared.entries["b" * 64] = b"garbage"
    shared.entries["c" * 64] = encode(answer(key="d" * 64, at=FakeClock().now()))  # under a name not its own
    layer = cache(shared)
    for key in ("a" * 64, "b" * 64, "c" * 64):
        assert await layer.get(key, "consumer:app", 60) is None


async def test_memory_stays_within_its_bound_with_many_distinct_entries() -> None:
    layer = cache(memory=100_000)
    for i in range(10_000):
        layer.put(answer(key=f"{i:064x}", body=b"x" * 1000))
    assert layer.memory_used <= 100_000 and layer.entries < 100
    assert layer.stats.evicted == 10_000 - layer.entries
    newest = f"{9_999:064x}"
    assert await layer.get(newest, "consumer:app", 10**9) is not None
    assert await layer.get(f"{0:064x}", "consumer:app", 10**9) is None


async def test_an_entry_over_the_size_cap_is_not_kept() -> None:
    store = MemoryAnswerStore()
    layer = cache(store, max_entry=10_000)
    assert not layer.put(answer(body=b"x" * 20_000))
    await layer.flush()
    assert store.writes == 0 and layer.entries == 0 and layer.stats.too_large == 1


async def test_writes_waiting_for_a_slow_store_are_bounded() -> None:
    store = MemoryAnswerStore()
    layer = cache(store, pending_bytes=50_000)
    for i in range(1_000):
        layer.put(answer(key=f"{i:064x}", body=b"x" * 1000))
    assert layer.pending < 50 and layer.stats.writes_dropped > 900
    await layer.flush()
    assert store.writes == layer.stats.writes - layer.stats.writes_dropped


async def test_a_store_that_fails_makes_misses_not_errors() -> None:
    store = MemoryAnswerStore()
    layer = cache(store)
    store.unavailable = True
    assert await layer.get("a" * 64, "consumer:app", 60) is None
    layer.put(answer(at=FakeClock().now()))
    await layer.flush()  # the failed write is logged and counted, the entry still served from memory
    assert layer.stats.store_errors == 2
    assert await layer.get("a" * 64, "consumer:app", 60) is not None


async def test_a_write_in_the_background_is_written_without_anyone_waiting() -> None:
    store = MemoryAnswerStore()
    layer = AnswerCache(store, FakeClock(), memory_bytes=1_000_000, max_entry_bytes=100_000)
    layer.put(answer())
    for _ in range(10):
        await asyncio.sleep(0)
    assert store.writes == 1
    await layer.close()
