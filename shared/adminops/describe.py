"""A consumer or team as one JSON document: what `consumers show`, the admin API and the audit table print, with the
field names of the bulk-creation JSON lines. No key and no key hash, ever."""

from __future__ import annotations

from typing import Any

from shared.records.cache import CachePolicy
from shared.records.consumers import Consumer, Team


def describe_cache(policy: CachePolicy) -> dict[str, Any]:
    return {"on": policy.enabled, "ttl_s": policy.ttl_s, "scope": policy.scope, "tools": policy.tools}


def describe_consumer(consumer: Consumer) -> dict[str, Any]:
    limits = consumer.limits
    users = consumer.users
    return {
        "id": consumer.id,
        "name": consumer.name,
        "key_prefix": consumer.key_prefix,
        "enabled": consumer.enabled,
        "priority": consumer.priority,
        "deployments": "*" if consumer.deployments is None else sorted(consumer.deployments),
        "tokens_per_minute": limits.tokens_per_minute,
        "deployment_tokens_per_minute": dict(limits.deployment_tokens_per_minute),
        "quota": limits.quota,
        "quota_period": limits.quota_period,
        "budget": limits.budget,
        "budget_period": (limits.budget_period or "monthly") if limits.budget else None,
        "entra": sorted(consumer.entra),
        "output_cap": "default" if limits.output_cap is None else ("on" if limits.output_cap else "off"),
        "capabilities": sorted(consumer.capabilities),
        "team": consumer.team,
        "users": {"tokens_per_minute": users.tokens_per_minute, "quota": users.quota, "quota_period": users.quota_period,
                  "sources": list(users.sources), "required": users.required},
        "fallback": "on" if consumer.fallback else "off",
        "cache": describe_cache(consumer.cache),
        "safety_policy": consumer.safety,
    }


def describe_team(team: Team, members: list[str] | None = None) -> dict[str, Any]:
    limits = team.limits
    described: dict[str, Any] = {
        "id": team.id,
        "name": team.name,
        "priority": team.priority,
        "deployments": "*" if team.deployments is None else sorted(team.deployments),
        "tokens_per_minute": limits.tokens_per_minute,
        "quota": limits.quota,
        "quota_period": limits.quota_period,
        "budget": limits.budget,
        "budget_period": (limits.budget_period or "monthly") if limits.budget else None,
        "cache": describe_cache(team.cache),
        "safety_policy": team.safety,
    }
    if members is not None:
        described["members"] = members
    return described
