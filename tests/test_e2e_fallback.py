"""Fallback across models end to end: simulated regions serving two models (gpt-4o-mini and gpt-4o), gateway processes
with GATEWAY_DEPLOYMENTS, the official SDK as client.

These gateways get backend ids of their own (their breakers are shared through Table Storage by backend id), so a
deployment throttled here disturbs no other test.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import openai
import pytest

from tests.conftest import unique
from tests.e2e import Stack
from tools import stack

pytestmark = pytest.mark.e2e
MINI, FOUR_O = "gpt-4o-mini", "gpt-4o"
MESSAGES = [{"role": "user", "content": "Write a haiku about fallbacks."}]


def regions(e2e: Stack) -> list[stack.Region]:
    tag = unique("fb")
    return [stack.Region(f"{tag}-{sim.region.region}", sim.region.region, sim.region.port, priority=i + 1)
            for i, sim in enumerate(e2e.simulators)]


def start(e2e: Stack, gateway_factory: Callable[..., stack.Child], catalog: dict[str, object]) -> stack.Child:
    return gateway_factory({"GATEWAY_DEPLOYMENTS": json.dumps(catalog)}, regions=regions(e2e))


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def throttle(e2e: Stack, deployment: str, retry_after_s: float = 5.0) -> None:
    for sim in e2e.simulators:
        sim.fault("429", count=-1, deployment=deployment, delay_s=retry_after_s)


def served(e2e: Stack, deployment: str) -> int:
    """Tokens the regions reported for the deployment's answers."""
    return sum(sim.stats()["usage_by_deployment"].get(deployment, {}).get("total_tokens", 0) for sim in e2e.simulators)


def sent(e2e: Stack, deployment: str) -> int:
    """Requests the regions received for the deployment."""
    return sum(1 for sim in e2e.simulators for r in sim.requests(200) if f"/deployments/{deployment}/" in r["path"])


def test_every_region_of_the_first_throttled_the_sdk_gets_200_from_the_second_chat_and_streaming(
    fresh_sims: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    e2e = fresh_sims
    gateway = start(e2e, gateway_factory, {MINI: {"fallback": [FOUR_O]}})
    consumer = unique("fb-app")
    key = e2e.create_consumer(consumer, tpm=200_000, deployment_tpm={MINI: 100_000, FOUR_O: 100_000})
    throttle(e2e, MINI)
    c = client(gateway.url, key)
    raw = c.chat.completions.with_raw_response.create(model=MINI, messages=MESSAGES, max_tokens=20)  # type: ignore[arg-type]
    completion = raw.parse()
    assert raw.headers["x-gateway-deployment"] == FOUR_O and completion.choices[0].message.content
    assert completion.model.startswith("gpt-4o") and "mini" not in completion.model  # the backend's model
    chunks = list(c.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=20, stream=True))  # type: ignore[arg-type]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text
    assert served(e2e, MINI) == 0 and sent(e2e, MINI) >= len(e2e.simulators)  # every region asked, none served
    assert completion.usage is not None
    # The books: what the backends reported for the two answers, all under gpt-4o.
    charged = e2e.charged(consumer)
    ledger = e2e.ledger(consumer)
    assert sum(ledger.windows.get(f"d:{MINI}", {}).values()) == 0
    assert sum(ledger.windows.get(f"d:{FOUR_O}", {}).values()) == charged
    rows = e2e.usage_rows(consumer)
    assert {row.deployment for row in rows} == {FOUR_O}


def test_a_content_filter_400_is_returned_as_is(
    fresh_sims: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    e2e = fresh_sims
    gateway = start(e2e, gateway_factory, {MINI: {"fallback": [FOUR_O]}})
    key = e2e.create_consumer(unique("fb-filtered"))
    e2e.simulators[0].fault("content-filter", deployment=MINI)
    with pytest.raises(openai.BadRequestError) as raised:
        client(gateway.url, key).chat.completions.create(model=MINI, messages=MESSAGES)  # type: ignore[arg-type]
    assert raised.value.code == "content_filter"
    body = raised.value.body
    assert isinstance(body, dict) and body["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    assert raised.value.response.headers["x-gateway-deployment"] == MINI
    assert sent(e2e, MINI) == 1 and sent(e2e, FOUR_O) == 0  # neither another region nor another model


def test_a_prompt_too_large_for_the_fallbacks_window_skips_it(
    fresh_sims: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    e2e = fresh_sims
    gateway = start(e2e, gateway_factory, {MINI: {"fallback": [FOUR_O]}, FOUR_O: {"context_window": 200}})
    key = e2e.create_consumer(unique("fb-large"))
    throttle(e2e, MINI)
    long_prompt = [{"role": "user", "content": "word " * 400}]
    response = httpx.post(f"{gateway.url}/v1/chat/completions", headers={"api-key": key}, timeout=30,
                          json={"model": MINI, "messages": long_prompt, "max_tokens": 10})
    assert response.status_code == 429 and response.json()["error"]["code"] == "backends_busy"
    assert sent(e2e, FOUR_O) == 0
    # A short prompt fits gpt-4o's window: it falls back.
    response = httpx.post(f"{gateway.url}/v1/chat/completions", headers={"api-key": key}, timeout=30,
                          json={"model": MINI, "messages": MESSAGES, "max_tokens": 10})
    assert response.status_code == 200 and response.headers["x-gateway-deployment"] == FOUR_O


def test_a_consumer_with_fallback_off_gets_the_429_with_the_true_retry_after(
    fresh_sims: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    e2e = fresh_sims
    gateway = start(e2e, gateway_factory, {MINI: {"fallback": [FOUR_O]}})
    consumer = unique("fb-strict")
    key = e2e.create_consumer(consumer)
    e2e.update_consumer(consumer, fallback=False)
    throttle(e2e, MINI, retry_after_s=12)
    with pytest.raises(openai.RateLimitError) as raised:
        client(gateway.url, key).chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=5)  # type: ignore[arg-type]
    retry_after = int(raised.value.response.headers["retry-after"])
    assert 11 <= retry_after <= 12  # what the regions said, less the time spent asking them
    assert sent(e2e, FOUR_O) == 0
