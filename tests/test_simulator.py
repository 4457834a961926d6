"""The simulated region over real HTTP on loopback, driven by the official openai SDK (and raw aiohttp where the SDK
would hide what is on the wire): Azure's shapes and headers, exact usage, real streaming, capacity, faults, control."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import orjson
import pytest
import pytest_asyncio
from openai.types.chat import ChatCompletionMessageParam

from shared.flow.tokens import (
    count_chat_prompt,
    count_completion_prompt,
    count_embedding_input,
    count_text,
    encoding_for,
)
from tools.simulator.capacity import LeakyBucket, SlidingWindow
from tools.simulator.config import DeploymentConfig, RegionConfig
from tools.simulator.server import Running, start

ROOT = Path(__file__).resolve().parent.parent
KEY = "sim-test-key"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story about a fox."}]
TOKEN_LATENCY_MS = 15
CONFIG = RegionConfig(
    region="testregion",
    deployments=(
        DeploymentConfig("gpt-4o", tpm=100_000, model="gpt-4o-2024-11-20", completion_tokens=12),
        DeploymentConfig("gpt-35", tpm=100_000, model="gpt-35-turbo"),  # cl100k_base; the region's default length
        DeploymentConfig("small", tpm=1_000, model="gpt-4o-mini-2024-07-18"),
        DeploymentConfig("emb", tpm=100_000, model="text-embedding-3-small", dimensions=64),
    ),
    api_key=KEY, latency_ms=1, token_latency_ms=TOKEN_LATENCY_MS, completion_tokens=20,
)


class Clock:
    """Capacity's clock, moved by hand: a 429's Retry-After is checked without waiting for it."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[Running]:
    running = await start(CONFIG, "127.0.0.1", 0, clock=Clock())
    yield running
    await running.cleanup()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Clients:
    """SDK clients for one test, closed at its end (before the event loop is)."""

    def __init__(self, sim: Running) -> None:
        self.sim = sim
        self.made: list[openai.AsyncOpenAI] = []

    def azure(self, key: str = KEY) -> openai.AsyncAzureOpenAI:
        client = openai.AsyncAzureOpenAI(azure_endpoint=self.sim.url, api_key=key, api_version="2024-10-21", max_retries=0)
        self.made.append(client)
        return client

    def v1(self) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.sim.url + "/v1", api_key=KEY, max_retries=0)
        self.made.append(client)
        return client


@pytest_asyncio.fixture
async def sdk(sim: Running) -> AsyncIterator[Clients]:
    clients = Clients(sim)
    yield clients
    for client in clients.made:
        await client.close()


def clock(sim: Running) -> Clock:
    window = sim.region.windows["small"]
    assert isinstance(window, SlidingWindow)
    return window._clock  # type: ignore[return-value]


