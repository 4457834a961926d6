"""The simulated region: capacity (fake clock), exact and re-countable usage, and its faults (in-process server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from aiohttp import web

from shared.tokens import get_encoding
from tools import stack
from tools.simulator.capacity import SlidingWindow
from tools.simulator.responses import VOCABULARY
from tools.simulator.server import DeploymentConfig, RegionConfig, start


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_vocabulary_words_are_single_tokens_in_both_encodings() -> None:
    for name in ("o200k_base", "cl100k_base"):
        encoding = get_encoding(name)
        assert all(len(encoding.encode(w)) == 1 for w in VOCABULARY), name
        text = "".join(VOCABULARY)
        assert len(encoding.encode(text)) == len(VOCABULARY), name


def test_capacity_is_a_sliding_minute_with_a_true_retry_after() -> None:
    clock = Clock()
    window = SlidingWindow(1000, None, clock)
    assert window.admit(600).admitted
    clock.t += 30
    assert window.admit(400).admitted
    refused = window.admit(100)
    assert not refused.admitted and refused.retry_after_s == pytest.approx(30) and refused.remaining_tokens == 0
    clock.t += 29.9  # a fixed minute would have reset by now
    assert not window.admit(100).admitted
    clock.t += 0.2
    assert window.admit(600).admitted
    assert not window.admit(1001).admitted  # larger than the whole capacity


def test_requests_per_minute_and_live_resize() -> None:
    clock = Clock()
    window = SlidingWindow(10_000, 2, clock)
    assert window.admit(1).admitted and window.admit(1).admitted
    assert not window.admit(1).admitted
    window.resize(10_000, 5)
    assert window.admit(1).admitted


@pytest.fixture
async def region() -> AsyncIterator[str]:
    config = RegionConfig(
        region="testregion",
        deployments={"gpt-4o": DeploymentConfig("gpt-4o", tpm=100_000, model="gpt-4o-2024-11-20", completion_tokens=12)},
        api_key="k", latency_ms=1, token_latency_ms=15,
    )
    port = stack.free_port()
    runner: web.AppRunner = await start(config, "127.0.0.1", port)
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def client(url: str) -> openai.AsyncAzureOpenAI:
    return openai.AsyncAzureOpenAI(azure_endpoint=url, api_key="k", api_version="2024-10-21", max_retries=0)


async def test_usage_is_exact_and_streams_really_stream(region: str) -> None:
    encoding = get_encoding("o200k_base")
    result = await client(region).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert result.usage is not None and result.usage.completion_tokens == 5
    assert len(encoding.encode(result.choices[0].message.content or "")) == 5
    arrivals = []
    usage = None
    text = ""
    stream = await client(region).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
    )
    async for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 12 == len(encoding.encode(text))
    assert arrivals[-1] - arrivals[0] >= 11 * 0.015 * 0.8
    async with aiohttp.ClientSession() as session:
        stats = await (await session.get(f"{region}/_sim/stats")).json()
    assert stats["usage"]["completion_tokens"] == 17


async def test_without_include_usage_no_usage_chunk_is_sent(region: str) -> None:
    stream = await client(region).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks)


@pytest.mark.parametrize(
    ("kind", "error"),
    [("500", openai.InternalServerError), ("503", openai.InternalServerError), ("429", openai.RateLimitError),
     ("429-bare", openai.RateLimitError), ("reset", openai.APIConnectionError)],
)
async def test_faults(region: str, kind: str, error: type[Exception]) -> None:
    async with aiohttp.ClientSession() as session:
        await session.post(f"{region}/_sim/faults", json={"kind": kind})
    with pytest.raises(error):
        await client(region).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    # one-shot: the next request is served
    await client(region).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


async def test_cut_stream_and_timeout(region: str) -> None:
    async with aiohttp.ClientSession() as session:
        await session.post(f"{region}/_sim/faults", json={"kind": "cut", "after_chunks": 2})
        await session.post(f"{region}/_sim/faults", json={"kind": "timeout", "delay_s": 2})
        stream = await client(region).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(
                f"{region}/openai/deployments/gpt-4o/chat/completions?api-version=x", headers={"api-key": "k"},
                json={"messages": [{"role": "user", "content": "hi"}]}, timeout=aiohttp.ClientTimeout(total=0.5),
            ):
                pass
        stats = await (await session.get(f"{region}/_sim/stats")).json()
    assert stats["streams_cut"] == 1 and stats["delivered_completion_tokens_in_cut_streams"] == 2


async def test_auth_and_unknown_deployment(region: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncAzureOpenAI(azure_endpoint=region, api_key="wrong", api_version="2024-10-21", max_retries=0).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        await client(region).chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
