"""One contract for every store, run against the Table Storage stores on Azurite and against their in-memory twins:
what the limiter, the router, the consumer directory, the usage rows and the console rely on (ETag conditions, 409 on create, an
older breaker transition never replacing a newer one, cumulative usage rows, the admin changes newest first, traffic
rows per instance per 10 s)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from azure.data.tables.aio import TableServiceClient

from shared.edge.consumers import hash_key
from shared.limits.ledger import Ledger, Quota, claim
from shared.limits.ledger_copy import read_ledger
from shared.records.audit import AuditEntry
from shared.records.breaker import BreakerRecord
from shared.records.capacity import CapacityReport, CapacitySummary
from shared.records.consumers import Consumer, Limits
from shared.records.traffic import TrafficRow
from shared.records.usage import UsageRow
from shared.storage import memory
from shared.storage.breaker_table import COPIES, TableBreakerStore, copy_partition
from shared.storage.capacity_table import TableCapacityStore
from shared.storage.change_log_table import TableChangeLogStore
from shared.storage.consumer_table import TableConsumerStore
from shared.storage.ledger_table import TableLedgerStore
from shared.storage.protocols import (
    BreakerStore,
    CapacityStore,
    ChangeLogStore,
    Conflict,
    ConsumerStore,
    LedgerStore,
    TrafficStore,
    UsageStore,
)
from shared.storage.tables import Tables, collect
from shared.storage.traffic_table import TableTrafficStore
from shared.storage.usage_table import TableUsageStore
from tools import stack

_prefixes = itertools.count(1)


@dataclass
class Stores:
    consumers: ConsumerStore
    ledger: LedgerStore
    breakers: BreakerStore
    usage: UsageStore
    capacity: CapacityStore
    changes: ChangeLogStore
    traffic: TrafficStore


@pytest.fixture(params=["memory", pytest.param("azurite", marks=pytest.mark.process)])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    if request.param == "memory":
        yield Stores(memory.MemoryConsumerStore(), memory.MemoryLedgerStore(), memory.MemoryBreakerStore(),
                     memory.MemoryUsageStore(), memory.MemoryCapacityStore(), memory.MemoryChangeLogStore(),
                     memory.MemoryTrafficStore())
        return
    azurite = request.getfixturevalue("azurite")
    service = TableServiceClient.from_connection_string(stack.table_connection_string(azurite.port), retry_total=0)
    tables = Tables(service, f"contract{next(_prefixes)}x{id(request) % 10_000}", timeout_s=10)
    try:
        yield Stores(TableConsumerStore(tables), TableLedgerStore(tables), TableBreakerStore(tables), TableUsageStore(tables),
                     TableCapacityStore(tables), TableChangeLogStore(tables), TableTrafficStore(tables))
    finally:
        await tables.close()


def consumer(consumer_id: str, key: str = "k", tpm: int = 1000) -> Consumer:
    return Consumer(id=consumer_id, name=consumer_id.title(), key_hash=hash_key(key), key_prefix=key[:9],
                    limits=Limits(tokens_per_minute=tpm))


# ---- ledger ----------------------------------------------------------------------------------------------------------


async def test_ledger_starts_empty_and_is_created_only_where_there_is_none(stores: Stores) -> None:
    ledger, etag = await read_ledger(stores.ledger, "team-a")
    assert etag is None and ledger == Ledger()
    claim(ledger, "i:1", {"*": 1}, {"*": 300}, {"*": 1000}, Quota(5000, "daily"), 1_700_000_000.0, 2000)
    first = await stores.ledger.write("team-a", ledger.to_entity(), None)
    with pytest.raises(Conflict):
        await stores.ledger.write("team-a", ledger.to_entity(), None)  # a second creator lost the race
    stored, etag = await read_ledger(stores.ledger, "team-a")
    assert etag == first and stored == ledger


async def test_a_ledger_with_thousands_of_lease_holders_is_stored_whole_and_shrinks_back(stores: Stores) -> None:
    # One string property holds 32K characters; 2,000 holders' leases take about 90,000 (issue 32: Flex scales an app
    # to 1,000 instances). Spread over several properties, the write is accepted and every lease comes back; and when
    # the holders leave, the extra properties go with the replaced row.
    t0 = 1_700_000_000.0
    ledger = Ledger()
    for i in range(2_000):
        claim(ledger, f"{i:012x}:{i}", {"*": 1}, {"*": 300}, {"*": 10_000_000}, None, t0, 8_000)
    entity = ledger.to_entity()
    assert "leases_2" in entity and all(len(str(v)) <= 30_000 for v in entity.values())
    first = await stores.ledger.write("team-big", entity, None)
    stored, etag = await read_ledger(stores.ledger, "team-big")
    assert etag == first and stored == ledger and len(stored.leases) == 2_000
    stored.leases = dict(list(stored.leases.items())[:3])
    await stores.ledger.write("team-big", stored.to_entity(), etag)
    again, _ = await read_ledger(stores.ledger, "team-big")
    assert set(again.leases) == set(stored.leases)


async def test_ledger_write_on_a_stale_etag_is_a_conflict_and_changes_nothing(stores: Stores) -> None:
    await stores.ledger.write("team-b", Ledger(quota_key="2026-12-01", quota_used=1).to_entity(), None)
    _, etag = await read_ledger(stores.ledger, "team-b")
    newer = await stores.ledger.write("team-b", Ledger(quota_key="2026-12-01", quota_used=2).to_entity(), etag)
    assert newer != etag
    with pytest.raises(Conflict):
        await stores.ledger.write("team-b", Ledger(quota_key="2026-12-01", quota_used=99).to_entity(), etag)
    stored, current = await read_ledger(stores.ledger, "team-b")
    assert stored.quota_used == 2 and current == newer


async def test_concurrent_writers_on_one_etag_exactly_one_wins(stores: Stores) -> None:
    await stores.ledger.write("team-c", Ledger().to_entity(), None)
    _, etag = await read_ledger(stores.ledger, "team-c")
    results = await asyncio.gather(
        *(stores.ledger.write("team-c", Ledger(quota_key="k", quota_used=n).to_entity(), etag) for n in range(1, 6)),
        return_exceptions=True,
    )
    assert sum(1 for r in results if isinstance(r, str)) == 1
    assert all(isinstance(r, (str, Conflict)) for r in results), results


async def test_ledgers_of_consumers_are_independent(stores: Stores) -> None:
    await stores.ledger.write("team-d", Ledger(quota_used=4).to_entity(), None)
    await stores.ledger.write("team-e", Ledger(quota_used=5).to_entity(), None)
    assert (await read_ledger(stores.ledger, "team-d"))[0].quota_used == 4
    assert (await read_ledger(stores.ledger, "team-e"))[0].quota_used == 5


# ---- breakers -------------------------------------------------------------------------------------------------------


def record(backend: str, state: str, since: float, deployment: str = "gpt-4o") -> BreakerRecord:
    return BreakerRecord(backend, deployment, state, since + 30, since, "429")


async def test_breaker_records_load_in_one_call_and_an_older_transition_never_wins(stores: Stores) -> None:
    await stores.breakers.save(record("sweden", "open", 100.0))
    await stores.breakers.save(record("france", "open", 100.0))
    await stores.breakers.save(record("sweden", "closed", 50.0))  # late, stale
    await stores.breakers.save(record("france", "closed", 150.0))  # newer
    loaded = {(r.backend_id, r.deployment): r for r in await stores.breakers.load()}
    assert loaded[("sweden", "gpt-4o")].state == "open"
    assert loaded[("france", "gpt-4o")].state == "closed" and loaded[("france", "gpt-4o")].since == 150.0


# ---- PTU capacity reports ---------------------------------------------------------------------------------------------


async def test_capacity_reports_are_one_per_instance_replaced_on_publish_and_read_back_to_the_millisecond(
    stores: Stores,
) -> None:
    now = time.time()
    charges = tuple((now - 30 + i * 0.25, 230.0 if i % 3 else -230.0) for i in range(120))
    first = CapacityReport("ptu", "gpt-4o", "i1", now, charges, (now - 20.123, now - 1.5), 345.6, None)
    await stores.capacity.publish(first)
    await stores.capacity.publish(CapacityReport("ptu", "gpt-4o", "i2", now, (), (), 0.0, 500.0))
    later = CapacityReport("ptu", "gpt-4o", "i1", now + 0.5, charges[1:], first.ready, 300.0, 498.5)
    await stores.capacity.publish(later)
    loaded = {r.instance: r for r in await stores.capacity.load()}
    assert set(loaded) == {"i1", "i2"}
    i1 = loaded["i1"]
    assert i1.at == later.at and i1.demand == 300.0 and i1.rate == 498.5 and len(i1.charges) == 119
    assert all(abs(a[0] - b[0]) < 0.001 and a[1] == b[1] for a, b in zip(i1.charges, later.charges, strict=True))
    assert [round(t, 3) for t in i1.ready] == [round(t, 3) for t in first.ready]
    assert loaded["i2"].rate == 500.0 and loaded["i2"].charges == ()


async def test_a_ptu_summary_row_is_created_once_written_only_over_the_version_read_and_not_among_the_reports(
    stores: Stores,
) -> None:
    now = time.time()
    assert await stores.capacity.read_summary("ptu", "gpt-4o") == (None, None)
    first = CapacitySummary("ptu", "gpt-4o", now, (now - 20.123, now + 0.8), 512.5, now - 20.123, True, "i1")
    await stores.capacity.write_summary(first, None)
    with pytest.raises(Conflict):  # a second creator lost the race
        await stores.capacity.write_summary(replace(first, by="i2"), None)
    read, etag = await stores.capacity.read_summary("ptu", "gpt-4o")
    assert read is not None and etag is not None
    assert all(abs(a - b) < 0.001 for a, b in zip(read.ready, first.ready, strict=True))  # to the millisecond
    assert read.rate == 512.5 and read.by == "i1"
    assert read.rate_learnt and abs(read.rate_from - first.rate_from) < 0.001
    newer = replace(first, ready=(*first.ready, now + 5), rate=None, rate_from=0.0, rate_learnt=False, by="i3")
    await stores.capacity.write_summary(newer, etag)
    with pytest.raises(Conflict):  # written over the version read: the stale ETag loses
        await stores.capacity.write_summary(replace(first, by="i4"), etag)
    read, etag = await stores.capacity.read_summary("ptu", "gpt-4o")
    assert read is not None and read.by == "i3" and read.rate is None and len(read.ready) == 3
    assert (read.fleet_at, read.members, read.rate_complete) == (0.0, 0, False)  # no figures (as an older version's)
    # The fleet's figures, read back as written.
    figures = replace(read, rate=480.25, rate_from=now, rate_learnt=True, rate_complete=True, fleet_at=now + 1,
                      fleet_by="i7", members=256, demand=12_345.5, demanders=200)
    await stores.capacity.write_summary(figures, etag)
    read, _ = await stores.capacity.read_summary("ptu", "gpt-4o")
    assert read is not None and read.rate_complete and read.fleet_by == "i7"
    assert (read.members, read.demanders, read.demand, read.rate) == (256, 200, 12_345.5, 480.25)
    assert abs(read.fleet_at - (now + 1)) < 0.001
    assert (await stores.capacity.read_summary("ptu", "gpt-4o-mini")) == (None, None)  # one row per deployment
    # The per-instance reports' query (gateways of every version read it) does not return the summary.
    assert await stores.capacity.load() == []


# ---- consumers ------------------------------------------------------------------------------------------------------


async def test_consumer_create_refuses_a_taken_id_and_lookup_by_key_hash_finds_current_and_previous(stores: Stores) -> None:
    store: Any = stores.consumers
    await store.create(consumer("alpha", key="gw-alpha"))
    with pytest.raises(Conflict):
        await store.create(consumer("alpha", key="gw-other"))
    found = await store.find_by_key_hash(hash_key("gw-alpha"))
    assert found is not None and found.id == "alpha" and found.limits.tokens_per_minute == 1000
    rotated = replace(found, key_hash=hash_key("gw-new"), previous_key_hash=hash_key("gw-alpha"), version=2)
    await store.put(rotated)
    assert (await store.find_by_key_hash(hash_key("gw-new"))) == rotated
    assert (await store.find_by_key_hash(hash_key("gw-alpha"))) == rotated
    assert await store.find_by_key_hash(hash_key("gw-nobody")) is None
    assert [c.id for c in await store.list_consumers()] == ["alpha"]
    assert await store.delete("alpha") is True
    assert await store.delete("alpha") is False
    assert await store.get("alpha") is None


async def test_a_consumer_write_on_a_stale_etag_is_a_conflict_and_changes_nothing(stores: Stores) -> None:
    store: Any = stores.consumers
    await store.create(consumer("beta", key="gw-beta"))
    found = await store.get_versioned("beta")
    assert found is not None
    current, etag = found
    await store.put(replace(current, enabled=False, version=1), if_match=etag)  # the first writer on this version
    with pytest.raises(Conflict):
        await store.put(replace(current, limits=Limits(tokens_per_minute=5), version=1), if_match=etag)
    stored = await store.get("beta")
    assert stored is not None and stored.enabled is False and stored.limits.tokens_per_minute == 1000
    newer = await store.get_versioned("beta")
    assert newer is not None and newer[1] != etag
    await store.delete("beta")
    with pytest.raises(Conflict):  # deleted meanwhile: the write does not bring it back
        await store.put(replace(current, version=2), if_match=newer[1])
    assert await store.get("beta") is None and await store.get_versioned("beta") is None


class _BothReadFirst:
    """The race, every time: both commands read the record before either writes it."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._barrier = asyncio.Barrier(2)
        self._held = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def _read(self, method: str, consumer_id: str) -> Any:
        found = await getattr(self._store, method)(consumer_id)
        if self._held < 2:
            self._held += 1
            await self._barrier.wait()
        return found

    async def get(self, consumer_id: str) -> Any:
        return await self._read("get", consumer_id)

    async def get_versioned(self, consumer_id: str) -> Any:
        return await self._read("get_versioned", consumer_id)


