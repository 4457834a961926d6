"""The console line per request (`GATEWAY_CONSOLE_LOG`, on in scripts/run): built from the records the real request
flow hands telemetry, so it says what the metrics and the per-request log say; refusals carry their reason."""

from __future__ import annotations

import json

import openai
import pytest

from shared.records.prices import parse_prices
from shared.records.usage import TokenUsage
from shared.telemetry.console import ConsoleTelemetry, format_line
from shared.telemetry.protocol import NullTelemetry, RequestRecord, Telemetry
from tests.fakes.gateway import GatewayHarness, backend

PRICES = parse_prices(json.dumps({"currency": "EUR", "deployments": {"gpt-4o": {"input": 2.5, "output": 10}}}))
NOON = 1_700_000_000.0


async def test_a_served_request_shows_consumer_deployment_backend_attempts_tokens_and_cost() -> None:
    harness = GatewayHarness([backend("swedencentral", "swedencentral", 1)])
    try:
        key = harness.consumer("team-a", tpm=100_000)
        await harness.openai(key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                                          max_tokens=20)
        record = harness.telemetry.requests[-1]
        line = format_line(record, PRICES, NOON)
    finally:
        await harness.close()
    assert record.usage is not None and record.reason == ""
    fields = line.split()
    assert fields[1:5] == ["200", "team-a", "gpt-4o", "swedencentral"]
    assert f"{record.usage.total} tok ({record.usage.prompt}+{record.usage.completion})" in line
    cost = (record.usage.prompt * 2.5 + record.usage.completion * 10) / 1e6
    assert f"EUR {cost:.6f}" in line and "1 try" in line and "\n" not in line


@pytest.mark.parametrize(
    ("env", "consumer", "call", "status", "reason"),
    [
        ({}, {"tpm": 10}, {"model": "gpt-4o", "max_tokens": 50}, "429", "tokens_exceed_limit"),
        ({}, {"deployments": ["gpt-4o-mini"]}, {"model": "gpt-4o"}, "404", "DeploymentNotFound"),
        ({}, {"quota": 1, "quota_period": "daily", "tpm": 0}, {"model": "gpt-4o", "max_tokens": 5}, None, None),
    ],
)
async def test_a_refusal_shows_its_reason(env: dict[str, str], consumer: dict[str, object], call: dict[str, object],
                                          status: str | None, reason: str | None) -> None:
    harness = GatewayHarness(env=env)
    try:
        key = harness.consumer("team-b", **consumer)  # type: ignore[arg-type]
        client = harness.openai(key)
        for _ in range(3):  # a quota of one token lets the first call through, then refuses
            try:
                await client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **call)  # type: ignore[call-overload]
            except openai.APIStatusError as error:
                status, reason = status or str(error.status_code), reason or str(error.code)
                break
        record = harness.telemetry.requests[-1]
    finally:
        await harness.close()
    line = format_line(record, PRICES, NOON)
    assert line.split()[1:3] == [status, "team-b"]
    assert line.endswith(f"  {reason}") and record.reason == reason


def test_fields_are_cut_to_their_columns_and_never_break_the_line() -> None:
    record = RequestRecord(consumer_id="c" * 200, client_ip="", api="a", operation="o", user_id="",
                           deployment="d\n" * 50, status=200, duration_ms=1.0, backend_id="b" * 300,
                           usage=TokenUsage(prompt=1, completion=2, total=3, reported=False), attempts=2)
    line = format_line(record, PRICES, NOON)
    assert "\n" not in line and len(line) < 160 and "counted" in line and "2 tries" in line
    assert "EUR" not in line  # an unpriced deployment shows no cost rather than a false 0


def test_a_fallback_shows_its_step_and_the_name_asked() -> None:
    record = RequestRecord(consumer_id="c", client_ip="", api="a", operation="o", user_id="", deployment="gpt-4o",
                           status=200, duration_ms=1.0, backend_id="b", attempts=1, requested="chat\n" * 30, step=2)
    line = format_line(record, PRICES, NOON)
    assert "fallback 2 from chat?" in line and "\n" not in line
    assert "fallback" not in format_line(RequestRecord("c", "", "a", "o", "", "gpt-4o", 200, 1.0), PRICES, NOON)


def test_the_console_writes_one_line_per_request_and_a_closed_console_fails_nothing() -> None:
    lines: list[str] = []
    record = RequestRecord("a", "", "api", "op", "", "gpt-4o", 200, 5.0)
    console = ConsoleTelemetry(NullTelemetry(), PRICES, lines.append, now=lambda: NOON)
    console.request_done(record)
    console.tokens_spent(record)  # a lost attempt: its tokens are in the request's line, not a line of its own
    assert len(lines) == 1 and " 200 " in lines[0]

    def closed(_: str) -> None:
        raise OSError("console closed")

    ConsoleTelemetry(NullTelemetry(), PRICES, closed).request_done(record)


def test_every_telemetry_method_reaches_the_inner_sink() -> None:
    calls: list[str] = []

    class Recording(NullTelemetry):
        def __getattribute__(self, name: str) -> object:
            if not name.startswith("_"):
                calls.append(name)
            return object.__getattribute__(self, name)

    console = ConsoleTelemetry(Recording(), PRICES, lambda _: None)
    methods = [m for m in dir(Telemetry) if not m.startswith("_")]
    for name in methods:
        calls.clear()
        arguments = {"begin": ("GET", "/x"), "request_done": (RequestRecord("a", "", "a", "o", "", "d", 200, 1.0),),
                     "tokens_spent": (RequestRecord("a", "", "a", "o", "", "d", 200, 1.0),)}
        getattr(console, name)(*arguments.get(name, ("a", "b", "c")[: _arity(name)]))
        assert name in calls, name


def _arity(name: str) -> int:
    import inspect

    return len(inspect.signature(getattr(Telemetry, name)).parameters) - 1