async def control(http: aiohttp.ClientSession, sim: Running, method: str, path: str, body: Any = None) -> Any:
    async with http.request(method, f"{sim.url}/_sim/{path}", json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def sse(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[tuple[float, bytes]]:
    """The raw events of a stream with their arrival times."""
    events: list[tuple[float, bytes]] = []
    async with http.post(url, json=body, headers={"api-key": KEY}) as response:
        assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")
        async for line in response.content:
            if line.startswith(b"data: "):
                events.append((time.monotonic(), line[6:].strip()))
    return events


def assert_region_headers(headers: Any) -> None:
    assert headers["x-ms-region"] == "testregion"
    assert len(headers["apim-request-id"]) == 36 and headers["x-request-id"] == headers["apim-request-id"]


# ---- bodies, usage, headers -------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(("deployment", "expected_tokens"), [("gpt-4o", 12), ("gpt-35", 20)])
async def test_chat_is_azure_shaped_with_exact_recountable_usage(sim: Running, sdk: Clients, deployment: str, expected_tokens: int) -> None:
    raw = await sdk.azure().chat.completions.with_raw_response.create(model=deployment, messages=MESSAGES)
    assert_region_headers(raw.headers)
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 100_000 and "x-ratelimit-remaining-requests" in raw.headers
    result = raw.parse()
    model = sim.region.deployments[deployment].model_name
    enc = encoding_for(model)
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion" and result.model == model
    assert result.choices[0].finish_reason == "stop" and result.choices[0].message.role == "assistant"
    assert result.system_fingerprint and result.model_extra and result.model_extra["prompt_filter_results"]
    usage = result.usage
    assert usage is not None and usage.completion_tokens == expected_tokens
    assert usage.prompt_tokens == count_chat_prompt({"messages": MESSAGES}, enc)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details and usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details and usage.completion_tokens_details.reasoning_tokens == 0
    assert count_text(result.choices[0].message.content or "", enc) == usage.completion_tokens


@pytest.mark.asyncio
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_truncates_with_finish_reason_length(sim: Running, sdk: Clients, field: str) -> None:
    result = await sdk.v1().chat.completions.create(model="gpt-4o", messages=MESSAGES, **{field: 5})  # type: ignore[call-overload]
    assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 5
    assert count_text(result.choices[0].message.content, encoding_for("gpt-4o")) == 5
    longer = await sdk.v1().chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=500)
    assert longer.choices[0].finish_reason == "stop" and longer.usage is not None and longer.usage.completion_tokens == 12


@pytest.mark.asyncio
async def test_text_completions_over_the_v1_path(sim: Running, sdk: Clients) -> None:
    result = await sdk.v1().completions.create(model="gpt-35", prompt=["Once upon", "a time"], max_tokens=7)
    enc = encoding_for("gpt-35-turbo")
    assert result.object == "text_completion" and result.id.startswith("cmpl-") and result.model == "gpt-35-turbo"
    assert result.usage is not None and result.usage.completion_tokens == 7 == count_text(result.choices[0].text, enc)
    assert result.usage.prompt_tokens == count_completion_prompt({"prompt": ["Once upon", "a time"]}, enc)


@pytest.mark.asyncio
async def test_embeddings_in_base64_by_default_and_as_floats(sim: Running, sdk: Clients) -> None:
    texts = ["the quick brown fox", "jumps over the lazy dog"]
    packed = await sdk.azure().embeddings.create(model="emb", input=texts)  # the SDK asks for base64 and decodes it
    assert sim.region.recent[-1]["body"]["encoding_format"] == "base64"
    floats = await sdk.v1().embeddings.create(model="emb", input=texts, encoding_format="float")
    assert [d.embedding for d in packed.data] == [d.embedding for d in floats.data]
    assert len(packed.data) == 2 and len(packed.data[0].embedding) == 64
    assert packed.usage.prompt_tokens == packed.usage.total_tokens == count_embedding_input({"input": texts}, encoding_for("text-embedding-3-small"))
    shorter = await sdk.v1().embeddings.create(model="emb", input="hi", dimensions=8)
    assert len(shorter.data[0].embedding) == 8


@pytest.mark.asyncio
async def test_models_lists_the_deployments(sim: Running, sdk: Clients) -> None:
    models = await sdk.v1().models.list()
    assert sorted(m.id for m in models.data) == ["emb", "gpt-35", "gpt-4o", "small"]


@pytest.mark.asyncio
async def test_auth_api_version_and_unknown_deployment_errors_are_azure_shaped(sim: Running, sdk: Clients, http: aiohttp.ClientSession) -> None:
    with pytest.raises(openai.AuthenticationError) as denied:
        await sdk.azure(key="wrong").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    error = denied.value.response.json()["error"]
    assert error["code"] == "401" and error["message"].startswith("Access denied due to invalid subscription key")
    assert_region_headers(denied.value.response.headers)
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.azure().chat.completions.create(model="nope", messages=MESSAGES)
    assert missing.value.response.json()["error"]["code"] == "DeploymentNotFound"
    chat = f"{sim.url}/openai/deployments/gpt-4o/chat/completions"
    async with http.post(chat, json={"messages": MESSAGES}, headers={"api-key": KEY}) as response:
        assert response.status == 400 and "api-version" in (await response.json())["error"]["message"]
        assert_region_headers(response.headers)
    async with http.post(chat + "?api-version=2024-10-21", json={"messages": MESSAGES}, headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status == 200
    async with http.post(chat + "?api-version=2024-10-21", json={"max_tokens": 5}, headers={"api-key": KEY}) as response:
        assert response.status == 400 and (await response.json())["error"]["param"] == "messages"
    async with http.get(f"{sim.url}/openai/nothing/here") as response:
        assert response.status == 404 and (await response.json())["error"]["code"] == "404"


# ---- streaming --------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_stream_follows_azures_sequence_and_really_streams(sim: Running, http: aiohttp.ClientSession) -> None:
    url = f"{sim.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    events = await sse(http, url, {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1][1] == b"[DONE]"
    chunks = [orjson.loads(data) for _, data in events[:-1]]
    first, role, *content, finish, usage = chunks
    assert first["choices"] == [] and first["prompt_filter_results"]
    assert role["choices"][0]["delta"] == {"content": "", "refusal": None, "role": "assistant"}
    assert len(content) == 12 and all(set(c["choices"][0]["delta"]) == {"content"} for c in content)
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    assert all(c["usage"] is None for c in [role, *content, finish])  # as OpenAI does once usage is asked for
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert count_text(text, encoding_for("gpt-4o-2024-11-20")) == 12
    assert usage["usage"]["prompt_tokens"] == count_chat_prompt({"messages": MESSAGES}, encoding_for("gpt-4o-2024-11-20"))
    # Each chunk left when it was made: from the first event to the last token spans ~12 token latencies.
    spread = events[13][0] - events[0][0]
    assert 12 * TOKEN_LATENCY_MS / 1000 * 0.8 <= spread <= 12 * TOKEN_LATENCY_MS / 1000 + 0.5


@pytest.mark.asyncio
async def test_sdk_stream_with_and_without_include_usage(sim: Running, sdk: Clients) -> None:
    stream = await sdk.v1().chat.completions.create(model="gpt-35", messages=MESSAGES, stream=True, max_tokens=9)
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks)
    assert sim.region.stats.usage["total_tokens"] == 0  # nothing was reported, so nothing counts as reported
    stream = await sdk.v1().chat.completions.create(
        model="gpt-35", messages=MESSAGES, stream=True, max_tokens=9, stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    with_usage = [c for c in chunks if c.usage is not None]
    assert with_usage == [chunks[-1]] and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert with_usage[0].usage is not None and with_usage[0].usage.completion_tokens == 9
    assert count_text(text, encoding_for("gpt-35-turbo")) == 9
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]


@pytest.mark.asyncio
async def test_stats_usage_is_exactly_what_callers_were_told(sim: Running, sdk: Clients, http: aiohttp.ClientSession) -> None:
    seen = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    def add(usage: Any) -> None:
        for key in seen:
            seen[key] += getattr(usage, key, 0) or 0

    client = sdk.azure()
    add((await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)).usage)
    add((await client.completions.create(model="gpt-35", prompt="Once", max_tokens=3)).usage)
    add((await client.embeddings.create(model="emb", input=["a b c", "d"])).usage)
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage:
            add(chunk.usage)
    unreported = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    async for _ in unreported:
        pass
    stats = await control(http, sim, "GET", "stats")
    assert stats["usage"] == seen
    assert sum(d["total_tokens"] for d in stats["usage_by_deployment"].values()) == seen["total_tokens"]
    prompt = count_chat_prompt({"messages": MESSAGES}, encoding_for("gpt-4o"))
    assert stats["billed"]["total_tokens"] == seen["total_tokens"] + prompt + 12  # the stream that reported nothing
    assert stats["requests"] == 5 and stats["by_status"] == {"200": 5}


