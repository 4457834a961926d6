"""Shared breaker state in Table Storage: one row per backend and deployment, and copies of all of them.

Every instance reads the shared state every `GATEWAY_BREAKER_SYNC_S` (0.5 s). Read as one query of the rows, that is
2 N B entities a second of one partition (N instances, B rows): past 500 instances with 2 rows, more than the 2,000 a
second Table Storage serves a partition (issue 32: bench.scale's 1,000 instances asked 3,822 a second and had 8,093
ServerBusy). So the state is also kept, whole, in COPIES entities of their own partitions (`breaker|0` ...), one
entity each whatever B, and a read is a point read of one copy chosen at random: N / COPIES / interval entities a
second of each copy's partition, 500 at Flex Consumption's 1,000 instances, and a trip still reaches everyone at their
next read. The rows themselves are still written (gateways of an earlier version read and write only them) and are
read at about one read in ROWS_EVERY x rows, so that what such a gateway writes reaches every instance within seconds
while they together ask the rows' partition about N / ROWS_EVERY / interval entities a second (500 at 1,000).

A transition is written only when it is news (records/breaker.is_news): to the row on its ETag, then to every copy on
its ETag. A copy that could not be written (throttled, lost too many races) is written again before the next reads;
meanwhile the instances reading another copy, or the rows, learn it there, so a trip is never lost, only later.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from typing import Any, Protocol

from azure.core.exceptions import ResourceNotFoundError

from shared.records.breaker import BreakerRecord, is_news
from shared.storage.protocols import Conflict, StoreUnavailable
from shared.storage.tables import Tables, change_on_etag, collect, entity_etag, replace_if_unchanged

log = logging.getLogger(__name__)


_BREAKER_PK = "breaker"
_COPY_RK = "all"
_BREAKER_WRITE_TRIES = 16  # each conflict means another writer finished: n writers at once need at most n tries
COPIES = 4  # copies of the whole state, each in its partition (a constant: every version must write all that any reads)
ROWS_EVERY = 4  # about one read in ROWS_EVERY x (rows last returned) queries the rows, the rest read a copy
KEEP_S = 3600.0  # a copy forgets a transition this long past both its start and its end (the rows keep it)
_PROPERTY_CHARS = 30_000  # a string property holds 32K characters


def copy_partition(k: int) -> str:
    """A copy's partition: never returned by the rows' query (`PartitionKey eq 'breaker'`), old versions' too."""
    return f"{_BREAKER_PK}|{k}"


class BreakerTable(Protocol):
    """The operations the breaker store makes of its table, each one request (tables.py; bench/simtable.py's twin)."""

    async def query(self, partition: str) -> list[dict[str, Any]]: ...

    async def read(self, partition: str, row: str) -> tuple[dict[str, Any] | None, str | None]: ...

    async def write(self, entity: dict[str, Any], etag: str | None) -> None:
        """Replace the row if it still has `etag`, create it if `etag` is None; else Conflict."""
        ...


class _Table:
    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    async def query(self, partition: str) -> list[dict[str, Any]]:
        return await self._tables.call(
            "breakers", lambda t: collect(t.query_entities(f"PartitionKey eq '{partition}'"))
        )

    async def read(self, partition: str, row: str) -> tuple[dict[str, Any] | None, str | None]:
        try:
            entity = await self._tables.call("breakers", lambda t: t.get_entity(partition, row))
        except ResourceNotFoundError:
            return None, None
        return dict(entity), entity_etag(entity)

    async def write(self, entity: dict[str, Any], etag: str | None) -> None:
        if etag is None:
            await self._tables.call("breakers", lambda t: t.create_entity(entity))
        else:
            await self._tables.call("breakers", replace_if_unchanged(entity, etag))


async def _change(table: BreakerTable, partition: str, row: str,
                  change: Callable[[dict[str, Any] | None], dict[str, Any] | None]) -> bool:
    """tables.change_on_etag over the BreakerTable (which bench.scale's simulated table also implements): `change`
    returns the entity to write over what it was given, or None (nothing to tell). True when written; Conflict after
    _BREAKER_WRITE_TRIES lost races."""
    written = await change_on_etag(lambda: table.read(partition, row), table.write, change, _BREAKER_WRITE_TRIES,
                                   f"breakers: every write of {partition}/{row}")
    return written is not None


def _from_row(e: dict[str, Any]) -> BreakerRecord:
    return BreakerRecord(e["backend"], e["deployment"], e["state"], float(e["until"]), float(e["since"]),
                         e.get("reason", ""))


def _from_copy(e: dict[str, Any] | None) -> dict[tuple[str, str], BreakerRecord]:
    if e is None:
        return {}
    try:
        rows = json.loads(e["rows"])
        records = [BreakerRecord(str(b), str(d), str(s), float(u), float(t), str(r)) for b, d, s, u, t, r in rows]
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("ignored a malformed breaker copy (%s)", type(exc).__name__)
        return {}  # written over by the next transition; the rows still have every one
    return {(r.backend_id, r.deployment): r for r in records}


