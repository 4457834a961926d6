"""Azure Table Storage: one service client per worker, every call bounded by a short timeout, errors mapped once.

The stores here are the real twins of the in-memory stores the pure logic is tested with.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
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
from azure.data.tables import EntityProperty, TableTransactionError, UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient

from shared.config import DEPLOYMENT_NAME, Settings
from shared.records.cache import MAX_TTL_S, SCOPES, CachePolicy
from shared.records.consumers import (
    CAPABILITIES,
    PRIORITIES,
    QUOTA_PERIODS,
    RETIRED_PRIORITIES,
    USER_SOURCES,
    Consumer,
    Limits,
    Team,
    UserLimits,
)
from shared.records.safety import NONE, valid_name
from shared.records.usage import UsageRow
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
        # The SDK's own retries would stretch a call far past our timeout; we decide about retrying ourselves.
        options: dict[str, Any] = {"retry_total": 0, "connection_timeout": settings.store_timeout_s,
                                    "use_env_settings": proxies_in_environment()}
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


# ---- consumers -----------------------------------------------------------------------------------------------------

_CONSUMER_PK = "consumer"
_INDEX_PK = "keyhash"
# One row that every write through TableConsumerStore replaces: gateways read it (one point read a second) and reload
# the consumers only when its ETag has changed, so a consumer created, disabled or rotated is seen within about a
# second without every instance listing every consumer that often.
_MARKER_PK, _MARKER_RK = "marker", "consumers"
_CONSUMER_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


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
        "capabilities": json.dumps(sorted(consumer.capabilities)),
        "team": consumer.team or "",
        "user_tpm": consumer.users.tokens_per_minute,
        "user_quota": consumer.users.quota,
        "user_quota_period": consumer.users.quota_period or "",
        "user_sources": ",".join(consumer.users.sources),
        "user_required": consumer.users.required,
        "fallback": "on" if consumer.fallback else "off",
        **_cache_fields(consumer.cache),
        "safety": consumer.safety or "",
    }


def _cache_fields(policy: CachePolicy) -> dict[str, Any]:
    return {"cache": "on" if policy.enabled else "", "cache_ttl_s": policy.ttl_s, "cache_scope": policy.scope,
            "cache_tools": policy.tools}


def _cache_policy(entity: dict[str, Any]) -> CachePolicy:
    """A row written before the cache existed has none of these: the cache is off for it."""
    enabled = entity.get("cache") or ""
    if enabled not in ("", "on"):
        raise BadConsumerRecord(f"cache: expected on or nothing, got {enabled!r}")
    if "cache_ttl_s" not in entity:
        return CachePolicy()
    ttl = _count(entity, "cache_ttl_s")
    if not 1 <= ttl <= MAX_TTL_S:
        raise BadConsumerRecord(f"cache_ttl_s: expected 1 to {MAX_TTL_S} seconds, got {ttl}")
    scope = entity.get("cache_scope") or "consumer"
    if scope not in SCOPES:
        raise BadConsumerRecord(f"cache_scope: expected one of {', '.join(SCOPES)}, got {scope!r}")
    tools = entity.get("cache_tools", False)
    if not isinstance(tools, bool):
        raise BadConsumerRecord(f"cache_tools: expected a boolean, got {tools!r}")
    return CachePolicy(enabled == "on", ttl, scope, tools)


class BadConsumerRecord(ValueError):
    """A consumer row that does not parse strictly; that consumer is refused (never given wider access)."""


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _count(entity: dict[str, Any], name: str) -> int:
    value = entity.get(name)
    if isinstance(value, EntityProperty):
        value = value.value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadConsumerRecord(f"{name}: expected a whole number >= 0, got {value!r}")
    return value


def _names(raw: Any, name: str) -> list[Any]:
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        value = None
    if not isinstance(value, list):
        raise BadConsumerRecord(f"{name}: expected a JSON array")
    return value


def _output_cap(entity: dict[str, Any]) -> bool | None:
    value = entity.get("output_cap") or ""
    if value not in ("", "on", "off"):
        raise BadConsumerRecord(f"output_cap: expected on, off or nothing, got {value!r}")
    return {"on": True, "off": False}.get(value)


def _fallback(entity: dict[str, Any]) -> bool:
    value = entity.get("fallback")
    if value is None or value == "":
        value = "on"  # rows written before fallbacks existed: the gateway's behaviour then
    if value not in ("on", "off"):
        raise BadConsumerRecord(f"fallback: expected on, off or nothing, got {value!r}")
    return value == "on"


def consumer_from_entity(entity: dict[str, Any]) -> Consumer:
    """Parse a consumer row strictly: every field typed as the admin command writes it, nothing defaulted to more
    access. `enabled` must be a boolean ("false" as text is not), the deployment list must be there ("*" for all)."""
    consumer_id = entity.get("RowKey")
    if not isinstance(consumer_id, str) or not _CONSUMER_ID.fullmatch(consumer_id):
        raise BadConsumerRecord(f"RowKey: not a consumer id: {consumer_id!r}")
    enabled = entity.get("enabled")
    if not isinstance(enabled, bool):
        raise BadConsumerRecord(f"enabled: expected a boolean, got {enabled!r}")
    entra = _names(entity.get("entra") or "[]", "entra")
    if not all(isinstance(e, str) and re.fullmatch(r"(app|oid|role|group):[^\s]{1,300}", e) for e in entra):
        raise BadConsumerRecord("entra: expected mapping keys like app:<id>, oid:<id>, role:<name>, group:<id>")
    key_hash = entity.get("key_hash")
    # A consumer without a key (Entra ID callers only) has an empty hash, which no key can ever produce.
    if not isinstance(key_hash, str) or not (_HEX64.fullmatch(key_hash) or (key_hash == "" and entra)):
        raise BadConsumerRecord("key_hash: expected 64 hex digits (empty only for a consumer with an Entra ID mapping)")
    previous = entity.get("previous_key_hash") or None
    if previous is not None and (not isinstance(previous, str) or not _HEX64.fullmatch(previous)):
        raise BadConsumerRecord("previous_key_hash: expected 64 hex digits or nothing")
    expires = entity.get("previous_key_expires", 0.0)
    if isinstance(expires, bool) or not isinstance(expires, (int, float)):
        raise BadConsumerRecord(f"previous_key_expires: expected a number, got {expires!r}")
    deployments_raw = entity.get("deployments")
    deployments: frozenset[str] | None
    if deployments_raw == "*":
        deployments = None
    else:
        names = _names(deployments_raw, "deployments")
        if not all(isinstance(n, str) and DEPLOYMENT_NAME.fullmatch(n) for n in names):
            raise BadConsumerRecord("deployments: expected deployment names")
        deployments = frozenset(names)
    try:
        per_deployment = json.loads(entity.get("deployment_tpm") or "{}")
    except ValueError:
        per_deployment = None
    if not isinstance(per_deployment, dict) or not all(
        isinstance(k, str) and DEPLOYMENT_NAME.fullmatch(k) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in per_deployment.items()
    ):
        raise BadConsumerRecord("deployment_tpm: expected a JSON object {deployment: whole number >= 0}")
    quota = _count(entity, "quota")
    quota_period = entity.get("quota_period") or None
    if quota_period is not None and quota_period not in QUOTA_PERIODS:
        raise BadConsumerRecord(f"quota_period: expected one of {', '.join(QUOTA_PERIODS)}, got {quota_period!r}")
    if quota and quota_period is None:
        raise BadConsumerRecord("quota: a quota needs a quota_period")
    budget = entity.get("budget", 0.0)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget < float("inf"):
        raise BadConsumerRecord(f"budget: expected an amount >= 0, got {budget!r}")
    budget_period = entity.get("budget_period") or None
    if budget_period is not None and budget_period not in QUOTA_PERIODS:
        raise BadConsumerRecord(f"budget_period: expected one of {', '.join(QUOTA_PERIODS)}, got {budget_period!r}")
    priority = entity.get("priority")
    priority = RETIRED_PRIORITIES.get(priority, priority) if isinstance(priority, str) else priority
    if priority not in PRIORITIES:
        raise BadConsumerRecord(f"priority: expected one of {', '.join(PRIORITIES)}, got {priority!r}")
    capabilities = _names(entity.get("capabilities") or "[]", "capabilities")
    if not all(c in CAPABILITIES for c in capabilities):
        raise BadConsumerRecord(f"capabilities: known ones are {', '.join(sorted(CAPABILITIES))}")
    team = entity.get("team") or None
    if team is not None and (not isinstance(team, str) or not _CONSUMER_ID.fullmatch(team)):
        raise BadConsumerRecord(f"team: not a team id: {team!r}")
    name = entity.get("name", consumer_id)
    return Consumer(
        id=consumer_id,
        name=name if isinstance(name, str) else consumer_id,
        key_hash=key_hash,
        key_prefix=str(entity.get("key_prefix") or ""),
        enabled=enabled,
        deployments=deployments,
        limits=Limits(
            tokens_per_minute=_count(entity, "tpm"),
            deployment_tokens_per_minute=per_deployment,
            quota=quota,
            quota_period=quota_period,
            budget=budget,
            budget_period=budget_period,
            output_cap=_output_cap(entity),
        ),
        priority=priority,
        previous_key_hash=previous,
        previous_key_expires=float(expires),
        version=_count(entity, "version"),
        capabilities=frozenset(capabilities),
        entra=frozenset(entra),
        team=team,
        users=_user_limits(entity),
        fallback=_fallback(entity),
        cache=_cache_policy(entity),
        safety=_safety(entity),
    )


def _safety(entity: dict[str, Any]) -> str | None:
    """The safety policy's name (a row written before policies existed has none). Whether the name is one of this
    gateway's policies is checked where it is written and where it is used (an unknown one refuses the request)."""
    value = entity.get("safety") or None
    if value is not None and (not isinstance(value, str) or not (valid_name(value) or value == NONE)):
        raise BadConsumerRecord(f"safety: not a policy name: {value!r}")
    return value