@pytest.mark.asyncio
async def test_a_caller_leaving_mid_stream_is_recorded(sim: Running, http: aiohttp.ClientSession) -> None:
    url = f"{sim.url}/v1/chat/completions"
    async with http.post(url, json={"model": "gpt-4o", "messages": MESSAGES, "stream": True}, headers={"api-key": KEY}) as response:
        words = 0
        async for line in response.content:
            words += b'"content":" ' in line
            if words == 2:
                break
    for _ in range(100):
        if sim.region.stats.streams_abandoned:
            break
        await asyncio.sleep(0.02)
    assert sim.region.stats.streams_abandoned == 1 and 2 <= sim.region.stats.unreported["completion_tokens"] < 12


# ---- capacity -----------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_429_carries_the_true_retry_after_and_azures_headers(sim: Running, sdk: Clients, http: aiohttp.ClientSession) -> None:
    client = sdk.azure()
    enc = encoding_for("gpt-4o-mini")
    charge = count_chat_prompt({"messages": MESSAGES}, enc) + 400
    first = await client.chat.completions.with_raw_response.create(model="small", messages=MESSAGES, max_tokens=400)
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 1000 - charge
    clock(sim).t += 20
    await client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=400)
    clock(sim).t += 10.5
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=400)
    headers = refused.value.response.headers
    assert_region_headers(headers)
    assert headers["retry-after"] == "30" and headers["retry-after-ms"] == "29500"  # the first charge leaves at +60
    assert headers["x-ratelimit-reset-tokens"] == "30s"
    assert int(headers["x-ratelimit-remaining-tokens"]) == 1000 - 2 * charge and "x-ratelimit-remaining-requests" in headers
    error = refused.value.response.json()["error"]
    assert error["code"] == "429" and "ChatCompletions_Create" in error["message"]
    assert "token rate limit" in error["message"] and "Please retry after 30 seconds" in error["message"]
    clock(sim).t += 29.5
    await client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=400)
    with pytest.raises(openai.RateLimitError) as never:  # larger than the whole capacity: a day, and room shown
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=100_001)
    headers = never.value.response.headers
    assert headers["retry-after"] == "86400" and int(headers["x-ratelimit-remaining-tokens"]) > 0
    stats = await control(http, sim, "GET", "stats")
    assert stats["by_status"] == {"200": 3, "429": 2} and len(stats["throttled"]) == 2


