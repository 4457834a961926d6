"""The limiter's ledgers in Table Storage: one row per ledger, written only on its ETag."""

from __future__ import annotations

from collections.abc import Mapping

from azure.core.exceptions import (
    ResourceNotFoundError,
)

from shared.storage.tables import Tables, entity_etag, replace_if_unchanged

_LEDGER_RK = "ledger"


class TableLedgerStore:
    """One entity per consumer (partition = consumer id), written only with ETag conditions."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    async def read(self, consumer_id: str) -> tuple[dict[str, object] | None, str | None]:
        try:
            entity = await self._tables.call("ledger", lambda t: t.get_entity(consumer_id, _LEDGER_RK))
        except ResourceNotFoundError:
            return None, None
        return dict(entity), entity_etag(entity)

    async def write(self, consumer_id: str, row: Mapping[str, object], etag: str | None) -> str:
        entity = {**row, "PartitionKey": consumer_id, "RowKey": _LEDGER_RK}
        if etag is None:
            result = await self._tables.call("ledger", lambda t: t.create_entity(entity))
        else:
            result = await self._tables.call(
                "ledger",
                replace_if_unchanged(entity, etag),
            )
        return str(result["etag"])
