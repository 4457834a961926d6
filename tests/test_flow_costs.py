"""Budgets in the request flow, in-process: the real edge, gateway, limiter and budget book over in-memory stores, the
official SDK as the client, a scripted upstream. What is charged, when the refusal comes, and what reaches a backend."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.fakes.gateway import GatewayHarness, backend

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "How much was that?"}]
PRICES = json.dumps({"currency": "EUR", "deployments": {"gpt-4o": {"input": 2.5, "cached_input": 1.25, "output": 10}}})
PAY_AS_YOU_GO = [backend("swedencentral", "swedencentral", 1)]


@pytest.fixture
async def priced() -> AsyncIterator[GatewayHarness]:
    harness = GatewayHarness(PAY_AS_YOU_GO, env={"GATEWAY_PRICES": PRICES})
    yield harness
    await harness.close()


async def test_spend_is_the_price_of_what_was_answered_and_the_budget_refuses_after(priced: GatewayHarness) -> None:
    key = priced.consumer("team", budget=0.001)  # a tenth of a cent
    client = priced.openai(key)
    spent = 0.0
    refused: openai.PermissionDeniedError | None = None
    for _ in range(50):
        try:
            completion = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=20)
        except openai.PermissionDeniedError as error:
            refused = error
            break
        assert completion.usage is not None
        spent += (completion.usage.prompt_tokens * 2.5 + completion.usage.completion_tokens * 10) / 1e6
    assert refused is not None, "the budget never refused"
    body = refused.body
    assert isinstance(body, dict) and body["code"] == "budget_exceeded" and "EUR" in body["message"]
    assert spent >= 0.001 and priced.budgets.spent("team") == pytest.approx(spent)
    answered = len(priced.upstream.sent)
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=20)
    assert len(priced.upstream.sent) == answered  # refused before any backend is asked
    assert ("team", "gpt-4o", "budget") in priced.telemetry.throttles


async def test_ptu_answers_never_spend_a_budget() -> None:
    harness = GatewayHarness(env={"GATEWAY_PRICES": PRICES})  # the PTU region first
    try:
        key = harness.consumer("team", budget=0.000001)
        for _ in range(5):
            await harness.openai(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=20)
        assert harness.budgets.spent("team") == 0
        assert {r.backend_id for r in harness.telemetry.requests} == {"uksouth-ptu"}
    finally:
        await harness.close()


async def test_requests_in_flight_when_the_budget_is_reached_finish_and_every_later_one_is_refused(
    priced: GatewayHarness,
) -> None:
    key = priced.consumer("burst", budget=0.000001)
    client = priced.openai(key)

    async def one() -> bool:
        try:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
        except openai.PermissionDeniedError:
            return False
        return True

    first = await asyncio.gather(*(one() for _ in range(8)))
    admitted = sum(first)
    assert admitted >= 1 and len(priced.upstream.sent) == admitted  # the admitted ones were answered and charged
    assert priced.budgets.spent("burst") > 0.000001
    assert not any(await asyncio.gather(*(one() for _ in range(8))))
    assert len(priced.upstream.sent) == admitted
