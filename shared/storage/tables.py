"""Azure Table Storage: one service client per worker, every call bounded by a short timeout, errors mapped once.

The stores here are the real twins of the in-memory stores the pure logic is tested with.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableTransactionError, UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient

from shared.config import Settings
from shared.storage.protocols import Conflict, StoreBusy, StoreUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def proxies_in_environment(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment names a proxy. Only then does the SDK's aiohttp session read the environment: it does
    so for every request, in a worker thread (proxy variables, ~/.netrc), which costs more than the store call itself
    on a worker that has none."""
    env = os.environ if env is None else env
    return any(env.get(name) for name in PROXY_VARIABLES)


class Tables:
    """The gateway's tables, each created on first use, with every call under `timeout_s`."""

    NAMES = ("consumers", "ledger", "breakers", "usage", "budgets", "capacity", "changes", "traffic")

    def __init__(self, service: TableServiceClient, prefix: str, timeout_s: float) -> None:
        self._service = service
        self._prefix = prefix
        self.timeout_s = timeout_s
        self._clients: dict[str, TableClient] = {}
        self._ready: set[str] = set()
        self.calls = 0

    @classmethod
    def from_settings(cls, settings: Settings, timeout_s: float | None = None) -> Tables:
        return cls.for_account(settings, settings.table_connection_string or settings.table_endpoint or "", timeout_s)

    @classmethod
    def for_account(cls, settings: Settings, account: str, timeout_s: float | None = None) -> Tables:
        """The tables of one account: `account` is a table endpoint (reached with the managed identity) or a
        connection string (GATEWAY_LEDGER_ACCOUNTS lists such accounts for the ledgers)."""
        # The SDK's own retries would stretch a call far past our timeout; we decide about retrying ourselves.
        options: dict[str, Any] = {"retry_total": 0, "connection_timeout": settings.store_timeout_s,
                                    "use_env_settings": proxies_in_environment()}
        if not account.startswith(("http://", "https://")):
            service = TableServiceClient.from_connection_string(account, **options)
        else:
            from azure.identity.aio import DefaultAzureCredential

            credential = DefaultAzureCredential(managed_identity_client_id=settings.managed_identity_client_id)
            service = TableServiceClient(endpoint=account, credential=credential, **options)
        return cls(service, settings.table_prefix, timeout_s or settings.store_timeout_s)

    def name(self, table: str) -> str:
        return f"{self._prefix}{table}"

    def client(self, table: str) -> TableClient:
        client = self._clients.get(table)
        if client is None:
            client = self._clients[table] = self._service.get_table_client(self.name(table))
        return client

    async def ensure(self, table: str) -> None:
        if table in self._ready:
            return
        try:
            await asyncio.wait_for(self._service.create_table_if_not_exists(self.name(table)), self.timeout_s * 5)
        except (TimeoutError, AzureError, OSError) as exc:
            if server_busy(exc):
                raise StoreBusy(f"table {self.name(table)}: 503 ServerBusy") from None
            raise StoreUnavailable(f"table {self.name(table)}: {type(exc).__name__}") from None
        self._ready.add(table)

    async def call(self, table: str, operation: Callable[[TableClient], Awaitable[T]], timeout_s: float | None = None) -> T:
        """Run one operation on a table, mapping timeouts and service errors to StoreUnavailable / Conflict."""
        for attempt in (1, 2):
            await self.ensure(table)
            self.calls += 1
            try:
                return await asyncio.wait_for(operation(self.client(table)), timeout_s or self.timeout_s)
            except (ResourceModifiedError, ResourceExistsError) as exc:
                raise Conflict(type(exc).__name__) from None
            except TableTransactionError as exc:
                if exc.status_code == 409 or getattr(exc, "error_code", None) == "EntityAlreadyExists":
                    raise Conflict(f"operation {exc.index} of the batch: {getattr(exc, 'error_code', None)}") from None
                if server_busy(exc):
                    raise StoreBusy(f"{self.name(table)}: 503 ServerBusy", retry_after(exc)) from None
                raise StoreUnavailable(f"{self.name(table)}: {type(exc).__name__}") from None
            except ResourceNotFoundError as exc:
                if getattr(exc, "error_code", None) == "TableNotFound" and attempt == 1:
                    self._ready.discard(table)  # the store lost the table (an emulator restarted): create it again
                    continue
                raise
            except (TimeoutError, AzureError, OSError) as exc:
                if server_busy(exc):
                    raise StoreBusy(f"{self.name(table)}: 503 ServerBusy", retry_after(exc)) from None
                raise StoreUnavailable(f"{self.name(table)}: {type(exc).__name__}") from None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        await self._service.close()


