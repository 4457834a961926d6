"""The simulated region's Responses API over real HTTP, driven by the official openai SDK: both paths, streamed events,
exact usage, stored responses per region, background and cancel, its own 429s and faults."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from shared.flow.responses import count_input
from shared.flow.tokens import count_text, encoding_for
from tools.simulator.config import DeploymentConfig, RegionConfig
from tools.simulator.server import Running, start

KEY = "sim-test-key"
CONFIG = RegionConfig(
    region="testregion",
    deployments=(
        DeploymentConfig("gpt-4o", tpm=100_000, model="gpt-4o-2024-11-20", completion_tokens=12),
        DeploymentConfig("small", tpm=200, model="gpt-4o-mini-2024-07-18"),
    ),
    api_key=KEY, latency_ms=1, token_latency_ms=1, completion_tokens=20,
)
ENC = encoding_for("gpt-4o-2024-11-20")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest_asyncio.fixture
async def sims() -> AsyncIterator[tuple[Running, Running]]:
    first = await start(CONFIG, "127.0.0.1", 0, clock=Clock())
    second = await start(CONFIG, "127.0.0.1", 0, clock=Clock())
    yield first, second
    await first.cleanup()
    await second.cleanup()


async def control(method: str, url: str, **kwargs: Any) -> httpx.Response:
    # Async: the simulator runs in this test's event loop, so a blocking call would never be answered.
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.request(method, url, **kwargs)


def v1(sim: Running) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{sim.url}/openai/v1", api_key=KEY, max_retries=0)


def preview(sim: Running) -> openai.AsyncAzureOpenAI:
    return openai.AsyncAzureOpenAI(azure_endpoint=sim.url, api_key=KEY, api_version="2025-04-01-preview", max_retries=0)


@pytest.mark.asyncio
@pytest.mark.parametrize("style", ["v1", "preview"])
async def test_create_with_exact_usage_and_a_stored_follow_up(sims: tuple[Running, Running], style: str) -> None:
    sim = sims[0]
    client = v1(sim) if style == "v1" else preview(sim)
    body: dict[str, Any] = {"model": "gpt-4o", "input": "Tell me about the fox.", "instructions": "Be brief."}
    first = await client.responses.create(**body)
    assert first.status == "completed" and first.id.startswith("resp_")
    assert first.usage is not None and first.usage.input_tokens == count_input(body, ENC)
    assert first.usage.output_tokens == 12 == count_text(first.output_text, ENC)
    follow = {"model": "gpt-4o", "input": [{"role": "user", "content": "And then?"}], "max_output_tokens": 5,
              "previous_response_id": first.id}
    second = await client.responses.create(**follow)
    assert second.status == "incomplete" and second.usage is not None
    assert second.usage.input_tokens == count_input(follow, ENC, first.usage.input_tokens + first.usage.output_tokens)
    assert second.usage.output_tokens == 5
    assert (await client.responses.retrieve(first.id)).output_text == first.output_text
    items = await client.responses.input_items.list(first.id)
    assert [i.type for i in items.data] == ["message"]
    await client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(first.id)


@pytest.mark.asyncio
async def test_stored_responses_belong_to_their_region(sims: tuple[Running, Running]) -> None:
    here, there = sims
    made = await v1(here).responses.create(model="gpt-4o", input="hello")
    with pytest.raises(openai.BadRequestError) as caught:
        await v1(there).responses.create(model="gpt-4o", input="again", previous_response_id=made.id)
    assert caught.value.code == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        await v1(there).responses.retrieve(made.id)
    unstored = await v1(here).responses.create(model="gpt-4o", input="hello", store=False)
    with pytest.raises(openai.NotFoundError):
        await v1(here).responses.retrieve(unstored.id)


@pytest.mark.asyncio
async def test_stream_events_in_order_with_usage_in_response_completed(sims: tuple[Running, Running]) -> None:
    sim = sims[0]
    stream = await v1(sim).responses.create(model="gpt-4o", input="stream it", stream=True)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds.count("response.output_text.delta") == 12 and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    completed = events[-1].response
    assert completed.usage is not None and completed.usage.output_tokens == count_text(text, ENC) == 12
    assert completed.id == events[0].response.id and completed.output_text == text
    assert (await v1(sim).responses.retrieve(completed.id)).output_text == text
    stats = (await control("GET", f"{sim.url}/_sim/stats")).json()
    assert stats["usage"]["completion_tokens"] == 12


@pytest.mark.asyncio
async def test_a_cut_stream_stops_before_response_completed(sims: tuple[Running, Running]) -> None:
    sim = sims[0]
    await control("POST", f"{sim.url}/_sim/faults", json={"kind": "cut", "after_chunks": 4})
    stream = await v1(sim).responses.create(model="gpt-4o", input="cut me", stream=True)
    kinds: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        async for event in stream:
            kinds.append(event.type)
    assert kinds.count("response.output_text.delta") == 4 and "response.completed" not in kinds
    stats = (await control("GET", f"{sim.url}/_sim/stats")).json()
    assert stats["delivered_completion_tokens_in_cut_streams"] == 4


@pytest.mark.asyncio
async def test_background_responses_can_be_polled_and_cancelled(sims: tuple[Running, Running]) -> None:
    client = v1(sims[0])
    slow = await client.responses.create(model="gpt-4o", input="later", background=True,
                                         metadata={"sim_background_s": "30"})
    assert slow.status == "queued" and slow.usage is None
    assert (await client.responses.cancel(slow.id)).status == "cancelled"
    quick = await client.responses.create(model="gpt-4o", input="soon", background=True, metadata={"sim_background_s": "0"})
    done = await client.responses.retrieve(quick.id)
    assert done.status == "completed" and done.usage is not None and done.usage.output_tokens == 12
    plain = await client.responses.create(model="gpt-4o", input="now")
    with pytest.raises(openai.BadRequestError):
        await client.responses.cancel(plain.id)


@pytest.mark.asyncio
async def test_capacity_429_and_faults_and_the_preview_path_needs_an_api_version(sims: tuple[Running, Running]) -> None:
    sim = sims[0]
    with pytest.raises(openai.RateLimitError) as caught:
        await v1(sim).responses.create(model="small", input="x" * 10, max_output_tokens=500)
    assert int(caught.value.response.headers["retry-after"]) >= 1
    await control("POST", f"{sim.url}/_sim/faults", json={"kind": "503"})
    with pytest.raises(openai.InternalServerError):
        await v1(sim).responses.create(model="gpt-4o", input="x")
    bare = await control("POST", f"{sim.url}/openai/responses", json={"model": "gpt-4o", "input": "x"}, headers={"api-key": KEY})
    assert bare.status_code == 400
    assert (await control("POST", f"{sim.url}/v1/responses", json={"model": "gpt-4o", "input": "x"})).status_code == 401
