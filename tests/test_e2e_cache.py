"""The response cache end to end: gateway processes, simulated regions, Azurite (Table and Blob), the openai SDK."""

from __future__ import annotations

import time
from collections.abc import Callable

import openai
import pytest

from shared.records.cache import CachePolicy
from tests.conftest import unique
from tests.e2e import Stack, patience, wait_for
from tools import stack

pytestmark = pytest.mark.e2e
ON = CachePolicy(enabled=True)
EMBED = {"model": "text-embedding-3-small", "input": "a chunk an indexer embeds on every run"}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Name three colours."}], "temperature": 0,
        "max_tokens": 12}


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def backend_requests(e2e: Stack) -> tuple[int, int]:
    """Requests and tokens every simulated region has served."""
    stats = [sim.stats() for sim in e2e.simulators]
    return sum(s["requests"] for s in stats), sum(s["usage"]["total_tokens"] for s in stats)


def test_the_same_embedding_twice_is_a_hit_and_the_regions_books_do_not_move(fresh_sims: Stack) -> None:
    e2e = fresh_sims
    sdk = client(e2e.url, e2e.create_consumer(unique("indexer"), cache=ON))
    first = sdk.embeddings.with_raw_response.create(**EMBED)  # type: ignore[arg-type]
    before = backend_requests(e2e)
    assert before[0] == 1 and first.headers["x-gateway-cache"] == "miss"
    second = sdk.embeddings.with_raw_response.create(**EMBED)  # type: ignore[arg-type]
    assert second.headers["x-gateway-cache"] == "hit" and second.headers["x-gateway-tokens-consumed"] == "0"
    assert second.parse().data[0].embedding == first.parse().data[0].embedding
    assert backend_requests(e2e) == before  # not one request, not one token more at any region

    other = client(e2e.url, e2e.create_consumer(unique("other"), cache=ON))
    assert other.embeddings.with_raw_response.create(**EMBED).headers["x-gateway-cache"] == "miss"  # type: ignore[arg-type]
    assert backend_requests(e2e)[0] == 2


def test_a_chat_that_is_not_deterministic_bypasses_the_cache(fresh_sims: Stack) -> None:
    sdk = client(fresh_sims.url, fresh_sims.create_consumer(unique("chatty"), cache=ON))
    for _ in range(2):
        raw = sdk.chat.completions.with_raw_response.create(**{**CHAT, "temperature": 0.9})  # type: ignore[call-overload]
        assert raw.headers["x-gateway-cache"] == "bypass"
    assert backend_requests(fresh_sims)[0] == 2


def test_a_stream_served_from_the_cache_equals_the_original_text(fresh_sims: Stack) -> None:
    sdk = client(fresh_sims.url, fresh_sims.create_consumer(unique("streamer"), cache=ON))

    def streamed(**options: object) -> tuple[str, int | None]:
        text, usage = [], None
        for chunk in sdk.chat.completions.create(**CHAT, stream=True, **options):  # type: ignore[call-overload]
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage.total_tokens
        return "".join(text), usage

    original, original_usage = streamed(stream_options={"include_usage": True})
    assert original and original_usage

    def cached() -> bool:  # the entry is written once the stream has ended, in the background
        raw = sdk.chat.completions.with_raw_response.create(**CHAT, stream=True)  # type: ignore[call-overload]
        list(raw.parse())
        return bool(raw.headers["x-gateway-cache"] == "hit")

    wait_for(cached)
    served = backend_requests(fresh_sims)
    assert streamed() == (original, None)
    assert streamed(stream_options={"include_usage": True}) == (original, original_usage)
    whole = sdk.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert whole.choices[0].message.content == original
    assert backend_requests(fresh_sims) == served


def test_another_gateway_instance_serves_the_entry_from_blob_storage(
    fresh_sims: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    key = fresh_sims.create_consumer(unique("shared"), cache=ON)
    body = {**EMBED, "input": unique("written by one instance")}
    assert client(fresh_sims.url, key).embeddings.with_raw_response.create(**body).headers["x-gateway-cache"] == "miss"  # type: ignore[arg-type]
    other = gateway_factory()
    deadline = time.monotonic() + 10 * patience()
    while True:  # the write reaches Blob Storage after the answer, in the background
        raw = client(other.url, key).embeddings.with_raw_response.create(**body)  # type: ignore[arg-type]
        if raw.headers["x-gateway-cache"] == "hit" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert raw.headers["x-gateway-cache"] == "hit"
    assert backend_requests(fresh_sims)[0] <= 1 + 1  # the first miss, and at most one miss of the second instance
