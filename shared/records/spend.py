"""What one instance has spent of a consumer's budget in one period (shared/limits/budget.py; the budget store).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpendRow:
    consumer: str
    period: str  # "2026-12" for a monthly budget
    instance: str
    nanos: int
