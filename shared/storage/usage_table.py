"""Usage rows for reports in Table Storage, batched per hour and instance."""

from __future__ import annotations

import json
from typing import Any

from azure.data.tables import UpdateMode

from shared.records.usage import UsageRow
from shared.storage.tables import Tables


class TableUsageStore:
    """Rows partitioned by hour and instance (key "hour|instance", row "consumer|deployment"): each instance writes only
    its own rows, cumulatively, and one batch carries up to 100 of them whatever their consumers, so a flush costs
    round trips per hundred consumers, not per consumer. Reports read a period as one partition-key range.

    Rows written by earlier versions (partition = consumer, row "hour|deployment|instance", no `consumer` property) are
    still read."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    async def save(self, rows: list[Any]) -> None:
        by_partition: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            partition = f"{row.hour}|{row.instance}"
            by_partition.setdefault(partition, []).append(
                {
                    "PartitionKey": partition,
                    "RowKey": f"{row.consumer}|{row.deployment}",
                    "consumer": row.consumer,
                    "hour": row.hour,
                    "deployment": row.deployment,
                    "instance": row.instance,
                    "requests": row.requests,
                    "prompt": row.prompt,
                    "completion": row.completion,
                    "total": row.total,
                    "cached": row.cached,
                    "reasoning": row.reasoning,
                    "counted": row.counted,
                    "tools": json.dumps(dict(row.tools), separators=(",", ":")),
                    "cache_hits": row.cache_hits,
                    "saved": row.saved,
                    "cost_nanos": row.cost_nanos,
                }
            )
        for entities in by_partition.values():
            for start in range(0, len(entities), 100):  # a batch holds at most 100 operations of one partition
                operations = [("upsert", e, {"mode": UpdateMode.REPLACE}) for e in entities[start : start + 100]]
                await self._tables.call("usage", lambda t, ops=operations: t.submit_transaction(ops))  # type: ignore[misc]

    async def query(self, consumer: str | None, start_hour: str, end_hour: str) -> list[Any]:
        # "hour|instance" keys of the hours in [start, end) sort between the two hour strings.
        parameters = {"start": start_hour, "end": end_hour}
        query = "PartitionKey ge @start and PartitionKey lt @end"
        legacy = "RowKey ge @start and RowKey lt @end"
        if consumer is not None:
            query += " and consumer eq @consumer"
            legacy = "PartitionKey eq @consumer and " + legacy
            parameters["consumer"] = consumer
        timeout = self._tables.timeout_s * 10
        entities = await self._tables.call("usage", lambda t: _stamped(t.query_entities(query, parameters=parameters)), timeout)
        old = await self._tables.call("usage", lambda t: _stamped(t.query_entities(legacy, parameters=parameters)), timeout)
        entities += [e for e in old if "consumer" not in e]
        return [
            UsageRow(
                consumer=e.get("consumer") or e["PartitionKey"], hour=e["hour"], deployment=e["deployment"],
                instance=e["instance"], requests=int(e["requests"]), prompt=int(e["prompt"]),
                completion=int(e["completion"]), total=int(e["total"]), cached=int(e.get("cached", 0)),
                reasoning=int(e.get("reasoning", 0)), counted=int(e.get("counted", 0)),
                tools=_tool_counts(e.get("tools")),
                cache_hits=int(e.get("cache_hits", 0)), saved=int(e.get("saved", 0)),
                cost_nanos=int(e.get("cost_nanos", 0)), written_s=_written_s(e),
            )
            for e in entities
        ]


async def _stamped(paged: Any) -> list[dict[str, Any]]:
    """Entities as dicts, each with the time Table Storage last wrote it (its Timestamp) under "_written_s"."""
    rows = []
    async for entity in paged:
        stamp: Any = getattr(entity, "metadata", {}).get("timestamp")
        rows.append({**dict(entity), "_written_s": stamp.timestamp() if hasattr(stamp, "timestamp") else 0.0})
    return rows


def _written_s(entity: dict[str, Any]) -> float:
    return float(entity.get("_written_s") or 0.0)


def _tool_counts(value: Any) -> tuple[tuple[str, int], ...]:
    """The `tools` column of a usage row ({"web_search": 3}); rows written before it existed have none."""
    try:
        counts = json.loads(value) if isinstance(value, str) else {}
    except json.JSONDecodeError:
        return ()
    if not isinstance(counts, dict):
        return ()
    return tuple(sorted((str(k), int(v)) for k, v in counts.items() if isinstance(v, int) and not isinstance(v, bool)))
