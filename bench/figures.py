"""Figures several benchmarks report, computed one way: the most admitted in any window, and percentiles."""

from __future__ import annotations

from collections.abc import Iterable


def most_in_any_window(events: Iterable[tuple[float, int]], window_s: float = 60.0) -> int:
    """The largest sum of `amount` over (at, amount) events within any `window_s` span (a limit's window: events
    exactly `window_s` apart are in different windows)."""
    ordered = sorted(events)
    worst = total = first = 0
    for at, amount in ordered:
        total += amount
        while ordered[first][0] <= at - window_s:
            total -= ordered[first][1]
            first += 1
        worst = max(worst, total)
    return worst


def percentile(values: Iterable[float], q: float) -> float:
    """The value at fraction `q` of the sorted values (nearest rank, lower); 0 for none."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
