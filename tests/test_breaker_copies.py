"""The shared breaker state read from copies (shared/storage/breaker_table.py): what each read costs each partition
with many instances, that a trip reaches every instance at its next read, and that none is lost when a copy cannot be
written or when a gateway of an earlier version writes only the rows."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from typing import Any

import pytest

from shared.clock import FakeClock
from shared.config import Backend, BreakerRule
from shared.records.breaker import SAME_TRIP_S, BreakerRecord, is_news
from shared.routing.breaker import OPEN
from shared.routing.router import Router
from shared.storage.breaker_table import COPIES, KEEP_S, ROWS_EVERY, TableBreakerStore, copy_partition, copy_text
from shared.storage.protocols import Conflict, StoreBusy
from shared.telemetry.protocol import NullTelemetry

D = "gpt-4o"


class Table:
    """The breaker table in memory, as Table Storage answers: ETags, 412/409, a partition that can be throttled; every
    request counted by partition, with the entities it returned."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
        self.entities: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.busy: set[str] = set()  # partitions answering 503 ServerBusy
        self._v = 0

    def _ask(self, partition: str, entities: int = 1) -> None:
        self.requests[partition] += 1
        if partition in self.busy:
            raise StoreBusy("503 ServerBusy")
        self.entities[partition] += max(1, entities)

    async def query(self, partition: str) -> list[dict[str, Any]]:
        found = [dict(e) for (p, _), (e, _) in self.rows.items() if p == partition]
        self._ask(partition, len(found))
        return found

    async def read(self, partition: str, row: str) -> tuple[dict[str, Any] | None, str | None]:
        self._ask(partition)
        found = self.rows.get((partition, row))
        return (dict(found[0]), found[1]) if found else (None, None)

    async def write(self, entity: dict[str, Any], etag: str | None) -> None:
        key = (entity["PartitionKey"], entity["RowKey"])
        self._ask(key[0])
        current = self.rows.get(key)
        if (etag is None) != (current is None) or (current is not None and current[1] != etag):
            raise Conflict("412")
        self._v += 1
        self.rows[key] = (dict(entity), f"v{self._v}")

    def old_version_writes(self, r: BreakerRecord) -> None:
        """A gateway of an earlier version: it replaces the row, and knows nothing of the copies."""
        self._v += 1
        self.rows[("breaker", f"{r.backend_id}|{r.deployment}")] = ({
            "PartitionKey": "breaker", "RowKey": f"{r.backend_id}|{r.deployment}", "backend": r.backend_id,
            "deployment": r.deployment, "state": r.state, "until": r.until, "since": r.since, "reason": r.reason,
        }, f"v{self._v}")


def trip(backend: str, since: float, until: float | None = None, state: str = "open") -> BreakerRecord:
    return BreakerRecord(backend, D, state, since + 30 if until is None else until, since, "500" if state == "open" else "")


BACKENDS = tuple(
    Backend(id=b, endpoint=f"https://{b}.example", region=b, deployments={D: D}, breaker=BreakerRule(trip_s=30))
    for b in ("sweden", "france")
)


def fleet(table: Table, n: int, clock: FakeClock) -> list[Router]:
    return [Router(BACKENDS, clock, NullTelemetry(), TableBreakerStore(table, random.Random(i)), sync_s=0.5)
            for i in range(n)]


async def one_sync_each(routers: list[Router]) -> None:
    for r in routers:
        await r.sync()


def tripped(routers: list[Router], backend: str = "sweden") -> int:
    return sum(r._breakers[(backend, D)].state == OPEN for r in routers)


