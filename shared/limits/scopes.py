"""What limits one request: the levels it belongs to (its consumer's team, the consumer with its per-deployment limit,
the end user), each with its tokens per minute and period quota, each kept in a ledger entity of its own."""

from __future__ import annotations

from dataclasses import dataclass

from shared.limits.ledger import CONSUMER_SCOPE, Quota, deployment_scope
from shared.records.consumers import Consumer

TEAM, CONSUMER, USER = "team", "consumer", "user"


@dataclass(frozen=True)
class Scopes:
    """Tokens per minute by scope (0: unlimited, tracked only for the quota), and the quota."""

    limits: dict[str, int]
    quota: Quota | None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.limits)


@dataclass(frozen=True)
class Level:
    """One ledger a request is admitted against: `kind` (team, consumer or user), `key` its ledger's partition."""

    kind: str
    key: str
    scopes: Scopes
    user: str | None = None  # the end user, on the consumer's level: admitted under this instance's share of ...
    user_tpm: int = 0  # ... each end user's tokens per minute (user_shares.py)


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


def _own(tokens_per_minute: int, quota: int, period: str | None) -> Scopes | None:
    scoped_quota = Quota(quota, period) if quota > 0 and period else None
    if tokens_per_minute <= 0 and scoped_quota is None:
        return None
    return Scopes({CONSUMER_SCOPE: max(0, tokens_per_minute)}, scoped_quota)


def team_key(team_id: str) -> str:
    return f"team|{team_id}"  # consumer ids have no '|': a team's ledger never meets a consumer's


def user_key(consumer_id: str, user: str) -> str:
    return f"user|{consumer_id}|{user}"


def levels_for(consumer: Consumer, deployment: str, user: str | None = None) -> list[Level]:
    """Every level with a limit that this request belongs to, narrowest first (the end user, the consumer, its team):
    the narrowest is the likeliest to refuse, and a refusal releases what the levels before it had taken."""
    levels: list[Level] = []
    users = consumer.users
    user_tpm = users.tokens_per_minute if user is not None else 0
    if user is not None:
        # An end user's quota is a ledger of its own; its tokens per minute ride on the consumer's (user_shares.py).
        own = _own(0, users.quota, users.quota_period)
        if own is not None:
            levels.append(Level(USER, user_key(consumer.id, user), own))
    scopes = scopes_for(consumer, deployment)
    if user_tpm > 0 and not scopes.limits:
        scopes = Scopes({CONSUMER_SCOPE: 0}, None)  # tracked, unlimited: its ledger carries the end users' shares
    if scopes.limits:
        levels.append(Level(CONSUMER, consumer.id, scopes, user if user_tpm > 0 else None, user_tpm))
    team = consumer.team_record
    if team is not None:
        own = _own(team.limits.tokens_per_minute, team.limits.quota, team.limits.quota_period)
        if own is not None:
            levels.append(Level(TEAM, team_key(team.id), own))
    return levels


def level_name(kind: str, scope: str) -> str:
    """The level a refusal names: team, consumer, deployment (a consumer's per-deployment limit) or user."""
    if kind == CONSUMER and scope != CONSUMER_SCOPE:
        return "deployment"
    return kind


def is_limited(consumer: Consumer, deployment: str, user: str | None = None) -> bool:
    return bool(levels_for(consumer, deployment, user))
