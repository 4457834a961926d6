"""Scopes the ledger refused: no claim for them (and an immediate refusal) until the refusal's time has come."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.limits.ledger import BUCKET_MS, Grant, Refusal
from shared.limits.scopes import Scopes

QUOTA_RECHECK_S = 5.0  # an exhausted quota is asked again this often (an admin may raise it)


@dataclass(eq=False)
class Blocks:
    until: dict[str, tuple[float, Refusal]] = field(default_factory=dict)  # scope -> (no claim before, why)

    def refusal(self, scopes: Scopes, now: float) -> tuple[float, Refusal] | None:
        for scope in scopes.limits:
            entry = self.until.get(scope)
            if entry is not None and entry[0] > now:
                return entry
        return None

    def blocked(self, scope: str, now: float) -> bool:
        entry = self.until.get(scope)
        return entry is not None and entry[0] > now

    def lift(self, scope: str) -> None:
        self.until.pop(scope, None)

    def record(self, grant: Grant, now: float) -> None:
        for scope, refusal in grant.refused.items():
            if refusal.quota_exhausted:
                until = min(refusal.quota_reset_s, now + QUOTA_RECHECK_S)
            else:
                wait_s = (refusal.wait_ms if refusal.wait_ms is not None else 1000) / 1000
                until = now + max(wait_s, BUCKET_MS / 1000)
            self.until[scope] = (until, refusal)
        for scope in grant.tokens:
            self.until.pop(scope, None)
