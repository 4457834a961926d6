"""What a consumer has spent this period, for `consumers show`, and how fresh that figure is.

With a budget, the figure is the one the gateways enforce: the sum of every instance's spend row for the budget's
period (each saved every few seconds, GATEWAY_BUDGET_REFRESH_S at most). Without one, no instance keeps spend rows,
so it is the cost in the consumer's usage rows for the month (each written at most every GATEWAY_USAGE_FLUSH_S).
"""

from __future__ import annotations

import time
from typing import Any

from shared.config import Settings
from shared.limits.budget import NANOS
from shared.limits.ledger import period_bounds
from shared.records.consumers import Consumer
from shared.storage.protocols import BudgetStore, UsageStore
from shared.telemetry.usage_rows import hour_key


async def spend_summary(consumer: Consumer, budgets: BudgetStore, usage: UsageStore, settings: Settings,
                        now_s: float) -> dict[str, Any]:
    limits = consumer.limits
    period = (limits.budget_period or "monthly") if limits.budget else "monthly"
    key, start, end = period_bounds(period, now_s)
    summary: dict[str, Any] = {"period": key, "currency": settings.prices.currency}
    if limits.budget:
        rows = await budgets.read(consumer.id, key)
        spent = sum(r.nanos for r in rows) / NANOS
        summary.update(amount=round(spent, 6), budget=limits.budget, left=round(max(0.0, limits.budget - spent), 6),
                       source="budget spend rows (what the gateways enforce)",
                       behind_at_most_s=settings.budget_refresh_s)
    else:
        rows_used = await usage.query(consumer.id, hour_key(start), hour_key(end))
        written = [r.written_s for r in rows_used if r.written_s > 0]
        summary.update(amount=round(sum(r.cost_nanos for r in rows_used) / NANOS, 6), budget=None,
                       source="usage rows", behind_at_most_s=settings.usage_flush_s,
                       last_written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(max(written))) if written else None)
    if not settings.prices.deployments:
        summary["note"] = "no price table here (GATEWAY_PRICES): costs are 0"
    return summary