# ---- what is news ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shared", "record", "news"),
    [
        (None, trip("a", 100), True),
        (trip("a", 100), trip("a", 90), False),  # older, written late
        (trip("a", 100), trip("a", 100), False),  # the same
        (trip("a", 100, state="closed"), trip("a", 110), True),  # a trip where the state is closed
        (trip("a", 100), trip("a", 100.5), False),  # the same outage, tripped half a second later: told already
        (trip("a", 100, until=130), trip("a", 110, until=130 + SAME_TRIP_S + 0.1), True),  # ends later
        (trip("a", 100, until=300), trip("a", 110, until=140), False),  # ends sooner than the shared one
        (trip("a", 100), trip("a", 120, state="closed"), True),  # a recovery of a shared trip
        (trip("a", 100, state="closed"), trip("a", 120, state="closed"), False),  # closed already
        (trip("a", 120, state="closed"), trip("a", 110, state="closed"), False),
    ],
)
def test_a_transition_is_written_only_when_newer_and_news(
    shared: BreakerRecord | None, record: BreakerRecord, news: bool,
) -> None:
    assert is_news(shared, record) is news


def test_a_copy_forgets_what_ended_long_ago_and_always_fits_one_property() -> None:
    now = 100_000.0
    records = {("old", D): trip("old", now - KEEP_S - 100, until=now - KEEP_S - 1),
               ("long", D): trip("long", now - KEEP_S - 100, until=now + 10),  # started long ago, not over
               ("new", D): trip("new", now)}
    assert sorted(row[0] for row in json.loads(copy_text(records, now))) == ["long", "new"]
    many = {(f"backend-{i:04d}" + "x" * 40, D): trip(f"backend-{i:04d}" + "x" * 40, now - i) for i in range(2000)}
    text = copy_text(many, now)
    kept = json.loads(text)
    assert len(text) <= 30_000 and 100 < len(kept) < 2000
    assert kept[0][0].startswith("backend-0000")  # the newest kept (the rows hold the rest)


# ---- cost and reach with many instances ----------------------------------------------------------------------------


async def test_each_read_is_one_entity_of_a_copy_and_the_rows_are_queried_about_once_in_rows_every_x_rows() -> None:
    table, clock = Table(), FakeClock()
    routers = fleet(table, 400, clock)
    first = routers[0]
    first.record_failure(BACKENDS[0], D, 500, {})
    first.record_failure(BACKENDS[1], D, 500, {})  # two rows
    await asyncio.sleep(0)
    await asyncio.gather(*first._pending_writes)
    table.entities.clear()
    table.requests.clear()
    syncs = 20
    for _ in range(syncs):
        await one_sync_each(routers)
    reads = 400 * syncs
    assert sum(table.requests.values()) == reads  # one request a read, whatever the number of rows
    copies = [table.entities[copy_partition(k)] for k in range(COPIES)]
    # Each copy's partition serves about a COPIES-th of the reads (one entity each), the rows about one read in
    # ROWS_EVERY x 2 (two entities each): every partition about N / 4 entities a read interval, not 2 N as one query
    # of the rows would be.
    for served in copies:
        assert reads / COPIES * 0.6 < served < reads / COPIES * 1.15
    rows = table.entities["breaker"]
    assert reads / ROWS_EVERY * 0.6 < rows < reads / ROWS_EVERY * 1.5
    assert max(*copies, rows) < reads / 3
    assert tripped(routers) == 400 and tripped(routers, "france") == 400
    for r in routers:
        await r.close()


async def test_a_trip_reaches_every_one_of_a_thousand_instances_at_its_next_read() -> None:
    table, clock = Table(), FakeClock()
    routers = fleet(table, 1000, clock)
    await one_sync_each(routers)
    routers[17].record_auth_failure(BACKENDS[0], D, 401)
    await asyncio.gather(*routers[17]._pending_writes)
    await one_sync_each(routers)
    assert tripped(routers) == 1000
    for r in routers:
        await r.close()


async def test_a_copy_that_cannot_be_written_loses_no_trip_and_is_written_before_the_next_read() -> None:
    table, clock = Table(), FakeClock()
    routers = fleet(table, 200, clock)
    table.busy = {copy_partition(0), copy_partition(1), copy_partition(2)}  # three of the four copies throttled
    writer = routers[0]
    writer.record_auth_failure(BACKENDS[0], D, 401)
    await asyncio.gather(*writer._pending_writes)
    assert (copy_partition(0), "all") not in table.rows and (copy_partition(3), "all") in table.rows
    table.busy = set()
    for _ in range(12):  # each instance reads copy 3 (or the rows) a read in four or sooner; never one without it
        await one_sync_each(routers[1:])
    assert tripped(routers) == 200
    await writer.sync()  # the writer's next read first writes the copies it could not
    for k in range(COPIES):
        assert [r[0] for r in json.loads(table.rows[(copy_partition(k), "all")][0]["rows"])] == ["sweden"]
    for r in routers:
        await r.close()


