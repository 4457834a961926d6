"""Consumers and teams in Table Storage: one row per consumer and per team, an index row per key hash, and a
change marker every write replaces, holding the change feed (the ids of the last changes: records/consumer_feed.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    ResourceNotFoundError,
)
from azure.data.tables import EntityProperty, UpdateMode

from shared.config import DEPLOYMENT_NAME
from shared.records.cache import MAX_TTL_S, SCOPES, CachePolicy
from shared.records.consumer_feed import CONSUMER, MARKER_FIELDS, TEAM, ChangeFeed, appended, parse, parse_marker
from shared.records.consumer_snapshot import (
    CHUNK_PK,
    HEAD_PK,
    HEAD_RK,
    READ_PARALLEL,
    BadSnapshot,
    Encoded,
    SnapshotHead,
    check_chunk,
    pack,
    parse_head,
    read_chunks,
    unpack,
)
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
from shared.storage.protocols import ChangeNotAnnounced, Conflict, StoreBusy, StoreUnavailable
from shared.storage.tables import Tables, change_row, collect, entity_etag, replace_if_unchanged

log = logging.getLogger(__name__)


_CONSUMER_PK = "consumer"
_INDEX_PK = "keyhash"
# One row that every write through TableConsumerStore replaces: gateways read it (one point read a second) and, when
# its ETag has changed, read the consumers and teams its change feed names (or, when they cannot follow the feed, the
# whole listing), so a consumer created, disabled or rotated is seen within about a second without every instance
# listing every consumer. The feed is appended on the row's ETag: two admins writing at once both get their entry.
_MARKER_PK, _MARKER_RK = "marker", "consumers"
MARK_TRIES = 20
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


def _deployments(entity: dict[str, Any]) -> frozenset[str] | None:
    """The deployments a consumer or team may call: None for "*" (all), else a list of names."""
    raw = entity.get("deployments")
    if raw == "*":
        return None
    names = _names(raw, "deployments")
    if not all(isinstance(n, str) and DEPLOYMENT_NAME.fullmatch(n) for n in names):
        raise BadConsumerRecord("deployments: expected deployment names")
    return frozenset(names)


def _spending(entity: dict[str, Any]) -> tuple[int, str | None, int | float, str | None]:
    """A consumer's or team's quota and budget with their periods, checked alike for both."""
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
    return quota, quota_period, budget, budget_period


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
    deployments = _deployments(entity)
    try:
        per_deployment = json.loads(entity.get("deployment_tpm") or "{}")
    except ValueError:
        per_deployment = None
    if not isinstance(per_deployment, dict) or not all(
        isinstance(k, str) and DEPLOYMENT_NAME.fullmatch(k) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in per_deployment.items()
    ):
        raise BadConsumerRecord("deployment_tpm: expected a JSON object {deployment: whole number >= 0}")
    quota, quota_period, budget, budget_period = _spending(entity)
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
    deployments = _deployments(entity)
    quota, quota_period, budget, budget_period = _spending(entity)
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


def _snapshot_schema() -> str:
    """The row fields this version writes: a snapshot written by a version with other fields is not read (a reader of
    another version reads the rows themselves: the listing)."""
    consumer = sorted(consumer_to_entity(Consumer(id="x", name="x", key_hash="", key_prefix="")))
    team = sorted(team_to_entity(Team(id="x", name="x")))
    return hashlib.sha256(json.dumps([consumer, team]).encode()).hexdigest()[:16]


SNAPSHOT_SCHEMA = _snapshot_schema()


def encode_snapshot(consumers: list[Consumer], teams: list[Team], epoch: str, seq: int, written_at: float) -> Encoded:
    """The listing as a snapshot (records/consumer_snapshot.py), rows as this table holds them: key hashes, no keys."""
    def row(entity: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in entity.items() if k != "PartitionKey"}

    rows = {"consumers": [row(consumer_to_entity(c)) for c in consumers], "teams": [row(team_to_entity(t)) for t in teams]}
    return pack(rows, SNAPSHOT_SCHEMA, epoch, seq, written_at)


def decode_snapshot(head: SnapshotHead, chunks: list[bytes]) -> tuple[list[Consumer], list[Team]]:
    """The snapshot's rows, each parsed as strictly as a row of the listing (one that does not parse is left out)."""
    rows = unpack(head, chunks)
    consumers = [c for c in (_parsed({**r, "PartitionKey": _CONSUMER_PK}) for r in rows["consumers"]) if c is not None]
    return consumers, _parsed_teams([{**r, "PartitionKey": _TEAM_PK} for r in rows["teams"]])


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

    async def change_marker(self) -> ChangeFeed:
        """The marker's token (its ETag), epoch and sequence: a projection, a few dozen bytes whatever the feed holds."""
        try:
            entity = await self._tables.call(
                "consumers", lambda t: t.get_entity(_MARKER_PK, _MARKER_RK, select=list(MARKER_FIELDS)))
        except ResourceNotFoundError:
            return ChangeFeed(None)
        return parse_marker(entity_etag(entity), dict(entity))

    async def change_feed(self) -> ChangeFeed:
        """The change marker (its ETag is the token) and the feed it holds: one point read."""
        try:
            entity = await self._tables.call("consumers", lambda t: t.get_entity(_MARKER_PK, _MARKER_RK))
        except ResourceNotFoundError:
            return ChangeFeed(None)
        return parse(entity_etag(entity), dict(entity))

    async def _mark_changed(self, changed: list[tuple[str, str]]) -> None:
        """Record the rows just written in the feed: after the write, so that a gateway reading a row the feed names
        reads it as written (the feed failing to record it leaves it to the periodic full reload, and the admin is
        told: ChangeNotAnnounced)."""
        try:
            await change_row(self._tables, "consumers", _MARKER_PK, _MARKER_RK,
                             lambda row: appended(parse(None, row), changed), tries=MARK_TRIES)
        except (Conflict, StoreUnavailable) as exc:
            raise ChangeNotAnnounced(f"written, but not recorded in the change feed ({type(exc).__name__})") from exc

    async def snapshot_head(self) -> tuple[SnapshotHead | None, str | None]:
        """The listing snapshot's head and its row's ETag: (None, None) when there is none, (None, etag) when there is
        one this version cannot use (another format, schema, out of shape: a writer replaces it)."""
        try:
            entity = await self._tables.call("consumers", lambda t: t.get_entity(HEAD_PK, HEAD_RK))
        except ResourceNotFoundError:
            return None, None
        etag = entity_etag(entity)
        try:
            return parse_head(dict(entity), etag, SNAPSHOT_SCHEMA), etag
        except BadSnapshot as problem:
            log.warning("consumer listing snapshot not used: %s", problem)
            return None, etag

    async def read_snapshot(self, head: SnapshotHead) -> tuple[list[Consumer], list[Team]]:
        """The snapshot's rows: every chunk of the head's generation (a point read each, a few at a time, each in a
        partition of its own). BadSnapshot when they are not what the head says (SnapshotGone: one is not there)."""
        async def chunk(k: int) -> bytes:
            try:
                entity = await self._tables.call("consumers", lambda t: t.get_entity(CHUNK_PK.format(k), head.generation))
            except ResourceNotFoundError:
                return check_chunk(head, None)
            return check_chunk(head, dict(entity))

        chunks = await read_chunks(head, chunk, lambda exc: isinstance(exc, StoreBusy))
        # Inflating and parsing 10,000 rows takes a few hundred ms: not on the worker's event loop.
        return await asyncio.to_thread(decode_snapshot, head, chunks)

    async def write_snapshot(self, consumers: list[Consumer], teams: list[Team], epoch: str, seq: int,
                             written_at: float, etag: str | None, previous: SnapshotHead | None) -> None:
        """The listing as a snapshot stamped (epoch, seq): the chunks of a new generation, then the head over the
        version read (`etag`; None: created), then the previous generation's chunks deleted. Conflict when another
        writer replaced the head first (its chunks stay, this writer's are deleted); BadSnapshot when too large."""
        encoded = await asyncio.to_thread(encode_snapshot, consumers, teams, epoch, seq, written_at)  # (as decoding)
        gate = asyncio.Semaphore(READ_PARALLEL)

        async def put(k: int, data: bytes) -> None:
            row = {"PartitionKey": CHUNK_PK.format(k), "RowKey": encoded.generation, "data": data}
            async with gate:
                await self._tables.call("consumers", lambda t: t.upsert_entity(row, mode=UpdateMode.REPLACE))

        async def drop(generation: str, chunks: int) -> None:
            async def one(k: int) -> None:
                async with gate:
                    with contextlib.suppress(ResourceNotFoundError, StoreUnavailable):
                        await self._tables.call("consumers", lambda t: t.delete_entity(CHUNK_PK.format(k), generation))

            await asyncio.gather(*(one(k) for k in range(chunks)))

        await asyncio.gather(*(put(k, data) for k, data in enumerate(encoded.chunks)))
        head = {**encoded.head, "PartitionKey": HEAD_PK, "RowKey": HEAD_RK}
        try:
            if etag is None:
                await self._tables.call("consumers", lambda t: t.create_entity(head))
            else:
                await self._tables.call("consumers", replace_if_unchanged(head, etag))
        except (Conflict, ResourceNotFoundError):
            await drop(encoded.generation, len(encoded.chunks))
            raise Conflict("another writer replaced the snapshot first") from None
        if previous is not None:
            await drop(previous.generation, previous.chunks)

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
        await self._put(consumer_to_entity(consumer), if_match, "consumer")
        await self._drop_index({h for h in before if h} - {consumer.key_hash, consumer.previous_key_hash or ""})
        await self._mark_changed([(CONSUMER, consumer.id)])

    async def create(self, consumer: Consumer) -> None:
        await self._write_index(consumer)
        entity = consumer_to_entity(consumer)
        try:
            await self._tables.call("consumers", lambda t: t.create_entity(entity))
        except Conflict:
            await self._drop_index({row["RowKey"] for row in _index_rows(consumer)})
            raise
        await self._mark_changed([(CONSUMER, consumer.id)])

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
            await self._mark_changed([(CONSUMER, c.id) for c in consumers])  # batches that went through are consumers too

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

    async def _put(self, entity: dict[str, Any], if_match: str | None, what: str) -> None:
        """Replace a consumer's or team's row: whatever is there, or with `if_match` only that version (Conflict when
        another write, or a deletion, came in between)."""
        if if_match is None:
            await self._tables.call("consumers", lambda t: t.upsert_entity(entity, mode=UpdateMode.REPLACE))
            return
        try:
            await self._tables.call("consumers", replace_if_unchanged(entity, if_match))
        except ResourceNotFoundError:
            raise Conflict(f"the {what} was deleted meanwhile") from None

    async def put_team(self, team: Team, if_match: str | None = None) -> None:
        await self._put(team_to_entity(team), if_match, "team")
        await self._mark_changed([(TEAM, team.id)])

    async def create_team(self, team: Team) -> None:
        entity = team_to_entity(team)
        await self._tables.call("consumers", lambda t: t.create_entity(entity))
        await self._mark_changed([(TEAM, team.id)])

    async def delete_team(self, team_id: str) -> bool:
        if await self.get_team(team_id) is None:
            return False
        await self._tables.call("consumers", lambda t: t.delete_entity(_TEAM_PK, team_id))
        await self._mark_changed([(TEAM, team_id)])
        return True

    async def delete(self, consumer_id: str) -> bool:
        try:
            entity = await self._tables.call("consumers", lambda t: t.get_entity(_CONSUMER_PK, consumer_id))
        except ResourceNotFoundError:
            return False
        await self._tables.call("consumers", lambda t: t.delete_entity(_CONSUMER_PK, consumer_id))
        await self._drop_index({h for h in (entity.get("key_hash"), entity.get("previous_key_hash")) if isinstance(h, str) and h})
        await self._mark_changed([(CONSUMER, consumer_id)])
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