@pytest.mark.parametrize("other", ["disable", "rotate"])
async def test_concurrent_admin_writes_never_undo_each_other(stores: Stores, other: str) -> None:
    import io

    from shared.admin.cli import Admin, parser

    store: Any = stores.consumers
    await store.create(consumer("gamma", key="gw-gamma"))
    admin = Admin(_BothReadFirst(store), io.StringIO(), err=io.StringIO(), json_mode=True)
    out = io.StringIO()
    second = Admin(_BothReadFirst(store), out, err=io.StringIO(), json_mode=True)
    second.store = admin.store  # one race: both commands share the barrier
    commands = {  # made only when chosen: an unused coroutine would never be awaited
        "disable": lambda: second.set_enabled("gamma", False),
        "rotate": lambda: second.rotate(parser().parse_args(["consumers", "rotate", "gamma"])),
    }
    await asyncio.gather(admin.update(parser().parse_args(["consumers", "set", "gamma", "--tpm", "5"])), commands[other]())
    stored = await store.get("gamma")
    assert stored is not None and stored.limits.tokens_per_minute == 5  # the set
    if other == "disable":
        assert stored.enabled is False
    else:
        key = json.loads(out.getvalue())["key"]
        assert stored.key_hash == hash_key(key) and await store.find_by_key_hash(hash_key(key)) == stored
        assert await store.find_by_key_hash(hash_key("gw-gamma")) is None  # no grace asked: the old key is gone
    assert stored.version == 2  # two changes, each made on the other's result


