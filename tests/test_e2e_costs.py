"""The per-request log, cost per consumer, budgets and the flush on SIGTERM, through real processes: the gateway under
tools/localhost.py, Azurite, simulated regions, the official openai SDK, and the captured Application Insights export."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from shared.records.prices import parse_prices
from shared.records.spend import SpendRow
from shared.storage.budget_table import TableBudgetStore
from shared.storage.tables import Tables
from shared.telemetry import protocol as names
from tests.conftest import unique
from tests.e2e import GatewayFactory, Stack, wait_for
from tools import stack
from tools.capture import Capture

pytestmark = pytest.mark.e2e
MINI = "gpt-4o-mini"
EMBED = "text-embedding-3-small"
MESSAGES = [{"role": "user", "content": "What does this cost?"}]
PRICES = json.dumps({
    "currency": "USD",
    "deployments": {MINI: {"input": 0.15, "cached_input": 0.075, "output": 0.6}, EMBED: {"input": 0.02}},
})
TABLE = parse_prices(PRICES)


@pytest.fixture
def capture(log_dir: Path) -> Iterator[Capture]:
    sink = Capture()
    yield sink
    sink.stop()
    (log_dir / f"{unique('capture')}.json").write_text(json.dumps(sink.envelopes))


def events(capture: Capture, consumer: str) -> list[dict[str, Any]]:
    """The per-request log records of one consumer: customDimensions and customMeasurements merged."""
    found = []
    for item in capture.items("EventData"):
        data = item["data"]["baseData"]
        if data["name"] == "GatewayLlmLog" and data["properties"].get(names.SUBSCRIPTION_ID) == consumer:
            found.append({**data["properties"], **data.get("measurements", {}), "operation_Id": item["tags"].get("ai.operation.id")})
    return found


def pay_as_you_go(e2e: Stack) -> list[stack.Region]:
    return [sim.region for sim in e2e.simulators if not sim.region.ptu]


def test_one_log_record_per_request_whose_totals_and_cost_equal_the_metrics(
    fresh_sims: Stack, capture: Capture, gateway_factory: Callable[..., stack.Child]
) -> None:
    e2e = fresh_sims
    gateway = gateway_factory(regions=pay_as_you_go(e2e), extra={
        "APPLICATIONINSIGHTS_CONNECTION_STRING": capture.connection_string,
        "OTEL_METRIC_EXPORT_INTERVAL": "300", "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_BLRP_SCHEDULE_DELAY": "100",
        "GATEWAY_TRACE_SAMPLING": "1", "GATEWAY_PRICES": PRICES,
    })
    consumer = unique("billed")
    key = e2e.create_consumer(consumer, tpm=1_000_000)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    expected_cost = 0.0
    for i in range(3):
        raw = client.chat.completions.with_raw_response.create(model=MINI, messages=MESSAGES, max_tokens=5 + i)
        usage = raw.parse().usage
        assert usage is not None
        expected_cost += (usage.prompt_tokens * 0.15 + usage.completion_tokens * 0.6) / 1e6
    streamed = list(client.chat.completions.create(
        model=MINI, messages=MESSAGES, max_tokens=9, stream=True, stream_options={"include_usage": True}))
    final = streamed[-1].usage
    assert final is not None
    expected_cost += (final.prompt_tokens * 0.15 + final.completion_tokens * 0.6) / 1e6
    embedded = client.embeddings.create(model=EMBED, input=["one", "two three"])
    expected_cost += embedded.usage.prompt_tokens * 0.02 / 1e6
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-deployment", messages=MESSAGES)
    backends_total = sum(sim.stats()["usage"]["total_tokens"] for sim in e2e.simulators)

    wait_for(lambda: len(events(capture, consumer)) >= 6)
    wait_for(lambda: capture.total(names.TOTAL_TOKENS, **{names.SUBSCRIPTION_ID: consumer}) >= backends_total)
    wait_for(lambda: capture.total(names.COST, **{names.SUBSCRIPTION_ID: consumer}) >= expected_cost * 0.999999)
    time.sleep(1.0)  # nothing more may arrive
    log = events(capture, consumer)
    assert len(log) == 6  # one record per request, the 404 included
    assert sum(r.get(names.TOTAL_TOKENS, 0) for r in log) == backends_total
    assert sum(r.get(names.TOTAL_TOKENS, 0) for r in log) == capture.total(names.TOTAL_TOKENS, **{names.SUBSCRIPTION_ID: consumer})
    assert sum(r.get(names.PROMPT_TOKENS, 0) for r in log) == capture.total(names.PROMPT_TOKENS, **{names.SUBSCRIPTION_ID: consumer})
    assert sum(r["Cost"] for r in log) == pytest.approx(expected_cost, rel=1e-9)
    assert capture.total(names.COST, **{names.SUBSCRIPTION_ID: consumer}) == pytest.approx(expected_cost, rel=1e-9)
    by_status = {r[names.STATUS_CODE] for r in log}
    assert by_status == {"200", "404"}
    answered = [r for r in log if r[names.STATUS_CODE] == "200"]
    assert {r["Usage Source"] for r in answered} == {"reported"}
    assert all(r["Attempts"] == 1 and r["Duration Ms"] > 0 and r[names.BACKEND_ID] for r in answered)
    assert sum(1 for r in answered if "Time To First Token Ms" in r) == 1  # the streamed one
    assert {r["Currency"] for r in log} == {"USD"}
    # Each record is joined to its request span by operation_Id.
    wait_for(lambda: len(capture.items("RequestData")) >= 6)
    operations = {item["tags"].get("ai.operation.id") for item in capture.items("RequestData")}
    assert {r["operation_Id"] for r in log} <= operations
    text = str(capture.envelopes)
    assert MESSAGES[0]["content"] not in text and key not in text  # counts and ids only, never content or keys


def test_a_budget_refuses_with_403_budget_exceeded_on_every_instance(
    fresh_sims: Stack, capture: Capture, gateway_factory: GatewayFactory
) -> None:
    e2e = fresh_sims
    extra = {"GATEWAY_PRICES": PRICES, "GATEWAY_BUDGET_REFRESH_S": "0.2", "GATEWAY_CONSUMER_REFRESH_S": "0.2",
             "APPLICATIONINSIGHTS_CONNECTION_STRING": capture.connection_string, "OTEL_METRIC_EXPORT_INTERVAL": "300"}
    first, second = gateway_factory.several(2, extra, regions=pay_as_you_go(e2e))
    consumer = unique("budgeted")
    key = e2e.create_consumer(consumer, tpm=1_000_000)
    e2e.update_consumer(consumer, limits={"budget": 0.000001})  # a millionth of a dollar: one answer spends it
    time.sleep(0.5)
    one = openai.OpenAI(base_url=first.url + "/v1", api_key=key, max_retries=0)
    two = openai.OpenAI(base_url=second.url + "/v1", api_key=key, max_retries=0)
    one.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=20)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        one.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=20)
    body: Any = refused.value.body
    assert refused.value.status_code == 403 and body["code"] == "budget_exceeded" and "budget" in body["message"]

    def second_refuses() -> bool:
        try:
            two.embeddings.create(model=EMBED, input="x")
        except openai.PermissionDeniedError as error:
            return (error.body or {}).get("code") == "budget_exceeded"  # type: ignore[union-attr]
        return False

    wait_for(second_refuses, timeout_s=10)  # the other instance learns the spend from Table Storage
    wait_for(lambda: capture.total(names.THROTTLED_REQUESTS, **{names.SUBSCRIPTION_ID: consumer, names.REASON: "budget"}) >= 2)
    rows = budget_rows(e2e, consumer)
    assert len(rows) == 1 and rows[0].nanos >= 1


def budget_rows(e2e: Stack, consumer: str) -> list[SpendRow]:
    async def read(tables: Tables) -> list[SpendRow]:
        from shared.limits.ledger import period_bounds

        return await TableBudgetStore(tables).read(consumer, period_bounds("monthly", time.time())[0])

    return e2e.run(e2e._with_tables(read))  # type: ignore[no-any-return]


def test_sigterm_flushes_metrics_spans_the_log_usage_rows_and_spend(
    fresh_sims: Stack, capture: Capture, gateway_factory: Callable[..., stack.Child]
) -> None:
    e2e = fresh_sims
    never = "600000"  # no periodic export during the test: only the flush on SIGTERM can deliver anything
    gateway = gateway_factory(regions=pay_as_you_go(e2e), extra={
        "APPLICATIONINSIGHTS_CONNECTION_STRING": capture.connection_string,
        "OTEL_METRIC_EXPORT_INTERVAL": never, "OTEL_BSP_SCHEDULE_DELAY": never, "OTEL_BLRP_SCHEDULE_DELAY": never,
        "GATEWAY_TRACE_SAMPLING": "1", "GATEWAY_PRICES": PRICES, "GATEWAY_BUDGET_REFRESH_S": "3600",
        "GATEWAY_CONSUMER_REFRESH_S": "0.2",
    })
    consumer = unique("recycled")
    key = e2e.create_consumer(consumer, tpm=1_000_000)
    e2e.update_consumer(consumer, limits={"budget": 1000.0})
    time.sleep(0.5)  # the gateway reloads consumers every 0.2 s
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    consumed, cost = 0, 0.0
    for i in range(4):
        raw = client.chat.completions.with_raw_response.create(model=MINI, messages=MESSAGES, max_tokens=3 + i)
        usage = raw.parse().usage
        assert usage is not None
        consumed += usage.total_tokens
        cost += (usage.prompt_tokens * 0.15 + usage.completion_tokens * 0.6) / 1e6
    assert capture.items("MetricData") == [] and capture.items("EventData") == []

    gateway.stop(timeout_s=30)  # SIGTERM, as the platform sends when it recycles an instance
    # uvicorn stops gracefully and then re-raises the signal it caught, so the process ends "by SIGTERM", not killed
    assert gateway.process.returncode in (0, -15), gateway.log()

    assert capture.total(names.TOTAL_TOKENS, **{names.SUBSCRIPTION_ID: consumer}) == consumed
    assert capture.total(names.COST, **{names.SUBSCRIPTION_ID: consumer}) == pytest.approx(cost, rel=1e-9)
    assert len(events(capture, consumer)) == 4
    assert len([r for r in capture.items("RequestData") if r["data"]["baseData"]["responseCode"] == "200"]) == 4
    rows = e2e.usage_rows(consumer)
    assert sum(r.total for r in rows) == consumed and sum(r.requests for r in rows) == 4
    assert [r.nanos for r in budget_rows(e2e, consumer)] == [pytest.approx(cost * 1e9, abs=4)]