def _user_limits(entity: dict[str, Any]) -> UserLimits:
    """The end-user settings; a row written before they existed has none (every default)."""
    if "user_tpm" not in entity:
        return UserLimits()
    quota = _count(entity, "user_quota")
    period = entity.get("user_quota_period") or None
    if period is not None and period not in QUOTA_PERIODS:
        raise BadConsumerRecord(f"user_quota_period: expected one of {', '.join(QUOTA_PERIODS)}, got {period!r}")
    if quota and period is None:
        raise BadConsumerRecord("user_quota: a quota needs a user_quota_period")
    raw = entity.get("user_sources")
    sources = tuple(s for s in raw.split(",") if s) if isinstance(raw, str) else None
    if not sources or not all(s in USER_SOURCES for s in sources) or len(set(sources)) != len(sources):
        raise BadConsumerRecord(f"user_sources: expected some of {', '.join(USER_SOURCES)}, comma-separated")
    required = entity.get("user_required", False)
    if not isinstance(required, bool):
        raise BadConsumerRecord(f"user_required: expected a boolean, got {required!r}")
    return UserLimits(_count(entity, "user_tpm"), quota, period, sources, required)


_TEAM_PK = "team"


def _parsed_teams(entities: list[dict[str, Any]]) -> list[Team]:
    teams: list[Team] = []
    for entity in entities:
        try:
            teams.append(team_from_entity(entity))
        except BadConsumerRecord as problem:
            log.error("team record %r refused: %s", entity.get("RowKey"), problem)
    return teams


