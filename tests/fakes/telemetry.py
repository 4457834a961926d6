"""A Telemetry sink that keeps what the request flow hands it, for tests to read."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.telemetry.protocol import Attempt, RequestRecord, Trace


@dataclass
class AttemptSpan:
    backend_id: str
    number: int
    status: int | None = None
    error: str | None = None
    ended: bool = False

    def end(self, status: int | None, error: str | None = None) -> None:
        self.status, self.error, self.ended = status, error, True


@dataclass
class RecordedTrace:
    name: str
    attempts: list[AttemptSpan] = field(default_factory=list)
    record: RequestRecord | None = None

    def attempt(self, backend_id: str, region: str, target: str, number: int) -> Attempt:
        span = AttemptSpan(backend_id, number)
        self.attempts.append(span)
        return span

    def end(self, record: RequestRecord) -> None:
        self.record = record


class RecordingTelemetry:
    def __init__(self) -> None:
        self.traces: list[RecordedTrace] = []
        self.requests: list[RequestRecord] = []
        self.spent: list[RequestRecord] = []
        self.throttles: list[tuple[str, str, str]] = []
        self.failovers: list[tuple[str, str, str]] = []
        self.model_fallbacks: list[tuple[str, str, str]] = []
        self.transitions: list[tuple[str, str]] = []
        self.fallbacks: list[str] = []
        self.auth_failures: list[str] = []
        self.cache: list[RequestRecord] = []
        self.safety: list[RequestRecord] = []
        self.audit_losses = 0

    def begin(self, method: str, route: str) -> Trace:
        trace = RecordedTrace(f"{method} {route}")
        self.traces.append(trace)
        return trace

    def request_done(self, record: RequestRecord, trace: Trace | None = None) -> None:
        self.requests.append(record)
        if trace is not None:
            trace.end(record)

    def tokens_spent(self, record: RequestRecord) -> None:
        self.spent.append(record)

    def throttled(self, consumer_id: str, deployment: str, reason: str) -> None:
        self.throttles.append((consumer_id, deployment, reason))

    def failover(self, from_backend: str, to_backend: str, reason: str) -> None:
        self.failovers.append((from_backend, to_backend, reason))

    def model_fallback(self, from_deployment: str, to_deployment: str, reason: str) -> None:
        self.model_fallbacks.append((from_deployment, to_deployment, reason))

    def breaker_transition(self, backend_id: str, region: str, state: str) -> None:
        self.transitions.append((backend_id, state))

    def store_fallback(self, reason: str) -> None:
        self.fallbacks.append(reason)

    def auth_refused(self, reason: str) -> None:
        self.auth_failures.append(reason)

    def cache_used(self, record: RequestRecord) -> None:
        self.cache.append(record)

    def safety_checked(self, record: RequestRecord) -> None:
        self.safety.append(record)

    def audit_lost(self, count: int) -> None:
        self.audit_losses += count

    def tokens_emitted(self) -> int:
        """Total Tokens as the metrics saw them: every request's answer plus every broken attempt's cost."""
        return sum(r.usage.total for r in (*self.requests, *self.spent) if r.usage is not None)