def copy_text(records: dict[tuple[str, str], BreakerRecord], now: float) -> str:
    """A copy's state as JSON: transitions both started and ended within KEEP_S of `now` (the newest kept first when
    even those do not fit one property: the rows hold the rest)."""
    kept = sorted((r for r in records.values() if max(r.since, r.until) >= now - KEEP_S),
                  key=lambda r: r.since, reverse=True)
    while True:
        text = json.dumps([[r.backend_id, r.deployment, r.state, r.until, r.since, r.reason] for r in kept],
                          separators=(",", ":"))
        if len(text) <= _PROPERTY_CHARS or len(kept) <= 1:
            return text
        kept = kept[: len(kept) * 9 // 10]


class TableBreakerStore:
    """The rows (one per backend and deployment, the truth, what earlier versions read) and COPIES copies of them."""

    def __init__(self, tables: Tables | BreakerTable, rng: random.Random | None = None) -> None:
        self._table: BreakerTable = _Table(tables) if isinstance(tables, Tables) else tables
        self._rng = rng or random.Random()
        self._rows = 1  # rows the last query of them returned
        # Copy reads before the next query of the rows: a newcomer's first read is a copy too, most often (a fleet
        # starting at once would otherwise query the rows in the same second).
        self._reads_to_rows = self._rng.randrange(ROWS_EVERY)
        self._unwritten: dict[int, dict[tuple[str, str], BreakerRecord]] = {}  # per copy, what a save could not write
        self.copy_reads = 0
        self.row_reads = 0

    async def load(self) -> list[BreakerRecord]:
        """Every shared transition: a copy's (one entity), or now and then the rows' (see the module's docstring)."""
        await self._write_unwritten()
        if self._reads_to_rows > 0:
            self._reads_to_rows -= 1
            self.copy_reads += 1
            entity, _ = await self._table.read(copy_partition(self._rng.randrange(COPIES)), _COPY_RK)
            return list(_from_copy(entity).values())
        # Out of step with the other instances: at about one read in ROWS_EVERY x rows (so their entities a second
        # stay N / ROWS_EVERY / interval however many rows there are), drawn from +-50 %.
        self._reads_to_rows = max(1, round(ROWS_EVERY * self._rows * self._rng.uniform(0.5, 1.5)))
        self.row_reads += 1
        records = []
        for e in await self._table.query(_BREAKER_PK):
            try:
                records.append(_from_row(e))
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("ignored a malformed breaker row (%s)", type(exc).__name__)
        self._rows = max(1, len(records))
        return records

    async def save(self, record: BreakerRecord) -> None:
        """Share a transition if it is news (records/breaker.is_news): written on the row's ETag, so that an
        instance's late write of an older transition (a stale "closed") never replaces another's newer trip; then on
        every copy's. Raises StoreUnavailable when the row could not be written (the copies are tried anyway)."""
        try:
            told = await self._change_row(record)
        except Conflict:
            log.info("breaker state of %s not shared: kept losing to concurrent writes", record.backend_id)
            return
        except StoreUnavailable:
            await self._write_copies(record)
            raise
        if told:
            await self._write_copies(record)

    async def _change_row(self, record: BreakerRecord) -> bool:
        row_key = f"{record.backend_id}|{record.deployment}"
        entity = {
            "PartitionKey": _BREAKER_PK, "RowKey": row_key, "backend": record.backend_id,
            "deployment": record.deployment, "state": record.state, "until": float(record.until),
            "since": float(record.since), "reason": record.reason,
        }

        def told(current: dict[str, Any] | None) -> dict[str, Any] | None:
            try:
                shared = _from_row(current) if current is not None else None
            except (KeyError, TypeError, ValueError):
                shared = None
            return entity if is_news(shared, record) else None  # None: told already (or a newer one is shared)

        return await _change(self._table, _BREAKER_PK, row_key, told)

    async def _write_copies(self, record: BreakerRecord) -> None:
        await asyncio.gather(*(self._write_copy(k, [record]) for k in range(COPIES)))

    async def _write_copy(self, k: int, records: list[BreakerRecord]) -> None:
        try:
            await self._change_copy(k, records)
        except (StoreUnavailable, Conflict) as exc:
            log.info("breaker copy %d not written (%s): again before the next read", k, type(exc).__name__)
            pending = self._unwritten.setdefault(k, {})
            for r in records:
                key = (r.backend_id, r.deployment)
                if key not in pending or pending[key].since < r.since:
                    pending[key] = r
            return
        left = self._unwritten.get(k)
        if left is not None:
            for r in records:
                if left.get((r.backend_id, r.deployment)) == r:
                    del left[(r.backend_id, r.deployment)]
            if not left:
                del self._unwritten[k]

    async def _change_copy(self, k: int, records: list[BreakerRecord]) -> None:
        partition = copy_partition(k)

        def with_news(current: dict[str, Any] | None) -> dict[str, Any] | None:
            shared = _from_copy(current)
            news = [r for r in records if is_news(shared.get((r.backend_id, r.deployment)), r)]
            if not news:
                return None
            for r in news:
                shared[(r.backend_id, r.deployment)] = r
            now = max(r.since for r in records)
            return {"PartitionKey": partition, "RowKey": _COPY_RK, "rows": copy_text(shared, now)}

        await _change(self._table, partition, _COPY_RK, with_news)

    async def _write_unwritten(self) -> None:
        for k, pending in list(self._unwritten.items()):
            await self._write_copy(k, list(pending.values()))

