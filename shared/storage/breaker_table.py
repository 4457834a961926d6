"""Shared breaker state in Table Storage: one row per backend and deployment."""

from __future__ import annotations

import logging
from typing import Any

from shared.storage.protocols import Conflict
from shared.storage.tables import Tables, change_row, collect

log = logging.getLogger(__name__)


_BREAKER_PK = "breaker"
_BREAKER_WRITE_TRIES = 16  # each conflict means another writer finished: n writers at once need at most n tries


class TableBreakerStore:
    """One row per backend and deployment, written on breaker transitions only; every instance reads them all a few times a second."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    async def load(self) -> list[Any]:
        from shared.records.breaker import BreakerRecord

        entities = await self._tables.call(
            "breakers", lambda t: collect(t.query_entities(f"PartitionKey eq '{_BREAKER_PK}'"))
        )
        return [
            BreakerRecord(e["backend"], e["deployment"], e["state"], float(e["until"]), float(e["since"]), e.get("reason", ""))
            for e in entities
        ]

    async def save(self, record: Any) -> None:
        """Share a transition unless a newer one is already shared: written on the row's ETag, so that an instance's
        late write of an older transition (a stale "closed") never replaces another's newer trip."""
        row_key = f"{record.backend_id}|{record.deployment}"
        entity = {
            "PartitionKey": _BREAKER_PK,
            "RowKey": row_key,
            "backend": record.backend_id,
            "deployment": record.deployment,
            "state": record.state,
            "until": float(record.until),
            "since": float(record.since),
            "reason": record.reason,
        }
        def newer(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is not None and float(current.get("since", 0.0)) >= record.since:
                return None  # a newer (or the same) transition is already shared
            return entity

        try:
            await change_row(self._tables, "breakers", _BREAKER_PK, row_key, newer, tries=_BREAKER_WRITE_TRIES)
            return
        except Conflict:
            pass
        log.info("breaker state of %s not shared: kept losing to concurrent writes", record.backend_id)
