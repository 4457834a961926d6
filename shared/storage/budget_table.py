"""Budget spend in Table Storage: one row per consumer, period and instance."""

from __future__ import annotations

from typing import Any

from azure.data.tables import UpdateMode

from shared.storage.tables import Tables, collect


class TableBudgetStore:
    """Spend rows keyed consumer|period / instance: each instance writes only its own row, cumulatively."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    async def save(self, rows: list[Any]) -> None:
        by_partition: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_partition.setdefault(f"{row.consumer}|{row.period}", []).append(
                {
                    "PartitionKey": f"{row.consumer}|{row.period}",
                    "RowKey": row.instance,
                    "consumer": row.consumer,
                    "period": row.period,
                    "nanos": row.nanos,
                }
            )
        for entities in by_partition.values():
            operations = [("upsert", e, {"mode": UpdateMode.REPLACE}) for e in entities]
            await self._tables.call("budgets", lambda t, ops=operations: t.submit_transaction(ops))  # type: ignore[misc]

    async def read(self, consumer: str, period: str) -> list[Any]:
        from shared.records.spend import SpendRow

        entities = await self._tables.call(
            "budgets",
            lambda t: collect(t.query_entities("PartitionKey eq @p", parameters={"p": f"{consumer}|{period}"})),
        )
        return [SpendRow(e["consumer"], e["period"], e["RowKey"], int(e["nanos"])) for e in entities]
