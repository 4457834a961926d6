"""Usage for one period, per consumer and deployment, from the usage rows: the admin command's report and the admin
API's /usage read the same rows through these functions. Each instance writes its rows when they are new and then at
most every GATEWAY_USAGE_FLUSH_S (60 s), so the figures can be that much behind the requests."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from shared.limits.budget import NANOS
from shared.limits.ledger import period_bounds
from shared.records.usage import UsageRow
from shared.telemetry.usage_rows import hour_key


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
