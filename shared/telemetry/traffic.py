"""Traffic per backend per 10 s, across instances, for the console's live picture.

Each instance adds its requests, tokens, backend 429s, failures and failovers in memory (no I/O on the request path)
and writes one row per closed 10-s bucket, at most once per 10 s and only when it had traffic: the Table work is
bounded by the number of instances, never by the number of requests. Readers merge the instances' rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.background import keep_running
from shared.clock import Clock
from shared.records.traffic import TrafficRow
from shared.telemetry.protocol import Attempt, ForwardingTelemetry, RequestRecord, Telemetry, Trace

if TYPE_CHECKING:
    from shared.storage.protocols import TrafficStore

log = logging.getLogger(__name__)

BUCKET_S = 10
FIELDS = ("requests", "tokens", "throttled", "failures", "failovers")
KEEP_S = 3600.0  # an instance deletes its own rows this old as it goes: a stopped one leaves at most an hour


def merge(rows: Iterable[TrafficRow], backends: Iterable[str], first: int, last: int) -> dict[str, Any]:
    """Every backend's series over buckets first..last inclusive (zeros where nobody wrote), summed over instances."""
    names = list(dict.fromkeys(backends))
    width = last - first + 1
    series = {name: {f: [0] * width for f in FIELDS} for name in names}
    instances: set[str] = set()
    fallbacks: dict[str, list[int]] = {}
    tokens: dict[str, dict[str, list[int]]] = {}
    for row in rows:
        if not first <= row.bucket <= last:
            continue
        instances.add(row.instance)
        for deployment, count in row.fallbacks.items():
            fallbacks.setdefault(deployment, [0] * width)[row.bucket - first] += int(count)
        for backend, per_deployment in row.deployment_tokens.items():
            for deployment, count in per_deployment.items():
                tokens.setdefault(backend, {}).setdefault(deployment, [0] * width)[row.bucket - first] += int(count)
        for backend, values in row.counts.items():
            if backend not in series:
                series[backend] = {f: [0] * width for f in FIELDS}
            for name, value in zip(FIELDS, values, strict=False):
                series[backend][name][row.bucket - first] += int(value)
    return {
        "bucket_s": BUCKET_S,
        "start": first * BUCKET_S,
        "buckets": width,
        "instances": len(instances),
        "backends": [{"id": name, **series[name], "deployment_tokens": tokens.get(name, {})} for name in series],
        "deployments": [{"id": name, "fallbacks": fallbacks[name]} for name in sorted(fallbacks)],
    }


@dataclass
class _Bucket:
    """One open 10-s bucket of this instance: what TrafficRow holds, still being added to."""

    counts: dict[str, list[int]] = field(default_factory=dict)
    fallbacks: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, dict[str, int]] = field(default_factory=dict)


