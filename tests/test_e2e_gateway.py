"""End to end over real HTTP: Azurite + simulated regions + a gateway process + the official openai SDK."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable

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


def test_embeddings_with_the_azure_client_and_float_format(e2e: Stack, key: str) -> None:
    result = azure(e2e, key).embeddings.create(model="text-embedding-3-small", input="hello", encoding_format="float", dimensions=8)
    assert len(result.data[0].embedding) == 8 and result.usage.prompt_tokens == 1


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


def test_stream_without_usage_option_gets_no_usage_chunk_but_is_accounted(e2e: Stack) -> None:
    consumer = unique("stream")
    key = e2e.create_consumer(consumer, tpm=1_000_000)
    chunks = list(azure(e2e, key).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, max_tokens=9))
    assert chunks and all(c.usage is None for c in chunks)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 9
    sent = next(r for r in e2e.simulators[0].requests(50) if r["body"].get("stream") and r["body"].get("max_tokens") == 9)
    assert sent["body"]["stream_options"] == {"include_usage": True}


def test_stream_with_usage_option_passes_the_usage_chunk(e2e: Stack, key: str) -> None:
    chunks = list(v1(e2e, key).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, max_tokens=4, stream_options={"include_usage": True}
    ))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_streaming_chunks_arrive_as_the_backend_produces_them(e2e: Stack, key: str, fresh_sims: Stack) -> None:
    for sim in e2e.simulators:
        sim.control("POST", "latency", {"latency_ms": 5, "token_latency_ms": 40})
    try:
        arrivals: list[float] = []
        with httpx.stream(
            "POST", f"{e2e.url}/openai/deployments/gpt-4o/chat/completions?api-version={API_VERSION}",
            headers={"api-key": key}, json={"messages": MESSAGES, "stream": True, "max_tokens": 10}, timeout=30,
        ) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if '"content":" ' in line:
                    arrivals.append(time.monotonic())
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
        assert len(arrivals) == 10
        # Each token was produced 40 ms after the previous one; buffering would deliver them together.
        assert arrivals[-1] - arrivals[0] >= 9 * 0.040 * 0.75
        assert sum(1 for g in gaps if g >= 0.020) >= 7
    finally:
        for sim in e2e.simulators:
            sim.control("POST", "latency", {"latency_ms": 5, "token_latency_ms": 2})


def test_the_consumer_key_never_reaches_the_backend(e2e: Stack, key: str) -> None:
    azure(e2e, key).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2, extra_headers={"cookie": "session=1", "x-forwarded-host": "evil"})
    sent = e2e.simulators[0].requests(1)[-1]
    headers = {k.lower(): v for k, v in sent["headers"].items()}
    assert headers["api-key"] == stack.SIM_API_KEY
    assert key not in str(sent)
    assert "cookie" not in headers and "x-forwarded-host" not in headers and "authorization" not in headers


def test_unauthenticated_and_forbidden(e2e: Stack) -> None:
    with pytest.raises(openai.AuthenticationError) as missing:
        httpx_post(e2e, "/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}, headers={})
    with pytest.raises(openai.AuthenticationError):
        v1(e2e, "gw-not-a-real-key").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    limited = e2e.create_consumer(unique("limited"), deployments=["text-embedding-3-small"])
    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        v1(e2e, limited).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert forbidden.value.code == "deployment_not_allowed"
    assert [m.id for m in v1(e2e, limited).models.list()] == ["text-embedding-3-small"]
    assert missing.value.status_code == 401


def httpx_post(e2e: Stack, path: str, body: object, headers: dict[str, str]) -> None:
    response = httpx.post(e2e.url + path, json=body, headers=headers)
    if response.status_code == 401:
        raise openai.AuthenticationError("401", response=response, body=response.json())
    response.raise_for_status()


@pytest.mark.parametrize(
    ("call", "status", "code"),
    [
        (lambda c: c.chat.completions.create(model="gpt-5-unknown", messages=MESSAGES), 404, "DeploymentNotFound"),
        (lambda c: c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x" * 300_000}]), 413, "request_too_large"),
        (lambda c: c.chat.completions.create(model="gpt-4o", messages=[]), 400, "invalid_type"),
    ],
)
def test_errors_are_openai_shaped(e2e: Stack, key: str, call: Callable[[openai.OpenAI], object], status: int, code: str) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        call(v1(e2e, key))
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == code and body["message"] and body["type"]
    assert "127.0.0.1" not in str(body) and stack.SIM_API_KEY not in str(body)


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/v1/chat/completions", None, 405),
        ("DELETE", "/openai/deployments/gpt-4o/embeddings?api-version=x", None, 405),
        ("POST", "/v1/chat/completions", b"{not json", 400),
        ("POST", "/v1/chat/completions", b"\xff\xfe", 400),
        ("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=../x", b'{"messages":[{"role":"user"}]}', 400),
        ("POST", "/v1/images/generations", b"{}", 404),
    ],
)
def test_bad_requests(e2e: Stack, key: str, method: str, path: str, body: bytes | None, status: int) -> None:
    response = httpx.request(method, e2e.url + path, content=body, headers={"api-key": key, "content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}


def test_wrong_content_type_is_415(e2e: Stack, key: str) -> None:
    response = httpx.post(e2e.url + "/v1/chat/completions", content=b"model=gpt-4o", headers={"api-key": key, "content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"


def test_health_shows_backends_without_secrets(e2e: Stack) -> None:
    health = httpx.get(e2e.url + "/health").json()
    assert {b["id"] for b in health["backends"]} == {"uksouth-ptu", "swedencentral", "francecentral"}
    assert "127.0.0.1" not in str(health) and stack.SIM_API_KEY not in str(health)


def test_backend_unreachable_is_502_and_timeout_is_504(e2e: Stack, key: str, gateway_factory: Callable[..., stack.Child]) -> None:
    dead = stack.Region("nowhere", "westeurope", stack.free_port(), priority=1)
    client = openai.OpenAI(base_url=gateway_factory(regions=[dead]).url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as unreachable:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert unreachable.value.status_code == 502 and unreachable.value.code == "backend_unreachable"
    assert "127.0.0.1" not in str(unreachable.value.body)

    sim = e2e.simulators[2]
    slow = stack.Region(sim.region.id, sim.region.region, sim.region.port, timeout_s=0.5)
    client = openai.OpenAI(base_url=gateway_factory(regions=[slow]).url + "/v1", api_key=key, max_retries=0)
    sim.fault("timeout", deployment="gpt-4o-mini", delay_s=3)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as timed_out:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert timed_out.value.status_code == 504 and timed_out.value.code == "backend_timeout"
    assert time.monotonic() - started < 2.5


def test_embeddings_base64_roundtrip(e2e: Stack, key: str) -> None:
    response = httpx.post(
        f"{e2e.url}/openai/deployments/text-embedding-3-small/embeddings?api-version={API_VERSION}",
        headers={"api-key": key}, json={"input": "abc", "encoding_format": "base64"},
    )
    assert response.status_code == 200
    vector = base64.b64decode(response.json()["data"][0]["embedding"])
    assert len(vector) == 1536 * 4
