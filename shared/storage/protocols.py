"""What the gateway asks of its stores, and the errors every store raises: one contract for the Table Storage
stores (tables.py and a *_table.py per table) and their in-memory twins (memory.py); tests/test_stores.py runs the same cases against both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the records are defined beside the logic that uses them; only their names are needed here
    from shared.records.audit import AuditEntry
    from shared.records.breaker import BreakerRecord
    from shared.records.capacity import CapacityReport, CapacitySummary
    from shared.records.consumer_feed import ChangeFeed
    from shared.records.consumer_snapshot import SnapshotHead
    from shared.records.consumers import Consumer, Team
    from shared.records.responses import StoredResponse
    from shared.records.spend import SpendRow
    from shared.records.traffic import TrafficRow
    from shared.records.usage import UsageRow


class StoreUnavailable(Exception):
    """The store did not answer in time or failed; callers fall back as their policy says."""


class StoreBusy(StoreUnavailable):
    """The store answers but throttles this partition or account: 503 ServerBusy. Not a reason to take it as down
    (a limiter falling back to local windows then would admit beyond what its leases already admitted).
    `retry_after_s`: the service's Retry-After, when it sent one."""

    def __init__(self, message: str = "503 ServerBusy", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ChangeNotAnnounced(StoreUnavailable):
    """A consumer or team row is written, but recording it in the consumers' change feed failed: the gateways see it at
    their next full reload, not at their next check."""


class Conflict(Exception):
    """An ETag-conditional write lost a race (412) or a create found the row already there (409)."""


class ConsumerStore(Protocol):
    async def change_marker(self) -> ChangeFeed:
        """The change marker: a token that changes whenever a consumer or team is written through this store (None
        before the first write), the feed's epoch and sequence, no entries. One small point read."""
        ...

    async def change_feed(self) -> ChangeFeed:
        """The change marker with the ids of the last changes (records/consumer_feed.py). One point read."""
        ...

    async def snapshot_head(self) -> tuple[SnapshotHead | None, str | None]:
        """The listing snapshot's head and its row's ETag (records/consumer_snapshot.py): (None, None) when there is
        none, (None, etag) when there is one this version cannot use. One point read."""
        ...

    async def read_snapshot(self, head: SnapshotHead) -> tuple[list[Consumer], list[Team]]:
        """The snapshot's rows (a point read per chunk); BadSnapshot when they are not what the head says."""
        ...

    async def write_snapshot(self, consumers: list[Consumer], teams: list[Team], epoch: str, seq: int,
                             written_at: float, etag: str | None, previous: SnapshotHead | None) -> None:
        """Replace the snapshot read with `etag` (None: create it); Conflict when another writer came first."""
        ...

    async def list_consumers(self) -> list[Consumer]: ...

    async def get(self, consumer_id: str) -> Consumer | None: ...

    async def find_by_key_hash(self, key_hash: str) -> Consumer | None: ...

    async def get_versioned(self, consumer_id: str) -> tuple[Consumer, str] | None:
        """The consumer and its ETag, for a change written with put(..., if_match=etag)."""
        ...

    async def put(self, consumer: Consumer, if_match: str | None = None) -> None:
        """Write the consumer; with `if_match`, only over that version, else Conflict (another writer came first)."""
        ...

    async def delete(self, consumer_id: str) -> bool: ...

    async def create(self, consumer: Consumer) -> None:
        """Write a new consumer; Conflict when its id exists."""
        ...

    async def list_teams(self) -> list[Team]: ...

    async def list_all(self) -> tuple[list[Consumer], list[Team]]:
        """Every consumer and every team, in one round trip (what a gateway reloads)."""
        ...

    async def get_team(self, team_id: str) -> Team | None: ...

    async def get_team_versioned(self, team_id: str) -> tuple[Team, str] | None:
        """The team and the ETag of its row (for put_team's if_match)."""
        ...

    async def put_team(self, team: Team, if_match: str | None = None) -> None:
        """Write the team; with `if_match`, only over that version (Conflict when another write came in between)."""
        ...

    async def create_team(self, team: Team) -> None:
        """Conflict when a team with that id exists."""
        ...

    async def delete_team(self, team_id: str) -> bool: ...


class LedgerStore(Protocol):
    """A consumer's ledger as one row of properties; what they mean is the ledger's business (shared/limits/ledger.py:
    Ledger.to_entity and Ledger.from_entity)."""

    async def read(self, consumer_id: str) -> tuple[dict[str, object] | None, str | None]:
        """The ledger's row and its ETag; (None, None) when there is none yet."""
        ...

    async def write(self, consumer_id: str, row: Mapping[str, object], etag: str | None) -> str:
        """Store `row` if the stored one still has `etag` (None: if there is none); return the new ETag.

        Raises Conflict when another writer got there first, StoreUnavailable when the store does not answer."""
        ...


class BudgetStore(Protocol):
    async def save(self, rows: list[SpendRow]) -> None:
        """Upsert this instance's spend rows (each instance owns its own rows)."""
        ...

    async def read(self, consumer: str, period: str) -> list[SpendRow]:
        """Every instance's row of one consumer and budget period."""
        ...


class BreakerStore(Protocol):
    async def load(self) -> list[BreakerRecord]:
        """Every shared breaker record, in one round trip whatever the number of backends."""
        ...

    async def save(self, record: BreakerRecord) -> None:
        """Share a transition if it is news (records/breaker.is_news): never over a newer one (by `since`)."""
        ...


class CapacityStore(Protocol):
    async def publish(self, report: CapacityReport) -> None:
        """Replace this instance's report for its backend and deployment (each instance owns its own rows)."""
        ...

    async def load(self) -> list[CapacityReport]:
        """Every instance's reports, in one round trip."""
        ...

    async def read_summary(self, backend_id: str, deployment: str) -> tuple[CapacitySummary | None, str | None]:
        """The one summary row of a PTU deployment and its ETag (None, None: there is none yet); a point read."""
        ...

    async def write_summary(self, summary: CapacitySummary, etag: str | None) -> None:
        """Replace the summary row only over the version read (`etag`; None: create it), else Conflict."""
        ...


class UsageStore(Protocol):
    async def save(self, rows: list[UsageRow]) -> None:
        """Upsert cumulative rows (each instance owns its own rows)."""
        ...

    async def query(self, consumer: str | None, start_hour: str, end_hour: str) -> list[UsageRow]:
        """Rows of hours in [start_hour, end_hour), of one consumer or all."""
        ...


class ResponseStore(Protocol):
    """Where stored responses live (response id -> backend and owner), kept for the backends' retention."""

    async def put(self, record: StoredResponse) -> None:
        """Record (or replace) where a response lives."""
        ...

    async def get(self, response_id: str, now: float) -> StoredResponse | None:
        """The record, or None when there is none or it has expired (an expired row is deleted, lazily)."""
        ...

    async def settle(self, response_id: str) -> bool:
        """Mark an unsettled record settled; True only for the one caller that changed it (a conditional write)."""
        ...

    async def rehold(self, response_id: str, held_until_ms: int, previous_ms: int) -> bool:
        """Move an unsettled record's hold from `previous_ms` to `held_until_ms`, on a conditional write; False when it
        was settled, or moved, by another caller meanwhile."""
        ...

    async def forget(self, response_id: str) -> None:
        """Drop the record (the response was deleted); nothing to drop is fine."""
        ...

    async def due(self, by_ms: int, now_ms: int, claim_until_ms: int, limit: int) -> list[tuple[str, str]]:
        """(response id, consumer id) of at most `limit` unsettled records whose hold ends by `by_ms` and which no
        sweeper has claimed past `now_ms`, read in one query; each one returned is claimed until `claim_until_ms` by a
        conditional write, so sweepers running at once get disjoint lists. An unsettled record is listed from its
        `put` until it is settled (`settle`), its hold's end following `rehold`."""
        ...

    async def unindex(self, response_id: str) -> None:
        """Stop listing a record in `due` (it is settled, deleted or expired); nothing to drop is fine."""
        ...


class AnswerStore(Protocol):
    """Where the response cache keeps its entries (key: 64 hex digits -> the entry's bytes), shared by every instance.
    Expiry is the reader's business (each entry carries its time); what is never read again is deleted by the
    storage account's lifecycle rule."""

    async def get(self, key: str) -> bytes | None:
        """The entry's bytes, or None when there is none."""
        ...

    async def put(self, key: str, data: bytes) -> None:
        """Store (or replace) an entry."""
        ...


class AuditStore(Protocol):
    """Where the audit trail goes (docs/safety.md): JSON Lines appended to one blob per consumer, hour and instance.
    Retention is the storage account's lifecycle rule."""

    async def append(self, name: str, data: bytes) -> None:
        """Append whole lines to the blob `name` (created when absent). StoreUnavailable when it could not."""
        ...


class ChangeLogStore(Protocol):
    """The admin changes (who, what, when, before and after): the admin API's /audit."""

    async def append(self, entry: AuditEntry) -> None:
        """Add one admin change (never overwrites another)."""
        ...

    async def recent(self, limit: int, since: float) -> list[AuditEntry]:
        """The newest entries first, at most `limit`, none older than `since` (epoch seconds)."""
        ...


class TrafficStore(Protocol):
    async def save(self, rows: list[TrafficRow]) -> None:
        """Write one instance's rows (one per 10-s bucket), replacing that instance's rows of the same buckets."""
        ...

    async def read(self, first_bucket: int, last_bucket: int) -> list[TrafficRow]:
        """Every instance's rows of buckets first..last inclusive."""
        ...

    async def forget(self, instance: str, buckets: list[int]) -> None:
        """Delete this instance's rows of these buckets (missing ones are fine)."""
        ...