@pytest.mark.asyncio
async def test_capacity_and_rpm_change_live(sim: Running, sdk: Clients, http: aiohttp.ClientSession) -> None:
    client = sdk.azure()
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=2000)
    assert await control(http, sim, "POST", "capacity", {"deployment": "small", "tpm": 5000, "rpm": 1}) == {
        "deployment": "small", "tpm": 5000, "rpm": 1,
    }
    await client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=2000)
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=1)
    assert "call rate limit" in refused.value.message and refused.value.response.headers["x-ratelimit-reset-requests"] == "60s"
    await control(http, sim, "POST", "capacity", {"deployment": "small", "tpm": 5000, "rpm": None})
    await client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=1)
    async with http.post(f"{sim.url}/_sim/capacity", json={"deployment": "nope", "tpm": 1}) as response:
        assert response.status == 404
    async with http.post(f"{sim.url}/_sim/capacity", json={"deployment": "small", "tpm": -1}) as response:
        assert response.status == 400


PTU_CONFIG = RegionConfig(
    region="testregion",
    deployments=(DeploymentConfig("ptu", tpm=6000, model="gpt-4o-2024-11-20", ptu=True, burst_s=10),),  # 100 tokens/s
    api_key=KEY, latency_ms=0, token_latency_ms=50, completion_tokens=20,  # a stream lasts a second
)


@pytest_asyncio.fixture
async def ptu_sim() -> AsyncIterator[Running]:
    running = await start(PTU_CONFIG, "127.0.0.1", 0, clock=Clock())
    yield running
    await running.cleanup()


