"""The admin's usage report: tokens and cost per consumer and deployment for one period, from the usage rows in Table
Storage (`python -m shared.admin usage ...`), and how fresh they are: each instance writes its rows when they are new
and then at most every GATEWAY_USAGE_FLUSH_S (60 s), so a report can be that much behind the requests."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, TextIO

from shared.config import Settings
from shared.limits.budget import NANOS
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
    cost: float = 0.0  # at the price table's marginal prices (PTU answers: 0)
    cache_hits: int = 0  # requests the response cache answered (in `requests`; no tokens above)
    saved: int = 0  # the tokens those hits saved


def summarize(rows: Iterable[UsageRow]) -> list[UsageTotal]:
    sums: dict[tuple[str, str], list[int]] = {}
    tools: dict[tuple[str, str], dict[str, int]] = {}
    cache: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        hits = cache.setdefault((row.consumer, row.deployment), [0, 0])
        hits[0] += row.cache_hits
        hits[1] += row.saved
        acc = sums.setdefault((row.consumer, row.deployment), [0, 0, 0, 0, 0, 0])
        acc[5] += row.cost_nanos
        acc[0] += row.requests
        acc[1] += row.prompt
        acc[2] += row.completion
        acc[3] += row.total
        acc[4] += row.cached
        calls = tools.setdefault((row.consumer, row.deployment), {})
        for name, n in row.tools:
            calls[name] = calls.get(name, 0) + n
    return [UsageTotal(c, d, v[0], v[1], v[2], v[3], v[4], tools[(c, d)], v[5] / NANOS, *cache[(c, d)])
            for (c, d), v in sorted(sums.items())]


def by_team(totals: Iterable[UsageTotal], team_of: dict[str, str | None]) -> list[UsageTotal]:
    """The totals summed per team (consumer = the team's id, "(no team)" for consumers in none; deployment "(all)"),
    by each consumer's team now: a consumer moved between teams is billed to its current one."""
    sums: dict[str, list[float]] = {}
    for t in totals:
        acc = sums.setdefault(team_of.get(t.consumer) or "(no team)", [0, 0, 0, 0, 0, 0.0])
        for i, v in enumerate((t.requests, t.prompt, t.completion, t.total, t.cached, t.cost)):
            acc[i] += v
    return [UsageTotal(team, "(all)", int(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), {}, v[5])
            for team, v in sorted(sums.items())]


def last_written(rows: Iterable[UsageRow]) -> float | None:
    """When the newest of these rows was written (epoch seconds), if the store said."""
    stamps = [r.written_s for r in rows if r.written_s > 0]
    return max(stamps) if stamps else None


def freshness(written_s: float | None, flush_s: float, now_s: float) -> str:
    """One line saying how far behind the figures may be."""
    rule = f"each instance writes its rows at most every {flush_s:g} s (GATEWAY_USAGE_FLUSH_S), so they can be that much behind"
    if written_s is None:
        return f"no rows written in this period; {rule}"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(written_s))
    return f"rows last written {stamp} UTC ({max(0, now_s - written_s):.0f} s ago); {rule}"


def period_hours(period: str, at_s: float) -> tuple[str, str, str]:
    """(label, first hour, first hour after) of the period containing `at_s`."""
    key, start, end = period_bounds(period, at_s)
    return key, hour_key(start), hour_key(end)


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
        from shared.storage.tables import TableConsumerStore

        totals = by_team(totals, {c.id: c.team for c in await TableConsumerStore(tables).list_consumers()})
    flush_s = settings.usage_flush_s if settings is not None else 60.0
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
