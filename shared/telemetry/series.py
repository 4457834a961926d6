"""Metric series kept in memory between exports: bounded, forgotten when idle, exported only when they changed.

Sums are added on the event loop (a few dictionary operations per request); the exporter's thread takes the deltas
once per export interval. Three rules keep what reaches Application Insights useful and its cost tied to traffic:

- only series that changed since the last export are exported (an idle series costs no ingestion, and count/avg panels
  are not skewed by zero points);
- a series that has not changed for `idle_s` is forgotten, making room for new ones;
- when `max_series` live series exist, a new combination gives up its high-cardinality dimensions first (the
  `collapse` levels, e.g. User ID and Client IP, then the rest; those series may use a reserve of a quarter of
  `max_series`), and never the consumer: the last level keeps only the dimensions named in `keep`, whose values are
  bounded by configuration (registered consumers, deployments, backends).

Threads: only the loop creates and deletes series and adds to them; the exporter only reads sums and moves each
series' exported mark. A series is deleted only when everything it summed was exported, so no increment is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

OTHER = "(other)"


@dataclass(slots=True)
class _Series:
    sums: list[float]
    exported: list[float]
    touched: float


class SeriesTable:
    def __init__(
        self,
        names: Sequence[str],
        width: int,
        now: Callable[[], float],
        *,
        max_series: int = 5000,
        idle_s: float = 600.0,
        collapse: Sequence[Sequence[str]] = (),
        keep: Sequence[str] = (),
    ) -> None:
        self.names = tuple(names)
        self.width = width
        self._now = now
        self.max_series = max_series
        self.idle_s = idle_s
        self._series: dict[tuple[str, ...], _Series] = {}
        self._last_sweep = now()
        # Each level lists, by position, the dimensions replaced by OTHER; levels are cumulative.
        levels: list[frozenset[int]] = []
        dropped: set[int] = set()
        for level in collapse:
            dropped |= {self.names.index(n) for n in level if n in self.names}
            levels.append(frozenset(dropped))
        kept = {self.names.index(n) for n in keep if n in self.names}
        levels.append(frozenset(i for i in range(len(self.names)) if i not in kept))
        self._levels = tuple(levels)
        self.collapsed = 0  # new combinations that had to give up dimensions (a health figure)
        self._reserve = max(1, max_series // 4)

    def __len__(self) -> int:
        return len(self._series)

    def add(self, key: tuple[str, ...], values: Sequence[float]) -> None:
        series = self._series.get(key)
        now = self._now()
        if series is None:
            series = self._slot(key, now)
        sums = series.sums
        for i, value in enumerate(values):
            if value:
                sums[i] += value
        series.touched = now

    def _slot(self, key: tuple[str, ...], now: float) -> _Series:
        if len(self._series) >= self.max_series or now - self._last_sweep >= self.idle_s:
            self._forget_idle(now)
        if len(self._series) < self.max_series:
            return self._new(key, now)
        self.collapsed += 1
        last = len(self._levels) - 1
        for depth, level in enumerate(self._levels):
            reduced = tuple(OTHER if i in level else v for i, v in enumerate(key))
            series = self._series.get(reduced)
            if series is not None:
                return series
            if depth == last or len(self._series) < self.max_series + self._reserve:
                # The last level is bounded by configuration, so always admitted: the consumer is never lost. The
                # levels before it may take a reserve of a quarter more series.
                return self._new(reduced, now)
        raise AssertionError("unreachable")

    def _new(self, key: tuple[str, ...], now: float) -> _Series:
        series = _Series([0.0] * self.width, [0.0] * self.width, now)
        self._series[key] = series
        return series

    def _forget_idle(self, now: float) -> None:
        self._last_sweep = now
        idle = [
            key for key, s in self._series.items()
            if now - s.touched >= self.idle_s and s.sums == s.exported
        ]
        for key in idle:
            del self._series[key]

    def deltas(self) -> list[tuple[dict[str, str], list[float]]]:
        """What changed since the last call, per series (the exporter's thread): (dimensions, delta per field)."""
        changed = []
        for key, series in list(self._series.items()):  # a snapshot: list() of a dict runs under the GIL
            sums = list(series.sums)
            if sums == series.exported:
                continue
            delta = [now - before for now, before in zip(sums, series.exported, strict=True)]
            series.exported = sums
            changed.append((dict(zip(self.names, key, strict=True)), delta))
        return changed
