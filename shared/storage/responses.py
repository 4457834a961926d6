"""Table Storage twin of the response-state store (storage/protocols.py: ResponseStore).

Table Storage has no TTL: each row carries its expiry, an expired row reads as absent, and it is deleted when it is
next read (lazily; nothing sweeps the table).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import UpdateMode

from shared.routing.pinning import StoredResponse
from shared.storage.protocols import Conflict, StoreUnavailable
from shared.storage.tables import MatchConditions, Tables, entity_etag

log = logging.getLogger(__name__)

TABLE = "responses"
_RK = "r"


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
        try:
            entity = await self._tables.call(TABLE, lambda t: t.get_entity(response_id, _RK))
        except ResourceNotFoundError:
            return False
        if not entity.get("unsettled"):
            return False
        changed = {**dict(entity), "unsettled": False}
        etag = entity_etag(entity)
        try:
            await self._tables.call(TABLE, lambda t: t.update_entity(
                changed, mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified))
        except Conflict:
            return False  # another instance settled it first
        return True

    async def rehold(self, response_id: str, held_until_ms: int, previous_ms: int) -> bool:
        try:
            entity = await self._tables.call(TABLE, lambda t: t.get_entity(response_id, _RK))
        except ResourceNotFoundError:
            return False
        if not entity.get("unsettled") or int(entity.get("held_until", 0) or 0) != previous_ms:
            return False
        changed = {**dict(entity), "held_until": float(held_until_ms)}
        etag = entity_etag(entity)
        try:
            await self._tables.call(TABLE, lambda t: t.update_entity(
                changed, mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified))
        except Conflict:
            return False
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
