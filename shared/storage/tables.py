"""Azure Table Storage: one service client per worker, every call bounded by a short timeout, errors mapped once.

The stores here are the real twins of the in-memory stores the pure logic is tested with.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableTransactionError, UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient

from shared.config import Settings
from shared.edge.consumers import Consumer, Limits
from shared.storage.protocols import Conflict, StoreUnavailable
from shared.telemetry.usage_rows import UsageRow

log = logging.getLogger(__name__)
T = TypeVar("T")


class Tables:
    """The gateway's tables, each created on first use, with every call under `timeout_s`."""

    NAMES = ("consumers", "ledger", "breakers", "usage", "budgets")

    def __init__(self, service: TableServiceClient, prefix: str, timeout_s: float) -> None:
        self._service = service
        self._prefix = prefix
        self.timeout_s = timeout_s
        self._clients: dict[str, TableClient] = {}
        self._ready: set[str] = set()
        self.calls = 0

    @classmethod
    def from_settings(cls, settings: Settings, timeout_s: float | None = None) -> Tables:
        # The SDK's own retries would stretch a call far past our timeout; we decide about retrying ourselves.
        options: dict[str, Any] = {"retry_total": 0, "connection_timeout": settings.store_timeout_s}
        if settings.table_connection_string:
            service = TableServiceClient.from_connection_string(settings.table_connection_string, **options)
        else:
            from azure.identity.aio import DefaultAzureCredential

            credential = DefaultAzureCredential(managed_identity_client_id=settings.managed_identity_client_id)
            assert settings.table_endpoint is not None
            service = TableServiceClient(endpoint=settings.table_endpoint, credential=credential, **options)
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
                raise StoreUnavailable(f"{self.name(table)}: {type(exc).__name__}") from None
            except ResourceNotFoundError as exc:
                if getattr(exc, "error_code", None) == "TableNotFound" and attempt == 1:
                    self._ready.discard(table)  # the store lost the table (an emulator restarted): create it again
                    continue
                raise
            except (TimeoutError, AzureError, OSError) as exc:
                raise StoreUnavailable(f"{self.name(table)}: {type(exc).__name__}") from None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        await self._service.close()


async def collect(paged: Any) -> list[dict[str, Any]]:
    return [dict(entity) async for entity in paged]


def entity_etag(entity: Any) -> str | None:
    metadata = getattr(entity, "metadata", None)
    return metadata.get("etag") if isinstance(metadata, dict) else None


# ---- consumers -----------------------------------------------------------------------------------------------------

_CONSUMER_PK = "consumer"


def consumer_to_entity(consumer: Consumer) -> dict[str, Any]:
    limits = consumer.limits
    return {
        "PartitionKey": _CONSUMER_PK,
        "RowKey": consumer.id,
        "name": consumer.name,
        "key_hash": consumer.key_hash,
        "key_prefix": consumer.key_prefix,
        "enabled": consumer.enabled,
        "deployments": "*" if consumer.deployments is None else json.dumps(sorted(consumer.deployments)),
        "tpm": limits.tokens_per_minute,
        "deployment_tpm": json.dumps(dict(limits.deployment_tokens_per_minute)),
        "quota": limits.quota,
        "quota_period": limits.quota_period or "",
        "budget": float(limits.budget),
        "budget_period": limits.budget_period or "",
        "output_cap": "" if limits.output_cap is None else ("on" if limits.output_cap else "off"),
        "priority": consumer.priority,
        "previous_key_hash": consumer.previous_key_hash or "",
        "previous_key_expires": float(consumer.previous_key_expires),
        "version": consumer.version,
        "entra": json.dumps(sorted(consumer.entra)),
    }


def consumer_from_entity(entity: dict[str, Any]) -> Consumer:
    deployments_raw = entity.get("deployments", "*")
    deployments = None if deployments_raw in ("*", "", None) else frozenset(json.loads(deployments_raw))
    return Consumer(
        id=entity["RowKey"],
        name=entity.get("name", entity["RowKey"]),
        key_hash=entity["key_hash"],
        key_prefix=entity.get("key_prefix", ""),
        enabled=bool(entity.get("enabled", True)),
        deployments=deployments,
        limits=Limits(
            tokens_per_minute=int(entity.get("tpm", 0) or 0),
            deployment_tokens_per_minute={k: int(v) for k, v in json.loads(entity.get("deployment_tpm") or "{}").items()},
            quota=int(entity.get("quota", 0) or 0),
            quota_period=entity.get("quota_period") or None,
            budget=float(entity.get("budget", 0.0) or 0.0),
            budget_period=entity.get("budget_period") or None,
            output_cap={"on": True, "off": False}.get(str(entity.get("output_cap") or "")),
        ),
        priority=entity.get("priority") or "normal",
        previous_key_hash=entity.get("previous_key_hash") or None,
        previous_key_expires=float(entity.get("previous_key_expires", 0.0) or 0.0),
        version=int(entity.get("version", 0) or 0),
        entra=frozenset(json.loads(entity.get("entra") or "[]")),
    )