class TrafficCounter(ForwardingTelemetry):
    """The flow's telemetry, with each backend attempt and finished request counted per backend per 10 s."""

    def __init__(self, inner: Telemetry, store: TrafficStore, clock: Clock, instance: str,
                 background: bool = True, keep_s: float = KEEP_S) -> None:
        super().__init__(inner)
        self._store = store
        self._clock = clock
        self.instance = instance
        self._background = background
        self._keep_s = keep_s
        self._open: dict[int, _Bucket] = {}
        self._written: list[int] = []  # buckets this instance wrote, oldest first (to delete after keep_s)
        self._task: asyncio.Task[None] | None = None
        self.writes = 0
        self.failures = 0

    def _bucket(self) -> _Bucket:
        bucket = self._open.get(now := int(self._clock.now() // BUCKET_S))
        if bucket is None:
            bucket = self._open[now] = _Bucket()
            if self._background:
                self._task = keep_running(self._task, self._flush_forever)
        return bucket

    def _add(self, backend: str, index: int, amount: int = 1) -> None:
        if not backend or amount <= 0:
            return
        self._bucket().counts.setdefault(backend, [0] * len(FIELDS))[index] += amount

    def _row(self, bucket: int) -> TrafficRow:
        held = self._open[bucket]
        return TrafficRow(bucket, self.instance, {k: tuple(v) for k, v in held.counts.items()}, dict(held.fallbacks),
                          {k: dict(v) for k, v in held.tokens.items()})

    def begin(self, method: str, route: str) -> Trace:
        return _CountingTrace(self._inner.begin(method, route), self)

    def request_done(self, record: RequestRecord, trace: Trace | None = None) -> None:
        # The inner telemetry gets its own trace back: it joins the request's log record to the span through it.
        self._inner.request_done(record, trace.inner if isinstance(trace, _CountingTrace) else trace)
        if record.backend_id and record.attempts:
            self._add(record.backend_id, 0)
            if record.usage is not None and record.usage.total > 0:
                self._add(record.backend_id, 1, record.usage.total)
                per_deployment = self._bucket().tokens.setdefault(record.backend_id, {})
                per_deployment[record.deployment] = per_deployment.get(record.deployment, 0) + record.usage.total

    def model_fallback(self, from_deployment: str, to_deployment: str, reason: str) -> None:
        self._inner.model_fallback(from_deployment, to_deployment, reason)
        if from_deployment:
            fallbacks = self._bucket().fallbacks
            fallbacks[from_deployment] = fallbacks.get(from_deployment, 0) + 1

    def failover(self, from_backend: str, to_backend: str, reason: str) -> None:
        self._inner.failover(from_backend, to_backend, reason)
        self._add(from_backend, 4)

    def attempt_ended(self, backend_id: str, status: int | None) -> None:
        if status == 429:
            self._add(backend_id, 2)
        elif status is None or status >= 500:
            self._add(backend_id, 3)

    def pending(self) -> list[TrafficRow]:
        """This instance's counts not yet written (the open bucket too), for the reader on this instance."""
        return [self._row(b) for b in sorted(self._open)]

    async def flush(self, everything: bool = False) -> None:
        """Write the closed buckets (each at most once; the open one too with `everything`, at shutdown)."""
        current = int(self._clock.now() // BUCKET_S)
        due = sorted(b for b in self._open if everything or b < current)
        if not due:
            return
        rows = [self._row(b) for b in due]
        try:
            await self._store.save(rows)
        except Exception as exc:
            self.failures += 1
            log.warning("could not save traffic rows (%s); will retry", type(exc).__name__)
            return
        self.writes += 1
        for b in due:
            del self._open[b]
        self._written.extend(due)
        old = [b for b in self._written if (current - b) * BUCKET_S > self._keep_s]
        if old:
            self._written = self._written[len(old):]
            try:
                await self._store.forget(self.instance, old)
            except Exception as exc:
                log.warning("could not delete old traffic rows (%s)", type(exc).__name__)

    async def _flush_forever(self) -> None:
        while self._open:
            now = self._clock.now()
            await asyncio.sleep(BUCKET_S - now % BUCKET_S + 0.05)  # just after the bucket closes
            await self.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.flush(everything=True)


class _CountingTrace:
    def __init__(self, inner: Trace, counter: TrafficCounter) -> None:
        self.inner = inner
        self._counter = counter

    def attempt(self, backend_id: str, region: str, target: str, number: int) -> Attempt:
        return _CountingAttempt(self.inner.attempt(backend_id, region, target, number), self._counter, backend_id)

    def end(self, record: RequestRecord) -> None:
        self.inner.end(record)


class _CountingAttempt:
    def __init__(self, inner: Attempt, counter: TrafficCounter, backend_id: str) -> None:
        self._inner = inner
        self._counter = counter
        self._backend = backend_id

    def end(self, status: int | None, error: str | None = None) -> None:
        self._inner.end(status, error)
        self._counter.attempt_ended(self._backend, status)
