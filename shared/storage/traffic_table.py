"""The console's traffic rows in Table Storage: one row per instance and 10-s bucket."""

from __future__ import annotations

import json
import logging
from typing import Any

from azure.core.exceptions import (
    ResourceNotFoundError,
)
from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient

from shared.storage.tables import Tables, collect

log = logging.getLogger(__name__)


class TableTrafficStore:
    """One row per instance per 10-s bucket (partition: the bucket, zero-padded, so a time range is a key range; row:
    the instance), the counts of its backends as JSON (and, when it had any, its model fallbacks per deployment and its
    tokens per backend and deployment). A read
    of N minutes is one range query over 6N partitions."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables
        self.calls = 0

    async def save(self, rows: list[Any]) -> None:
        for row in rows:
            entity = {"PartitionKey": f"{row.bucket:012d}", "RowKey": row.instance, "bucket": int(row.bucket),
                      "counts": json.dumps({k: list(v) for k, v in row.counts.items()}, separators=(",", ":"))}
            if row.fallbacks:
                entity["fallbacks"] = json.dumps(row.fallbacks, separators=(",", ":"))
            if row.deployment_tokens:
                entity["deployment_tokens"] = json.dumps(row.deployment_tokens, separators=(",", ":"))
            self.calls += 1
            async def upsert(t: TableClient, e: dict[str, Any] = entity) -> None:
                await t.upsert_entity(e, mode=UpdateMode.REPLACE)

            await self._tables.call("traffic", upsert)

    async def read(self, first_bucket: int, last_bucket: int) -> list[Any]:
        from shared.records.traffic import TrafficRow

        parameters = {"first": f"{first_bucket:012d}", "last": f"{last_bucket:012d}"}
        self.calls += 1
        entities = await self._tables.call("traffic", lambda t: collect(t.query_entities(
            "PartitionKey ge @first and PartitionKey le @last", parameters=parameters)), self._tables.timeout_s * 10)
        rows = []
        for e in entities:
            try:
                counts = {str(k): tuple(int(x) for x in v) for k, v in json.loads(e["counts"]).items()}
                fallbacks = {str(k): int(v) for k, v in json.loads(e.get("fallbacks") or "{}").items()}
                tokens = {str(b): {str(d): int(n) for d, n in per.items()}
                          for b, per in json.loads(e.get("deployment_tokens") or "{}").items()}
                rows.append(TrafficRow(int(e["PartitionKey"]), str(e["RowKey"]), counts, fallbacks, tokens))
            except (KeyError, TypeError, ValueError, AttributeError):
                log.warning("ignored a malformed traffic row")
        return rows

    async def forget(self, instance: str, buckets: list[int]) -> None:
        for bucket in buckets:
            self.calls += 1
            try:
                async def delete(t: TableClient, b: int = bucket) -> None:
                    await t.delete_entity(f"{b:012d}", instance)

                await self._tables.call("traffic", delete)
            except ResourceNotFoundError:
                pass