@pytest.mark.asyncio
async def test_a_provisioned_deployment_admits_by_utilisation_and_says_when_it_is_back_under_100_percent(
    ptu_sim: Running, http: aiohttp.ClientSession
) -> None:
    client = openai.AsyncAzureOpenAI(azure_endpoint=ptu_sim.url, api_key=KEY, api_version="2024-10-21", max_retries=0)
    utilisation = ptu_sim.region.windows["ptu"]
    assert isinstance(utilisation, LeakyBucket)
    ptu_clock: Clock = utilisation._clock  # type: ignore[assignment]
    prompt = count_chat_prompt({"messages": MESSAGES}, encoding_for("gpt-4o-2024-11-20"))
    # 100 % is 1000 tokens, and the clock stands still: nothing drains unless the test moves it.
    first = await client.chat.completions.with_raw_response.create(model="ptu", messages=MESSAGES, max_tokens=900)
    assert "x-ratelimit-remaining-tokens" not in first.headers and "x-ratelimit-remaining-requests" not in first.headers
    assert utilisation.used_tokens == prompt + 20  # charged prompt + 900, corrected to the 20 it generated
    await client.chat.completions.create(model="ptu", messages=MESSAGES, max_tokens=900)
    held = await client.chat.completions.create(model="ptu", messages=MESSAGES, max_tokens=900, stream=True)
    assert utilisation.used_tokens == 3 * prompt + 2 * 20 + 900 > 1000  # admitted below 100 %, now over it
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(model="ptu", messages=MESSAGES, max_tokens=1)
    headers = refused.value.response.headers
    over = utilisation.used_tokens - 1000
    assert headers["retry-after-ms"] == str(over * 10)  # 100 tokens/s drain: 10 ms a token
    assert headers["retry-after"] == str(-(-over * 10 // 1000))  # whole seconds, rounded up
    assert not any(name.startswith("x-ratelimit") for name in headers)
    assert refused.value.response.json()["error"]["code"] == "429"
    ptu_clock.t += (over * 10 - 1) / 1000
    with pytest.raises(openai.RateLimitError) as again:
        await client.chat.completions.create(model="ptu", messages=MESSAGES, max_tokens=1)
    assert again.value.response.headers["retry-after-ms"] == "1"
    ptu_clock.t += 0.001
    await client.chat.completions.create(model="ptu", messages=MESSAGES, max_tokens=1)  # back at 100 %: admitted
    async for _ in held:  # the held stream ends: its 900 are corrected to the 20 it generated
        pass
    assert utilisation.used_tokens == 1000 + prompt + 1 - 880
    await client.close()
    stats = await control(http, ptu_sim, "GET", "stats")
    assert stats["by_status"] == {"200": 4, "429": 2}
    assert sorted(n for _, d, n in stats["provisioned"]) == sorted([prompt + 20] * 3 + [prompt + 1])
    config = await control(http, ptu_sim, "GET", "config")
    assert config["deployments"][0]["ptu"] is True and config["deployments"][0]["burst_s"] == 10
    async with http.post(f"{ptu_sim.url}/_sim/capacity", json={"deployment": "ptu", "tpm": 6000, "rpm": 5}) as response:
        assert response.status == 400


# ---- faults -------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kind", "error", "retry_after"),
    [
        ("500", openai.InternalServerError, None),
        ("503", openai.InternalServerError, "1"),
        ("429", openai.RateLimitError, "2"),
        ("429-ptu", openai.RateLimitError, "1"),
        ("429-huge", openai.RateLimitError, "86400"),
        ("429-bare", openai.RateLimitError, None),
        ("reset", openai.APIConnectionError, None),
    ],
)
async def test_fault_kinds(sim: Running, sdk: Clients, http: aiohttp.ClientSession, kind: str, error: type[Exception], retry_after: str | None) -> None:
    await control(http, sim, "POST", "faults", {"kind": kind})
    with pytest.raises(error) as caught:
        await sdk.azure().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    if isinstance(caught.value, openai.APIStatusError):
        headers = caught.value.response.headers
        assert_region_headers(headers)
        assert headers.get("retry-after") == retry_after
        if kind == "429-bare":
            assert not any(h.startswith(("retry-after", "x-ratelimit")) for h in headers)
        if kind == "429-huge":
            assert headers["retry-after-ms"] == "86400000"
        if kind == "429-ptu":  # exactly what a full provisioned deployment sends: the two waits and no quota figures
            assert headers["retry-after-ms"] == "50" and not any(h.startswith("x-ratelimit") for h in headers)
    await sdk.azure().chat.completions.create(model="gpt-4o", messages=MESSAGES)  # one-shot: the next is served
    stats = await control(http, sim, "GET", "stats")
    expected = {"reset": "reset", "503": "503", "500": "500"}.get(kind, "429")
    assert stats["by_status"] == {expected: 1, "200": 1}


@pytest.mark.asyncio
async def test_malformed_json_in_a_body_and_in_a_stream(sim: Running, http: aiohttp.ClientSession) -> None:
    await control(http, sim, "POST", "faults", {"kind": "malformed", "count": 2})
    url = f"{sim.url}/v1/chat/completions"
    async with http.post(url, json={"model": "gpt-4o", "messages": MESSAGES}, headers={"api-key": KEY}) as response:
        assert response.status == 200
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(await response.read())
    events = await sse(http, url, {"model": "gpt-4o", "messages": MESSAGES, "stream": True})
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(events[0][1])


@pytest.mark.asyncio
async def test_cut_streams_drop_without_done_and_count_what_was_delivered(sim: Running, sdk: Clients, http: aiohttp.ClientSession) -> None:
    await control(http, sim, "POST", "faults", {"kind": "cut", "after_chunks": 4, "deployment": "gpt-4o"})
    stream = await sdk.azure().chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
    )
    delivered = 0
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        async for chunk in stream:
            delivered += bool(chunk.choices and chunk.choices[0].delta.content)
    assert delivered == 4
    await control(http, sim, "POST", "faults", {"kind": "cut"})
    with pytest.raises(openai.APIConnectionError):  # not streamed: headers and half the body
        await sdk.azure().chat.completions.create(model="gpt-35", messages=MESSAGES)
    stats = await control(http, sim, "GET", "stats")
    assert stats["streams_cut"] == 2 and stats["delivered_completion_tokens_in_cut_streams"] == 4
    assert stats["usage"]["total_tokens"] == 0 and stats["unreported"]["completion_tokens"] == 4


