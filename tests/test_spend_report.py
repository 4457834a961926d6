"""Cost in the usage rows, the usage report and `consumers show`: what each answer cost (PTU answers: 0) lands in the
consumer's rows through the real request flow, and the reports say their currency and how fresh their figures are."""

from __future__ import annotations

import io
import json

from shared.admin.cli import Admin, parser
from shared.admin.spend import spend_summary
from shared.admin.usage_report import format_report, freshness, last_written, summarize
from shared.config import load_settings
from shared.records.consumers import Consumer, Limits
from shared.records.spend import SpendRow
from shared.records.usage import UsageRow
from shared.storage.memory import MemoryBudgetStore, MemoryConsumerStore, MemoryUsageStore
from shared.telemetry.usage_rows import hour_key
from tests.fakes.gateway import GatewayHarness, backend

PRICES = json.dumps({"currency": "EUR", "deployments": {"gpt-4o": {"input": 2.5, "output": 10}}})
NOW = 1_764_936_000.0  # 2025-12-05 12:00 UTC


async def _one_answer(region: dict[str, object]) -> tuple[UsageRow, float]:
    harness = GatewayHarness([region], env={"GATEWAY_PRICES": PRICES})
    try:
        key = harness.consumer("team")
        answer = await harness.openai(key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}])
        [row] = await harness.usage_rows("team")
    finally:
        await harness.close()
    assert answer.usage is not None
    return row, (answer.usage.prompt_tokens * 2.5 + answer.usage.completion_tokens * 10) / 1e6


async def test_each_answers_cost_lands_in_the_usage_rows_and_a_ptu_answer_costs_nothing() -> None:
    paid, expected = await _one_answer(backend("sweden", "swedencentral", 1))
    assert paid.cost_nanos == round(expected * 1e9) and paid.cost_nanos > 0
    free, _ = await _one_answer(backend("uksouth-ptu", "uksouth", 1, ptu=True))
    assert free.cost_nanos == 0 and free.total > 0


def test_the_report_shows_cost_per_consumer_and_says_how_fresh_it_is() -> None:
    hour = hour_key(NOW)
    rows = [UsageRow("a", hour, "gpt-4o", "i1", requests=2, total=30, cost_nanos=1_500_000, written_s=NOW - 30),
            UsageRow("a", hour, "gpt-4o-mini", "i2", requests=1, total=10, cost_nanos=250_000, written_s=NOW - 90)]
    totals = summarize(rows)
    text = format_report("daily period x", totals, "EUR")
    assert "cost_EUR" in text and "0.0015" in text and "0.0018" in text  # the (all) row sums the deployments
    assert last_written(rows) == NOW - 30
    line = freshness(last_written(rows), 60, NOW)
    assert "30 s ago" in line and "at most every 60 s" in line
    assert "no rows written" in freshness(None, 60, NOW)


async def test_show_says_what_a_consumer_spent_and_where_the_figure_comes_from() -> None:
    settings = load_settings({"GATEWAY_TABLE_CONNECTION_STRING": "UseDevelopmentStorage=true", "GATEWAY_PRICES": PRICES,
                              "GATEWAY_BUDGET_REFRESH_S": "7"}, require_backends=False)
    budgets, usage = MemoryBudgetStore(), MemoryUsageStore()
    budgeted = Consumer(id="b", name="b", key_hash="0" * 64, key_prefix="gw-x", limits=Limits(budget=10.0))
    plain = Consumer(id="p", name="p", key_hash="1" * 64, key_prefix="gw-y")
    await budgets.save([SpendRow("b", "2025-12", "i1", 2_000_000_000), SpendRow("b", "2025-12", "i2", 500_000_000),
                        SpendRow("b", "2025-11", "i1", 9_000_000_000)])
    await usage.save([UsageRow("p", hour_key(NOW), "gpt-4o", "i1", cost_nanos=3_000_000, written_s=NOW - 5),
                      UsageRow("p", "2025-11-30T10", "gpt-4o", "i1", cost_nanos=7_000_000)])
    b = await spend_summary(budgeted, budgets, usage, settings, NOW)
    assert (b["period"], b["amount"], b["left"], b["currency"], b["behind_at_most_s"]) == ("2025-12", 2.5, 7.5, "EUR", 7)
    p = await spend_summary(plain, budgets, usage, settings, NOW)
    assert (p["amount"], p["budget"], p["last_written"]) == (0.003, None, "2025-12-05T11:59:55Z")
    store, out = MemoryConsumerStore(), io.StringIO()
    store.consumers["p"] = plain

    async def spend(consumer: Consumer) -> dict[str, object]:
        return await spend_summary(consumer, budgets, usage, settings, NOW)

    admin = Admin(store, out, json_mode=True, spend=spend)  # type: ignore[arg-type]
    assert await admin.show(parser().parse_args(["consumers", "show", "p"])) == 0
    assert json.loads(out.getvalue())["spend"]["amount"] == 0.003
