"""In-memory twins of the Table Storage stores, with the same contract (storage/protocols.py): ETag conditions,
409 on create, an older breaker transition never replacing a newer one. `unavailable` switches a twin off."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from shared.records.breaker import is_news
from shared.records.consumer_feed import CONSUMER, TEAM, ChangeFeed, appended, parse, parse_marker
from shared.records.consumer_snapshot import (
    CHUNK_PK,
    HEAD_PK,
    HEAD_RK,
    BadSnapshot,
    SnapshotHead,
    check_chunk,
    parse_head,
    read_chunks,
)
from shared.storage.consumer_table import SNAPSHOT_SCHEMA, decode_snapshot, encode_snapshot
from shared.storage.protocols import Conflict, StoreBusy, StoreUnavailable

if TYPE_CHECKING:
    from shared.records.audit import AuditEntry
    from shared.records.breaker import BreakerRecord
    from shared.records.capacity import CapacityReport, CapacitySummary
    from shared.records.consumers import Consumer, Team
    from shared.records.responses import StoredResponse
    from shared.records.spend import SpendRow
    from shared.records.traffic import TrafficRow
    from shared.records.usage import UsageRow


class _Switch:
    unavailable = False

    def _check(self) -> None:
        if self.unavailable:
            raise StoreUnavailable("memory store switched off")


class MemoryConsumerStore(_Switch):
    def __init__(self) -> None:
        self.consumers: dict[str, Consumer] = {}
        self.teams: dict[str, Team] = {}
        self.team_etags: dict[str, str] = {}
        self.calls = 0
        # The change marker: every write through the store bumps `writes` and records the feed. A test bumping
        # `writes` by hand is a marker replaced without a feed (an older version's admin command).
        self.writes = 0
        self.etags: dict[str, str] = {}
        self._feed: dict[str, object] | None = None
        self._feed_at = 0  # `writes` when the feed was recorded
        # The listing snapshot's rows by (partition, row): the head (with its "etag") and the chunks, as the table has them.
        self.snapshot_rows: dict[tuple[str, str], dict[str, object]] = {}
        self.snapshot_writes = 0

    def _current_feed(self) -> ChangeFeed:
        return parse(str(self.writes) if self.writes else None,
                     self._feed if self._feed_at == self.writes else None)

    def mark(self, changed: list[tuple[str, str]]) -> None:
        self._feed = appended(self._current_feed(), changed)
        self.writes += 1
        self._feed_at = self.writes

    async def change_marker(self) -> ChangeFeed:
        self._check()
        self.calls += 1
        return parse_marker(str(self.writes) if self.writes else None,
                            self._feed if self._feed_at == self.writes else None)

    async def change_feed(self) -> ChangeFeed:
        self._check()
        self.calls += 1
        return self._current_feed()

    async def snapshot_head(self) -> tuple[SnapshotHead | None, str | None]:
        self._check()
        self.calls += 1
        row = self.snapshot_rows.get((HEAD_PK, HEAD_RK))
        if row is None:
            return None, None
        etag = str(row["etag"])
        try:
            return parse_head(row, etag, SNAPSHOT_SCHEMA), etag
        except BadSnapshot:
            return None, etag

    def snapshot_chunk(self, head: SnapshotHead, k: int) -> bytes:
        return check_chunk(head, self.snapshot_rows.get((CHUNK_PK.format(k), head.generation)))

    async def read_snapshot(self, head: SnapshotHead) -> tuple[list[Consumer], list[Team]]:
        self._check()

        async def chunk(k: int) -> bytes:
            self._check()
            self.calls += 1
            return self.snapshot_chunk(head, k)

        return decode_snapshot(head, await read_chunks(head, chunk, lambda exc: isinstance(exc, StoreBusy)))

    async def write_snapshot(self, consumers: list[Consumer], teams: list[Team], epoch: str, seq: int,
                             written_at: float, etag: str | None, previous: SnapshotHead | None) -> None:
        """As the Table store: chunks, then the head on its ETag, then the previous generation's chunks deleted."""
        self._check()
        encoded = encode_snapshot(consumers, teams, epoch, seq, written_at)
        for k, data in enumerate(encoded.chunks):
            self.snapshot_rows[(CHUNK_PK.format(k), encoded.generation)] = {"data": data}
        current = self.snapshot_rows.get((HEAD_PK, HEAD_RK))
        if (current is None) != (etag is None) or (current is not None and current["etag"] != etag):
            for k in range(len(encoded.chunks)):
                self.snapshot_rows.pop((CHUNK_PK.format(k), encoded.generation), None)
            raise Conflict("another writer replaced the snapshot first")
        self.snapshot_writes += 1
        self.snapshot_rows[(HEAD_PK, HEAD_RK)] = {**encoded.head, "etag": f"s{self.snapshot_writes}"}
        if previous is not None:
            for k in range(previous.chunks):
                self.snapshot_rows.pop((CHUNK_PK.format(k), previous.generation), None)

    async def list_consumers(self) -> list[Consumer]:
        self._check()
        self.calls += 1
        return list(self.consumers.values())

    async def get(self, consumer_id: str) -> Consumer | None:
        self._check()
        self.calls += 1
        return self.consumers.get(consumer_id)

    async def find_by_key_hash(self, key_hash: str) -> Consumer | None:
        self._check()
        self.calls += 1
        for consumer in self.consumers.values():
            if key_hash in (consumer.key_hash, consumer.previous_key_hash):
                return consumer
        return None

    async def get_versioned(self, consumer_id: str) -> tuple[Consumer, str] | None:
        self._check()
        self.calls += 1
        consumer = self.consumers.get(consumer_id)
        return None if consumer is None else (consumer, self.etags[consumer_id])

    async def put(self, consumer: Consumer, if_match: str | None = None) -> None:
        self._check()
        if if_match is not None and self.etags.get(consumer.id) != if_match:
            raise Conflict("etag mismatch" if consumer.id in self.consumers else "consumer deleted")
        self._store(consumer)

    def _store(self, consumer: Consumer) -> None:
        self.consumers[consumer.id] = consumer
        self.mark([(CONSUMER, consumer.id)])
        self.etags[consumer.id] = f"c{self.writes}"

    async def create(self, consumer: Consumer) -> None:
        self._check()
        if consumer.id in self.consumers:
            raise Conflict("consumer exists")
        self._store(consumer)

    async def create_many(self, consumers: list[Consumer]) -> None:
        self._check()
        for start in range(0, len(consumers), 100):  # as the Table store: batches of 100, each all or nothing
            chunk = consumers[start : start + 100]
            if any(c.id in self.consumers for c in chunk) or len({c.id for c in chunk}) < len(chunk):
                raise Conflict("consumer exists")
            for c in chunk:
                self.consumers[c.id] = c
                self.etags[c.id] = f"c{self.writes + 1}-{c.id}"
            self.mark([(CONSUMER, c.id) for c in chunk])

    async def delete(self, consumer_id: str) -> bool:
        self._check()
        deleted = self.consumers.pop(consumer_id, None) is not None
        self.etags.pop(consumer_id, None)
        if deleted:
            self.mark([(CONSUMER, consumer_id)])
        return deleted

    async def list_teams(self) -> list[Team]:
        self._check()
        self.calls += 1
        return list(self.teams.values())

    async def list_all(self) -> tuple[list[Consumer], list[Team]]:
        return await self.list_consumers(), list(self.teams.values())  # one call, as the Table store's one query

    async def get_team(self, team_id: str) -> Team | None:
        self._check()
        self.calls += 1
        return self.teams.get(team_id)

    async def get_team_versioned(self, team_id: str) -> tuple[Team, str] | None:
        self._check()
        self.calls += 1
        team = self.teams.get(team_id)
        return None if team is None else (team, self.team_etags[team_id])

    async def put_team(self, team: Team, if_match: str | None = None) -> None:
        self._check()
        if if_match is not None and self.team_etags.get(team.id) != if_match:
            raise Conflict("etag mismatch" if team.id in self.teams else "team deleted")
        self._store_team(team)

    def _store_team(self, team: Team) -> None:
        self.teams[team.id] = team
        self.mark([(TEAM, team.id)])
        self.team_etags[team.id] = f"t{self.writes}"

    async def create_team(self, team: Team) -> None:
        self._check()
        if team.id in self.teams:
            raise Conflict("team exists")
        self._store_team(team)

    async def delete_team(self, team_id: str) -> bool:
        self._check()
        deleted = self.teams.pop(team_id, None) is not None
        if deleted:
            self.mark([(TEAM, team_id)])
        return deleted