async def test_as_many_concurrent_admin_commands_as_write_tries_all_land(stores: Stores) -> None:
    """Each lost race means another command won and is done, so WRITE_TRIES commands at once always all land."""
    import io

    from shared.admin.cli import WRITE_TRIES, Admin, parser

    store: Any = stores.consumers
    await store.create(consumer("delta", key="gw-delta"))
    out = io.StringIO()
    admin = Admin(store, out, err=io.StringIO(), json_mode=True)
    argv = [["set", "delta", "--tpm", "7"], ["set", "delta", "--quota", "100", "--quota-period", "daily"],
            ["set", "delta", "--name", "Delta team"], ["rotate", "delta"]]
    commands = [admin.update(parser().parse_args(["consumers", *a])) if a[0] == "set"
                else admin.rotate(parser().parse_args(["consumers", *a])) for a in argv]
    commands.append(admin.set_enabled("delta", False))
    assert len(commands) == WRITE_TRIES
    assert await asyncio.gather(*commands) == [0] * WRITE_TRIES
    stored = await store.get("delta")
    assert stored is not None and stored.version == WRITE_TRIES
    assert stored.limits.tokens_per_minute == 7 and stored.limits.quota == 100 and stored.name == "Delta team"
    assert stored.enabled is False
    decoder, text, documents = json.JSONDecoder(), out.getvalue(), []
    while text.strip():
        document, end = decoder.raw_decode(text.strip())
        documents.append(document)
        text = text.strip()[end:]
    key = next(d["key"] for d in documents if "key" in d)
    assert stored.key_hash == hash_key(key)


