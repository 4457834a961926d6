"""A backend breaker's shared state (shared/routing/router.py keeps it; the breaker store holds it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BreakerRecord:
    backend_id: str
    deployment: str
    state: str
    until: float
    since: float
    reason: str