class TableConsumerStore:
    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    async def list_consumers(self) -> list[Consumer]:
        entities = await self._tables.call(
            "consumers", lambda t: collect(t.query_entities(f"PartitionKey eq '{_CONSUMER_PK}'")), self._tables.timeout_s * 5
        )
        return [consumer_from_entity(e) for e in entities]

    async def get(self, consumer_id: str) -> Consumer | None:
        try:
            entity = await self._tables.call("consumers", lambda t: t.get_entity(_CONSUMER_PK, consumer_id))
        except ResourceNotFoundError:
            return None
        return consumer_from_entity(dict(entity))

    async def find_by_key_hash(self, key_hash: str) -> Consumer | None:
        # The SDK substitutes @names split on spaces, so parentheses need spaces around them.
        query = "PartitionKey eq @pk and ( key_hash eq @h or previous_key_hash eq @h )"
        entities = await self._tables.call(
            "consumers",
            lambda t: collect(t.query_entities(query, parameters={"pk": _CONSUMER_PK, "h": key_hash})),
        )
        return consumer_from_entity(entities[0]) if entities else None

    async def put(self, consumer: Consumer) -> None:
        entity = consumer_to_entity(consumer)
        await self._tables.call("consumers", lambda t: t.upsert_entity(entity, mode=UpdateMode.REPLACE))

    async def create(self, consumer: Consumer) -> None:
        entity = consumer_to_entity(consumer)
        await self._tables.call("consumers", lambda t: t.create_entity(entity))

    async def create_many(self, consumers: list[Consumer], parallel: int = 4) -> None:
        """Create many consumers in batches of 100 (one round trip each; all share one partition), a few at a time.
        A batch is all or nothing: Conflict names the first batch holding an id that exists."""
        entities = [consumer_to_entity(c) for c in consumers]
        gate = asyncio.Semaphore(parallel)

        async def batch(chunk: list[dict[str, Any]]) -> None:
            operations = [("create", e) for e in chunk]
            async with gate:
                await self._tables.call("consumers", lambda t: t.submit_transaction(operations))

        await asyncio.gather(*(batch(entities[i : i + 100]) for i in range(0, len(entities), 100)))

    async def delete(self, consumer_id: str) -> bool:
        existing = await self.get(consumer_id)
        if existing is None:
            return False
        await self._tables.call("consumers", lambda t: t.delete_entity(_CONSUMER_PK, consumer_id))
        return True


__all__ = [
    "Conflict",
    "MatchConditions",
    "StoreUnavailable",
    "TableConsumerStore",
    "Tables",
    "collect",
    "entity_etag",
]


# ---- the limiter's ledgers -----------------------------------------------------------------------------------------

_LEDGER_RK = "ledger"


class TableLedgerStore:
    """One entity per consumer (partition = consumer id), written only with ETag conditions."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    async def read(self, consumer_id: str) -> tuple[Any, str | None]:
        from shared.limits.ledger import Ledger

        try:
            entity = await self._tables.call("ledger", lambda t: t.get_entity(consumer_id, _LEDGER_RK))
        except ResourceNotFoundError:
            return Ledger(), None
        return Ledger.from_entity(dict(entity)), entity_etag(entity)

    async def write(self, consumer_id: str, ledger: Any, etag: str | None) -> str:
        entity = {"PartitionKey": consumer_id, "RowKey": _LEDGER_RK, **ledger.to_entity()}
        if etag is None:
            result = await self._tables.call("ledger", lambda t: t.create_entity(entity))
        else:
            result = await self._tables.call(
                "ledger",
                lambda t: t.update_entity(
                    entity, mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified
                ),
            )
        return str(result["etag"])


# ---- usage rows for reports ----------------------------------------------------------------------------------------


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
        entities = await self._tables.call("usage", lambda t: collect(t.query_entities(query, parameters=parameters)), timeout)
        old = await self._tables.call("usage", lambda t: collect(t.query_entities(legacy, parameters=parameters)), timeout)
        entities += [e for e in old if "consumer" not in e]
        return [
            UsageRow(
                consumer=e.get("consumer") or e["PartitionKey"], hour=e["hour"], deployment=e["deployment"],
                instance=e["instance"], requests=int(e["requests"]), prompt=int(e["prompt"]),
                completion=int(e["completion"]), total=int(e["total"]), cached=int(e.get("cached", 0)),
                reasoning=int(e.get("reasoning", 0)), counted=int(e.get("counted", 0)),
            )
            for e in entities
        ]


# ---- shared breaker state ------------------------------------------------------------------------------------------

_BREAKER_PK = "breaker"
_BREAKER_WRITE_TRIES = 16  # each conflict means another writer finished: n writers at once need at most n tries


class TableBreakerStore:
    """One row per backend and deployment, written on breaker transitions only; every instance reads them all a few times a second."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    async def load(self) -> list[Any]:
        from shared.routing.router import BreakerRecord

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
        for _ in range(_BREAKER_WRITE_TRIES):
            try:
                current = await self._tables.call("breakers", lambda t: t.get_entity(_BREAKER_PK, row_key))
            except ResourceNotFoundError:
                current = None
            try:
                if current is None:
                    await self._tables.call("breakers", lambda t: t.create_entity(entity))
                elif float(current.get("since", 0.0)) >= record.since:
                    return  # a newer (or the same) transition is already shared
                else:
                    await self._tables.call("breakers", _replace_if_unchanged(entity, entity_etag(current)))
                return
            except Conflict:
                continue  # another instance wrote in between: compare with what it wrote
        log.info("breaker state of %s not shared: kept losing to concurrent writes", record.backend_id)


def _replace_if_unchanged(entity: dict[str, Any], etag: str | None) -> Callable[[TableClient], Awaitable[Any]]:
    return lambda table: table.update_entity(
        entity, mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified
    )


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
        from shared.limits.budget import SpendRow

        entities = await self._tables.call(
            "budgets",
            lambda t: collect(t.query_entities("PartitionKey eq @p", parameters={"p": f"{consumer}|{period}"})),
        )
        return [SpendRow(e["consumer"], e["period"], e["RowKey"], int(e["nanos"])) for e in entities]