# ---- usage rows -----------------------------------------------------------------------------------------------------


async def test_every_consumer_write_changes_the_marker_and_reads_do_not(stores: Stores) -> None:
    from dataclasses import replace

    from shared.records.consumer_feed import CONSUMER, TEAM
    from shared.records.consumers import Team

    store: Any = stores.consumers
    first = await store.change_feed()
    seen = [first.token]
    assert first.token is None and first.after("", 0) is None  # nothing written: nothing to follow yet

    async def changed(*named: tuple[str, str]) -> bool:
        marker, feed = await store.change_marker(), await store.change_feed()
        # The check every second reads the marker alone (a projection): the same token, epoch and sequence, no ids.
        assert (marker.token, marker.epoch, marker.seq, marker.changes) == (feed.token, feed.epoch, feed.seq, ())
        fresh = feed.token not in seen
        seen.append(feed.token)
        if fresh and named:  # the feed names what was written, and follows on from the last read
            assert feed.after(last[0].epoch, last[0].seq) is not None
            assert [(c.kind, c.id) for c in feed.after(last[0].epoch, last[0].seq) or ()] == list(named)
        last[0] = feed
        return fresh

    last = [first]
    await store.create(consumer("m-1", key="gw-m1"))
    assert await changed()  # the first entry starts the feed: nothing before it to follow on from
    await store.list_consumers()
    await store.get("m-1")
    await store.find_by_key_hash(hash_key("gw-m1"))
    assert not await changed()
    await store.put(replace(consumer("m-1", key="gw-m1"), enabled=False))
    assert await changed((CONSUMER, "m-1"))
    await store.create_many([consumer("m-2", key="gw-m2"), consumer("m-3", key="gw-m3")])
    assert await changed((CONSUMER, "m-2"), (CONSUMER, "m-3"))
    assert await store.delete("m-2")
    assert await changed((CONSUMER, "m-2"))
    assert not await store.delete("m-2")  # nothing deleted, nothing to see
    assert not await changed()
    await store.create_team(Team("t-1", "T"))
    assert await changed((TEAM, "t-1"))
    await store.put_team(Team("t-1", "T2"))
    assert await changed((TEAM, "t-1"))
    assert await store.delete_team("t-1")
    assert await changed((TEAM, "t-1"))


async def test_two_admins_writing_at_once_each_get_their_feed_entry(stores: Stores) -> None:
    """The feed is appended on the marker row's ETag: concurrent writes through two stores (two admins) never lose
    one another's entry."""
    from shared.records.consumer_feed import CONSUMER

    store: Any = stores.consumers
    await store.create(consumer("w-0", key="gw-w0"))
    start = await store.change_feed()
    await asyncio.gather(*(store.create(consumer(f"w-{i}", key=f"gw-w{i}")) for i in range(1, 13)))
    feed = await store.change_feed()
    changes = feed.after(start.epoch, start.seq)
    assert changes is not None and feed.seq == start.seq + 12
    assert sorted(c.id for c in changes if c.kind == CONSUMER) == sorted(f"w-{i}" for i in range(1, 13))