def server_busy(exc: BaseException) -> bool:
    """A 503 ServerBusy: the service throttles the partition or the account (azure-data-tables puts the
    x-ms-error-code header, or the body's code, on the error as `error_code`; azure-core alone does not)."""
    if not isinstance(exc, HttpResponseError) or exc.status_code != 503:
        return False
    code = getattr(exc, "error_code", None)
    if code is None:
        code = getattr(exc.response, "headers", {}).get("x-ms-error-code")
    return str(getattr(code, "value", code)) == "ServerBusy"


def retry_after(exc: BaseException) -> float | None:
    """The seconds of a 503's Retry-After header, if it has one (Table Storage seldom sends it)."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    try:
        value = float(headers.get("Retry-After") or headers.get("retry-after") or "")
    except ValueError:
        return None
    return value if value > 0 else None


async def collect(paged: Any) -> list[dict[str, Any]]:
    return [dict(entity) async for entity in paged]


def entity_etag(entity: Any) -> str | None:
    metadata = getattr(entity, "metadata", None)
    return metadata.get("etag") if isinstance(metadata, dict) else None


def replace_if_unchanged(entity: Mapping[str, Any], etag: str | None) -> Callable[[TableClient], Awaitable[Any]]:
    """The one conditional write: replace the row only if it still has `etag` (else Conflict, through Tables.call)."""
    return lambda table: table.update_entity(
        dict(entity), mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified
    )


def _create(entity: dict[str, Any]) -> Callable[[TableClient], Awaitable[Any]]:
    return lambda table: table.create_entity(entity)


async def change_on_etag(
    read: Callable[[], Awaitable[tuple[dict[str, Any] | None, str | None]]],
    write: Callable[[dict[str, Any], str | None], Awaitable[None]],
    change: Callable[[dict[str, Any] | None], Mapping[str, Any] | None], tries: int, where: str,
) -> dict[str, Any] | None:
    """Read-modify-write of one row on its ETag, the loop every table that shares a row between instances needs, over
    any table's read and write (`change_row` for Tables; the breaker store's own table, which bench.scale simulates):
    `read` gives the row and its ETag (None, None: there is none), `change` returns its replacement (None: leave it as
    it is), `write` writes it only over that ETag (creates it when None) or raises Conflict. A write that loses to
    another writer is tried again on a fresh read, `tries` times in all, then Conflict. Returns the row written, or
    None when `change` left it."""
    for _ in range(tries):
        current, etag = await read()
        changed = change(current)
        if changed is None:
            return None
        entity = dict(changed)
        try:
            await write(entity, etag)
        except Conflict:
            continue  # another writer came first: decide again on what it wrote
        return entity
    raise Conflict(f"{where} lost to another writer")


async def change_row(
    tables: Tables, table: str, partition: str, row: str,
    change: Callable[[dict[str, Any] | None], Mapping[str, Any] | None], tries: int = 1,
) -> dict[str, Any] | None:
    """`change_on_etag` on a row of `table` (the replacement gets the row's keys)."""

    async def read() -> tuple[dict[str, Any] | None, str | None]:
        try:
            current: Any = await tables.call(table, lambda t: t.get_entity(partition, row))
        except ResourceNotFoundError:
            return None, None
        return dict(current), entity_etag(current)

    async def write(entity: dict[str, Any], etag: str | None) -> None:
        await tables.call(table, _create(entity) if etag is None else replace_if_unchanged(entity, etag))

    def keyed(current: dict[str, Any] | None) -> dict[str, Any] | None:
        changed = change(current)
        return None if changed is None else {**changed, "PartitionKey": partition, "RowKey": row}

    return await change_on_etag(read, write, keyed, tries, f"{table}: every write of {partition}/{row}")


