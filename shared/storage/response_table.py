"""Table Storage twin of the response-state store (storage/protocols.py: ResponseStore).

Table Storage has no TTL: each row carries its expiry, an expired row reads as absent, and it is deleted when it is
next read (lazily; nothing sweeps the table).

An unsettled background response also has a row in one partition of its own (`sweep:`, which no response id or item
key can be): written when it is recorded, moved with its hold, deleted when it is settled. Every instance's sweep reads
that partition in one query (the rows due, one page) so that whichever instance is up settles it, not only the one that
created it; a row left behind (its record settled, deleted or expired) is dropped by the sweep that next finds it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import UpdateMode

from shared.records.responses import StoredResponse
from shared.storage.protocols import Conflict, StoreUnavailable
from shared.storage.tables import Tables, change_row, entity_etag, replace_if_unchanged

log = logging.getLogger(__name__)

TABLE = "responses"
_RK = "r"
_SWEEP_PK = "sweep:"  # a colon: in no response id (flow.responses.RESPONSE_ID_RE) and after the "item" of item keys


def _to_entity(record: StoredResponse) -> dict[str, Any]:
    return {
        "PartitionKey": record.response_id,
        "RowKey": _RK,
        "backend": record.backend_id,
        "consumer": record.consumer_id,
        "deployment": record.deployment,
        "expires": float(record.expires),
        "context_tokens": int(record.context_tokens),
        "unsettled": bool(record.unsettled),
        "charged": int(record.charged),
        "held_until": float(record.held_until_ms),  # ms since the epoch: past Int32, exact as a Double
        "held_places": record.held_places,
    }


def _from_entity(entity: dict[str, Any]) -> StoredResponse:
    return StoredResponse(
        response_id=str(entity["PartitionKey"]),
        backend_id=str(entity["backend"]),
        consumer_id=str(entity["consumer"]),
        deployment=str(entity.get("deployment", "")),
        expires=float(entity["expires"]),
        context_tokens=int(entity.get("context_tokens", 0) or 0),
        unsettled=bool(entity.get("unsettled", False)),
        charged=int(entity.get("charged", 0) or 0),
        held_until_ms=int(entity.get("held_until", 0) or 0),
        held_places=str(entity.get("held_places", "") or ""),
    )


class TableResponseStore:
    """One row per response id, in its own partition: reads and writes spread over the table's servers."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables
        self._cleanups: set[asyncio.Task[None]] = set()

    async def put(self, record: StoredResponse) -> None:
        entity = _to_entity(record)
        await self._tables.call(TABLE, lambda t: t.upsert_entity(entity, mode=UpdateMode.REPLACE))
        if record.unsettled and record.held_until_ms:
            # After the record: a sweep that finds this row always finds the record (or drops the row).
            await self._index(record.response_id, record.consumer_id, record.held_until_ms)

    async def _index(self, response_id: str, consumer_id: str, held_until_ms: int) -> None:
        row = {"PartitionKey": _SWEEP_PK, "RowKey": response_id, "consumer": consumer_id,
               "held_until": float(held_until_ms), "claimed_until": 0.0}
        await self._tables.call(TABLE, lambda t: t.upsert_entity(row, mode=UpdateMode.REPLACE))

    async def due(self, by_ms: int, now_ms: int, claim_until_ms: int, limit: int) -> list[tuple[str, str]]:
        query = "PartitionKey eq @pk and held_until le @by and claimed_until le @now"
        parameters = {"pk": _SWEEP_PK, "by": float(by_ms), "now": float(now_ms)}

        async def first_page(t: Any) -> list[Any]:
            pages = t.query_entities(query, parameters=parameters, results_per_page=limit).by_page()
            async for page in pages:
                return [entity async for entity in page][:limit]
            return []

        rows = await self._tables.call(TABLE, first_page)
        claimed = await asyncio.gather(*(self._claim(row, claim_until_ms) for row in rows))
        return [(str(row["RowKey"]), str(row.get("consumer", ""))) for row, ok in zip(rows, claimed, strict=True) if ok]

    async def _claim(self, row: Any, claim_until_ms: int) -> bool:
        changed = {**dict(row), "claimed_until": float(claim_until_ms)}
        try:
            await self._tables.call(TABLE, replace_if_unchanged(changed, entity_etag(row)))
        except (Conflict, ResourceNotFoundError):
            return False  # another sweeper claimed it (or settled it) first
        except StoreUnavailable:
            return False  # the next sweep tries again
        return True

    async def unindex(self, response_id: str) -> None:
        try:
            await self._tables.call(TABLE, lambda t: t.delete_entity(_SWEEP_PK, response_id))
        except ResourceNotFoundError:
            pass

    async def get(self, response_id: str, now: float) -> StoredResponse | None:
        try:
            entity = await self._tables.call(TABLE, lambda t: t.get_entity(response_id, _RK))
        except ResourceNotFoundError:
            return None
        try:
            record = _from_entity(dict(entity))
        except (KeyError, TypeError, ValueError):
            log.warning("unreadable response-state row; treated as absent")
            return None
        if record.expired(now):
            self._clean_up(response_id)
            return None
        return record

    async def settle(self, response_id: str) -> bool:
        def settled(entity: dict[str, Any] | None) -> dict[str, Any] | None:
            return {**entity, "unsettled": False} if entity is not None and entity.get("unsettled") else None

        try:
            if await change_row(self._tables, TABLE, response_id, _RK, settled) is None:
                return False
        except Conflict:
            return False  # another instance settled it first
        try:
            await self.unindex(response_id)
        except StoreUnavailable:
            pass  # settled all the same: the sweep that next finds the row drops it
        return True

    async def rehold(self, response_id: str, held_until_ms: int, previous_ms: int) -> bool:
        def moved(entity: dict[str, Any] | None) -> dict[str, Any] | None:
            if entity is None or not entity.get("unsettled") or int(entity.get("held_until", 0) or 0) != previous_ms:
                return None
            return {**entity, "held_until": float(held_until_ms)}

        try:
            entity = await change_row(self._tables, TABLE, response_id, _RK, moved)
        except Conflict:
            return False
        if entity is None:
            return False
        try:
            await self._index(response_id, str(entity.get("consumer", "")), held_until_ms)
        except StoreUnavailable:
            pass  # the row keeps its earlier time: the sweep reads the record, sees the hold moved, and moves the row
        return True

    async def forget(self, response_id: str) -> None:
        try:
            await self._tables.call(TABLE, lambda t: t.delete_entity(response_id, _RK))
        except ResourceNotFoundError:
            pass

    def _clean_up(self, response_id: str) -> None:
        async def delete() -> None:
            try:
                await self.forget(response_id)
            except StoreUnavailable:
                pass  # the next reader tries again

        task = asyncio.get_running_loop().create_task(delete())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def close(self) -> None:
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