async def test_usage_rows_are_replaced_cumulatively_and_queried_by_hour_and_consumer(stores: Stores) -> None:
    first = UsageRow("alpha", "2026-12-01T05", "gpt-4o", "i1", requests=1, prompt=10, completion=5, total=15)
    await stores.usage.save([first, UsageRow("beta", "2026-12-01T05", "gpt-4o", "i1", requests=2, total=7)])
    later = replace(first, requests=3, prompt=30, completion=15, total=45, tools=(("mcp", 1), ("web_search", 4)))
    await stores.usage.save([later, UsageRow("alpha", "2026-12-01T07", "gpt-4o", "i1", requests=1, total=1)])
    rows = await stores.usage.query("alpha", "2026-12-01T05", "2026-12-01T06")
    assert rows == [later]
    every = await stores.usage.query(None, "2026-12-01T00", "2026-12-02T00")
    assert sorted((r.consumer, r.hour, r.total) for r in every) == [
        ("alpha", "2026-12-01T05", 45), ("alpha", "2026-12-01T07", 1), ("beta", "2026-12-01T05", 7)]


async def test_usage_rows_of_many_consumers_go_out_in_batches_of_a_hundred(azurite: stack.Child) -> None:
    """On the Table store a flush costs round trips per hundred rows of an instance and hour, not per consumer."""
    service = TableServiceClient.from_connection_string(stack.table_connection_string(azurite.port), retry_total=0)
    tables = Tables(service, f"batches{next(_prefixes)}", timeout_s=10)
    try:
        store = TableUsageStore(tables)
        await tables.ensure("usage")
        before = tables.calls
        rows = [UsageRow(f"consumer-{n}", "2026-12-01T05", "gpt-4o", "i1", requests=1, total=n) for n in range(250)]
        await store.save(rows)
        assert tables.calls - before == 3
        back = await store.query(None, "2026-12-01T05", "2026-12-01T06")
        assert sorted(r.total for r in back) == list(range(250))
        assert [r.total for r in await store.query("consumer-7", "2026-12-01T00", "2026-12-02T00")] == [7]
    finally:
        await tables.close()


async def test_usage_rows_written_by_earlier_versions_are_still_reported(azurite: stack.Child) -> None:
    service = TableServiceClient.from_connection_string(stack.table_connection_string(azurite.port), retry_total=0)
    tables = Tables(service, f"legacy{next(_prefixes)}", timeout_s=10)
    try:
        old = {"PartitionKey": "alpha", "RowKey": "2026-12-01T05|gpt-4o|i0", "hour": "2026-12-01T05",
               "deployment": "gpt-4o", "instance": "i0", "requests": 2, "prompt": 5, "completion": 5, "total": 10,
               "cached": 0, "reasoning": 0}
        await tables.call("usage", lambda t: t.create_entity(old))
        store = TableUsageStore(tables)
        await store.save([UsageRow("alpha", "2026-12-01T05", "gpt-4o", "i1", requests=1, total=3)])
        rows = await store.query("alpha", "2026-12-01T00", "2026-12-02T00")
        assert sorted((r.instance, r.total) for r in rows) == [("i0", 10), ("i1", 3)]
        assert sorted(r.total for r in await store.query(None, "2026-12-01T05", "2026-12-01T06")) == [3, 10]
    finally:
        await tables.close()


async def test_every_breaker_record_loads_in_one_round_trip(azurite: stack.Child) -> None:
    service = TableServiceClient.from_connection_string(stack.table_connection_string(azurite.port), retry_total=0)
    tables = Tables(service, f"breakers{next(_prefixes)}", timeout_s=10)
    try:
        store = TableBreakerStore(tables)
        for i in range(60):
            await store.save(record(f"backend-{i}", "open", 100.0 + i))
        for _ in range(3 * 4 * 4):  # copies (one entity each) and now and then the rows: every read has all 60
            before = tables.calls
            assert len(await store.load()) == 60
            assert tables.calls - before == 1
        assert store.copy_reads and store.row_reads
        # What a gateway of an earlier version queries is the rows, as they were; each copy is one entity of its own
        # partition holding every transition.
        rows = await tables.call("breakers", lambda t: collect(t.query_entities("PartitionKey eq 'breaker'")))
        assert len(rows) == 60 and {"backend", "deployment", "state", "until", "since", "reason"} <= set(rows[0])
        for k in range(COPIES):
            copy = await tables.call("breakers", lambda t, k=k: collect(
                t.query_entities(f"PartitionKey eq '{copy_partition(k)}'")))
            assert len(copy) == 1 and len(json.loads(copy[0]["rows"])) == 60
    finally:
        await tables.close()


async def test_many_consumers_are_created_at_once_and_an_existing_id_is_a_conflict(stores: Stores) -> None:
    store: Any = stores.consumers
    await store.create(consumer("taken"))
    await store.create_many([consumer(f"many-{n}", key=f"gw-key-{n}") for n in range(250)])
    assert len(await store.list_consumers()) == 251
    found = await store.find_by_key_hash(hash_key("gw-key-199"))
    assert found is not None and found.id == "many-199"
    with pytest.raises(Conflict):
        await store.create_many([consumer("fresh-1", key="gw-f1"), consumer("taken", key="gw-t2"), consumer("fresh-2", key="gw-f2")])
    assert await store.get("fresh-1") is None  # a batch is all or nothing


