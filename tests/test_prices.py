"""The price table: what one answer costs, and the table's validation."""

from __future__ import annotations

import pytest

from shared.records.prices import Price, PriceError, PriceTable, parse_prices
from shared.records.usage import TokenUsage

TABLE = PriceTable("EUR", {"gpt-4o": Price(2.5, 1.25, 10.0), "emb": Price(0.02, 0.02, 0.0)})


@pytest.mark.parametrize(
    ("deployment", "ptu", "usage", "cost"),
    [
        ("gpt-4o", False, TokenUsage(1_000_000, 0, 1_000_000), 2.5),
        ("gpt-4o", False, TokenUsage(0, 1_000_000, 1_000_000), 10.0),
        # cached prompt tokens at the cached price, the rest at the input price
        ("gpt-4o", False, TokenUsage(1000, 200, 1200, cached=400), (600 * 2.5 + 400 * 1.25 + 200 * 10.0) / 1e6),
        # reasoning tokens are part of the completion tokens: not billed twice
        ("gpt-4o", False, TokenUsage(100, 300, 400, reasoning=250), (100 * 2.5 + 300 * 10.0) / 1e6),
        # a backend reporting more cached than prompt tokens is not paid for negative input
        ("gpt-4o", False, TokenUsage(10, 0, 10, cached=50), 10 * 1.25 / 1e6),
        ("emb", False, TokenUsage(12345, 0, 12345), 12345 * 0.02 / 1e6),
        ("gpt-4o", True, TokenUsage(1_000_000, 1_000_000, 2_000_000), 0.0),  # PTU: paid by the hour
        ("unpriced", False, TokenUsage(1000, 1000, 2000), 0.0),
        ("gpt-4o", False, None, 0.0),
    ],
)
def test_cost_of_one_answer(deployment: str, ptu: bool, usage: TokenUsage | None, cost: float) -> None:
    assert TABLE.cost(deployment, ptu, usage) == pytest.approx(cost, rel=1e-12, abs=1e-15)


def test_parse_a_table() -> None:
    table = parse_prices(
        '{"currency": "USD", "deployments": {"gpt-4o": {"input": 2.5, "cached_input": 1.25, "output": 10},'
        ' "emb": {"input": 0.02}}, "ptu_hourly": {"uk-ptu": 2}}'
    )
    assert table.currency == "USD"
    assert table.deployments["gpt-4o"] == Price(2.5, 1.25, 10.0)
    assert table.deployments["emb"] == Price(0.02, 0.02, 0.0)  # cached defaults to the input price
    assert table.ptu_hourly == {"uk-ptu": 2.0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "invalid JSON"),
        ("[]", "expected an object"),
        ('{"currency": "dollars"}', "currency"),
        ('{"deployments": {"gpt-4o": {"input": -1}}}', "deployments.gpt-4o.input"),
        ('{"deployments": {"gpt-4o": {"input": 1, "output": "ten"}}}', "deployments.gpt-4o.output"),
        ('{"deployments": {"gpt-4o": {"input": NaN}}}', "deployments.gpt-4o.input"),
        ('{"deployments": {"gpt-4o": {"output": 1}}}', "deployments.gpt-4o"),
        ('{"deployments": {"gpt-4o": {"input": 1, "outptu": 2}}}', "deployments.gpt-4o"),
        ('{"ptu_hourly": {"uk": true}}', "ptu_hourly.uk"),
        ('{"prices": {}}', "prices: unknown field"),
    ],
)
def test_a_bad_table_names_the_field(text: str, message: str) -> None:
    with pytest.raises(PriceError, match=message):
        parse_prices(text)
