"""The cost of counting a prompt: large prompts are counted off the event loop, and a consumer already over its limit
is refused before anything is counted. An in-process gateway on in-memory stores; the backend is never reached."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import pytest_asyncio

from shared.clock import SystemClock
from shared.config import Backend, Settings
from shared.edge.consumers import hash_key
from shared.edge.messages import GatewayRequest
from shared.flow import tokens
from shared.flow.gateway import Gateway
from shared.flow.offload import ON_LOOP_BYTES as COUNT_ON_LOOP_BYTES
from shared.limits.limiter import TokenLimiter
from shared.records.consumers import Consumer, Limits
from shared.telemetry.protocol import NullTelemetry
from shared.wiring import build, memory_stores

KEY = "gw-counting-test-key"
SMALL_KEY = "gw-counting-small-key"
TIGHT_KEY = "gw-counting-tight-key"
BACKEND = Backend(id="nowhere", endpoint="http://127.0.0.1:9", region="test", deployments={"gpt-4o": "gpt-4o"},
                  auth="none")


@pytest_asyncio.fixture
async def gateway() -> AsyncIterator[tuple[Gateway, TokenLimiter]]:
    clock = SystemClock()
    stores = memory_stores()
    store = stores.consumers
    await store.put(Consumer(id="big", name="big", key_hash=hash_key(KEY), key_prefix=KEY[:9],
                             limits=Limits(tokens_per_minute=10_000_000)))
    await store.put(Consumer(id="small", name="small", key_hash=hash_key(SMALL_KEY), key_prefix=SMALL_KEY[:9],
                             limits=Limits(tokens_per_minute=10_000)))
    # Room for a 2.7 MB prompt's count (~1.2M tokens), not for its upper bound twice over (its bytes): it is counted.
    await store.put(Consumer(id="tight", name="tight", key_hash=hash_key(TIGHT_KEY), key_prefix=TIGHT_KEY[:9],
                             limits=Limits(tokens_per_minute=4_000_000)))
    settings = Settings(backends=(BACKEND,), max_attempts=1)
    built = build(settings, stores, clock, NullTelemetry(), background=False)  # as shared/app.py builds a worker
    yield Gateway(built.services), built.limiter
    await built.services.upstream.close()


def request(prompt: str, key: str = KEY) -> GatewayRequest:
    body = orjson.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": 10})
    return GatewayRequest("POST", "/openai/deployments/gpt-4o/chat/completions", {"api-version": "2024-10-21"},
                          {"api-key": key, "content-type": "application/json"}, body, "127.0.0.1")


async def test_a_large_prompt_is_counted_while_the_event_loop_keeps_running(
    gateway: tuple[Gateway, TokenLimiter], monkeypatch: pytest.MonkeyPatch
) -> None:
    beats = 0
    during: list[int] = []
    real = tokens.count_chat_prompt

    def counting(body: Any, encoding: Any) -> int:
        if isinstance(encoding, tokens.Utf8Bytes):
            return real(body, encoding)  # the upper bound, measured before counting: not a count
        start = beats
        result = real(body, encoding)
        during.append(beats - start)
        return result

    monkeypatch.setattr(tokens, "count_chat_prompt", counting)

    async def heartbeat() -> None:
        nonlocal beats
        while True:
            await asyncio.sleep(0)
            beats += 1

    ticking = asyncio.get_running_loop().create_task(heartbeat())
    try:
        prompt = " ".join(f"word{i}" for i in range(400_000))  # ~2.7 MB, hundreds of milliseconds of counting
        assert len(prompt) > COUNT_ON_LOOP_BYTES
        await gateway[0].handle(request(prompt, TIGHT_KEY))
        small = await gateway[0].handle(request("hello", TIGHT_KEY))
    finally:
        ticking.cancel()
    assert small.status in (502, 503)  # counted and admitted; the backend is nowhere
    big, tiny = during
    assert big > 10  # the loop ran many times while the large prompt was counted
    assert tiny == 0  # a small prompt is counted in place (no thread hop)


async def test_a_consumer_already_over_its_limit_is_refused_before_its_prompt_is_counted(
    gateway: tuple[Gateway, TokenLimiter], monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, limiter = gateway
    consumer = await gw.s.consumers.authenticate(KEY)
    for _ in range(10):  # fill the minute
        (await limiter.admit(consumer, "gpt-4o", 1_000_000)).settle(1_000_000)
    counted: list[int] = []

    def count(body: Any, encoding: Any) -> int:
        counted.append(1)
        return 1

    monkeypatch.setattr(tokens, "count_chat_prompt", count)
    # The window is full: the first refusal is learnt from the ledger...
    first = await gw.handle(request("x" * 100))
    assert first.status == 429
    counted.clear()
    # ...after which a large prompt is refused from what this instance knows, without counting it.
    refused = await gw.handle(request("y " * COUNT_ON_LOOP_BYTES))
    assert refused.status == 429 and orjson.loads(refused.body)["error"]["code"] == "rate_limit_exceeded"
    assert counted == []


async def test_a_prompt_larger_than_the_whole_minute_is_refused_from_its_size_without_counting(
    gateway: tuple[Gateway, TokenLimiter], monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, _ = gateway
    counted: list[int] = []

    def count(body: Any, encoding: Any) -> int:
        counted.append(1)
        return 1

    monkeypatch.setattr(tokens, "count_chat_prompt", count)
    prompt = "x" * (2 * 1024 * 1024)  # at least 16,384 tokens, whatever it says
    refused = await gw.handle(GatewayRequest(
        "POST", "/openai/deployments/gpt-4o/chat/completions", {"api-version": "2024-10-21"},
        {"api-key": SMALL_KEY, "content-type": "application/json"},
        orjson.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": 10}), "127.0.0.1",
    ))
    assert refused.status == 429 and orjson.loads(refused.body)["error"]["code"] == "tokens_exceed_limit"
    assert counted == []


def test_the_lower_bound_never_exceeds_the_count() -> None:
    import random

    encoding = tokens.get_encoding()
    rng = random.Random(3)
    alphabet = "ab é中😀 \n.,:{}0123456789"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3_000)))
        body = {"messages": [{"role": "user", "content": text}]}
        assert tokens.prompt_lower_bound(body) <= len(encoding.encode(text, disallowed_special=()))
    assert tokens.prompt_lower_bound({"messages": [{"role": "user", "content": "a" * 128 * 1000}]}) == 1000
