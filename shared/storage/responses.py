"""Where each stored response lives: response id -> the backend that holds it and the consumer that created it.

Azure keeps a stored response in the resource that produced it (30 days by default), so every follow-up must go back
there, from whichever gateway instance receives it. Table Storage has no TTL: each row carries its expiry, an expired
row reads as absent, and it is deleted when it is next read (lazily; nothing sweeps the table).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import Any, Protocol

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import UpdateMode

from shared.storage.tables import StoreUnavailable, Tables

log = logging.getLogger(__name__)

TABLE = "responses"
# Azure OpenAI keeps stored responses for 30 days.
RETENTION_S = 30 * 24 * 3600.0
_RK = "r"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    response_id: str
    backend_id: str
    consumer_id: str
    deployment: str
    expires: float  # unix time
    # What continuing this response adds to the next input (its own input and output), for admission's estimate;
    # 0 until known (a stream still running, a background response).
    context_tokens: int = 0
    background: bool = False

    def expired(self, now: float) -> bool:
        return now >= self.expires


class ResponseStore(Protocol):
    async def put(self, record: StoredResponse) -> None:
        """Record (or replace) where a response lives. Raises StoreUnavailable."""
        ...

    async def get(self, response_id: str, now: float) -> StoredResponse | None:
        """The record, or None when there is none or it has expired. Raises StoreUnavailable."""
        ...

    async def forget(self, response_id: str) -> None:
        """Drop the record (the response was deleted). Raises StoreUnavailable."""
        ...


class MemoryResponseStore:
    """The in-memory twin: one process's view, for tests and single-instance runs."""

    def __init__(self) -> None:
        self.records: dict[str, StoredResponse] = {}
        self.unavailable = False  # tests switch the store off to see the flow's answer

    def _check(self) -> None:
        if self.unavailable:
            raise StoreUnavailable("memory store switched off")

    async def put(self, record: StoredResponse) -> None:
        self._check()
        self.records[record.response_id] = record

    async def get(self, response_id: str, now: float) -> StoredResponse | None:
        self._check()
        record = self.records.get(response_id)
        if record is not None and record.expired(now):
            del self.records[response_id]
            return None
        return record

    async def forget(self, response_id: str) -> None:
        self._check()
        self.records.pop(response_id, None)


def _to_entity(record: StoredResponse) -> dict[str, Any]:
    return {
        "PartitionKey": record.response_id,
        "RowKey": _RK,
        "backend": record.backend_id,
        "consumer": record.consumer_id,
        "deployment": record.deployment,
        "expires": float(record.expires),
        "context_tokens": int(record.context_tokens),
        "background": bool(record.background),
    }


def _from_entity(entity: dict[str, Any]) -> StoredResponse:
    return StoredResponse(
        response_id=str(entity["PartitionKey"]),
        backend_id=str(entity["backend"]),
        consumer_id=str(entity["consumer"]),
        deployment=str(entity.get("deployment", "")),
        expires=float(entity["expires"]),
        context_tokens=int(entity.get("context_tokens", 0) or 0),
        background=bool(entity.get("background", False)),
    )


class TableResponseStore:
    """One row per response id (its own partition: reads and writes spread over the table's servers)."""

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
            log.warning("unreadable response-state row %s; treated as absent", response_id)
            return None
        if record.expired(now):
            self._clean_up(response_id)
            return None
        return record

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


def with_context(record: StoredResponse, context_tokens: int) -> StoredResponse:
    return replace(record, context_tokens=context_tokens)
