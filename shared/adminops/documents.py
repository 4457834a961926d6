"""Consumer and team documents in, records out: the admin API's strict reading of the JSON a caller sends.

The field names are those `consumers show` prints and the bulk-creation JSON lines use, so one document describes a
consumer everywhere. Unknown fields, wrong types and out-of-range numbers are refused with the field named, before
anything is written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import Any

from shared.adminops.operations import OperationError
from shared.config import DEPLOYMENT_NAME
from shared.edge.entra import MAPPING_KINDS, mapping_key
from shared.records.cache import MAX_TTL_S, SCOPES, CachePolicy
from shared.records.consumers import (
    CAPABILITIES,
    PRIORITIES,
    QUOTA_PERIODS,
    USER_SOURCES,
    Consumer,
    Limits,
    Team,
    UserLimits,
    validate_consumer_id,
)
from shared.records.safety import NONE

MAX_COUNT = 10**12
MAX_NAME = 200
_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

CONSUMER_FIELDS = ("name", "id", "enabled", "deployments", "tokens_per_minute", "deployment_tokens_per_minute", "quota",
                   "quota_period", "budget", "budget_period", "priority", "output_cap", "entra", "capabilities", "team",
                   "users", "fallback", "cache", "key_prefix", "safety_policy")
TEAM_FIELDS = ("name", "id", "deployments", "tokens_per_minute", "quota", "quota_period", "budget", "budget_period",
               "priority", "cache", "members", "safety_policy")
USER_FIELDS = ("tokens_per_minute", "quota", "quota_period", "sources", "required")
CACHE_FIELDS = ("on", "ttl_s", "scope", "tools")


def bad(field: str, message: str) -> OperationError:
    return OperationError(400, "invalid_value", f"{field}: {message}", field)


def _object(value: Any, field: str, known: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise bad(field, "expected a JSON object")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise OperationError(400, "unknown_field", f"{(field + '.') if field != 'body' else ''}{unknown[0]}: unknown "
                             f"field (known: {', '.join(known)})", unknown[0])
    return value


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise bad(field, f"expected a whole number from 0 to {MAX_COUNT}")
    return int(value)


def _choice(value: Any, field: str, choices: tuple[str, ...], nullable: bool = False) -> Any:
    if value is None and nullable:
        return None
    if not isinstance(value, str) or value not in choices:
        raise bad(field, f"expected one of {', '.join(choices)}" + (" or null" if nullable else ""))
    return value


def _safety(value: Any, policies: Collection[str]) -> str | None:
    """A policy of GATEWAY_SAFETY_POLICIES, `none` (no policy at all), or null / "" (inherit)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or (value != NONE and value not in policies):
        known = ", ".join(sorted(policies)) or "none are defined"
        raise bad("safety_policy", f"expected a policy of GATEWAY_SAFETY_POLICIES ({known}), {NONE!r}, or null")
    return value


def _flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise bad(field, "expected true or false")
    return value


def _name(value: Any, field: str = "name") -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME or not value.isprintable():
        raise bad(field, f"expected a printable name of 1 to {MAX_NAME} characters")
    return value


def _deployments(value: Any, field: str = "deployments") -> frozenset[str] | None:
    if value == "*":
        return None
    if not isinstance(value, list) or not value or len(value) > 1000:
        raise bad(field, 'expected a non-empty list of deployment names, or "*" for all')
    for item in value:
        if not isinstance(item, str) or not DEPLOYMENT_NAME.fullmatch(item):
            raise bad(field, f"not a deployment name: {str(item)[:80]!r}")
    return frozenset(value)


def _per_deployment(value: Any) -> dict[str, int]:
    field = "deployment_tokens_per_minute"
    if not isinstance(value, dict) or len(value) > 1000:
        raise bad(field, "expected an object of deployment names to whole numbers")
    for name, tpm in value.items():
        if not DEPLOYMENT_NAME.fullmatch(name):
            raise bad(field, f"not a deployment name: {name[:80]!r}")
        _count(tpm, f"{field}.{name}")
    return dict(value)


