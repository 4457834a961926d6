"""What limits one request: the consumer's tokens per minute, its per-deployment limit, and its period quota."""

from __future__ import annotations

from dataclasses import dataclass

from shared.edge.consumers import Consumer
from shared.limits.ledger import CONSUMER_SCOPE, Quota, deployment_scope


@dataclass(frozen=True)
class Scopes:
    """Tokens per minute by scope (0: unlimited, tracked only for the quota), and the quota."""

    limits: dict[str, int]
    quota: Quota | None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.limits)


def scopes_for(consumer: Consumer, deployment: str) -> Scopes:
    limits = consumer.limits
    scoped: dict[str, int] = {}
    quota = Quota(limits.quota, limits.quota_period) if limits.quota > 0 and limits.quota_period else None
    if limits.tokens_per_minute > 0 or quota is not None:
        scoped[CONSUMER_SCOPE] = max(0, limits.tokens_per_minute)
    per_deployment = limits.deployment_tokens_per_minute.get(deployment, 0)
    if per_deployment > 0:
        scoped[deployment_scope(deployment)] = per_deployment
    return Scopes(scoped, quota)


def is_limited(consumer: Consumer, deployment: str) -> bool:
    limits = consumer.limits
    return bool(
        limits.tokens_per_minute > 0
        or (limits.quota > 0 and limits.quota_period)
        or limits.deployment_tokens_per_minute.get(deployment, 0) > 0
    )