@pytest.mark.asyncio
async def test_timeout_and_slow(sim: Running, sdk: Clients, http: aiohttp.ClientSession) -> None:
    await control(http, sim, "POST", "faults", {"kind": "timeout", "delay_s": 2})
    with pytest.raises(openai.APITimeoutError):
        await sdk.azure().with_options(timeout=0.3, max_retries=0).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    # The prompt was read and nothing was answered: kept apart from what was billed (bench/soak.py's books).
    stats = await control(http, sim, "GET", "stats")
    prompt = count_chat_prompt({"messages": MESSAGES}, encoding_for("gpt-4o"))
    assert stats["unanswered"] == {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt, "requests": 1}
    assert stats["billed"]["total_tokens"] == 0
    await control(http, sim, "POST", "faults", {"kind": "slow", "delay_s": 0.3})
    started = time.monotonic()
    result = await sdk.azure().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert time.monotonic() - started >= 0.3 and result.usage is not None


@pytest.mark.asyncio
async def test_faults_by_deployment_until_cleared(sim: Running, sdk: Clients, http: aiohttp.ClientSession) -> None:
    queued = await control(http, sim, "POST", "faults", {"kind": "500", "count": -1, "deployment": "gpt-4o"})
    assert queued["queued"] == 1 and queued["faults"][0]["deployment"] == "gpt-4o"
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            await sdk.azure().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    await sdk.azure().chat.completions.create(model="gpt-35", messages=MESSAGES)
    assert (await control(http, sim, "DELETE", "faults"))["queued"] == 0
    await sdk.azure().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    async with http.post(f"{sim.url}/_sim/faults", json={"kind": "teapot"}) as response:
        assert response.status == 400 and "unknown fault kind" in (await response.json())["error"]


@pytest.mark.asyncio
async def test_a_cut_waits_for_a_request_the_region_admits(sim: Running, sdk: Clients, http: aiohttp.ClientSession) -> None:
    await control(http, sim, "POST", "faults", {"kind": "cut", "deployment": "small"})
    with pytest.raises(openai.RateLimitError):
        await sdk.azure().chat.completions.create(model="small", messages=MESSAGES, max_tokens=5000)
    assert (await control(http, sim, "GET", "faults"))["queued"] == 1


# ---- control ------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_recorded_requests_latency_and_reset(sim: Running, sdk: Clients, http: aiohttp.ClientSession) -> None:
    await sdk.azure().chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers={"x-user-id": "alice"})
    with pytest.raises(openai.AuthenticationError):
        await sdk.azure(key="wrong").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    recorded = await control(http, sim, "GET", "requests?limit=2")
    ok, denied = recorded
    assert ok["method"] == "POST" and ok["path"] == "/openai/deployments/gpt-4o/chat/completions"
    assert ok["query"] == {"api-version": "2024-10-21"} and ok["body"]["messages"] == MESSAGES
    assert ok["headers"]["x-user-id"] == "alice" and ok["headers"]["api-key"] == KEY
    assert denied["headers"]["api-key"] == "wrong"  # recorded even when refused
    assert len(await control(http, sim, "GET", "requests?limit=1")) == 1

    latency = await control(http, sim, "POST", "latency", {"latency_ms": 150, "token_latency_ms": 1})
    assert latency == {"latency_ms": 150.0, "token_latency_ms": 1.0, "pace_non_streaming": False}
    started = time.monotonic()
    await sdk.azure().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert time.monotonic() - started >= 0.15

    await control(http, sim, "POST", "capacity", {"deployment": "gpt-4o", "tpm": 10})
    await control(http, sim, "POST", "faults", {"kind": "500", "count": -1})
    assert await control(http, sim, "POST", "reset") == {"reset": True}
    stats = await control(http, sim, "GET", "stats")
    assert stats["requests"] == 0 and stats["usage"]["total_tokens"] == 0
    assert await control(http, sim, "GET", "requests") == []
    config = await control(http, sim, "GET", "config")
    assert config["latency_ms"] == 1 and config["deployments"][0]["tpm"] == 100_000
    await sdk.azure().chat.completions.create(model="gpt-4o", messages=MESSAGES)  # no fault, capacity restored


