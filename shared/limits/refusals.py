"""The limiter's refusals, as values with numbers (shared/outcomes.py); shared/edge/errors.py renders them."""

from __future__ import annotations

from shared.limits.ledger import Refusal
from shared.limits.scopes import CONSUMER, Scopes, level_name
from shared.outcomes import LimiterUnavailable, NeverAdmissible, QuotaExhausted, RateLimited


def too_large(reserve: int, limit: int, kind: str = CONSUMER, scope: str = "*") -> NeverAdmissible:
    return NeverAdmissible(need=reserve, limit=limit, level=level_name(kind, scope))


def rate_limited(limit: int, wait_ms: float, remaining: int = 0) -> RateLimited:
    return RateLimited(limit=limit, wait_ms=wait_ms, remaining=remaining)


def refused(
    scopes: Scopes, refusal: Refusal, until: float, now: float, need: int = 0, remaining: int = 0, kind: str = CONSUMER
) -> QuotaExhausted | RateLimited:
    """The ledger's refusal of a scope: out of quota (until the period resets) or over a rate (until `until`; the
    request reserves `need`, and `remaining` tokens are free now), naming the level it belongs to (`kind`: team,
    consumer or user; a consumer's per-deployment scope is 'deployment')."""
    if refusal.quota_exhausted and scopes.quota is not None:
        return QuotaExhausted(
            limit=scopes.quota.limit, period=scopes.quota.period, resets_at_s=refusal.quota_reset_s,
            resets_in_s=refusal.quota_reset_s - now, level=kind,
        )
    limit = scopes.limits.get(refusal.scope, 0) or max(scopes.limits.values(), default=0)
    refused = RateLimited(limit=limit, wait_ms=max(0.0, (until - now) * 1000), remaining=min(remaining, limit), need=need)
    refused.level = level_name(kind, refusal.scope if refusal.scope in scopes.limits else "*")
    return refused


def store_unavailable() -> LimiterUnavailable:
    return LimiterUnavailable()
