"""Metric names, values and dimensions through an in-memory OpenTelemetry reader (the captured export is e2e)."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.telemetry import events as names
from shared.config import Settings, load_settings
from shared.telemetry.otel import OtelTelemetry, views
from shared.telemetry.events import RequestRecord
from shared.flow.usage import TokenUsage

BACKENDS = '[{"id": "b", "endpoint": "https://b.example", "region": "uksouth", "deployments": ["gpt-4o"], "auth": "none"}]'


def settings(**env: str) -> Settings:
    return load_settings({"GATEWAY_BACKENDS": BACKENDS, "GATEWAY_TABLE_CONNECTION_STRING": "UseDevelopmentStorage=true", **env})


def record(**changes: Any) -> RequestRecord:
    base: dict[str, Any] = dict(
        consumer_id="team-a", client_ip="10.1.2.3", api="openai-v1", operation="ChatCompletions_Create", user_id="alice",
        deployment="gpt-4o", status=200, duration_ms=12.5, stream=True, backend_id="uk-ptu", region="uksouth", ptu=True,
        model="gpt-4o-2024-11-20", usage=TokenUsage(100, 20, 120, cached=64, reasoning=5), ttft_ms=3.0, attempts=1,
    )
    base.update(changes)
    return RequestRecord(**base)


def collect(reader: InMemoryMetricReader) -> dict[str, list[tuple[float, dict[str, Any]]]]:
    found: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:
                        value = point.sum  # histograms
                    found.setdefault(metric.name, []).append((value, dict(point.attributes or {})))
    return found


def telemetry(**env: str) -> tuple[OtelTelemetry, InMemoryMetricReader, InMemorySpanExporter]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], views=views())
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    return OtelTelemetry(settings(**env), provider.get_meter("test"), tracer_provider.get_tracer("test")), reader, spans


def test_token_metrics_have_apim_names_and_dimensions() -> None:
    sink, reader, _ = telemetry()
    sink.request_done(record())
    sink.request_done(record(client_ip="10.9.9.9", usage=TokenUsage(10, 0, 10)))
    metrics = collect(reader)
    assert sum(v for v, _ in metrics[names.PROMPT_TOKENS]) == 110
    assert sum(v for v, _ in metrics[names.COMPLETION_TOKENS]) == 20
    assert sum(v for v, _ in metrics[names.TOTAL_TOKENS]) == 130
    assert metrics[names.CACHED_TOKENS] == [(64, metrics[names.CACHED_TOKENS][0][1])]
    assert sum(v for v, _ in metrics[names.REASONING_TOKENS]) == 5
    dimensions = next(d for v, d in metrics[names.TOTAL_TOKENS] if v == 120)
    assert dimensions == {
        "Subscription ID": "team-a", "Client IP": "10.1.2.3", "API ID": "openai-v1", "Operation ID": "ChatCompletions_Create",
        "User ID": "alice", "Backend ID": "uk-ptu", "Location": "uksouth", "Deployment": "gpt-4o", "Model": "gpt-4o-2024-11-20",
    }
    requests = metrics[names.GATEWAY_REQUESTS]
    assert sum(v for v, _ in requests) == 2 and requests[0][1][names.PTU] == "true"
    assert names.TIME_TO_FIRST_TOKEN in metrics and names.REQUEST_DURATION in metrics


def test_the_dimension_set_is_configurable() -> None:
    sink, reader, _ = telemetry(GATEWAY_METRIC_DIMENSIONS="Subscription ID,Deployment,Gateway ID", GATEWAY_ID="gw-eu")
    sink.request_done(record())
    assert collect(reader)[names.TOTAL_TOKENS][0][1] == {"Subscription ID": "team-a", "Deployment": "gpt-4o", "Gateway ID": "gw-eu"}


def test_a_request_without_usage_is_counted_but_emits_no_tokens() -> None:
    sink, reader, _ = telemetry()
    sink.request_done(record(status=502, usage=None, ttft_ms=None))
    metrics = collect(reader)
    assert names.TOTAL_TOKENS not in metrics
    assert metrics[names.GATEWAY_REQUESTS][0] == (1, pytest.approx(metrics[names.GATEWAY_REQUESTS][0][1]))
    assert metrics[names.GATEWAY_REQUESTS][0][1][names.STATUS_CODE] == "502"


def test_tokens_a_broken_attempt_spent_are_emitted_under_its_backend_without_counting_a_request() -> None:
    sink, reader, _ = telemetry()
    sink.tokens_spent(record(backend_id="uk-ptu", status=502, usage=TokenUsage(100, 0, 100, reported=False), ttft_ms=None))
    sink.request_done(record(backend_id="se", region="swedencentral", ptu=False, usage=TokenUsage(100, 20, 120)))
    metrics = collect(reader)
    totals = {d["Backend ID"]: v for v, d in metrics[names.TOTAL_TOKENS]}
    assert totals == {"uk-ptu": 100, "se": 120}
    assert sum(v for v, _ in metrics[names.GATEWAY_REQUESTS]) == 1  # one request, answered by "se"
    assert metrics[names.GATEWAY_REQUESTS][0][1][names.BACKEND_ID] == "se"


def test_operational_metrics() -> None:
    sink, reader, _ = telemetry()
    sink.throttled("team-a", "gpt-4o", "rate")
    sink.failover("uk-ptu", "sweden", "429")
    sink.breaker_transition("uk-ptu", "uksouth", "open")
    sink.store_fallback("open")
    metrics = collect(reader)
    assert metrics[names.THROTTLED_REQUESTS] == [(1, {"Subscription ID": "team-a", "Deployment": "gpt-4o", "Reason": "rate"})]
    assert metrics[names.FAILOVERS] == [(1, {"From Backend": "uk-ptu", "To Backend": "sweden", "Reason": "429"})]
    assert metrics[names.BREAKER_TRANSITIONS] == [(1, {"Backend ID": "uk-ptu", "Location": "uksouth", "State": "open"})]
    assert metrics[names.STORE_FALLBACKS] == [(1, {"Reason": "open"})]


def test_requests_are_traced_with_attempts_as_child_dependencies() -> None:
    sink, _, spans = telemetry()
    trace = sink.begin("POST /v1/chat/completions")
    trace.attempt("uk-ptu", "uksouth", "https://uk.example/openai/deployments/gpt-4o/chat/completions", 1).end(429)
    trace.attempt("sweden", "swedencentral", "https://se.example/openai/deployments/gpt-4o/chat/completions", 2).end(200)
    sink.request_done(record(), trace)
    finished = spans.get_finished_spans()
    server = next(s for s in finished if s.name == "POST /v1/chat/completions")
    clients = [s for s in finished if s is not server]
    assert [c.attributes["Backend ID"] for c in clients] == ["uk-ptu", "sweden"]
    assert all(c.parent is not None and c.parent.span_id == server.context.span_id for c in clients)
    assert server.attributes["Subscription ID"] == "team-a"