async def test_creating_a_thousand_consumers_takes_twenty_two_round_trips(azurite: stack.Child) -> None:
    service = TableServiceClient.from_connection_string(stack.table_connection_string(azurite.port), retry_total=0)
    tables = Tables(service, f"bulk{next(_prefixes)}", timeout_s=10)
    try:
        store = TableConsumerStore(tables)
        await tables.ensure("consumers")
        before = tables.calls
        await store.create_many([consumer(f"c-{n}", key=f"gw-{n}") for n in range(1000)])
        # 10 batches of key-hash index rows, 10 of consumer rows, and the change marker the gateways read (a read and
        # a conditional write: its feed is appended on its ETag).
        assert tables.calls - before == 22
        assert len(await store.list_consumers()) == 1000
    finally:
        await tables.close()


async def test_a_busy_instances_charges_are_summed_into_wider_buckets_until_they_fit_one_property(stores: Stores) -> None:
    now = time.time()
    charges = tuple((now - 59 + i * 0.0125, 1234.5) for i in range(4000))  # 4000 charges in 50 s
    await stores.capacity.publish(CapacityReport("ptu", "gpt-4o", "busy", now, charges, (), 0.0, None))
    (loaded,) = [r for r in await stores.capacity.load() if r.instance == "busy"]
    assert sum(n for _, n in loaded.charges) == pytest.approx(4000 * 1234.5)
    # Still placed in time to within the buckets: the first and second halves keep their tokens.
    middle = now - 59 + 2000 * 0.0125
    assert sum(n for t, n in loaded.charges if t < middle - 0.1) == pytest.approx(sum(n for t, n in charges if t < middle - 0.1), rel=0.01)


# ---- the console's change log and traffic rows -----------------------------------------------------------------------


def change(at: float, n: int, action: str = "consumers.set") -> AuditEntry:
    return AuditEntry(at, "key:admin", "Gateway.Admin", action, f"c{n}", json.dumps({"tokens_per_minute": n}),
                      json.dumps({"tokens_per_minute": n + 1}), f"id{n:04d}")


async def test_changes_come_back_newest_first_within_the_limit_and_the_period(stores: Stores) -> None:
    now = time.time()
    entries = [change(now - 3600 * n, n) for n in range(12)]
    for entry in reversed(entries):
        await stores.changes.append(entry)
    assert await stores.changes.recent(5, now - 86400) == entries[:5]
    assert await stores.changes.recent(100, now - 3600 * 4 - 1) == entries[:5]  # none older than `since`
    assert await stores.changes.recent(100, now + 1) == []


async def test_changes_in_the_same_millisecond_are_all_kept_and_before_after_round_trip(stores: Stores) -> None:
    now = time.time()
    made = AuditEntry(now, "easyauth:ops@example.com", "Gateway.Admin", "consumers.create", "new", "",
                      json.dumps({"name": "n\u00e9w \"quoted\"", "deployments": "*"}), "aaaa")
    gone = AuditEntry(now, "cli:root", "Gateway.Admin", "consumers.delete", "old", json.dumps({"name": "old"}), "", "bbbb")
    await stores.changes.append(made)
    await stores.changes.append(gone)
    assert sorted(await stores.changes.recent(10, now - 1), key=lambda e: e.id) == [made, gone]


async def test_changes_months_back_are_found_when_the_period_reaches_them(stores: Stores) -> None:
    """The API reads up to 366 days back: an entry three months old is found when asked for 100 days, and the newest
    still come first (the table keeps one partition per month)."""
    now = time.time()
    old, older, recent = change(now - 95 * 86400, 1), change(now - 70 * 86400, 2), change(now - 60, 3)
    for entry in (old, older, recent):
        await stores.changes.append(entry)
    assert await stores.changes.recent(10, now - 100 * 86400) == [recent, older, old]
    assert await stores.changes.recent(2, now - 100 * 86400) == [recent, older]
    assert await stores.changes.recent(10, now - 80 * 86400) == [recent, older]


