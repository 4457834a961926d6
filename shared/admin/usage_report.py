"""The admin's usage report: tokens and cost per consumer and deployment for one period, from the usage rows in Table
Storage (`python -m shared.admin usage ...`), and how fresh they are: each instance writes its rows when they are new
and then at most every GATEWAY_USAGE_FLUSH_S (60 s), so a report can be that much behind the requests."""

from __future__ import annotations

import time
from datetime import UTC
from typing import Any, TextIO

from shared.adminops.usage import UsageTotal, by_team, freshness, last_written, period_hours, summarize
from shared.config import Settings
from shared.storage.usage_table import TableUsageStore
from shared.text import table


def format_report(label: str, totals: list[UsageTotal], currency: str | None = None, first: str = "consumer") -> str:
    columns = [first, "deployment", "requests", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"]
    rows: list[list[object]] = [[t.consumer, t.deployment, t.requests, t.prompt, t.completion, t.total, t.cached] for t in totals]
    if currency is not None:
        columns.append(f"cost_{currency}")
        for row, t in zip(rows, totals, strict=True):
            row.append(f"{t.cost:.4f}")
    if any(t.tool_calls for t in totals):
        columns.append("tool_calls")
        for row, t in zip(rows, totals, strict=True):
            row.append(" ".join(f"{name}={n}" for name, n in sorted(t.tool_calls.items())))
    if any(t.cache_hits for t in totals):
        columns += ["cache_hits", "tokens_saved"]
        for row, t in zip(rows, totals, strict=True):
            row += [t.cache_hits, t.saved]
    by_consumer: dict[str, list[int]] = {}
    for t in totals:
        acc = by_consumer.setdefault(t.consumer, [0, 0, 0, 0, 0])
        for i, v in enumerate((t.requests, t.prompt, t.completion, t.total, t.cached)):
            acc[i] += v
    costs: dict[str, float] = {}
    for t in totals:
        costs[t.consumer] = costs.get(t.consumer, 0.0) + t.cost
    if len(totals) > 1:
        rows += [[consumer, "(all)", *acc, *([f"{costs[consumer]:.4f}"] if currency is not None else []),
                  *([""] if "tool_calls" in columns else []), *(["", ""] if "cache_hits" in columns else [])]
                 for consumer, acc in by_consumer.items()]
    numeric = columns[2:7] + ([f"cost_{currency}"] if currency is not None else [])
    body = table(columns, rows, numeric=numeric) if rows else "(no usage recorded)"
    return f"usage for {label} (UTC)\n{body}"


async def report(tables: Any, args: Any, out: TextIO, settings: Settings | None = None) -> int:
    """The admin command's usage report: tokens and cost per consumer and deployment for one period, from Table
    Storage, with how fresh the figures are."""
    import json
    from datetime import datetime

    at = time.time()
    if args.at:
        parsed = datetime.fromisoformat(args.at.replace("Z", "+00:00"))
        at = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    label, first, after = period_hours(args.period, at)
    rows = await TableUsageStore(tables).query(args.consumer, first, after)
    totals = summarize(rows)
    if getattr(args, "by_team", False):
        from shared.storage.consumer_table import TableConsumerStore

        totals = by_team(totals, {c.id: c.team for c in await TableConsumerStore(tables).list_consumers()})
    flush_s = (settings or Settings).usage_flush_s  # the setting, else its default
    currency = settings.prices.currency if settings is not None and settings.prices.deployments else None
    written = last_written(rows)
    if args.json:
        print(json.dumps({
            "period": label, "currency": currency, "usage": [t.__dict__ for t in totals],
            "last_written": None if written is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(written)),
            "behind_at_most_s": flush_s,
        }, indent=2), file=out)
    else:
        print(format_report(f"{args.period} period {label}", totals, currency,
                            "team" if getattr(args, "by_team", False) else "consumer"), file=out)
        print(freshness(written, flush_s, time.time()), file=out)
    return 0