async def test_every_copy_throttled_the_trip_still_reaches_everyone_through_the_rows() -> None:
    table, clock = Table(), FakeClock()
    routers = fleet(table, 100, clock)
    table.busy = {copy_partition(k) for k in range(COPIES)}
    routers[0].record_auth_failure(BACKENDS[0], D, 401)
    await asyncio.gather(*routers[0]._pending_writes)
    for _ in range(3 * ROWS_EVERY):  # a rows query within 1.5 x ROWS_EVERY x rows reads
        await one_sync_each(routers)
    assert tripped(routers) == 100


async def test_a_trip_written_by_a_gateway_of_an_earlier_version_reaches_every_new_instance() -> None:
    table, clock = Table(), FakeClock()
    routers = fleet(table, 300, clock)
    await one_sync_each(routers)
    table.old_version_writes(trip("sweden", clock.now(), until=clock.now() + 60))
    reads = 0
    while tripped(routers) < 300 and reads < 10:
        await one_sync_each(routers)
        reads += 1
    assert tripped(routers) == 300
    assert reads <= 1.5 * ROWS_EVERY * 1 + 1  # one row: a rows query within 1.5 x ROWS_EVERY reads
    # And what the new instances write, the old one reads: the row.
    routers[5].record_auth_failure(BACKENDS[1], D, 401)
    await asyncio.gather(*routers[5]._pending_writes)
    assert table.rows[("breaker", f"france|{D}")][0]["state"] == "open"


async def test_many_instances_tripping_on_one_outage_write_it_once() -> None:
    table, clock = Table(), FakeClock()
    routers = fleet(table, 300, clock)
    for r in routers:
        clock.advance(0.002)
        r.record_failure(BACKENDS[0], D, 500, {})
    await asyncio.gather(*(t for r in routers for t in r._pending_writes))
    assert tripped(routers) == 300
    writes = table.requests["breaker"] - 300  # each instance read the row once; the rest are writes
    assert writes <= 2
    assert json.loads(table.rows[(copy_partition(2), "all")][0]["rows"])[0][2] == "open"
    # The outage over: the first recovery is written, the others find it told.
    clock.advance(31)
    for r in routers:
        assert r.acquire(BACKENDS[0], D)
        r.record_success(BACKENDS[0], D, {})
    await asyncio.gather(*(t for r in routers for t in r._pending_writes))
    assert table.rows[("breaker", f"sweden|{D}")][0]["state"] == "closed"
    assert table.requests["breaker"] - 300 - writes <= 300 + 2


async def test_a_late_write_of_an_older_transition_never_replaces_a_newer_one_in_the_rows_or_the_copies() -> None:
    table = Table()
    store = TableBreakerStore(table, random.Random(1))
    await store.save(trip("sweden", 1_010.0, until=2_000.0))
    await store.save(trip("sweden", 1_005.0, state="closed"))  # an older recovery, late
    for _ in range(2 * COPIES * ROWS_EVERY):
        assert [(r.state, r.since) for r in await store.load()] == [("open", 1_010.0)]


async def test_a_malformed_copy_is_ignored_and_written_over() -> None:
    table = Table()
    table.rows[(copy_partition(0), "all")] = ({"PartitionKey": copy_partition(0), "RowKey": "all", "rows": "{"}, "v0")
    store = TableBreakerStore(table, random.Random(3))
    await store.save(trip("sweden", 1_000.0))
    assert json.loads(table.rows[(copy_partition(0), "all")][0]["rows"])[0][:3] == ["sweden", D, "open"]