async def test_traffic_rows_are_read_by_bucket_range_inclusive_across_instances(stores: Stores) -> None:
    base = int(time.time() // 10)
    a = [TrafficRow(base + i, "instance-a", {"ptu": (i, 10 * i, 0, 0, 0), "paygo": (1, 2, 3, 4, 5)}) for i in range(6)]
    b = [TrafficRow(base + 2, "instance-b", {"ptu": (7, 70, 1, 0, 1)})]
    await stores.traffic.save(a)
    await stores.traffic.save(b)
    read = await stores.traffic.read(base + 2, base + 4)
    assert sorted(read, key=lambda r: (r.bucket, r.instance)) == [a[2], b[0], a[3], a[4]]
    assert await stores.traffic.read(base + 100, base + 200) == []


async def test_a_traffic_row_saved_again_replaces_that_instances_row_only(stores: Stores) -> None:
    base = int(time.time() // 10)
    await stores.traffic.save([TrafficRow(base, "a", {"ptu": (1, 1, 0, 0, 0)}), TrafficRow(base, "b", {"ptu": (2, 2, 0, 0, 0)})])
    again = TrafficRow(base, "a", {"ptu": (5, 500, 1, 2, 3), "paygo": (10**9, 10**12, 0, 0, 0)})
    await stores.traffic.save([again])
    read = sorted(await stores.traffic.read(base, base), key=lambda r: r.instance)
    assert read == [again, TrafficRow(base, "b", {"ptu": (2, 2, 0, 0, 0)})]


async def test_traffic_rows_keep_their_model_fallbacks_and_tokens_per_deployment(stores: Stores) -> None:
    base = int(time.time() // 10)
    with_fallbacks = TrafficRow(base, "a", {"ptu": (3, 30, 3, 0, 3)}, {"gpt-4.1": 3, "gpt-4o": 1},
                                {"ptu": {"gpt-4o": 20, "text-embedding-3-small": 10}})
    only_fallbacks = TrafficRow(base + 1, "a", {}, {"gpt-4.1": 2})
    without = TrafficRow(base, "b", {"ptu": (1, 10, 0, 0, 0)})
    await stores.traffic.save([with_fallbacks, only_fallbacks, without])
    read = sorted(await stores.traffic.read(base, base + 1), key=lambda r: (r.bucket, r.instance))
    assert read == [with_fallbacks, without, only_fallbacks]


async def test_forgetting_deletes_only_that_instances_buckets_and_missing_ones_are_fine(stores: Stores) -> None:
    base = int(time.time() // 10)
    await stores.traffic.save([TrafficRow(base + i, "a", {"x": (1, 0, 0, 0, 0)}) for i in range(3)])
    await stores.traffic.save([TrafficRow(base + i, "b", {"x": (2, 0, 0, 0, 0)}) for i in range(3)])
    await stores.traffic.forget("a", [base, base + 1, base + 50])
    left = sorted((r.bucket - base, r.instance) for r in await stores.traffic.read(base, base + 2))
    assert left == [(0, "b"), (1, "b"), (2, "a"), (2, "b")]
    await stores.traffic.forget("a", [base, base + 1])  # again: nothing there, no error


# ---- the one read-modify-write every shared row uses (storage/tables.py: change_row) ---------------------------------


@pytest.mark.process
async def test_change_row_loses_no_change_among_many_writers_and_gives_up_only_after_its_tries(
    request: pytest.FixtureRequest,
) -> None:
    """Twelve writers add one each to the same row at once: every addition lands (each lost race is decided again on
    what the winner wrote); a writer allowed a single try against a row that moves under it gets Conflict, never a
    silent overwrite; and `change` returning None leaves the row as it is."""
    from shared.storage.tables import change_row

    azurite = request.getfixturevalue("azurite")
    service = TableServiceClient.from_connection_string(stack.table_connection_string(azurite.port), retry_total=0)
    prefix = f"rmw{next(_prefixes)}x{id(request) % 10_000}"
    tables = Tables(service, prefix, timeout_s=10)
    other = Tables(TableServiceClient.from_connection_string(stack.table_connection_string(azurite.port), retry_total=0),
                   prefix, timeout_s=10)  # another instance, on the same table

    def plus_one(row: dict[str, Any] | None) -> dict[str, Any]:
        return {"n": (row or {}).get("n", 0) + 1}

    async def count() -> int:
        return int((await tables.call("breakers", lambda t: t.get_entity("p", "r")))["n"])

    try:
        results = await asyncio.gather(
            *(change_row(tables, "breakers", "p", "r", plus_one, tries=40) for _ in range(12)), return_exceptions=True
        )
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert await count() == 12

        assert await change_row(tables, "breakers", "p", "r", lambda row: None) is None
        assert await count() == 12

        def moved_meanwhile(row: dict[str, Any] | None) -> dict[str, Any]:
            racer.append(asyncio.ensure_future(change_row(other, "breakers", "p", "r", plus_one)))
            return {"n": 1000}

        racer: list[asyncio.Future[Any]] = []
        # The racer's write lands between this writer's read and its write: with one try, Conflict.
        original_call = tables.call

        async def call_then_let_racer_write(table: str, operation: Any) -> Any:
            if racer and not racer[0].done():
                await racer[0]
            return await original_call(table, operation)

        tables.call = call_then_let_racer_write  # type: ignore[method-assign]
        with pytest.raises(Conflict):
            await change_row(tables, "breakers", "p", "r", moved_meanwhile, tries=1)
        tables.call = original_call  # type: ignore[method-assign]
        assert await count() == 13  # the racer's addition, not the 1000 written over it
    finally:
        await tables.close()
        await other.close()


# ---- the consumer listing's snapshot (issue 32) ----------------------------------------------------------------------


async def _raw_put(store: Any, partition: str, row: str, props: dict[str, Any]) -> None:
    """Overwrite one snapshot row as a corrupting writer would (bypassing the store's own writes)."""
    if isinstance(store, memory.MemoryConsumerStore):
        current = store.snapshot_rows.get((partition, row), {})
        store.snapshot_rows[(partition, row)] = {**current, **props}
        return
    entity = {"PartitionKey": partition, "RowKey": row, **props}
    await store._tables.call("consumers", lambda t: t.upsert_entity(entity, mode="merge"))


async def _filled(store: Any, count: int) -> list[str]:
    from shared.edge.consumers import new_key

    keys = [new_key() for _ in range(count)]
    await store.create_many([consumer(f"s-{i}", key=k) for i, k in enumerate(keys)])
    return keys


async def test_a_listing_snapshot_is_written_in_chunks_and_read_back_as_the_listing(stores: Stores) -> None:
    """About 2,000 consumers (random key hashes do not compress) span several chunks, each a binary property of a row
    of its own partition; read back they are the listing, row for row. Replacing it deletes the chunks it replaced; a
    writer on a stale ETag loses (Conflict) and leaves the snapshot as it was."""
    from shared.records.consumer_snapshot import CHUNK_BYTES, SnapshotGone
    from shared.records.consumers import Team

    store: Any = stores.consumers
    await _filled(store, 2_000)
    await store.create_team(Team("t-1", "T", limits=Limits(tokens_per_minute=5)))
    consumers, teams = await store.list_all()
    assert await store.snapshot_head() == (None, None)
    await store.write_snapshot(consumers, teams, "abc123", 7, 1_000.0, None, None)
    head, etag = await store.snapshot_head()
    assert head is not None and etag is not None and (head.epoch, head.seq, head.written_at) == ("abc123", 7, 1_000.0)
    assert head.chunks > 3 and head.size > 3 * CHUNK_BYTES
    back, back_teams = await store.read_snapshot(head)
    assert sorted(back, key=lambda c: c.id) == sorted(consumers, key=lambda c: c.id) and back_teams == teams
    with pytest.raises(Conflict):
        await store.write_snapshot(consumers[:5], teams, "abc123", 9, 2_000.0, "W/\"datetime'2000-01-01T00%3A00%3A00Z'\"",
                                   head)
    assert (await store.snapshot_head())[0] == head
    await store.write_snapshot(consumers[:5], [], "abc123", 9, 2_000.0, etag, head)
    newer, _ = await store.snapshot_head()
    assert newer is not None and newer.seq == 9 and newer.chunks == 1
    assert [c.id for c in (await store.read_snapshot(newer))[0]] == [c.id for c in consumers[:5]]
    with pytest.raises(SnapshotGone):  # the generation it replaced is deleted: a reader of the old head reads again
        await store.read_snapshot(head)


@pytest.mark.parametrize("damage", ["chunk", "oversized", "format", "epoch", "truncated"])
async def test_a_cold_instance_reads_the_listing_when_the_snapshot_cannot_be_used(stores: Stores, damage: str) -> None:
    """A corrupt chunk, a chunk larger than a chunk may be, another format, another epoch of the change feed, a head
    promising more than the chunks hold: the cold instance reads the whole listing, and answers every key."""
    from shared.clock import FakeClock
    from shared.edge.consumers import ConsumerDirectory
    from shared.records.consumer_snapshot import CHUNK_BYTES, CHUNK_PK, HEAD_PK, HEAD_RK

    store: Any = stores.consumers
    keys = await _filled(store, 30)
    writer = ConsumerDirectory(store, FakeClock(), refresh_s=60)
    await writer.reload()
    assert writer._writing is not None
    await writer._writing
    head, _ = await store.snapshot_head()
    assert head is not None and writer.snapshot_writes == 1
    if damage == "chunk":
        await _raw_put(store, CHUNK_PK.format(0), head.generation, {"data": b"x" * 100})
    elif damage == "oversized":
        await _raw_put(store, CHUNK_PK.format(0), head.generation, {"data": b"x" * (CHUNK_BYTES + 1)})
    elif damage == "format":
        await _raw_put(store, HEAD_PK, HEAD_RK, {"format": 99})
    elif damage == "epoch":
        await _raw_put(store, HEAD_PK, HEAD_RK, {"epoch": "0ddba11"})
    else:
        await _raw_put(store, HEAD_PK, HEAD_RK, {"size": head.size + 1})
    cold = ConsumerDirectory(store, FakeClock(), refresh_s=60)
    assert (await cold.authenticate(keys[3])).id == "s-3"
    assert (cold.snapshot_loads, cold.snapshot_fallbacks) == (0, 1)
    if cold._writing is not None:  # the listing it read replaces the unusable snapshot
        await cold._writing
    fixed, _ = await store.snapshot_head()
    assert fixed is not None and fixed.generation != head.generation
    again = ConsumerDirectory(store, FakeClock(), refresh_s=60)
    assert (await again.authenticate(keys[4])).id == "s-4" and again.snapshot_loads == 1


async def test_a_row_changed_between_the_snapshots_stamp_and_its_listing_is_replayed_from_the_feed(stores: Stores) -> None:
    """The writer reads the marker, then the listing; a consumer disabled after the marker was read but before (or
    while) the listing was read may be in the snapshot as it was: its feed entry is after the stamp, so a cold
    instance reads its row before it answers, and refuses the key."""
    from shared.clock import FakeClock
    from shared.edge.consumers import ConsumerDirectory
    from shared.outcomes import ConsumerDisabled

    store: Any = stores.consumers
    keys = await _filled(store, 20)
    listing = await store.list_all()  # the listing as read before the change ...
    stamp = await store.change_marker()
    await store.put(replace((await store.get("s-5")), enabled=False))  # ... the change, recorded after the stamp
    await store.write_snapshot(*listing, stamp.epoch, stamp.seq, 1_000.0, None, None)
    cold = ConsumerDirectory(store, FakeClock(), refresh_s=60)
    with pytest.raises(ConsumerDisabled):
        await cold.authenticate(keys[5])
    assert (await cold.authenticate(keys[6])).id == "s-6"
    assert cold.snapshot_loads == 1 and cold.feed_reads == 1