def team_to_entity(team: Team) -> dict[str, Any]:
    limits = team.limits
    return {
        "PartitionKey": _TEAM_PK,
        "RowKey": team.id,
        "name": team.name,
        "deployments": "*" if team.deployments is None else json.dumps(sorted(team.deployments)),
        "tpm": limits.tokens_per_minute,
        "quota": limits.quota,
        "quota_period": limits.quota_period or "",
        "budget": float(limits.budget),
        "budget_period": limits.budget_period or "",
        "priority": team.priority,
        "version": team.version,
        **_cache_fields(team.cache),
        "safety": team.safety or "",
    }


def team_from_entity(entity: dict[str, Any]) -> Team:
    """Parse a team row as strictly as a consumer's: a row that does not parse leaves its members with nothing."""
    team_id = entity.get("RowKey")
    if not isinstance(team_id, str) or not _CONSUMER_ID.fullmatch(team_id):
        raise BadConsumerRecord(f"RowKey: not a team id: {team_id!r}")
    deployments_raw = entity.get("deployments")
    deployments: frozenset[str] | None = None
    if deployments_raw != "*":
        names = _names(deployments_raw, "deployments")
        if not all(isinstance(n, str) and DEPLOYMENT_NAME.fullmatch(n) for n in names):
            raise BadConsumerRecord("deployments: expected deployment names")
        deployments = frozenset(names)
    quota = _count(entity, "quota")
    quota_period = entity.get("quota_period") or None
    if quota_period is not None and quota_period not in QUOTA_PERIODS:
        raise BadConsumerRecord(f"quota_period: expected one of {', '.join(QUOTA_PERIODS)}, got {quota_period!r}")
    if quota and quota_period is None:
        raise BadConsumerRecord("quota: a quota needs a quota_period")
    budget = entity.get("budget", 0.0)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget < float("inf"):
        raise BadConsumerRecord(f"budget: expected an amount >= 0, got {budget!r}")
    budget_period = entity.get("budget_period") or None
    if budget_period is not None and budget_period not in QUOTA_PERIODS:
        raise BadConsumerRecord(f"budget_period: expected one of {', '.join(QUOTA_PERIODS)}, got {budget_period!r}")
    priority = entity.get("priority")
    if priority not in PRIORITIES:
        raise BadConsumerRecord(f"priority: expected one of {', '.join(PRIORITIES)}, got {priority!r}")
    name = entity.get("name", team_id)
    return Team(
        id=team_id,
        name=name if isinstance(name, str) else team_id,
        limits=Limits(tokens_per_minute=_count(entity, "tpm"), quota=quota, quota_period=quota_period,
                      budget=float(budget), budget_period=budget_period),
        deployments=deployments,
        priority=priority,
        version=_count(entity, "version"),
        cache=_cache_policy(entity),
        safety=_safety(entity),
    )