class MemoryLedgerStore(_Switch):
    def __init__(self) -> None:
        self.ledgers: dict[str, tuple[dict[str, object], str]] = {}
        self.reads = 0
        self.writes = 0
        self._version = 0

    async def read(self, consumer_id: str) -> tuple[dict[str, object] | None, str | None]:
        self._check()
        self.reads += 1
        stored = self.ledgers.get(consumer_id)
        if stored is None:
            return None, None
        return dict(stored[0]), stored[1]

    async def write(self, consumer_id: str, row: Mapping[str, object], etag: str | None) -> str:
        self._check()
        self.writes += 1
        stored = self.ledgers.get(consumer_id)
        if (stored[1] if stored else None) != etag:
            raise Conflict("etag mismatch")
        self._version += 1
        new_etag = f"v{self._version}"
        self.ledgers[consumer_id] = (dict(row), new_etag)
        return new_etag


class MemoryBudgetStore:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], SpendRow] = {}
        self.reads = 0

    async def save(self, rows: list[SpendRow]) -> None:
        for row in rows:
            self.rows[(row.consumer, row.period, row.instance)] = row

    async def read(self, consumer: str, period: str) -> list[SpendRow]:
        self.reads += 1
        return [r for (c, p, _), r in self.rows.items() if c == consumer and p == period]