# ---- the CLI ------------------------------------------------------------------------------------------------------


@pytest.mark.process
def test_cli_serves_several_regions_and_stops_on_sigterm(tmp_path: Path) -> None:
    regions = [
        {"region": name, "port": 0, "api_key": KEY, "latency_ms": 0, "deployments": ["gpt-4o:tpm=1000,model=gpt-4o-2024-11-20"]}
        for name in ("uksouth", "swedencentral")
    ]
    spec = tmp_path / "regions.json"
    spec.write_bytes(orjson.dumps(regions))
    process = subprocess.Popen(
        [sys.executable, "-m", "tools.simulator", "--regions-json", str(spec)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().decode().strip() for _ in regions]
        urls = {line.split()[1]: line.split()[-1] for line in lines}
        assert set(urls) == {"uksouth", "swedencentral"} and all(line.split()[2:4] == ["listening", "on"] for line in lines)
        for name, url in urls.items():
            response = httpx.post(f"{url}/v1/chat/completions", headers={"api-key": KEY},
                                  json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 2})
            assert response.status_code == 200 and response.headers["x-ms-region"] == name
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ---- older api-versions, n choices, streams without usage (issue 13) ----------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(("version", "accepted"), [("2024-06-01", False), ("2024-02-01", False),
                                                   ("2024-08-01-preview", False), ("2024-09-01-preview", True),
                                                   ("2024-10-21", True), ("preview", True)])
async def test_stream_options_are_refused_on_api_versions_before_2024_09_01(
    sim: Running, http: aiohttp.ClientSession, version: str, accepted: bool
) -> None:
    url = f"{sim.url}/openai/deployments/gpt-4o/chat/completions?api-version={version}"
    body = {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(url, json=body, headers={"api-key": KEY}) as response:
        if accepted:
            assert response.status == 200
            await response.read()
            return
        assert response.status == 400
        assert (await response.json())["error"]["message"] == "Unrecognized request argument supplied: stream_options"
    # Without the field, an old version streams (and, never asked, reports no usage).
    events = await sse(http, url, {"messages": MESSAGES, "stream": True})
    assert events[-1][1] == b"[DONE]" and all(b'"usage":{' not in data for _, data in events)


@pytest.mark.asyncio
async def test_n_choices_are_generated_and_billed(sim: Running, http: aiohttp.ClientSession) -> None:
    url = f"{sim.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    async with http.post(url, json={"messages": MESSAGES, "n": 3}, headers={"api-key": KEY}) as response:
        whole = await response.json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    assert whole["usage"]["completion_tokens"] == 36
    events = await sse(http, url, {"messages": MESSAGES, "n": 3, "stream": True, "stream_options": {"include_usage": True}})
    chunks = [orjson.loads(data) for _, data in events[:-1]]
    indexes = {c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0].get("delta", {}).get("content")}
    assert indexes == {0, 1, 2} and chunks[-1]["usage"]["completion_tokens"] == 36


@pytest.mark.asyncio
async def test_a_no_usage_fault_streams_without_the_usage_chunk_it_was_asked_for(
    sim: Running, http: aiohttp.ClientSession
) -> None:
    await control(http, sim, "POST", "faults", {"kind": "no-usage"})
    url = f"{sim.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    events = await sse(http, url, {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1][1] == b"[DONE]" and all(b'"usage":{' not in data for _, data in events)


@pytest.mark.asyncio
async def test_a_bare_done_fault_ends_the_stream_as_the_aoai_api_simulator_does(
    sim: Running, http: aiohttp.ClientSession
) -> None:
    await control(http, sim, "POST", "faults", {"kind": "bare-done"})
    url = f"{sim.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    async with http.post(url, json={"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}},
                         headers={"api-key": KEY}) as response:
        raw = await response.read()
    assert raw.endswith(b"\n\n[DONE]") and b"data: [DONE]" not in raw and b'"usage":{' not in raw
