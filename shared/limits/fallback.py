"""When the ledger's store does not answer: fail closed (503), or admit against this instance's share of the limit
(the limit divided by the configured instance count) and keep what it admits as pending usage for the ledger."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.limits.leases import Usage, add
from shared.limits.ledger import WINDOW_MS, bucket_expiry
from shared.limits.refusals import rate_limited
from shared.limits.scopes import Scopes


@dataclass(eq=False)
class Fallback:
    degraded_until: float = 0.0  # the store failed; local fallback until this, then probe
    local: Usage = field(default_factory=dict)  # fallback window occupancy by scope

    def active(self, now: float) -> bool:
        return self.degraded_until > now

    def failed(self, now: float, retry_s: float) -> bool:
        """The store failed; return whether this starts a degraded spell (to log it once)."""
        starts = self.degraded_until <= now
        self.degraded_until = now + retry_s
        return starts

    def recovered(self) -> None:
        self.degraded_until = 0.0
        self.local.clear()

    def admit(self, scopes: Scopes, reserve: int, now: float, instances: int) -> int:
        """Admit into the local window or raise 429; return the window expiry the tokens were admitted under."""
        now_ms = int(now * 1000)
        for scope, limit in scopes.limits.items():
            if limit <= 0:
                continue
            share = max(1, limit // instances)
            window = self.local.setdefault(scope, {})
            for expiry in [e for e in window if e <= now_ms]:
                del window[expiry]
            used = sum(window.values())
            if used + reserve > share:
                wait_ms = _local_wait_ms(window, used + reserve - share, now_ms)
                raise rate_limited(limit, wait_ms, remaining=max(0, share - used))
        expiry = bucket_expiry(now_ms)
        for scope in scopes.limits:
            add(self.local, scope, expiry, reserve)
        return expiry

    def settle(self, scopes: tuple[str, ...], expiry: int, delta: int) -> None:
        for scope in scopes:
            add(self.local, scope, expiry, delta)


def _local_wait_ms(window: Mapping[int, int], excess: int, now_ms: int) -> float:
    freed = 0
    for expiry in sorted(window):
        freed += window[expiry]
        if freed >= excess:
            return float(expiry - now_ms)
    return float(WINDOW_MS)
