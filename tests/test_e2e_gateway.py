"""End to end over real HTTP: Azurite + simulated regions + a gateway process + the official openai SDK."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.conftest import unique
from tests.e2e import Stack
from tools import stack

pytestmark = pytest.mark.e2e
API_VERSION = "2024-10-21"
MESSAGES = [{"role": "user", "content": "Say something about the weather."}]


def azure(e2e: Stack, key: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(azure_endpoint=e2e.url, api_key=key, api_version=API_VERSION, max_retries=0)


def v1(e2e: Stack, key: str, path: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=e2e.url + path, api_key=key, max_retries=0)


@pytest.fixture
def key(e2e: Stack) -> str:
    return e2e.create_consumer(unique("app"))


def test_azure_client_chat_and_headers(e2e: Stack, key: str) -> None:
    raw = azure(e2e, key).chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, max_tokens=7)
    completion = raw.parse()
    assert completion.usage is not None and completion.usage.completion_tokens == 7
    assert raw.headers["x-gateway-backend"] == "uksouth-ptu"
    assert raw.headers["x-ms-region"] == "uksouth"
    assert raw.headers["x-gateway-tokens-consumed"] == str(completion.usage.total_tokens)


@pytest.mark.parametrize("path", ["/v1", "/openai/v1"])
def test_openai_client_chat_completions_embeddings_and_models(e2e: Stack, key: str, path: str) -> None:
    client = v1(e2e, key, path)
    chat = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert chat.usage is not None and chat.usage.total_tokens > 0 and chat.choices[0].message.content
    text = client.completions.create(model="gpt-4o-mini", prompt="Once upon a time", max_tokens=4)
    assert text.usage is not None and text.usage.completion_tokens == 4
    vectors = client.embeddings.create(model="text-embedding-3-small", input=["first text", "second text"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 1536
    assert {m.id for m in client.models.list()} == {"gpt-4o", "gpt-4o-mini", "text-embedding-3-small"}


def test_async_clients_stream_and_not(e2e: Stack, key: str) -> None:
    async def run() -> tuple[int, int, int]:
        client = openai.AsyncAzureOpenAI(azure_endpoint=e2e.url, api_key=key, api_version=API_VERSION, max_retries=0)
        first = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=3)
        stream = await openai.AsyncOpenAI(base_url=e2e.url + "/v1", api_key=key, max_retries=0).chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, max_tokens=6
        )
        words = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
        results = await asyncio.gather(*(client.chat.completions.create(model="gpt-4o", messages=MESSAGES) for _ in range(8)))
        assert first.usage is not None
        return first.usage.completion_tokens, len(words), len(results)

    assert asyncio.run(run()) == (3, 6, 8)


def test_streaming_chunks_arrive_as_the_backend_produces_them(e2e: Stack, key: str, fresh_sims: Stack) -> None:
    """Order, not timing: the backend stops after 3 of 10 tokens until the test releases it. A gateway that buffered
    would hold those 3 back, and the client would wait in vain (its read timeout fails the test); one that relays as
    the backend produces has them at the client while the backend still holds the rest."""
    for sim in e2e.simulators:  # whichever region serves it
        sim.control("POST", "faults", {"kind": "hold", "after_chunks": 3})
    content: list[str] = []
    try:
        with httpx.stream(
            "POST", f"{e2e.url}/openai/deployments/gpt-4o/chat/completions?api-version={API_VERSION}",
            headers={"api-key": key}, json={"messages": MESSAGES, "stream": True, "max_tokens": 10},
            timeout=httpx.Timeout(30, read=15),
        ) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            for line in lines:
                if '"content":" ' in line:
                    content.append(line)
                    if len(content) == 3:
                        break
            # The 3 arrived while the backend had produced no more.
            assert sum(sim.stats()["held_streams"] for sim in e2e.simulators) == 1
            for sim in e2e.simulators:
                sim.control("DELETE", "faults")
            content += [line for line in lines if '"content":" ' in line]
    finally:
        for sim in e2e.simulators:
            sim.control("DELETE", "faults")
    assert len(content) == 10


def test_the_consumer_key_never_reaches_the_backend(e2e: Stack, key: str) -> None:
    azure(e2e, key).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2, extra_headers={"cookie": "session=1", "x-forwarded-host": "evil"})
    sent = e2e.simulators[0].requests(1)[-1]
    headers = {k.lower(): v for k, v in sent["headers"].items()}
    assert headers["api-key"] == stack.SIM_API_KEY
    assert key not in str(sent)
    assert "cookie" not in headers and "x-forwarded-host" not in headers and "authorization" not in headers