def _parsed(entity: dict[str, Any]) -> Consumer | None:
    try:
        return consumer_from_entity(entity)
    except BadConsumerRecord as problem:
        log.error("consumer record %r refused: %s", entity.get("RowKey"), problem)
        return None


def _index_partition(key_hash: str) -> str:
    # One partition: point reads (the row key is the hash) need no spreading at a few lookups a second per instance,
    # and bulk creation writes the index in batches of 100 (a batch holds one partition).
    return _INDEX_PK


def _index_rows(consumer: Consumer) -> list[dict[str, Any]]:
    hashes = [h for h in (consumer.key_hash, consumer.previous_key_hash) if h]
    return [{"PartitionKey": _index_partition(h), "RowKey": h, "consumer_id": consumer.id} for h in hashes]


class TableConsumerStore:
    """Consumer rows in partition "consumer", plus one index row per key hash (partition "keyhash", row = hash)
    so that a key the gateway has not cached yet costs one point read, not a scan of the consumers."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    async def change_marker(self) -> str | None:
        """The change marker's ETag (every write through this store replaces the row); None before the first write."""
        try:
            entity = await self._tables.call("consumers", lambda t: t.get_entity(_MARKER_PK, _MARKER_RK))
        except ResourceNotFoundError:
            return None
        return entity_etag(entity)

    async def _mark_changed(self) -> None:
        # Last writer wins: any new ETag tells the gateways to reload, whatever the row holds.
        row = {"PartitionKey": _MARKER_PK, "RowKey": _MARKER_RK}
        await self._tables.call("consumers", lambda t: t.upsert_entity(row, mode=UpdateMode.REPLACE))

    async def list_consumers(self) -> list[Consumer]:
        entities = await self._tables.call(
            "consumers", lambda t: collect(t.query_entities(f"PartitionKey eq '{_CONSUMER_PK}'")), self._tables.timeout_s * 5
        )
        return [c for c in map(_parsed, entities) if c is not None]

    async def get(self, consumer_id: str) -> Consumer | None:
        try:
            entity = await self._tables.call("consumers", lambda t: t.get_entity(_CONSUMER_PK, consumer_id))
        except ResourceNotFoundError:
            return None
        return _parsed(dict(entity))

    async def get_versioned(self, consumer_id: str) -> tuple[Consumer, str] | None:
        try:
            entity = await self._tables.call("consumers", lambda t: t.get_entity(_CONSUMER_PK, consumer_id))
        except ResourceNotFoundError:
            return None
        consumer, etag = _parsed(dict(entity)), entity_etag(entity)
        return None if consumer is None or etag is None else (consumer, etag)

    async def find_by_key_hash(self, key_hash: str) -> Consumer | None:
        if not _HEX64.fullmatch(key_hash):
            return None
        try:
            row = await self._tables.call("consumers", lambda t: t.get_entity(_index_partition(key_hash), key_hash))
        except ResourceNotFoundError:
            return None
        consumer_id = row.get("consumer_id")
        if not isinstance(consumer_id, str) or not _CONSUMER_ID.fullmatch(consumer_id):
            return None
        consumer = await self.get(consumer_id)
        # The index may lag a rotation or deletion: only the consumer row decides.
        if consumer is None or key_hash not in (consumer.key_hash, consumer.previous_key_hash):
            return None
        return consumer

    async def _write_index(self, consumer: Consumer) -> None:
        for row in _index_rows(consumer):
            await self._tables.call("consumers", lambda t, r=row: t.upsert_entity(r, mode=UpdateMode.REPLACE))  # type: ignore[misc]

    async def _drop_index(self, hashes: set[str]) -> None:
        for key_hash in hashes:
            try:
                await self._tables.call("consumers", lambda t, h=key_hash: t.delete_entity(_index_partition(h), h))  # type: ignore[misc]
            except ResourceNotFoundError:
                pass

    async def put(self, consumer: Consumer, if_match: str | None = None) -> None:
        """Write the consumer with its index rows; index rows of keys it no longer has are removed afterwards (a lookup
        through a stale index row finds the consumer row without that hash and refuses). With `if_match` (an ETag from
        get_versioned) only over that version: Conflict when another write, or a deletion, came in between (an index
        row written for a key the consumer row never got finds nothing)."""
        try:
            entity_before = await self._tables.call("consumers", lambda t: t.get_entity(_CONSUMER_PK, consumer.id))
            before = {str(entity_before.get("key_hash") or ""), str(entity_before.get("previous_key_hash") or "")}
        except ResourceNotFoundError:
            before = set()
        await self._write_index(consumer)
        entity = consumer_to_entity(consumer)
        if if_match is None:
            await self._tables.call("consumers", lambda t: t.upsert_entity(entity, mode=UpdateMode.REPLACE))
        else:
            try:
                await self._tables.call("consumers", lambda t: t.update_entity(
                    entity, mode=UpdateMode.REPLACE, etag=if_match, match_condition=MatchConditions.IfNotModified))
            except ResourceNotFoundError:
                raise Conflict("the consumer was deleted meanwhile") from None
        await self._drop_index({h for h in before if h} - {consumer.key_hash, consumer.previous_key_hash or ""})
        await self._mark_changed()

    async def create(self, consumer: Consumer) -> None:
        await self._write_index(consumer)
        entity = consumer_to_entity(consumer)
        try:
            await self._tables.call("consumers", lambda t: t.create_entity(entity))
        except Conflict:
            await self._drop_index({row["RowKey"] for row in _index_rows(consumer)})
            raise
        await self._mark_changed()

    async def create_many(self, consumers: list[Consumer], parallel: int = 4) -> None:
        """Create many consumers in batches of 100 (one round trip each; all share one partition), a few at a time.
        A batch is all or nothing: Conflict names the first batch holding an id that exists."""
        entities = [consumer_to_entity(c) for c in consumers]
        gate = asyncio.Semaphore(parallel)

        async def batch(chunk: list[dict[str, Any]], kind: str) -> None:
            operations: list[Any] = [(kind, e) for e in chunk]
            async with gate:
                await self._tables.call("consumers", lambda t: t.submit_transaction(operations))

        # The key-hash index rows first (a batch holds one partition: grouped by the hash's partition), so that every
        # consumer is findable by one point read as soon as its row exists; a lookup through an index row whose
        # consumer row was never created finds nothing.
        by_partition: dict[str, list[dict[str, Any]]] = {}
        seen: set[str] = set()
        for consumer in consumers:
            for row in _index_rows(consumer):
                if row["RowKey"] in seen:
                    raise ValueError(f"two consumers share a key ({consumer.key_prefix}...): every consumer needs its own")
                seen.add(row["RowKey"])
                by_partition.setdefault(row["PartitionKey"], []).append(row)
        await asyncio.gather(*(
            batch(rows[i : i + 100], "upsert") for rows in by_partition.values() for i in range(0, len(rows), 100)
        ))
        try:
            await asyncio.gather(*(batch(entities[i : i + 100], "create") for i in range(0, len(entities), 100)))
        finally:
            await self._mark_changed()  # batches that went through before a conflict are consumers too

    async def list_teams(self) -> list[Team]:
        entities = await self._tables.call(
            "consumers", lambda t: collect(t.query_entities(f"PartitionKey eq '{_TEAM_PK}'")), self._tables.timeout_s * 5
        )
        return _parsed_teams(entities)

    async def list_all(self) -> tuple[list[Consumer], list[Team]]:
        query = f"PartitionKey eq '{_CONSUMER_PK}' or PartitionKey eq '{_TEAM_PK}'"
        entities = await self._tables.call("consumers", lambda t: collect(t.query_entities(query)),
                                           self._tables.timeout_s * 5)
        consumers = [c for c in map(_parsed, (e for e in entities if e.get("PartitionKey") == _CONSUMER_PK)) if c]
        return consumers, _parsed_teams([e for e in entities if e.get("PartitionKey") == _TEAM_PK])

    async def get_team(self, team_id: str) -> Team | None:
        if not _CONSUMER_ID.fullmatch(team_id):
            return None
        try:
            entity = await self._tables.call("consumers", lambda t: t.get_entity(_TEAM_PK, team_id))
        except ResourceNotFoundError:
            return None
        return team_from_entity(dict(entity))

    async def get_team_versioned(self, team_id: str) -> tuple[Team, str] | None:
        if not _CONSUMER_ID.fullmatch(team_id):
            return None
        try:
            entity = await self._tables.call("consumers", lambda t: t.get_entity(_TEAM_PK, team_id))
        except ResourceNotFoundError:
            return None
        etag = entity_etag(entity)
        return None if etag is None else (team_from_entity(dict(entity)), etag)

    async def put_team(self, team: Team, if_match: str | None = None) -> None:
        entity = team_to_entity(team)
        if if_match is None:
            await self._tables.call("consumers", lambda t: t.upsert_entity(entity, mode=UpdateMode.REPLACE))
        else:
            try:
                await self._tables.call("consumers", lambda t: t.update_entity(
                    entity, mode=UpdateMode.REPLACE, etag=if_match, match_condition=MatchConditions.IfNotModified))
            except ResourceNotFoundError:
                raise Conflict("the team was deleted meanwhile") from None
        await self._mark_changed()

    async def create_team(self, team: Team) -> None:
        entity = team_to_entity(team)
        await self._tables.call("consumers", lambda t: t.create_entity(entity))
        await self._mark_changed()

    async def delete_team(self, team_id: str) -> bool:
        if await self.get_team(team_id) is None:
            return False
        await self._tables.call("consumers", lambda t: t.delete_entity(_TEAM_PK, team_id))
        await self._mark_changed()
        return True

    async def delete(self, consumer_id: str) -> bool:
        try:
            entity = await self._tables.call("consumers", lambda t: t.get_entity(_CONSUMER_PK, consumer_id))
        except ResourceNotFoundError:
            return False
        await self._tables.call("consumers", lambda t: t.delete_entity(_CONSUMER_PK, consumer_id))
        await self._drop_index({h for h in (entity.get("key_hash"), entity.get("previous_key_hash")) if isinstance(h, str) and h})
        await self._mark_changed()
        return True


