"""The audit trail's store: append blobs on Azurite's Blob service and the in-memory twin, under one contract: lines
appended in order, a blob created at its first append, large appends split into blocks, concurrent writers kept."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from azure.storage.blob.aio import BlobServiceClient

from shared.clock import FakeClock
from shared.safety.audit import AuditTrail
from shared.storage.blobs import BlobAuditStore
from shared.storage.memory import MemoryAuditStore
from shared.storage.protocols import AuditStore
from tools import stack

_containers = itertools.count(1)


class Reader:
    def __init__(self, store: AuditStore, connection: str | None, container: str) -> None:
        self.store = store
        self._connection = connection
        self._container = container

    async def read(self, name: str) -> bytes:
        if isinstance(self.store, MemoryAuditStore):
            return bytes(self.store.blobs.get(name, b""))
        assert self._connection is not None
        async with BlobServiceClient.from_connection_string(self._connection) as service:
            blob = service.get_blob_client(self._container, name)
            return await (await blob.download_blob()).readall()


@pytest.fixture(params=["memory", pytest.param("azurite", marks=pytest.mark.process)])
async def reader(request: pytest.FixtureRequest) -> AsyncIterator[Reader]:
    if request.param == "memory":
        yield Reader(MemoryAuditStore(), None, "")
        return
    azurite = request.getfixturevalue("azurite")
    connection = stack.table_connection_string(azurite.port)
    container = f"audit{next(_containers)}x{id(request) % 10_000}"
    store = BlobAuditStore(lambda: BlobServiceClient.from_connection_string(connection, retry_total=0), container, 10)
    try:
        yield Reader(store, connection, container)
    finally:
        await store.close()


async def test_appends_accumulate_in_order_per_blob(reader: Reader) -> None:
    store = reader.store
    await store.append("app/2026/12/05/12/i1.jsonl", b'{"n":1}\n')
    await store.append("app/2026/12/05/12/i1.jsonl", b'{"n":2}\n{"n":3}\n')
    await store.append("other/2026/12/05/12/i1.jsonl", b'{"n":9}\n')
    assert await reader.read("app/2026/12/05/12/i1.jsonl") == b'{"n":1}\n{"n":2}\n{"n":3}\n'
    assert await reader.read("other/2026/12/05/12/i1.jsonl") == b'{"n":9}\n'


async def test_an_append_larger_than_a_block_is_split_and_kept_whole(reader: Reader) -> None:
    line = b'{"prompt":"' + b"x" * (5 * 1024 * 1024) + b'"}\n'
    await reader.store.append("big/i1.jsonl", line)
    assert await reader.read("big/i1.jsonl") == line


async def test_two_trails_writing_one_blob_at_once_lose_nothing(reader: Reader) -> None:
    clock = FakeClock()
    trails = [AuditTrail(reader.store, clock, "same", memory_bytes=1 << 20, flush_s=1, lost=lambda n: None,
                         background=False) for _ in range(2)]
    for n in range(40):
        trails[n % 2].offer({"consumer": "c", "n": n})
    await asyncio.gather(*(t.flush() for t in trails))
    name = f"c/{time.strftime('%Y/%m/%d/%H', time.gmtime(clock.now()))}/same.jsonl"
    lines = (await reader.read(name)).splitlines()
    assert sorted(orjson.loads(line)["n"] for line in lines) == list(range(40))
