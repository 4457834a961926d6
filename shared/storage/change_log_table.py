"""The admin change log in Table Storage: one row per change, newest first per month."""

from __future__ import annotations

import time
from typing import Any

from azure.data.tables.aio import TableClient

from shared.storage.tables import Tables, collect

_NEWEST_FIRST = 10**13  # row keys count down, so the newest entries come first in a partition


class TableChangeLogStore:
    """One row per admin change, partitioned by month (key "YYYY-MM"), row keys newest first; a read goes from this
    month back to the month of `since` (the API asks at most 366 days: 13 partitions), stopping at `limit`."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    async def append(self, entry: Any) -> None:
        row = f"{_NEWEST_FIRST - int(entry.at * 1000):013d}-{entry.id}"
        entity = {
            "PartitionKey": time.strftime("%Y-%m", time.gmtime(entry.at)), "RowKey": row, "at": float(entry.at),
            "actor": entry.actor, "role": entry.role, "action": entry.action, "target": entry.target,
            "before": entry.before, "after": entry.after, "id": entry.id,
        }
        await self._tables.call("changes", lambda t: t.create_entity(entity))

    async def recent(self, limit: int, since: float) -> list[Any]:
        from shared.records.audit import AuditEntry

        found: list[Any] = []
        for month in _months_back(max(time.time(), since), since):
            query = "PartitionKey eq @m and at ge @since"
            parameters = {"m": month, "since": float(since)}

            async def read(t: TableClient, q: str = query, p: dict[str, Any] = parameters) -> list[dict[str, Any]]:
                return await collect(t.query_entities(q, parameters=p, results_per_page=min(limit, 1000)))

            entities = await self._tables.call("changes", read, self._tables.timeout_s * 10)
            found += [AuditEntry(float(e["at"]), e["actor"], e["role"], e["action"], e["target"], e.get("before", ""),
                                 e.get("after", ""), e.get("id", "")) for e in entities]
            if len(found) >= limit:
                break
        return sorted(found, key=lambda e: e.at, reverse=True)[:limit]


def _months_back(newest: float, oldest: float) -> list[str]:
    """The "YYYY-MM" of every month from newest's back to oldest's, newest first."""
    year, month = time.gmtime(newest)[:2]
    last = time.strftime("%Y-%m", time.gmtime(oldest))
    months = [f"{year:04d}-{month:02d}"]
    while months[-1] > last:
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
        months.append(f"{year:04d}-{month:02d}")
    return months