class MemoryBreakerStore(_Switch):
    def __init__(self) -> None:
        self.records: dict[str, BreakerRecord] = {}
        self.saves = 0
        self.loads = 0

    async def load(self) -> list[BreakerRecord]:
        self._check()
        self.loads += 1
        return list(self.records.values())

    async def save(self, record: BreakerRecord) -> None:
        self._check()
        self.saves += 1
        key = f"{record.backend_id}|{record.deployment}"
        if is_news(self.records.get(key), record):  # as the table store: an older transition never wins
            self.records[key] = record


class MemoryCapacityStore(_Switch):
    def __init__(self) -> None:
        self.reports: dict[tuple[str, str, str], CapacityReport] = {}
        self.publishes = 0
        self.loads = 0
        self.summaries: dict[tuple[str, str], tuple[CapacitySummary, str]] = {}  # (backend, deployment) -> (row, etag)
        self.summary_reads = self.summary_writes = self.summary_conflicts = 0

    async def publish(self, report: CapacityReport) -> None:
        self._check()
        self.publishes += 1
        self.reports[(report.backend_id, report.deployment, report.instance)] = report

    async def load(self) -> list[CapacityReport]:
        self._check()
        self.loads += 1
        return list(self.reports.values())

    async def read_summary(self, backend_id: str, deployment: str) -> tuple[CapacitySummary | None, str | None]:
        self._check()
        self.summary_reads += 1
        return self.summaries.get((backend_id, deployment), (None, None))

    async def write_summary(self, summary: CapacitySummary, etag: str | None) -> None:
        self._check()
        key = (summary.backend_id, summary.deployment)
        if self.summaries.get(key, (None, None))[1] != etag:
            self.summary_conflicts += 1
            raise Conflict("412: the summary changed since it was read" if etag else "409: the summary exists")
        self.summary_writes += 1
        self.summaries[key] = (summary, f"s{self.summary_writes}")


class MemoryUsageStore(_Switch):
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str, str], UsageRow] = {}
        self.saves = 0

    async def save(self, rows: list[UsageRow]) -> None:
        self._check()
        self.saves += 1
        for row in rows:
            self.rows[(row.consumer, row.hour, row.deployment, row.instance)] = row

    async def query(self, consumer: str | None, start_hour: str, end_hour: str) -> list[UsageRow]:
        self._check()
        return [
            r for r in self.rows.values()
            if (consumer is None or r.consumer == consumer) and start_hour <= r.hour < end_hour
        ]


