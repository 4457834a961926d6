"""Token metrics end to end, through what azure-monitor-opentelemetry really exports to a local ingestion endpoint."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from shared.telemetry import protocol as names
from tests.conftest import unique
from tests.e2e import Stack, wait_for
from tools import stack
from tools.capture import Capture

pytestmark = pytest.mark.e2e
MINI = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Count the tokens, exactly."}]
NETGUARD = Path(__file__).parent / "netguard"


@pytest.fixture
def capture(log_dir: Path) -> Iterator[Capture]:
    sink = Capture()
    yield sink
    sink.stop()
    # Kept with the logs, so the final leak scan reads everything the gateway exported too.
    (log_dir / f"{unique('capture')}.json").write_text(json.dumps(sink.envelopes))



def test_token_metrics_are_exact_with_apim_names_and_dimensions_and_nothing_leaves_loopback(
    fresh_sims: Stack, capture: Capture, gateway_factory: Callable[..., stack.Child], tmp_path: Path
) -> None:
    e2e = fresh_sims
    netlog = tmp_path / "netguard.log"
    tag = unique("t")
    ptu, sweden, france = (sim.region for sim in e2e.simulators)
    regions = [
        stack.Region(f"{tag}-uksouth-ptu", ptu.region, ptu.port, priority=1, ptu=True),
        stack.Region(f"{tag}-sweden", sweden.region, sweden.port, priority=2),
        stack.Region(f"{tag}-france", france.region, france.port, priority=2),
    ]
    gateway = gateway_factory(regions=regions, extra={
        "APPLICATIONINSIGHTS_CONNECTION_STRING": capture.connection_string,
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "PYTHONPATH": str(NETGUARD),
        "NETGUARD_LOG": str(netlog),
        "LOCALHOST_LOOP": "asyncio",  # so every connection goes through Python's socket module and the guard
        "GATEWAY_ID": "test-gateway",
        "GATEWAY_TRACE_SAMPLING": "1",  # every request traced (the default is a rate limit)
    })
    consumer = unique("metered")
    key = e2e.create_consumer(consumer, tpm=1_000_000)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, default_headers={"x-user-id": "alice"})
    azure = openai.AzureOpenAI(azure_endpoint=gateway.url, api_key=key, api_version="2024-10-21", max_retries=0,
                               default_headers={"x-user-id": "bob"})

    client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=7)
    list(client.chat.completions.create(model=MINI, messages=MESSAGES, stream=True, max_tokens=9))
    azure.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=3)
    client.embeddings.create(model="text-embedding-3-small", input=["one", "two three"])
    e2e.simulators[0].fault("500", deployment=MINI)
    failed_over = client.chat.completions.with_raw_response.create(model=MINI, messages=MESSAGES, max_tokens=5)
    assert failed_over.headers["x-gateway-backend"] != f"{tag}-uksouth-ptu"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-deployment", messages=MESSAGES)

    backends_total = sum(sim.stats()["usage"]["total_tokens"] for sim in e2e.simulators)
    assert backends_total > 0
    wait_for(lambda: capture.total(names.TOTAL_TOKENS, **{names.SUBSCRIPTION_ID: consumer}) >= backends_total)
    time.sleep(1.2)  # one more export: nothing more may arrive
    exported = {
        name: capture.total(name, **{names.SUBSCRIPTION_ID: consumer})
        for name in (names.PROMPT_TOKENS, names.COMPLETION_TOKENS, names.TOTAL_TOKENS)
    }
    backends = {k: sum(sim.stats()["usage"][k] for sim in e2e.simulators) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert exported == {
        names.PROMPT_TOKENS: backends["prompt_tokens"],
        names.COMPLETION_TOKENS: backends["completion_tokens"],
        names.TOTAL_TOKENS: backends["total_tokens"],
    }

    points = [p for p in capture.metrics(names.TOTAL_TOKENS) if p[3].get(names.SUBSCRIPTION_ID) == consumer]
    dimensions = {key for *_, props in points for key in props}
    assert dimensions >= {
        names.SUBSCRIPTION_ID, names.CLIENT_IP, names.API_ID, names.OPERATION_ID, names.USER_ID, names.BACKEND_ID,
        names.LOCATION, names.DEPLOYMENT, names.MODEL,
    }
    seen = {(p[names.API_ID], p[names.OPERATION_ID], p[names.BACKEND_ID].removeprefix(tag + "-"), p[names.LOCATION]) for *_, p in points}
    assert ("openai-v1", "ChatCompletions_Create", "uksouth-ptu", "uksouth") in seen
    assert ("azure-openai", "ChatCompletions_Create", "uksouth-ptu", "uksouth") in seen
    assert ("openai-v1", "Embeddings_Create", "uksouth-ptu", "uksouth") in seen
    assert {b for _, _, b, _ in seen} >= {"uksouth-ptu"} and ({"sweden", "france"} & {b for _, _, b, _ in seen})
    assert {p[names.CLIENT_IP] for *_, p in points} == {"127.0.0.0"}  # truncated to /24 by default
    assert {p[names.USER_ID] for *_, p in points} == {"alice", "bob"}
    assert {p[names.MODEL] for *_, p in points} >= {"gpt-4o-mini-2024-07-18", "text-embedding-3-small"}

    # Requests are counted whether or not they got usage; failovers and breaker trips are metrics too.
    requests = [p for p in capture.metrics(names.GATEWAY_REQUESTS) if p[3].get(names.SUBSCRIPTION_ID) == consumer]
    assert sum(v for _, v, _, _ in requests) == 6
    assert sum(v for _, v, _, p in requests if p[names.STATUS_CODE] == "404") == 1
    assert capture.total(names.FAILOVERS, **{names.FROM_BACKEND: f"{tag}-uksouth-ptu", names.REASON: "500"}) == 1
    assert capture.total(names.BREAKER_TRANSITIONS, **{names.BACKEND_ID: f"{tag}-uksouth-ptu", names.STATE: "open"}) == 1
    assert any(name == names.TIME_TO_FIRST_TOKEN for name, *_ in capture.metrics())
    assert any(name == names.REQUEST_DURATION for name, *_ in capture.metrics())

    # Each request is traced, with its backend attempts as dependencies.
    wait_for(lambda: len(capture.items("RemoteDependencyData")) >= 6)
    dependencies = capture.items("RemoteDependencyData")
    assert {d["data"]["baseData"]["properties"].get(names.BACKEND_ID) for d in dependencies} >= {f"{tag}-uksouth-ptu"}
    assert {d["data"]["baseData"]["name"] for d in dependencies} >= {f"POST /openai/deployments/{MINI}/chat/completions"}
    assert any(d["data"]["baseData"].get("resultCode") == "500" for d in dependencies)
    request_items = capture.items("RequestData")
    assert any(r["data"]["baseData"]["name"].endswith("/v1/chat/completions") for r in request_items)
    text = str(capture.envelopes)
    assert MESSAGES[0]["content"] not in text and key not in text  # no prompt text, no key

    assert not netlog.exists() or netlog.read_text() == "", netlog.read_text()


def _points(capture: Capture) -> list[tuple[str, str | None, float, dict[str, str]]]:
    """(name, namespace, value, dimensions) of every exported metric point."""
    found = []
    for envelope in capture.items("MetricData"):
        data = envelope["data"]["baseData"]
        for point in data.get("metrics", []):
            found.append((point["name"], point.get("ns"), float(point["value"]), data.get("properties", {})))
    return found


def test_export_lands_in_the_namespace_with_real_result_codes_bounded_series_and_no_idle_points(
    fresh_sims: Stack, capture: Capture, gateway_factory: Callable[..., stack.Child]
) -> None:
    e2e = fresh_sims
    gateway = gateway_factory(extra={
        "APPLICATIONINSIGHTS_CONNECTION_STRING": capture.connection_string,
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "GATEWAY_TRACE_SAMPLING": "1",
        "GATEWAY_METRIC_SERIES_MAX": "10",
    })
    spray, tiny = unique("spray"), unique("tiny")
    spray_key = e2e.create_consumer(spray, tpm=10_000_000)
    tiny_key = e2e.create_consumer(tiny, tpm=20)
    consumed = 0
    for i in range(40):  # one client varies x-user-id on every request
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=spray_key, max_retries=0,
                               default_headers={"x-user-id": f"user-{i}@example.com"})
        raw = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=f"text {i}")
        consumed += int(raw.headers["x-gateway-tokens-consumed"])
    limited = openai.OpenAI(base_url=gateway.url + "/v1", api_key=tiny_key, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        limited.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=50)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.url + "/v1", api_key="gw-wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=gateway.url + "/v1", api_key=spray_key, max_retries=0).chat.completions.create(
            model="no-such-deployment", messages=MESSAGES)

    wait_for(lambda: capture.total(names.TOTAL_TOKENS, **{names.SUBSCRIPTION_ID: spray}) >= consumed)
    wait_for(lambda: {"429", "401", "404"} <= {r["data"]["baseData"]["responseCode"] for r in capture.items("RequestData")})
    wait_for(lambda: capture.total(names.GATEWAY_REQUESTS, **{names.SUBSCRIPTION_ID: spray}) >= 41)
    wait_for(lambda: capture.total(names.GATEWAY_REQUESTS, **{names.SUBSCRIPTION_ID: tiny}) >= 1)
    time.sleep(0.4)
    settled = len(_points(capture))
    time.sleep(1.5)  # five export intervals without traffic
    points = _points(capture)
    assert len(points) == settled, points[settled:]  # idle series are not re-exported
    # (the exporter sends its own `_OTELRESOURCE_` marker, value 0, with each batch of spans)
    assert [p for p in points if p[2] <= 0 and p[0] != "_OTELRESOURCE_"] == []

    # Token metrics land in the configured namespace (default "openai", as in API Management's labs).
    assert {ns for name, ns, _, _ in points if name == names.TOTAL_TOKENS} == {"openai"}
    # Series pressure: exact totals, the consumer kept on every point, user and address given up first.
    spray_points = [(v, d) for name, _, v, d in points if name == names.TOTAL_TOKENS and d.get(names.SUBSCRIPTION_ID) == spray]
    assert sum(v for v, _ in spray_points) == consumed
    assert "(other)" in {d[names.USER_ID] for _, d in spray_points}
    assert all(d[names.SUBSCRIPTION_ID] not in ("overflow", "(other)", "") for name, _, _, d in points
               if name == names.TOTAL_TOKENS)
    assert {d[names.CLIENT_IP] for _, d in spray_points} <= {"127.0.0.0", "(other)"}  # truncated to /24

    # Requests carry real result codes, success false from 400, method and route; no query string.
    requests = {r["data"]["baseData"]["responseCode"]: r["data"]["baseData"] for r in capture.items("RequestData")}
    assert requests["200"]["success"] is True
    for code in ("429", "401", "404"):
        assert requests[code]["success"] is False, requests[code]
    assert requests["429"]["name"] == "POST /v1/chat/completions"
    assert "?" not in str([r.get("url", "") for r in requests.values()])
    # Dependencies name their backend host and port, never "host:None".
    targets = {d["data"]["baseData"].get("target") for d in capture.items("RemoteDependencyData")}
    ports = {str(sim.region.port) for sim in e2e.simulators}
    assert targets and all(t and t.startswith("127.0.0.1:") and t.split(":")[1] in ports for t in targets), targets
