"""The request flow in-process, answers that succeed: the official SDK against the real edge and gateway, a scripted
upstream behind them (tests/fakes). What reaches the backend, what reaches the client, and what is charged."""

from __future__ import annotations

import base64

import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.fakes.gateway import ADMIN_HEADERS, GatewayHarness
from tests.fakes.upstream import PROMPT_TOKENS, json_reply

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something about the weather."}]


async def test_azure_client_chat_headers_and_books(harness: GatewayHarness) -> None:
    key = harness.consumer("app", tpm=100_000)
    raw = await harness.azure(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=7
    )
    completion = raw.parse()
    assert completion.usage is not None and completion.usage.completion_tokens == 7
    assert raw.headers["x-gateway-backend"] == "uksouth-ptu" and raw.headers["x-gateway-attempts"] == "1"
    assert raw.headers["x-ms-region"] == "uksouth"
    assert raw.headers["x-gateway-tokens-consumed"] == str(completion.usage.total_tokens)
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    sent = harness.upstream.sent[-1]
    assert sent.url == "https://uksouth-ptu.openai.azure.example/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    # Charged = emitted = served: the ledger, the usage rows and the metrics all hold the answer's usage.
    assert await harness.charged("app") == completion.usage.total_tokens
    assert sum(r.total for r in await harness.usage_rows("app")) == completion.usage.total_tokens
    assert harness.telemetry.tokens_emitted() == completion.usage.total_tokens
    record = harness.telemetry.requests[-1]
    assert (record.status, record.backend_id, record.attempts, record.ptu) == (200, "uksouth-ptu", 1, True)


@pytest.mark.parametrize("path", ["/v1", "/openai/v1"])
async def test_openai_client_chat_completions_embeddings_and_models(harness: GatewayHarness, path: str) -> None:
    client = harness.openai(harness.consumer(), path)
    chat = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert chat.usage is not None and chat.usage.total_tokens > 0 and chat.choices[0].message.content
    text = await client.completions.create(model="gpt-4o-mini", prompt="Once upon a time", max_tokens=4)
    assert text.usage is not None and text.usage.completion_tokens == 4
    vectors = await client.embeddings.create(model="text-embedding-3-small", input=["first", "second"], dimensions=16)
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 16
    assert {m.id async for m in client.models.list()} == {"gpt-4o", "gpt-4o-mini", "text-embedding-3-small"}
    paths = [s.path for s in harness.upstream.sent]
    assert paths == [
        "/openai/deployments/gpt-4o/chat/completions",
        "/openai/deployments/gpt-4o-mini/completions",
        "/openai/deployments/text-embedding-3-small/embeddings",
    ]


async def test_embeddings_bodies_pass_through_byte_for_byte(harness: GatewayHarness) -> None:
    vector = base64.b64encode(b"\x00\x01\x02\x03" * 8).decode()
    answer = orjson.dumps({"object": "list", "model": "text-embedding-3-small",
                           "data": [{"object": "embedding", "index": 0, "embedding": vector}],
                           "usage": {"prompt_tokens": 1, "total_tokens": 1}})
    harness.upstream.script("uksouth-ptu", json_reply(answer))
    response = await harness.post(
        "/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21", harness.consumer(),
        {"input": "abc", "encoding_format": "base64"},
    )
    assert response.status_code == 200 and response.content == answer
    assert response.headers["x-gateway-tokens-consumed"] == "1"


async def test_a_stream_without_the_usage_option_gets_no_usage_chunk_but_the_backend_is_asked_for_one(
    harness: GatewayHarness,
) -> None:
    key = harness.consumer("streamer", tpm=1_000_000)
    stream = await harness.azure(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, max_tokens=9)
    chunks = [c async for c in stream]
    assert chunks and all(c.usage is None for c in chunks)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 9
    assert harness.upstream.sent[-1].json["stream_options"] == {"include_usage": True}
    # The usage chunk the client did not ask for is still what the stream is charged.
    assert await harness.charged("streamer") == PROMPT_TOKENS + 9
    assert harness.telemetry.requests[-1].usage is not None and harness.telemetry.requests[-1].usage.reported


async def test_a_stream_with_the_usage_option_passes_the_usage_chunk(harness: GatewayHarness) -> None:
    stream = await harness.openai(harness.consumer()).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, max_tokens=4, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    response_headers = harness.upstream.answers[-1].headers
    assert response_headers["content-type"] == "text/event-stream"


async def test_the_consumer_key_and_client_headers_never_reach_the_backend(harness: GatewayHarness) -> None:
    key = harness.consumer()
    await harness.azure(key).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=2,
        extra_headers={"cookie": "session=1", "x-forwarded-host": "evil", "x-user-id": "alice",
                       "x-ms-client-request-id": "ok-id"},
    )
    sent = harness.upstream.sent[-1]
    assert sent.headers["api-key"] == "backend-key-uksouth-ptu"
    assert key not in str(sent.headers) and key.encode() not in sent.body
    assert not {"cookie", "x-forwarded-host", "authorization", "x-user-id"} & set(sent.headers)
    assert sent.headers["x-ms-client-request-id"] == "ok-id"
    assert harness.telemetry.requests[-1].user_id == "alice"


async def test_an_openai_compatible_backend_gets_its_own_url_model_name_and_bearer_auth() -> None:
    backend = {
        "id": "compatible", "endpoint": "https://compatible.example/v1", "region": "local", "api": "openai",
        "api_key": "sk-backend", "deployments": {"gpt-4o": "served-model-name"},
    }
    harness = GatewayHarness([backend])
    try:
        chat = await harness.openai(harness.consumer()).chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert chat.choices[0].message.content
        sent = harness.upstream.sent[-1]
        assert sent.url == "https://compatible.example/v1/chat/completions"
        assert sent.json["model"] == "served-model-name"
        assert sent.headers["authorization"] == "Bearer sk-backend" and "api-key" not in sent.headers
    finally:
        await harness.close()


async def test_models_lists_only_what_the_key_may_use(harness: GatewayHarness) -> None:
    limited = harness.openai(harness.consumer("limited", deployments=["text-embedding-3-small"]))
    assert [m.id async for m in limited.models.list()] == ["text-embedding-3-small"]


async def test_health_shows_backends_without_secrets(harness: GatewayHarness) -> None:
    response = await harness.http.get("/health/details", headers=ADMIN_HEADERS)
    health = response.json()
    assert response.status_code == 200 and health["status"] == "ok"
    assert {b["id"] for b in health["backends"]} == {"uksouth-ptu", "swedencentral", "francecentral"}
    assert "backend-key" not in response.text and "openai.azure.example" not in response.text
    assert harness.telemetry.requests == []  # health checks are not requests to count