class MemoryResponseStore(_Switch):
    def __init__(self) -> None:
        self.records: dict[str, StoredResponse] = {}
        # The sweep's partition: response id -> (consumer id, hold's end (ms), claimed until (ms)).
        self.unsettled: dict[str, tuple[str, int, int]] = {}
        self.reads = 0
        self.queries = 0

    async def put(self, record: StoredResponse) -> None:
        self._check()
        self.records[record.response_id] = record
        if record.unsettled and record.held_until_ms:
            self.unsettled[record.response_id] = (record.consumer_id, record.held_until_ms, 0)

    async def due(self, by_ms: int, now_ms: int, claim_until_ms: int, limit: int) -> list[tuple[str, str]]:
        self._check()
        self.queries += 1
        found = [(r, row) for r, row in self.unsettled.items() if row[1] <= by_ms and row[2] <= now_ms][:limit]
        for r, row in found:
            self.unsettled[r] = (row[0], row[1], claim_until_ms)
        return [(r, row[0]) for r, row in found]

    async def unindex(self, response_id: str) -> None:
        self._check()
        self.unsettled.pop(response_id, None)

    async def get(self, response_id: str, now: float) -> StoredResponse | None:
        self._check()
        self.reads += 1
        record = self.records.get(response_id)
        if record is not None and record.expired(now):
            del self.records[response_id]
            return None
        return record

    async def settle(self, response_id: str) -> bool:
        self._check()
        record = self.records.get(response_id)
        if record is None or not record.unsettled:
            return False
        self.records[response_id] = replace(record, unsettled=False)
        self.unsettled.pop(response_id, None)
        return True

    async def rehold(self, response_id: str, held_until_ms: int, previous_ms: int) -> bool:
        self._check()
        record = self.records.get(response_id)
        if record is None or not record.unsettled or record.held_until_ms != previous_ms:
            return False
        self.records[response_id] = replace(record, held_until_ms=held_until_ms)
        self.unsettled[response_id] = (record.consumer_id, held_until_ms, 0)
        return True

    async def forget(self, response_id: str) -> None:
        self._check()
        self.records.pop(response_id, None)


class MemoryAnswerStore(_Switch):
    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}
        self.reads = 0
        self.writes = 0

    async def get(self, key: str) -> bytes | None:
        self._check()
        self.reads += 1
        return self.entries.get(key)

    async def put(self, key: str, data: bytes) -> None:
        self._check()
        self.writes += 1
        self.entries[key] = data


class MemoryAuditStore(_Switch):
    def __init__(self) -> None:
        self.blobs: dict[str, bytearray] = {}
        self.appends = 0

    async def append(self, name: str, data: bytes) -> None:
        self._check()
        self.appends += 1
        self.blobs.setdefault(name, bytearray()).extend(data)

    def lines(self) -> list[bytes]:
        return [line for blob in self.blobs.values() for line in bytes(blob).splitlines()]


class MemoryChangeLogStore(_Switch):
    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []

    async def append(self, entry: AuditEntry) -> None:
        self._check()
        self.entries.append(entry)

    async def recent(self, limit: int, since: float) -> list[AuditEntry]:
        self._check()
        return sorted((e for e in reversed(self.entries) if e.at >= since), key=lambda e: e.at, reverse=True)[:limit]


class MemoryTrafficStore(_Switch):
    def __init__(self) -> None:
        self.rows: dict[tuple[int, str], TrafficRow] = {}
        self.calls = 0

    async def save(self, rows: list[TrafficRow]) -> None:
        self._check()
        self.calls += 1
        for row in rows:
            self.rows[(row.bucket, row.instance)] = row

    async def read(self, first_bucket: int, last_bucket: int) -> list[TrafficRow]:
        self._check()
        self.calls += 1
        return [r for (b, _), r in sorted(self.rows.items()) if first_bucket <= b <= last_bucket]

    async def forget(self, instance: str, buckets: list[int]) -> None:
        self._check()
        self.calls += 1
        for bucket in buckets:
            self.rows.pop((bucket, instance), None)