def _budget(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1e12:
        raise bad("budget", "expected an amount from 0 to 1e12 (0: no budget)")
    return float(value)


def _entra(value: Any) -> frozenset[str]:
    """Mapping keys as `consumers show` prints them: kind:value or kind:value@tenant."""
    if not isinstance(value, list) or len(value) > 100:
        raise bad("entra", "expected a list of mappings such as app:<id>, oid:<id>, role:<name>, group:<id>")
    keys = set()
    for item in value:
        if not isinstance(item, str):
            raise bad("entra", "expected strings")
        kind, sep, rest = item.partition(":")
        value_part, at, tenant = rest.rpartition("@") if "@" in rest else (rest, "", "")
        if not sep or kind not in MAPPING_KINDS or (kind != "role" and not _GUID.fullmatch(value_part.strip())):
            raise bad("entra", f"not a mapping: {item[:80]!r} (app:, oid: and group: take a GUID; role: a name)")
        try:
            keys.add(mapping_key(kind, value_part, tenant if at else None))
        except ValueError as error:
            raise bad("entra", str(error)) from None
    return frozenset(keys)


def _capabilities(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(c, str) and c in CAPABILITIES for c in value):
        raise bad("capabilities", f"expected a list of some of {', '.join(sorted(CAPABILITIES))}")
    return frozenset(value)


def _team_id(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise bad("team", "expected a team id or null")
    try:
        return validate_consumer_id(value)
    except ValueError:
        raise bad("team", "not a team id") from None


def _users(value: Any, base: UserLimits) -> UserLimits:
    doc = _object(value, "users", USER_FIELDS)
    tpm = _count(doc["tokens_per_minute"], "users.tokens_per_minute") if "tokens_per_minute" in doc else base.tokens_per_minute
    quota = _count(doc["quota"], "users.quota") if "quota" in doc else base.quota
    period = _choice(doc["quota_period"], "users.quota_period", QUOTA_PERIODS, True) if "quota_period" in doc else base.quota_period
    if quota and period is None:
        raise bad("users.quota_period", f"a quota needs a period, one of {', '.join(QUOTA_PERIODS)}")
    sources = base.sources
    if "sources" in doc:
        raw = doc["sources"]
        if not isinstance(raw, list) or not raw or not all(isinstance(x, str) and x in USER_SOURCES for x in raw):
            raise bad("users.sources", f"expected a non-empty list of some of {', '.join(USER_SOURCES)}")
        sources = tuple(dict.fromkeys(raw))
    required = _flag(doc["required"], "users.required") if "required" in doc else base.required
    return UserLimits(tpm, quota, period if quota else None, sources, required)


def _cache(value: Any, base: CachePolicy) -> CachePolicy:
    doc = _object(value, "cache", CACHE_FIELDS)
    ttl = doc.get("ttl_s", base.ttl_s)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_TTL_S:
        raise bad("cache.ttl_s", f"expected 1 to {MAX_TTL_S} seconds")
    return CachePolicy(
        _flag(doc["on"], "cache.on") if "on" in doc else base.enabled, ttl,
        _choice(doc["scope"], "cache.scope", SCOPES) if "scope" in doc else base.scope,
        _flag(doc["tools"], "cache.tools") if "tools" in doc else base.tools,
    )


def _limits(doc: Mapping[str, Any], base: Limits, per_deployment: bool = True) -> Limits:
    quota = _count(doc["quota"], "quota") if "quota" in doc else base.quota
    period = _choice(doc["quota_period"], "quota_period", QUOTA_PERIODS, True) if "quota_period" in doc else base.quota_period
    if quota and period is None:
        raise bad("quota_period", f"a quota needs a period, one of {', '.join(QUOTA_PERIODS)}")
    budget = _budget(doc["budget"]) if "budget" in doc else base.budget
    budget_period = (_choice(doc["budget_period"], "budget_period", QUOTA_PERIODS, True) if "budget_period" in doc
                     else base.budget_period)
    output_cap = base.output_cap
    if "output_cap" in doc:
        output_cap = {"on": True, "off": False, "default": None}[_choice(doc["output_cap"], "output_cap", ("on", "off", "default"))]
    return Limits(
        tokens_per_minute=_count(doc["tokens_per_minute"], "tokens_per_minute") if "tokens_per_minute" in doc
        else base.tokens_per_minute,
        deployment_tokens_per_minute=(_per_deployment(doc["deployment_tokens_per_minute"])
                                      if per_deployment and "deployment_tokens_per_minute" in doc
                                      else base.deployment_tokens_per_minute),
        quota=quota, quota_period=period if quota else None,
        budget=budget, budget_period=budget_period if budget else None, output_cap=output_cap,
    )


def consumer_change(body: Any, path_id: str | None = None,
                    policies: Collection[str] = ()) -> Callable[[Consumer], Consumer]:
    """A PATCH (or the fields of a create) as a change of a consumer; every field checked now, before any read or write.
    `id` and `key_prefix` are read-only: accepted only as they are (so a document read can be sent back)."""
    doc = _object(body, "body", CONSUMER_FIELDS)
    checks: dict[str, Any] = {}
    if "name" in doc:
        checks["name"] = _name(doc["name"])
    if "enabled" in doc:
        checks["enabled"] = _flag(doc["enabled"], "enabled")
    if "deployments" in doc:
        checks["deployments"] = _deployments(doc["deployments"])
    if "priority" in doc:
        checks["priority"] = _choice(doc["priority"], "priority", PRIORITIES)
    if "entra" in doc:
        checks["entra"] = _entra(doc["entra"])
    if "capabilities" in doc:
        checks["capabilities"] = _capabilities(doc["capabilities"])
    if "team" in doc:
        checks["team"] = _team_id(doc["team"])
    if "fallback" in doc:
        checks["fallback"] = _choice(doc["fallback"], "fallback", ("on", "off")) == "on"
    if "safety_policy" in doc:
        checks["safety"] = _safety(doc["safety_policy"], policies)
    if path_id is not None and "id" in doc and doc["id"] != path_id:
        raise bad("id", "read-only: a consumer's id never changes")
    _limits(doc, Limits())  # the limits' own checks, now
    if "users" in doc:
        _users(doc["users"], UserLimits())
    if "cache" in doc:
        _cache(doc["cache"], CachePolicy())

    def change(consumer: Consumer) -> Consumer:
        if "key_prefix" in doc and doc["key_prefix"] != consumer.key_prefix:
            raise bad("key_prefix", "read-only: rotate the key to change it")
        return replace(
            consumer, **checks, limits=_limits(doc, consumer.limits),
            users=_users(doc["users"], consumer.users) if "users" in doc else consumer.users,
            cache=_cache(doc["cache"], consumer.cache) if "cache" in doc else consumer.cache,
            version=consumer.version + 1,
        )

    return change


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:63] or "consumer"


def new_consumer(body: Any, key_hash: str, key_prefix: str, policies: Collection[str] = ()) -> Consumer:
    """A create's document as a new consumer: `name` and `deployments` are required (access is never implied)."""
    doc = _object(body, "body", CONSUMER_FIELDS)
    if "name" not in doc:
        raise bad("name", "required")
    if "deployments" not in doc:
        raise bad("deployments", 'required: a list of deployment names, or "*" for all')
    if "key_prefix" in doc:
        raise bad("key_prefix", "read-only: the gateway makes the key")
    raw_id = doc.get("id")
    if raw_id is not None and not isinstance(raw_id, str):
        raise bad("id", "expected a string")
    try:
        consumer_id = validate_consumer_id(raw_id or slug(_name(doc["name"])))
    except ValueError:
        raise bad("id", "lower-case letters, digits and '-', 1 to 63, starting with a letter or digit") from None
    base = Consumer(id=consumer_id, name=_name(doc["name"]), key_hash=key_hash, key_prefix=key_prefix)
    made = consumer_change({k: v for k, v in doc.items() if k != "id"}, policies=policies)(base)
    return replace(made, version=0)


def team_change(body: Any, path_id: str | None = None, policies: Collection[str] = ()) -> Callable[[Team], Team]:
    doc = _object(body, "body", TEAM_FIELDS)
    checks: dict[str, Any] = {}
    if "name" in doc:
        checks["name"] = _name(doc["name"])
    if "deployments" in doc:
        checks["deployments"] = _deployments(doc["deployments"])
    if "priority" in doc:
        checks["priority"] = _choice(doc["priority"], "priority", PRIORITIES)
    if "safety_policy" in doc:
        checks["safety"] = _safety(doc["safety_policy"], policies)
    if path_id is not None and "id" in doc and doc["id"] != path_id:
        raise bad("id", "read-only: a team's id never changes")
    if "members" in doc:
        raise bad("members", "read-only: set a consumer's team to move it")
    _limits(doc, Limits(), per_deployment=False)
    if "cache" in doc:
        _cache(doc["cache"], CachePolicy())

    def change(team: Team) -> Team:
        return replace(team, **checks, limits=_limits(doc, team.limits, per_deployment=False),
                       cache=_cache(doc["cache"], team.cache) if "cache" in doc else team.cache, version=team.version + 1)

    return change


def new_team(body: Any, policies: Collection[str] = ()) -> Team:
    doc = _object(body, "body", TEAM_FIELDS)
    if "name" not in doc:
        raise bad("name", "required")
    if "deployments" not in doc:
        raise bad("deployments", 'required: a list of deployment names, or "*" for all')
    raw_id = doc.get("id")
    if raw_id is not None and not isinstance(raw_id, str):
        raise bad("id", "expected a string")
    try:
        team_id = validate_consumer_id(raw_id or slug(_name(doc["name"])))
    except ValueError:
        raise bad("id", "lower-case letters, digits and '-', 1 to 63, starting with a letter or digit") from None
    made = team_change({k: v for k, v in doc.items() if k != "id"}, policies=policies)(
        Team(id=team_id, name=_name(doc["name"])))
    return replace(made, version=0)