__all__ = [
    "Conflict",
    "MatchConditions",
    "StoreBusy",
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


# ---- shared breaker state ------------------------------------------------------------------------------------------

_BREAKER_PK = "breaker"
_BREAKER_WRITE_TRIES = 16  # each conflict means another writer finished: n writers at once need at most n tries


class TableBreakerStore:
    """One row per backend and deployment, written on breaker transitions only; every instance reads them all a few times a second."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    async def load(self) -> list[Any]:
        from shared.records.breaker import BreakerRecord

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


# ---- shared PTU capacity ------------------------------------------------------------------------------------------

_CAPACITY_PK = "capacity"
_PROPERTY_CHARS = 30_000  # a string property holds 64 KiB of UTF-16: 32K characters, with room to spare


def _compact_charges(charges: Any, t0: float) -> str:
    """[[milliseconds after t0, tokens], ...] as JSON. A busy instance's minute can hold thousands of charges: then
    neighbours are summed into ever wider time buckets (1, 2, 4 ... ms) until the text fits one Table property; what
    is learnt from them only needs them to the nearest few milliseconds."""
    width = 1
    while True:
        buckets: dict[int, float] = {}
        for t, n in charges:
            key = int(round((t - t0) * 1000)) // width * width
            buckets[key] = buckets.get(key, 0.0) + n
        text = json.dumps([[ms, round(n, 1)] for ms, n in sorted(buckets.items()) if n], separators=(",", ":"))
        if len(text) <= _PROPERTY_CHARS:
            return text
        width *= 2


class TableCapacityStore:
    """One row per instance, backend and deployment, replaced on every sync; all rows read in one query. Rows of
    instances gone for a while are ignored by the readers (their `at` is old) and deleted by whoever sees them."""

    STALE_S = 600.0

    def __init__(self, tables: Tables, clock: Callable[[], float] | None = None) -> None:
        self._tables = tables
        self._clock = clock or time.time

    async def publish(self, report: Any) -> None:
        t0 = report.charges[0][0] if report.charges else report.at
        entity = {
            "PartitionKey": _CAPACITY_PK,
            "RowKey": f"{report.backend_id}|{report.deployment}|{report.instance}",
            "backend": report.backend_id,
            "deployment": report.deployment,
            "instance": report.instance,
            "at": float(report.at),
            "t0": float(t0),
            "charges": _compact_charges(report.charges, t0),
            "ready": json.dumps(sorted({round(t, 3) for t in report.ready})),
            "demand": float(report.demand),
            "rate": float(report.rate) if report.rate is not None else -1.0,
        }
        await self._tables.call("capacity", lambda t: t.upsert_entity(entity, mode=UpdateMode.REPLACE))

    async def load(self) -> list[Any]:
        from shared.records.capacity import CapacityReport

        entities = await self._tables.call(
            "capacity", lambda t: collect(t.query_entities(f"PartitionKey eq '{_CAPACITY_PK}'"))
        )
        reports = []
        now = self._clock()
        for e in entities:
            try:
                t0 = float(e["t0"])
                report = CapacityReport(
                    e["backend"], e["deployment"], e["instance"], float(e["at"]),
                    tuple((t0 + ms / 1000, float(n)) for ms, n in json.loads(e["charges"])),
                    tuple(float(t) for t in json.loads(e["ready"])),
                    float(e["demand"]), float(e["rate"]) if float(e["rate"]) > 0 else None,
                )
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("ignored a malformed capacity row (%s)", type(exc).__name__)
                continue
            if now - report.at > self.STALE_S:
                await self._forget(e)
                continue
            reports.append(report)
        return reports

    async def _forget(self, entity: dict[str, Any]) -> None:
        try:
            await self._tables.call("capacity", lambda t: t.delete_entity(_CAPACITY_PK, entity["RowKey"]))
        except (StoreUnavailable, ResourceNotFoundError):
            pass


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
        from shared.records.spend import SpendRow

        entities = await self._tables.call(
            "budgets",
            lambda t: collect(t.query_entities("PartitionKey eq @p", parameters={"p": f"{consumer}|{period}"})),
        )
        return [SpendRow(e["consumer"], e["period"], e["RowKey"], int(e["nanos"])) for e in entities]


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
