"""The admin's usage report: tokens per consumer and deployment for one period, from the usage rows in Table Storage
(`python -m shared.admin usage ...`)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, TextIO

from shared.limits.ledger import period_bounds
from shared.storage.tables import TableUsageStore
from shared.telemetry.usage_rows import UsageRow, hour_key
from shared.text import table


@dataclass(frozen=True)
class UsageTotal:
    consumer: str
    deployment: str
    requests: int
    prompt: int
    completion: int
    total: int
    cached: int
    tool_calls: dict[str, int] = field(default_factory=dict)  # built-in tool calls, by tool


def summarize(rows: Iterable[UsageRow]) -> list[UsageTotal]:
    sums: dict[tuple[str, str], list[int]] = {}
    tools: dict[tuple[str, str], dict[str, int]] = {}
    for row in rows:
        acc = sums.setdefault((row.consumer, row.deployment), [0, 0, 0, 0, 0])
        acc[0] += row.requests
        acc[1] += row.prompt
        acc[2] += row.completion
        acc[3] += row.total
        acc[4] += row.cached
        calls = tools.setdefault((row.consumer, row.deployment), {})
        for name, n in row.tools:
            calls[name] = calls.get(name, 0) + n
    return [UsageTotal(c, d, v[0], v[1], v[2], v[3], v[4], tools[(c, d)]) for (c, d), v in sorted(sums.items())]


def period_hours(period: str, at_s: float) -> tuple[str, str, str]:
    """(label, first hour, first hour after) of the period containing `at_s`."""
    key, start, end = period_bounds(period, at_s)
    return key, hour_key(start), hour_key(end)


def format_report(label: str, totals: list[UsageTotal]) -> str:
    columns = ["consumer", "deployment", "requests", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"]
    rows: list[list[object]] = [[t.consumer, t.deployment, t.requests, t.prompt, t.completion, t.total, t.cached] for t in totals]
    if any(t.tool_calls for t in totals):
        columns.append("tool_calls")
        for row, t in zip(rows, totals, strict=True):
            row.append(" ".join(f"{name}={n}" for name, n in sorted(t.tool_calls.items())))
    by_consumer: dict[str, list[int]] = {}
    for t in totals:
        acc = by_consumer.setdefault(t.consumer, [0, 0, 0, 0, 0])
        for i, v in enumerate((t.requests, t.prompt, t.completion, t.total, t.cached)):
            acc[i] += v
    if len(totals) > 1:
        extra = [""] if "tool_calls" in columns else []
        rows += [[consumer, "(all)", *acc, *extra] for consumer, acc in by_consumer.items()]
    body = table(columns, rows, numeric=columns[2:7]) if rows else "(no usage recorded)"
    return f"usage for {label} (UTC)\n{body}"


async def report(tables: Any, args: Any, out: TextIO) -> int:
    """The admin command's usage report: tokens per consumer and deployment for one period, from Table Storage."""
    import json
    from datetime import datetime

    at = time.time()
    if args.at:
        parsed = datetime.fromisoformat(args.at.replace("Z", "+00:00"))
        at = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    label, first, after = period_hours(args.period, at)
    totals = summarize(await TableUsageStore(tables).query(args.consumer, first, after))
    if args.json:
        print(json.dumps({"period": label, "usage": [t.__dict__ for t in totals]}, indent=2), file=out)
    else:
        print(format_report(f"{args.period} period {label}", totals), file=out)
    return 0
