"""The limiter's refusals as the client sees them: 429 over a rate, 403 over a quota, 503 without a store."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from shared.edge.errors import GatewayError
from shared.limits.ledger import Refusal
from shared.limits.scopes import Scopes


def too_large(reserve: int, limit: int) -> GatewayError:
    return GatewayError(
        429,
        f"This request needs up to {reserve} tokens, more than the {limit} tokens per minute this key may "
        "use; it can never be admitted. Lower max_tokens or shorten the prompt.",
        type="rate_limit_error",
        code="tokens_exceed_limit",
        headers={"x-should-retry": "false", "x-ratelimit-limit-tokens": str(limit)},
    )


def rate_limited(limit: int, wait_ms: float, extra: Mapping[str, str]) -> GatewayError:
    wait_ms = max(1.0, wait_ms)
    seconds = max(1, math.ceil(wait_ms / 1000))
    return GatewayError(
        429,
        f"This key has used its {limit} tokens per minute; retry after {seconds} seconds.",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={
            "retry-after": str(seconds),
            "retry-after-ms": str(int(math.ceil(wait_ms))),
            "x-ratelimit-limit-tokens": str(limit),
            "x-ratelimit-reset-tokens": f"{seconds}s",
            **extra,
        },
    )


def refused(scopes: Scopes, refusal: Refusal, until: float, now: float) -> GatewayError:
    """The ledger's refusal of a scope: out of quota (403 until the period resets) or over a rate (429 until `until`)."""
    if refusal.quota_exhausted and scopes.quota is not None:
        reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(refusal.quota_reset_s))
        seconds = max(1, math.ceil(refusal.quota_reset_s - now))
        return GatewayError(
            403,
            f"The token quota of {scopes.quota.limit} per {scopes.quota.period} period is used up; it resets at {reset}.",
            type="insufficient_quota",
            code="quota_exceeded",
            headers={
                "x-ratelimit-limit-quota-tokens": str(scopes.quota.limit),
                "x-ratelimit-remaining-quota-tokens": "0",
                "x-ratelimit-reset-quota-tokens": f"{seconds}s",
                "x-gateway-quota-resets-at": reset,
            },
        )
    limit = scopes.limits.get(refusal.scope, 0) or max(scopes.limits.values(), default=0)
    return rate_limited(limit, max(0.0, (until - now) * 1000), {"x-ratelimit-remaining-tokens": "0"})


def store_unavailable() -> GatewayError:
    return GatewayError(
        503, "The rate limiter's store is unavailable; try again shortly.", type="server_error",
        code="limiter_unavailable", headers={"retry-after": "1"},
    )
