"""Metrics and traces through OpenTelemetry, exported to Application Insights by azure-monitor-opentelemetry.

Instruments are created once per worker. Token metrics carry the dimensions named in the settings (API Management's
names by default, so existing App Insights queries keep working); the operational metrics have fixed small dimension
sets. No prompt or completion text is recorded. This is the only module that imports OpenTelemetry.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import metrics, trace
from opentelemetry._logs import SeverityNumber, get_logger, get_logger_provider
from opentelemetry.metrics import Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.config import Settings
from shared.telemetry import protocol as names
from shared.telemetry.privacy import Privacy
from shared.telemetry.protocol import Attempt, NullTelemetry, RequestRecord, Telemetry, Trace
from shared.telemetry.request_log import EVENT_NAME, KIND_LOST_ATTEMPT, KIND_REQUEST, RequestLog
from shared.telemetry.series import SeriesTable

log = logging.getLogger(__name__)

_configured = False

# OpenTelemetry instrument names may not contain spaces; views give the metrics API Management's names on export.
INSTRUMENTS = {
    names.PROMPT_TOKENS: "gateway.tokens.prompt",
    names.COMPLETION_TOKENS: "gateway.tokens.completion",
    names.TOTAL_TOKENS: "gateway.tokens.total",
    names.CACHED_TOKENS: "gateway.tokens.cached",
    names.REASONING_TOKENS: "gateway.tokens.reasoning",
    names.COUNTED_TOKENS: "gateway.tokens.counted",
    names.GATEWAY_REQUESTS: "gateway.requests",
    names.THROTTLED_REQUESTS: "gateway.requests.throttled",
    names.FAILOVERS: "gateway.failovers",
    names.MODEL_FALLBACKS: "gateway.model_fallbacks",
    names.BREAKER_TRANSITIONS: "gateway.breaker.transitions",
    names.STORE_FALLBACKS: "gateway.limiter.store_fallbacks",
    names.AUTH_FAILURES: "gateway.auth.failures",
    names.REQUEST_DURATION: "gateway.request.duration",
    names.TIME_TO_FIRST_TOKEN: "gateway.time_to_first_token",
    names.COST: "gateway.cost",
    names.TOOL_CALLS: "gateway.tool_calls",
    names.CACHE_REQUESTS: "gateway.cache.requests",
    names.TOKENS_SAVED: "gateway.cache.tokens_saved",
    names.SAFETY_CHECKS: "gateway.safety.checks",
    names.AUDIT_RECORDS_LOST: "gateway.audit.records_lost",
}


def views() -> list[Any]:
    from opentelemetry.sdk.metrics.view import View

    return [View(instrument_name=instrument, name=name) for name, instrument in INSTRUMENTS.items()]

_DIMENSIONS: dict[str, Callable[[RequestRecord], str]] = {
    names.SUBSCRIPTION_ID: lambda r: r.consumer_id,
    names.CLIENT_IP: lambda r: r.client_ip,
    names.API_ID: lambda r: r.api,
    names.OPERATION_ID: lambda r: r.operation,
    names.USER_ID: lambda r: r.user_id,
    names.BACKEND_ID: lambda r: r.backend_id,
    names.LOCATION: lambda r: r.region,
    names.DEPLOYMENT: lambda r: r.deployment,
    names.MODEL: lambda r: r.model,
    names.STREAM: lambda r: "true" if r.stream else "false",
    names.TEAM: lambda r: r.team,
}


def configure(settings: Settings) -> Telemetry:
    """Set up the Azure Monitor exporters once per worker, when a connection string is configured."""
    global _configured
    if not settings.appinsights_connection_string:
        return NullTelemetry()
    if not _configured:
        from azure.monitor.opentelemetry import configure_azure_monitor

        # The exporter sends a metric namespace only when opted in, taking it from the meter's name (our
        # GATEWAY_METRIC_NAMESPACE): Metrics Explorer charts and metric alerts look metrics up by namespace.
        os.environ.setdefault("APPLICATIONINSIGHTS_METRIC_NAMESPACE_OPT_IN", "true")
        # The per-request log is queued for export in batches; the SDK's default queue (2,048 records) drops records
        # in a burst of more than that within one export delay. 16,384 records (~10 MB) ride out ~15 s at 1,000
        # requests a second; beyond that the queue stays bounded and drops, rather than growing without limit.
        os.environ.setdefault("OTEL_BLRP_MAX_QUEUE_SIZE", "16384")
        credential = None
        if "Authorization=AAD" in (_env("APPLICATIONINSIGHTS_AUTHENTICATION_STRING") or ""):
            from azure.identity import ManagedIdentityCredential

            credential = ManagedIdentityCredential(client_id=settings.managed_identity_client_id)
        # Traces: exporting a request and its dependencies costs far more CPU than its metrics (the exporter's
        # serialization), so by default at most GATEWAY_TRACES_PER_SECOND requests a second are traced; set
        # GATEWAY_TRACE_SAMPLING (a share, 1 = all) instead to sample by ratio. Metrics are never sampled.
        sampling: dict[str, float] = (
            {"sampling_ratio": settings.trace_sampling}
            if settings.trace_sampling is not None
            else {"traces_per_second": settings.traces_per_second}
        )
        configure_azure_monitor(
            connection_string=settings.appinsights_connection_string,
            credential=credential,
            enable_live_metrics=False,
            enable_performance_counters=False,
            # Our own spans describe requests and backend attempts; library auto-instrumentation would add a
            # dependency per Table call and per HTTP hop, and cost time on every request.
            instrumentation_options={lib: {"enabled": False} for lib in (
                "azure_sdk", "django", "fastapi", "flask", "httpx", "httpx2", "psycopg2", "requests", "urllib", "urllib3"
            )},
            logger_name="shared",
            views=views(),
            **sampling,
        )
        _configured = True
    return OtelTelemetry(settings)


def _env(name: str) -> str | None:
    import os

    return os.environ.get(name)


class _Attempt:
    __slots__ = ("_span",)

    def __init__(self, span: Any) -> None:
        self._span = span

    def end(self, status: int | None, error: str | None = None) -> None:
        span = self._span
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 400:
                span.set_status(Status(StatusCode.ERROR))
        if error is not None:
            span.set_attribute("error.type", error)
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()


def _target(url: str) -> dict[str, Any]:
    """The attributes the exporter builds a dependency's target and data from: host and port given apart (a port
    inside server.address made it print `host:None`), the scheme so it drops default ports, no query string."""
    parts = urlsplit(url)
    attributes: dict[str, Any] = {
        "url.full": urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")),
        "url.scheme": parts.scheme,
        "server.address": parts.hostname or "",
    }
    port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    if port is not None:
        attributes["server.port"] = port
    return attributes


class _Trace:
    __slots__ = ("_tracer", "_span", "_context", "_ended", "_privacy")

    def __init__(self, tracer: Any, method: str, route: str, privacy: Privacy) -> None:
        self._tracer = tracer
        # The exporter reads a request's result code, success and operation name from these attributes only when
        # the span carries the HTTP method; the route is the template (no deployment names, no query secrets).
        self._span = tracer.start_span(
            f"{method} {route}", kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route},
        )
        self._context = trace.set_span_in_context(self._span)
        self._ended = False
        self._privacy = privacy

    @property
    def context(self) -> Any:
        return self._context

    def attempt(self, backend_id: str, region: str, target: str, number: int) -> Attempt:
        path = urlsplit(target).path
        attributes = _target(target)
        attributes.update({
            "http.request.method": "POST",
            names.BACKEND_ID: backend_id,
            names.LOCATION: region,
            "Attempt": number,
        })
        span = self._tracer.start_span(f"POST {path}", context=self._context, kind=SpanKind.CLIENT, attributes=attributes)
        return _Attempt(span)

    def end(self, record: RequestRecord) -> None:
        if self._ended:
            return
        self._ended = True
        span = self._span
        span.set_attribute("http.response.status_code", record.status)
        address = self._privacy.client_ip(record.client_ip)
        if address:
            span.set_attribute("client.address", address)
        span.set_attribute(names.SUBSCRIPTION_ID, record.consumer_id)
        span.set_attribute(names.DEPLOYMENT, record.deployment)
        span.set_attribute(names.BACKEND_ID, record.backend_id)
        span.set_attribute(names.OPERATION_ID, record.operation)
        if record.status >= 400:
            span.set_status(Status(StatusCode.ERROR))
        span.end()


TOKEN_FIELDS = (
    (names.PROMPT_TOKENS, 0),
    (names.COMPLETION_TOKENS, 1),
    (names.TOTAL_TOKENS, 2),
    (names.CACHED_TOKENS, 3),
    (names.REASONING_TOKENS, 4),
    (names.COUNTED_TOKENS, 5),
)
REQUEST_DIMENSIONS = (
    names.SUBSCRIPTION_ID, names.API_ID, names.OPERATION_ID, names.BACKEND_ID, names.LOCATION, names.DEPLOYMENT,
    names.STATUS_CODE, names.PTU, names.TEAM,
)
# Under series pressure a new combination gives these up first, level by level; the consumer, deployment and backend
# (bounded by configuration) are always kept.
COLLAPSE = (
    (names.USER_ID, names.CLIENT_IP),
    (names.MODEL, names.OPERATION_ID, names.API_ID, names.STREAM, names.GATEWAY_ID, names.STATUS_CODE),
)
COST_DIMENSIONS = (names.SUBSCRIPTION_ID, names.DEPLOYMENT, names.BACKEND_ID, names.TEAM)
KEEP = (names.SUBSCRIPTION_ID, names.DEPLOYMENT, names.BACKEND_ID, names.LOCATION, names.PTU, names.TEAM)


class OtelTelemetry:
    def __init__(
        self, settings: Settings, meter: Any = None, tracer: Any = None, now: Callable[[], float] | None = None,
        logger: Any = None,
    ) -> None:
        meter = meter or metrics.get_meter(settings.metric_namespace)
        self._tracer = tracer or trace.get_tracer("ai-gateway")
        self._logger = logger or get_logger("ai-gateway.requests")
        self._prices = settings.prices
        now = now or time.monotonic
        self.privacy = Privacy(
            settings.client_ip_mode,
            settings.user_id_mode,
            (settings.user_id_hash_key or "").encode(),
        )
        privacy = self.privacy
        extract: dict[str, Callable[[RequestRecord], str]] = {
            **_DIMENSIONS,
            names.CLIENT_IP: lambda r: privacy.client_ip(r.client_ip),
            names.USER_ID: lambda r: privacy.user_id(r.user_id),
        }
        dimensions = [(name, extract[name]) for name in settings.metric_dimensions if name in extract]
        gateway_id = settings.gateway_id
        if names.GATEWAY_ID in settings.metric_dimensions:
            dimensions.append((names.GATEWAY_ID, lambda r: gateway_id))
        self._dimension_values = tuple(value for _, value in dimensions)
        limits = {
            "max_series": settings.metric_series_max, "idle_s": settings.metric_series_idle_s,
            "collapse": COLLAPSE, "keep": KEEP,
        }
        self.tokens = SeriesTable(tuple(name for name, _ in dimensions), len(TOKEN_FIELDS), now, **limits)  # type: ignore[arg-type]
        self.requests = SeriesTable(REQUEST_DIMENSIONS, 1, now, **limits)  # type: ignore[arg-type]
        self.costs = SeriesTable(COST_DIMENSIONS, 1, now, **limits)  # type: ignore[arg-type]
        self.request_log = (
            RequestLog(settings.prices, privacy, gateway_id, settings.request_log_sampling)
            if settings.request_log else None
        )
        self._sampling = settings.request_log_sampling
        i = INSTRUMENTS
        self._token_counters = [meter.create_counter(i[name], unit="{token}") for name, _ in TOKEN_FIELDS]
        self._request_counter = meter.create_counter(i[names.GATEWAY_REQUESTS], unit="{request}")
        self._cost_counter = meter.create_counter(i[names.COST], unit=settings.prices.currency)
        # Sums are kept in the series tables (a request costs a few dictionary operations) and handed to the SDK as
        # deltas when it collects: this callback runs first in every collection and observes nothing itself.
        meter.create_observable_gauge("gateway.internal.collect", callbacks=[self._collect])
        self._throttled = meter.create_counter(i[names.THROTTLED_REQUESTS], unit="{request}")
        self._failovers = meter.create_counter(i[names.FAILOVERS], unit="{request}")
        self._model_fallbacks = meter.create_counter(i[names.MODEL_FALLBACKS], unit="{request}")
        self._transitions = meter.create_counter(i[names.BREAKER_TRANSITIONS], unit="{transition}")
        self._fallbacks = meter.create_counter(i[names.STORE_FALLBACKS], unit="{event}")
        self._auth_failures = meter.create_counter(i[names.AUTH_FAILURES], unit="{request}")
        self._tool_calls = meter.create_counter(i[names.TOOL_CALLS], unit="{call}")
        self._cache_requests = meter.create_counter(i[names.CACHE_REQUESTS], unit="{request}")
        self._tokens_saved = meter.create_counter(i[names.TOKENS_SAVED], unit="{token}")
        self._safety_checks = meter.create_counter(i[names.SAFETY_CHECKS], unit="{request}")
        self._audit_lost = meter.create_counter(i[names.AUDIT_RECORDS_LOST], unit="{record}")
        self._duration = meter.create_histogram(i[names.REQUEST_DURATION], unit="ms")
        self._ttft = meter.create_histogram(i[names.TIME_TO_FIRST_TOKEN], unit="ms")

    def _collect(self, _options: Any) -> Iterator[Observation]:
        for dimensions, delta in self.tokens.deltas():
            for counter, value in zip(self._token_counters, delta, strict=True):
                if value:
                    counter.add(_whole(value), dimensions)
        for dimensions, delta in self.requests.deltas():
            self._request_counter.add(_whole(delta[0]), dimensions)
        for dimensions, delta in self.costs.deltas():
            self._cost_counter.add(delta[0], dimensions)
        return iter(())

    def begin(self, method: str, route: str) -> Trace:
        return _Trace(self._tracer, method, route, self.privacy)

    def request_done(self, record: RequestRecord, trace: Trace | None = None) -> None:
        self._count_tokens(record)
        status = str(record.status)
        self.requests.add((
            record.consumer_id, record.api, record.operation, record.backend_id, record.region, record.deployment,
            status, "true" if record.ptu else "false", record.team,
        ), (1,))
        self._duration.record(
            record.duration_ms,
            {
                names.OPERATION_ID: record.operation,
                names.BACKEND_ID: record.backend_id,
                names.STATUS_CODE: status,
                names.STREAM: "true" if record.stream else "false",
            },
        )
        if record.ttft_ms is not None:
            self._ttft.record(record.ttft_ms, {names.BACKEND_ID: record.backend_id, names.DEPLOYMENT: record.deployment})
        if trace is not None:
            trace.end(record)
        self._log(record, KIND_REQUEST, getattr(trace, "context", None))

    def tokens_spent(self, record: RequestRecord) -> None:
        # An attempt whose body broke off before failover: its tokens were charged, so it gets a record of its own,
        # and the log's totals stay equal to the token metrics.
        self._count_tokens(record)
        if record.usage is not None:
            self._log(record, KIND_LOST_ATTEMPT, None)

    def _log(self, record: RequestRecord, kind: str, context: Any) -> None:
        request_log = self.request_log
        # Requests no consumer was found for (no key, a wrong key, an unknown path) are not logged: a client spraying
        # keys would otherwise buy ingestion at will. Their spans (rate-limited) and result codes remain.
        if (
            request_log is not None and record.consumer_id
            and (self._sampling >= 1.0 or random.random() < self._sampling)
        ):
            self._logger.emit(
                body=EVENT_NAME,
                attributes=request_log.attributes(record, kind),
                context=context,
                severity_number=SeverityNumber.INFO,
            )

    def _count_tokens(self, record: RequestRecord) -> None:
        usage = record.usage
        if usage is not None:
            self.tokens.add(
                tuple(value(record) for value in self._dimension_values),
                (usage.prompt, usage.completion, usage.total, usage.cached, usage.reasoning,
                 0 if usage.reported else usage.total),
            )
            cost = self._prices.cost(record.deployment, record.ptu, usage)
            if cost:
                self.costs.add((record.consumer_id, record.deployment, record.backend_id, record.team), (cost,))
            for tool, calls in usage.tools:  # rare: counted directly, bounded by consumers x deployments x 6 tools
                self._tool_calls.add(calls, {names.SUBSCRIPTION_ID: record.consumer_id,
                                             names.DEPLOYMENT: record.deployment, names.TOOL: tool})

    def throttled(self, consumer_id: str, deployment: str, reason: str) -> None:
        self._throttled.add(1, {names.SUBSCRIPTION_ID: consumer_id, names.DEPLOYMENT: deployment, names.REASON: reason})

    def failover(self, from_backend: str, to_backend: str, reason: str) -> None:
        self._failovers.add(1, {names.FROM_BACKEND: from_backend, names.TO_BACKEND: to_backend, names.REASON: reason})

    def model_fallback(self, from_deployment: str, to_deployment: str, reason: str) -> None:
        self._model_fallbacks.add(
            1, {names.FROM_DEPLOYMENT: from_deployment, names.TO_DEPLOYMENT: to_deployment, names.REASON: reason}
        )

    def breaker_transition(self, backend_id: str, region: str, state: str) -> None:
        self._transitions.add(1, {names.BACKEND_ID: backend_id, names.LOCATION: region, names.STATE: state})

    def store_fallback(self, reason: str) -> None:
        self._fallbacks.add(1, {names.REASON: reason})

    def auth_refused(self, reason: str) -> None:
        self._auth_failures.add(1, {names.REASON: reason})

    def safety_checked(self, record: RequestRecord) -> None:
        category = record.safety_detail if record.safety in ("blocked", "unchecked", "unavailable") else ""
        self._safety_checks.add(1, {names.SUBSCRIPTION_ID: record.consumer_id, names.TEAM: record.team,
                                    names.DEPLOYMENT: record.deployment, names.SAFETY_POLICY: record.safety_policy,
                                    names.SAFETY: record.safety, names.CATEGORY: category})

    def audit_lost(self, count: int) -> None:
        self._audit_lost.add(count)

    def cache_used(self, record: RequestRecord) -> None:
        dimensions = {names.SUBSCRIPTION_ID: record.consumer_id, names.DEPLOYMENT: record.deployment,
                      names.CACHE: record.cache}
        self._cache_requests.add(1, dimensions)
        if record.saved is not None and record.saved.total:
            self._tokens_saved.add(record.saved.total, {names.SUBSCRIPTION_ID: record.consumer_id,
                                                        names.DEPLOYMENT: record.deployment})
        if record.cache == "hit":
            cost = self._prices.cost(record.deployment, record.ptu, None, record.saved)
            if cost:
                self.costs.add((record.consumer_id, record.deployment, record.backend_id, record.team), (cost,))


def _whole(value: float) -> int | float:
    return int(value) if value == int(value) else value


def flush(timeout_ms: int = 10_000) -> None:
    """Export everything recorded so far (tests and shutdown)."""
    provider = metrics.get_meter_provider()
    force = getattr(provider, "force_flush", None)
    if force is not None:
        force(timeout_ms)
    tracer_provider = trace.get_tracer_provider()
    force = getattr(tracer_provider, "force_flush", None)
    if force is not None:
        force(timeout_ms)
    force = getattr(get_logger_provider(), "force_flush", None)
    if force is not None:
        force(timeout_ms)
