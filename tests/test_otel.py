"""Metric names, values and dimensions through an in-memory OpenTelemetry reader (the captured export is e2e)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from azure.monitor.opentelemetry.exporter.export.metrics._exporter import APPLICATION_INSIGHTS_METRIC_TEMPORALITIES
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.config import Settings, load_settings
from shared.records.usage import TokenUsage
from shared.telemetry import protocol as names
from shared.telemetry.otel import OtelTelemetry, views
from shared.telemetry.protocol import RequestRecord

BACKENDS = '[{"id": "b", "endpoint": "https://b.example", "region": "uksouth", "deployments": ["gpt-4o"], "auth": "none"}]'


def settings(**env: str) -> Settings:
    return load_settings({"GATEWAY_BACKENDS": BACKENDS, "GATEWAY_TABLE_CONNECTION_STRING": "UseDevelopmentStorage=true", **env})


def record(**changes: Any) -> RequestRecord:
    base: dict[str, Any] = dict(
        consumer_id="team-a", client_ip="10.1.2.3", api="openai-v1", operation="ChatCompletions_Create", user_id="alice",
        deployment="gpt-4o", status=200, duration_ms=12.5, stream=True, backend_id="uk-ptu", region="uksouth", ptu=True,
        model="gpt-4o-2024-11-20", usage=TokenUsage(100, 20, 120, cached=64, reasoning=5), ttft_ms=3.0, attempts=1,
        team="search",
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


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


LOGS: list[InMemoryLogRecordExporter] = []


def telemetry(
    clock: FakeClock | None = None, **env: str
) -> tuple[OtelTelemetry, InMemoryMetricReader, InMemorySpanExporter]:
    # The temporalities Azure Monitor's exporter asks for (deltas for counters and histograms).
    reader = InMemoryMetricReader(preferred_temporality=APPLICATION_INSIGHTS_METRIC_TEMPORALITIES)  # type: ignore[arg-type]
    provider = MeterProvider(metric_readers=[reader], views=views())
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    logs = InMemoryLogRecordExporter()
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    LOGS[:] = [logs]
    sink = OtelTelemetry(
        settings(**env), provider.get_meter("test"), tracer_provider.get_tracer("test"), clock or FakeClock(),
        logger_provider.get_logger("test"),
    )
    return sink, reader, spans


def log_records() -> list[dict[str, Any]]:
    """The per-request log as the exporter reads it: attributes, measurements decoded."""
    found = []
    for item in LOGS[0].get_finished_logs():
        attributes = dict(item.log_record.attributes or {})
        attributes["microsoft.custom_measurements"] = json.loads(str(attributes["microsoft.custom_measurements"]))
        found.append(attributes)
    return found


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
        "Subscription ID": "team-a", "Client IP": "10.1.2.0", "API ID": "openai-v1", "Operation ID": "ChatCompletions_Create",
        "User ID": "alice", "Backend ID": "uk-ptu", "Location": "uksouth", "Deployment": "gpt-4o", "Model": "gpt-4o-2024-11-20",
        "Team": "search",
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
    trace = sink.begin("POST", "/v1/chat/completions")
    trace.attempt("uk-ptu", "uksouth", "https://uk.example/openai/deployments/gpt-4o/chat/completions", 1).end(429)
    trace.attempt("sweden", "swedencentral", "https://se.example/openai/deployments/gpt-4o/chat/completions", 2).end(200)
    sink.request_done(record(), trace)
    finished = spans.get_finished_spans()
    server = next(s for s in finished if s.name == "POST /v1/chat/completions")
    clients = [s for s in finished if s is not server]
    assert [c.attributes["Backend ID"] for c in clients] == ["uk-ptu", "sweden"]
    assert all(c.parent is not None and c.parent.span_id == server.context.span_id for c in clients)
    assert server.attributes["Subscription ID"] == "team-a"


def test_a_series_is_exported_only_in_intervals_where_it_changed() -> None:
    sink, reader, _ = telemetry()
    sink.request_done(record())
    sink.request_done(record())
    first = collect(reader)
    assert sum(v for v, _ in first[names.TOTAL_TOKENS]) == 240
    assert sum(v for v, _ in first[names.GATEWAY_REQUESTS]) == 2
    quiet = collect(reader)
    # Nothing happened: no point at all, not a zero per series (ingestion cost follows traffic, not series).
    assert not {name for name in quiet if name in (*INSTRUMENT_NAMES,)}, quiet
    sink.request_done(record(consumer_id="team-b", usage=TokenUsage(1, 2, 3)))
    third = collect(reader)
    assert [(v, d[names.SUBSCRIPTION_ID]) for v, d in third[names.TOTAL_TOKENS]] == [(3, "team-b")]
    assert all(v > 0 for points in third.values() for v, _ in points)


INSTRUMENT_NAMES = (
    names.PROMPT_TOKENS, names.COMPLETION_TOKENS, names.TOTAL_TOKENS, names.CACHED_TOKENS, names.REASONING_TOKENS,
    names.GATEWAY_REQUESTS, names.REQUEST_DURATION, names.TIME_TO_FIRST_TOKEN,
)


def test_under_series_pressure_user_and_ip_go_first_and_the_consumer_is_never_lost() -> None:
    sink, reader, _ = telemetry(GATEWAY_METRIC_SERIES_MAX="10")
    for i in range(300):  # one client varying x-user-id and its address, the other well-behaved
        sink.request_done(record(consumer_id="spray", user_id=f"u{i}", client_ip=f"10.{i % 250}.{i // 250}.1"))
        sink.request_done(record(consumer_id="steady", usage=TokenUsage(1, 1, 2)))
    points = collect(reader)[names.TOTAL_TOKENS]
    by_consumer: dict[str, float] = {}
    for value, dims in points:
        by_consumer[dims[names.SUBSCRIPTION_ID]] = by_consumer.get(dims[names.SUBSCRIPTION_ID], 0) + value
    assert by_consumer == {"spray": 300 * 120, "steady": 300 * 2}  # exact, and no "overflow" consumer
    assert len(points) <= 10 + 2
    collapsed = [d for _, d in points if d[names.USER_ID] == "(other)"]
    assert collapsed and all(d[names.DEPLOYMENT] == "gpt-4o" and d[names.BACKEND_ID] == "uk-ptu" for d in collapsed)


def test_idle_series_are_forgotten_and_make_room() -> None:
    clock = FakeClock()
    sink, reader, _ = telemetry(clock, GATEWAY_METRIC_SERIES_MAX="10", GATEWAY_METRIC_SERIES_IDLE_S="60")
    for i in range(10):
        sink.request_done(record(user_id=f"old{i}"))
    collect(reader)
    assert len(sink.tokens) == 10
    clock.t += 61
    sink.request_done(record(user_id="new"))
    assert len(sink.tokens) == 1  # the ten idle (and exported) series are gone
    points = collect(reader)[names.TOTAL_TOKENS]
    assert [d[names.USER_ID] for _, d in points] == ["new"]  # its own series, not collapsed


def test_an_unexported_series_is_never_forgotten() -> None:
    clock = FakeClock()
    sink, reader, _ = telemetry(clock, GATEWAY_METRIC_SERIES_MAX="10", GATEWAY_METRIC_SERIES_IDLE_S="60")
    sink.request_done(record(user_id="pending"))
    clock.t += 3600
    sink.request_done(record(user_id="later"))
    totals = {d[names.USER_ID]: v for v, d in collect(reader)[names.TOTAL_TOKENS]}
    assert totals == {"pending": 120, "later": 120}


@pytest.mark.parametrize(
    ("env", "user_id", "client_ip", "expected_user", "expected_ip"),
    [
        ({}, "alice@example.com", "10.1.2.3", "alice@example.com", "10.1.2.0"),
        ({}, "x" * 65, "2001:db8:1:2::5", "(invalid)", "2001:db8:1::"),
        ({}, "<script>alert(1)</script>", "::ffff:192.168.7.9", "(invalid)", "192.168.7.0"),
        ({}, "bob", "not-an-address", "bob", ""),
        ({"GATEWAY_CLIENT_IP": "raw", "GATEWAY_USER_ID": "raw"}, "a b", "10.1.2.3", "a b", "10.1.2.3"),
        ({"GATEWAY_CLIENT_IP": "omit", "GATEWAY_USER_ID": "omit"}, "alice", "10.1.2.3", "", ""),
        (
            {"GATEWAY_USER_ID": "hashed", "GATEWAY_USER_ID_HASH_KEY": "k" * 32},
            "alice@example.com", "10.1.2.3", "5f6c35c8d0b4b9f6", "10.1.2.0",
        ),
    ],
)
def test_client_ip_and_user_id_are_reduced_by_default(
    env: dict[str, str], user_id: str, client_ip: str, expected_user: str, expected_ip: str
) -> None:
    if env.get("GATEWAY_USER_ID") == "hashed":
        import hashlib
        import hmac

        expected_user = hmac.new(b"k" * 32, user_id.encode(), hashlib.sha256).hexdigest()[:16]
    sink, reader, _ = telemetry(**env)
    sink.request_done(record(user_id=user_id, client_ip=client_ip))
    (_, dims), = collect(reader)[names.TOTAL_TOKENS]
    assert (dims[names.USER_ID], dims[names.CLIENT_IP]) == (expected_user, expected_ip)


def test_hashed_user_ids_need_a_key() -> None:
    with pytest.raises(Exception, match="GATEWAY_USER_ID_HASH_KEY"):
        settings(GATEWAY_USER_ID="hashed")


@pytest.mark.parametrize(("status", "error"), [(200, False), (429, True), (401, True), (503, True)])
def test_the_request_span_carries_method_route_status_and_the_truncated_address(status: int, error: bool) -> None:
    sink, _, spans = telemetry()
    trace = sink.begin("POST", "/openai/deployments/{deployment}/{*operation}")
    trace.attempt("uk", "uksouth", "http://127.0.0.1:8123/openai/deployments/gpt-4o/chat/completions", 1).end(200)
    sink.request_done(record(status=status), trace)
    server = next(s for s in spans.get_finished_spans() if s.kind.name == "SERVER")
    attributes = dict(server.attributes or {})
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.route"] == "/openai/deployments/{deployment}/{*operation}"
    assert attributes["http.response.status_code"] == status
    assert attributes["client.address"] == "10.1.2.0"
    assert (server.status.status_code.name == "ERROR") is error
    client = next(s for s in spans.get_finished_spans() if s.kind.name == "CLIENT")
    assert (client.attributes or {})["server.address"] == "127.0.0.1"
    assert (client.attributes or {})["server.port"] == 8123


PRICES = '{"currency": "EUR", "deployments": {"gpt-4o": {"input": 2.5, "cached_input": 1.25, "output": 10}}}'


def test_one_log_record_per_request_with_tokens_source_attempts_latency_and_cost() -> None:
    sink, reader, _ = telemetry(GATEWAY_PRICES=PRICES)
    sink.request_done(record(ptu=False, attempts=2))
    sink.request_done(record(status=429, usage=None, ttft_ms=None, backend_id="", region="", ptu=False, attempts=0))
    sink.request_done(record(ptu=False, usage=TokenUsage(10, 5, 15, reported=False), stream=True))
    first, throttled, counted = log_records()
    assert first["microsoft.custom_event.name"] == "GatewayLlmLog"
    assert first["Team"] == "search"
    assert first["microsoft.custom_measurements"] == {
        "Prompt Tokens": 100, "Completion Tokens": 20, "Cached Tokens": 64, "Reasoning Tokens": 5, "Total Tokens": 120,
        "Attempts": 2, "Fallback Step": 0, "Duration Ms": 12.5, "Time To First Token Ms": 3.0,
        "Cost": pytest.approx((36 * 2.5 + 64 * 1.25 + 20 * 10) / 1e6),
    }
    assert first["Requested Deployment"] == "gpt-4o"
    assert {k: first[k] for k in ("Subscription ID", "Deployment", "Model", "Backend ID", "Location", "Status Code",
                                  "Usage Source", "Client IP", "User ID", "Currency", "PTU")} == {
        "Subscription ID": "team-a", "Deployment": "gpt-4o", "Model": "gpt-4o-2024-11-20", "Backend ID": "uk-ptu",
        "Location": "uksouth", "Status Code": "200", "Usage Source": "reported", "Client IP": "10.1.2.0",
        "User ID": "alice", "Currency": "EUR", "PTU": "false",
    }
    assert throttled["Status Code"] == "429" and throttled["Usage Source"] == "none"
    assert "Total Tokens" not in throttled["microsoft.custom_measurements"]
    assert counted["Usage Source"] == "counted"
    costs = collect(reader)[names.COST]
    assert sum(v for v, _ in costs) == pytest.approx(
        sum(r["microsoft.custom_measurements"]["Cost"] for r in log_records())
    )
    assert costs[0][1] == {"Subscription ID": "team-a", "Deployment": "gpt-4o", "Backend ID": "uk-ptu", "Team": "search"}


def test_ptu_answers_log_zero_cost_and_emit_no_cost_points() -> None:
    sink, reader, _ = telemetry(GATEWAY_PRICES=PRICES)
    sink.request_done(record(ptu=True))
    assert log_records()[0]["microsoft.custom_measurements"]["Cost"] == 0
    assert names.COST not in collect(reader)


def test_the_log_can_be_turned_off_or_sampled_with_a_weight() -> None:
    sink, _, _ = telemetry(GATEWAY_REQUEST_LOG="false")
    sink.request_done(record())
    assert log_records() == []
    sink, _, _ = telemetry(GATEWAY_REQUEST_LOG_SAMPLING="0.5")
    for _ in range(400):
        sink.request_done(record())
    kept = log_records()
    assert 100 < len(kept) < 300
    assert {r["microsoft.custom_measurements"]["Sample Weight"] for r in kept} == {2.0}


def test_hostile_identifiers_are_bounded_in_the_log() -> None:
    sink, _, _ = telemetry()
    sink.request_done(record(model="m" * 10_000, user_id="u" * 10_000, client_ip="x" * 10_000))
    (entry,) = log_records()
    assert len(entry["Model"]) == 128 and entry["User ID"] == "(invalid)" and entry["Client IP"] == ""
    assert sum(len(str(v)) for v in entry.values()) < 2000


def test_requests_without_a_consumer_are_not_logged() -> None:
    sink, reader, _ = telemetry()
    for _ in range(50):  # a client spraying keys: each refusal would otherwise buy ~1 KB of ingestion
        sink.request_done(record(consumer_id="", status=401, usage=None, ttft_ms=None, backend_id="", region=""))
    sink.request_done(record())
    assert [r["Subscription ID"] for r in log_records()] == ["team-a"]


def test_an_attempt_whose_body_broke_off_gets_its_own_record_so_log_totals_equal_the_metrics() -> None:
    sink, reader, _ = telemetry(GATEWAY_PRICES=PRICES)
    sink.tokens_spent(record(backend_id="uk", status=502, ptu=False, usage=TokenUsage(100, 0, 100, reported=False)))
    sink.request_done(record(backend_id="se", ptu=False, attempts=2))
    lost, answered = log_records()
    assert (lost["Kind"], lost["Backend ID"], lost["Status Code"], lost["Usage Source"]) == (
        "lost attempt", "uk", "502", "counted")
    assert (answered["Kind"], answered["Backend ID"]) == ("request", "se")
    metrics = collect(reader)
    assert sum(r["microsoft.custom_measurements"]["Total Tokens"] for r in (lost, answered)) == sum(
        v for v, _ in metrics[names.TOTAL_TOKENS]) == 220
    assert sum(r["microsoft.custom_measurements"]["Cost"] for r in (lost, answered)) == pytest.approx(
        sum(v for v, _ in metrics[names.COST]))
    assert sum(v for v, _ in metrics[names.GATEWAY_REQUESTS]) == 1


def test_a_fallback_is_logged_with_the_name_asked_and_its_step_and_counted_by_deployments() -> None:
    sink, reader, _ = telemetry(GATEWAY_PRICES=PRICES)
    sink.model_fallback("gpt-4.1", "gpt-4o", "BackendsBusy")
    sink.request_done(record(ptu=False, requested="chat", step=1))
    (logged,) = log_records()
    assert logged["Deployment"] == "gpt-4o" and logged["Requested Deployment"] == "chat"
    assert logged["microsoft.custom_measurements"]["Fallback Step"] == 1
    assert logged["microsoft.custom_measurements"]["Cost"] > 0  # priced as the deployment that served
    assert collect(reader)[names.MODEL_FALLBACKS] == [
        (1, {"From Deployment": "gpt-4.1", "To Deployment": "gpt-4o", "Reason": "BackendsBusy"})
    ]


def test_tool_calls_are_a_metric_by_tool_and_a_cost_and_in_the_request_log() -> None:
    prices = '{"deployments": {}, "tools": {"web_search": 0.01}}'
    sink, reader, _ = telemetry(GATEWAY_PRICES=prices, GATEWAY_REQUEST_LOG="true")
    usage = TokenUsage(10, 5, 15, tools=(("mcp", 1), ("web_search", 3)))
    sink.request_done(record(usage=usage))  # on a PTU: the tokens cost nothing at the margin, the searches do
    metrics = collect(reader)
    calls = {d[names.TOOL]: v for v, d in metrics[names.TOOL_CALLS]}
    assert calls == {"web_search": 3, "mcp": 1}
    assert all(d[names.SUBSCRIPTION_ID] == "team-a" and d[names.DEPLOYMENT] == "gpt-4o" for _, d in metrics[names.TOOL_CALLS])
    assert sum(v for v, _ in metrics[names.COST]) == pytest.approx(0.03)
    measurements = log_records()[-1]["microsoft.custom_measurements"]
    assert measurements["Tool Calls web_search"] == 3 and measurements["Cost"] == pytest.approx(0.03)
def test_a_cache_hit_is_logged_and_counted_as_cached_with_the_tokens_it_saved_and_its_own_price() -> None:
    prices = '{"deployments": {"gpt-4o": {"input": 2.5, "output": 10, "cache_hit": 0.5}}}'
    sink, reader, _ = telemetry(GATEWAY_PRICES=prices)
    hit = record(usage=None, saved=TokenUsage(100, 20, 120), cache="hit", backend_id="", region="", ptu=False,
                 ttft_ms=None, attempts=0)
    sink.request_done(hit)
    sink.cache_used(hit)
    miss = record(ptu=False, cache="miss")
    sink.request_done(miss)
    sink.cache_used(miss)
    sink.request_done(record(ptu=False))  # a consumer without the cache
    logged, missed, plain = log_records()
    assert logged["Cache"] == "hit" and missed["Cache"] == "miss" and plain["Cache"] == "off"
    assert logged["microsoft.custom_measurements"]["Tokens Saved"] == 120
    assert logged["microsoft.custom_measurements"]["Cost"] == pytest.approx(120 * 0.5 / 1e6)
    assert "Total Tokens" not in logged["microsoft.custom_measurements"]
    metrics = collect(reader)
    assert sorted((v, d["Cache"]) for v, d in metrics[names.CACHE_REQUESTS]) == [(1, "hit"), (1, "miss")]
    assert metrics[names.TOKENS_SAVED] == [(120, {"Subscription ID": "team-a", "Deployment": "gpt-4o"})]
    assert sum(v for v, _ in metrics[names.COST]) == pytest.approx(
        sum(r["microsoft.custom_measurements"]["Cost"] for r in log_records()))
    assert sum(v for v, _ in metrics[names.TOTAL_TOKENS]) == 240  # the hit emitted no tokens
