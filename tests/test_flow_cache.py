"""The response cache in the request flow, in-process with the openai SDK: a hit answers as the backend answered,
costs no backend tokens and is recorded as cached; nothing crosses a scope; only what may be kept is kept."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from shared.records.cache import CachePolicy
from shared.records.consumers import Team, UserLimits
from tests.fakes.gateway import GatewayHarness
from tests.fakes.upstream import Reply, chat_body, embeddings_body, json_reply, sse_events, stream_reply

ON = CachePolicy(enabled=True)
EMBED = {"model": "text-embedding-3-small", "input": "the same chunk, re-indexed"}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "temperature": 0}


async def post(harness: GatewayHarness, key: str, body: dict[str, Any], path: str = "/v1/embeddings",
               **headers: str) -> Any:
    return await harness.post(path, key, body, headers=headers)


def calls(harness: GatewayHarness) -> int:
    return len(harness.upstream.sent)


async def test_the_same_embedding_twice_is_answered_once_by_the_backend_and_once_by_the_cache(
    harness: GatewayHarness,
) -> None:
    key = harness.consumer("indexer", tpm=100_000, cache=ON)
    client = harness.openai(key)
    first = await client.embeddings.with_raw_response.create(**EMBED)  # type: ignore[arg-type]
    second = await client.embeddings.with_raw_response.create(**EMBED)  # type: ignore[arg-type]
    assert calls(harness) == 1
    assert first.headers["x-gateway-cache"] == "miss" and second.headers["x-gateway-cache"] == "hit"
    assert second.headers["x-gateway-tokens-consumed"] == "0"
    assert second.http_response.content == first.http_response.content  # the same body, byte for byte
    assert second.parse().data[0].embedding == first.parse().data[0].embedding

    # Charged once (the backend's 11 tokens), recorded twice: the hit as cached, with the tokens it saved.
    assert await harness.charged("indexer") == 11
    rows = await harness.usage_rows("indexer")
    assert sum(r.requests for r in rows) == 2 and sum(r.total for r in rows) == 11
    assert sum(r.cache_hits for r in rows) == 1 and sum(r.saved for r in rows) == 11
    hit = harness.telemetry.requests[-1]
    assert hit.cache == "hit" and hit.usage is None and hit.saved is not None and hit.saved.total == 11
    assert hit.status == 200 and hit.backend_id == ""
    assert [r.cache for r in harness.telemetry.cache] == ["miss", "hit"]
    assert harness.telemetry.tokens_emitted() == 11


async def test_nothing_crosses_a_scope(harness: GatewayHarness) -> None:
    alice, bob = harness.consumer("alice", cache=ON), harness.consumer("bob", cache=ON)
    for key in (alice, bob):
        response = await post(harness, key, EMBED)
        assert response.headers["x-gateway-cache"] == "miss"
    assert calls(harness) == 2
    for key in (alice, bob):
        assert (await post(harness, key, EMBED)).headers["x-gateway-cache"] == "hit"
    assert calls(harness) == 2


async def test_the_whole_gateway_shares_answers_only_where_the_operator_says_so(harness: GatewayHarness) -> None:
    shared = CachePolicy(enabled=True, scope="gateway")
    first, second = harness.consumer("one", cache=shared), harness.consumer("two", cache=shared)
    own = harness.consumer("own", cache=ON)
    await post(harness, first, EMBED)
    assert (await post(harness, second, EMBED)).headers["x-gateway-cache"] == "hit"
    assert (await post(harness, own, EMBED)).headers["x-gateway-cache"] == "miss"
    assert calls(harness) == 2


async def test_a_team_turns_the_cache_on_for_its_members_and_shares_answers_only_inside_it(
    harness: GatewayHarness,
) -> None:
    harness.consumer_store.teams["search"] = Team("search", "Search", cache=CachePolicy(enabled=True, scope="team"))
    harness.consumer_store.teams["ads"] = Team("ads", "Ads", cache=CachePolicy(enabled=True, scope="team"))
    first, second = harness.consumer("s1", team="search"), harness.consumer("s2", team="search")
    other = harness.consumer("a1", team="ads")
    outsider = harness.consumer("solo", cache=CachePolicy(enabled=True, scope="team"))  # no team: its own scope
    assert (await post(harness, first, EMBED)).headers["x-gateway-cache"] == "miss"
    assert (await post(harness, second, EMBED)).headers["x-gateway-cache"] == "hit"
    assert (await post(harness, other, EMBED)).headers["x-gateway-cache"] == "miss"
    assert (await post(harness, outsider, EMBED)).headers["x-gateway-cache"] == "miss"
    assert calls(harness) == 3
    harness.consumer_store.teams["quiet"] = Team("quiet", "Quiet")
    assert "x-gateway-cache" not in (await post(harness, harness.consumer("q1", team="quiet"), EMBED)).headers


async def test_a_hit_is_served_when_the_consumer_has_no_tokens_left(harness: GatewayHarness) -> None:
    """A hit uses no backend tokens: neither the minute's limit nor the quota stands in its way or moves."""
    key = harness.consumer("tight", quota=11, quota_period="daily", cache=ON)
    await post(harness, key, EMBED)
    assert (await post(harness, key, {**EMBED, "input": "another"})).status_code == 403  # the quota is spent
    response = await post(harness, key, EMBED)
    assert response.status_code == 200 and response.headers["x-gateway-cache"] == "hit"
    assert await harness.charged("tight") == 11


async def test_a_hit_names_the_end_user_and_is_refused_without_one_where_the_consumer_requires_it(
    harness: GatewayHarness,
) -> None:
    key = harness.consumer("app", cache=ON, users=UserLimits(tokens_per_minute=1000, required=True))
    assert (await post(harness, key, EMBED, **{"x-gateway-user": "alice"})).headers["x-gateway-cache"] == "miss"
    response = await post(harness, key, EMBED, **{"x-gateway-user": "bob"})
    assert response.headers["x-gateway-cache"] == "hit"  # one consumer's scope: its end users share its answers
    assert harness.telemetry.requests[-1].user_id == "bob"
    refused = await post(harness, key, EMBED)
    assert refused.status_code == 400 and "x-gateway-cache" not in refused.headers
    assert calls(harness) == 1


async def test_a_consumer_without_the_cache_never_sees_it(harness: GatewayHarness) -> None:
    key = harness.consumer("plain")
    for _ in range(2):
        assert "x-gateway-cache" not in (await post(harness, key, EMBED)).headers
    assert calls(harness) == 2 and harness.answer_store.entries == {} and harness.telemetry.cache == []
    assert harness.telemetry.requests[-1].cache == ""


async def test_a_chat_that_is_not_deterministic_bypasses_the_cache(harness: GatewayHarness) -> None:
    key = harness.consumer("chatty", cache=ON)
    body = {**CHAT, "temperature": 0.8}
    for _ in range(2):
        response = await post(harness, key, body, "/v1/chat/completions")
        assert response.headers["x-gateway-cache"] == "bypass"
    assert calls(harness) == 2
    assert [r.cache for r in harness.telemetry.cache] == ["bypass", "bypass"]


async def test_field_order_and_excluded_fields_share_an_entry_and_content_does_not(harness: GatewayHarness) -> None:
    key = harness.consumer("app", cache=ON)
    await harness.post("/v1/chat/completions", key, content=b'{"model":"gpt-4o","temperature":0,"messages":[{"role":"user","content":"hi"}]}',
                       headers={"content-type": "application/json"})
    same = b'{"messages":[{"content":"\\u0068i","role":"user"}], "temperature":0, "model":"gpt-4o", "user":"u1", "stream":false}'
    response = await harness.post("/v1/chat/completions", key, content=same, headers={"content-type": "application/json"})
    assert response.headers["x-gateway-cache"] == "hit"
    other = b'{"messages":[{"content":"hi ","role":"user"}],"temperature":0,"model":"gpt-4o"}'
    response = await harness.post("/v1/chat/completions", key, content=other, headers={"content-type": "application/json"})
    assert response.headers["x-gateway-cache"] == "miss"
    duplicate = b'{"model":"gpt-4o","temperature":0,"messages":[{"role":"user","content":"hi"}],"messages":[]}'
    response = await harness.post("/v1/chat/completions", key, content=duplicate, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "duplicate_key"
    assert calls(harness) == 2


async def test_a_stream_served_from_the_cache_equals_the_original(harness: GatewayHarness) -> None:
    key = harness.consumer("streamer", cache=ON)
    client = harness.openai(key)

    async def text(**options: Any) -> tuple[str, Any]:
        pieces, usage = [], None
        async for chunk in await client.chat.completions.create(**CHAT, stream=True, **options):  # type: ignore[call-overload]
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        return "".join(pieces), usage

    original, _ = await text()
    assert calls(harness) == 1 and original
    replayed, usage = await text()
    assert replayed == original and usage is None and calls(harness) == 1
    replayed, usage = await text(stream_options={"include_usage": True})
    assert replayed == original and usage is not None and usage.total_tokens == 11 + 5
    whole = await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert whole.choices[0].message.content == original and whole.choices[0].finish_reason == "length"
    assert calls(harness) == 1


async def test_a_whole_answer_is_replayed_as_a_stream(harness: GatewayHarness) -> None:
    key = harness.consumer("mixed", cache=ON)
    client = harness.openai(key)
    whole = await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    response = await post(harness, key, {**CHAT, "stream": True}, "/v1/chat/completions")
    assert response.headers["x-gateway-cache"] == "hit" and response.headers["content-type"].startswith("text/event-stream")
    events = [orjson.loads(line[6:]) for line in response.text.split("\n") if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == \
        whole.choices[0].message.content
    assert response.text.endswith("data: [DONE]\n\n") and calls(harness) == 1


async def test_the_request_header_opts_out_or_refreshes(harness: GatewayHarness) -> None:
    key = harness.consumer("app", cache=ON)
    response = await post(harness, key, EMBED, **{"x-gateway-cache": "no-store"})
    assert response.headers["x-gateway-cache"] == "bypass" and harness.answer_store.entries == {}
    assert (await post(harness, key, EMBED)).headers["x-gateway-cache"] == "miss"
    assert (await post(harness, key, EMBED, **{"x-gateway-cache": "no-cache"})).headers["x-gateway-cache"] == "miss"
    assert (await post(harness, key, EMBED)).headers["x-gateway-cache"] == "hit"
    assert calls(harness) == 3
    bad = await post(harness, key, EMBED, **{"x-gateway-cache": "please"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cache_directive"
    assert "x-gateway-cache" not in harness.upstream.sent[-1].headers


async def test_an_entry_expires_with_its_consumers_ttl(harness: GatewayHarness) -> None:
    key = harness.consumer("app", cache=CachePolicy(enabled=True, ttl_s=60))
    await post(harness, key, EMBED)
    harness.clock.advance(59)
    assert (await post(harness, key, EMBED)).headers["x-gateway-cache"] == "hit"
    harness.clock.advance(2)
    assert (await post(harness, key, EMBED)).headers["x-gateway-cache"] == "miss"
    assert calls(harness) == 2


@pytest.mark.parametrize("reply", [
    json_reply(orjson.dumps({**orjson.loads(chat_body()), "choices": [
        {"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "content_filter"}]})),
    json_reply(orjson.dumps({**orjson.loads(chat_body()), "prompt_filter_results": [
        {"prompt_index": 0, "content_filter_results": {"hate": {"filtered": True, "severity": "high"}}}]})),
    json_reply(b'{"error":{"message":"bad","type":"invalid_request_error"}}', status=400),
    json_reply(b'{"choices":[]}'),  # no usage: the backend's figures are what a hit saves
    Reply(200, {"content-type": "text/event-stream"}, pieces=sse_events(5)[:-1]),  # a stream without its end
    Reply(200, {"content-type": "text/event-stream"}, pieces=sse_events(5, with_usage=False)),
])
async def test_only_whole_successful_unfiltered_answers_are_kept(harness: GatewayHarness, reply: Reply) -> None:
    key = harness.consumer("app", cache=ON)
    harness.upstream.script("uksouth-ptu", reply)
    stream = reply.pieces is not None
    await post(harness, key, {**CHAT, "stream": stream}, "/v1/chat/completions")
    assert harness.services.cache is not None and harness.services.cache.entries == 0


async def test_an_answer_over_the_size_cap_is_not_kept() -> None:
    harness = GatewayHarness(env={"GATEWAY_CACHE_MAX_ENTRY_BYTES": "2048"})
    try:
        key = harness.consumer("app", cache=ON)
        harness.upstream.script("uksouth-ptu", json_reply(embeddings_body(dimensions=1000)))
        await post(harness, key, EMBED)
        assert (await post(harness, key, EMBED)).headers["x-gateway-cache"] == "miss"
        harness.upstream.script("uksouth-ptu", stream_reply(2000))  # a long stream: its assembly stops at the cap
        for _ in range(2):
            response = await post(harness, key, {**CHAT, "stream": True}, "/v1/chat/completions")
            assert response.headers["x-gateway-cache"] == "miss"
    finally:
        await harness.close()


async def test_a_hit_is_read_from_the_shared_store_by_another_instance(harness: GatewayHarness) -> None:
    key = harness.consumer("app", cache=ON)
    await post(harness, key, EMBED)
    cache = harness.services.cache
    assert cache is not None
    await cache.flush()
    assert len(harness.answer_store.entries) == 1
    cache.clear_memory()  # as another instance: nothing in its memory
    assert (await post(harness, key, EMBED)).headers["x-gateway-cache"] == "hit"
    assert harness.answer_store.reads == 2 and calls(harness) == 1  # the first miss read it too
    assert (await post(harness, key, EMBED)).headers["x-gateway-cache"] == "hit"
    assert harness.answer_store.reads == 2  # from memory now


async def test_responses_are_cached_only_without_state(harness: GatewayHarness) -> None:
    key = harness.consumer("app", cache=ON)
    body = {"model": "gpt-4o", "input": "hello", "temperature": 0}
    response = await post(harness, key, body, "/v1/responses")
    assert response.headers["x-gateway-cache"] == "bypass"  # store is true by default: the response lives on
    response = await post(harness, key, {**body, "store": False}, "/v1/responses")
    assert response.headers["x-gateway-cache"] == "miss"


async def test_a_hit_is_priced_at_its_own_price_and_reported_as_cached() -> None:
    from shared.admin.usage_report import format_report, summarize

    prices = '{"currency": "EUR", "deployments": {"text-embedding-3-small": {"input": 1000, "cache_hit": 100}}}'
    harness = GatewayHarness(env={"GATEWAY_PRICES": prices})
    try:
        key = harness.consumer("app", cache=ON)
        for _ in range(3):
            await post(harness, key, EMBED)
        rows = await harness.usage_rows("app")
        # The miss was served by the PTU region (0 at the margin); each hit costs its 11 saved tokens at 100 / million.
        assert sum(r.cost_nanos for r in rows) == round(2 * 11 * 100 / 1e6 * 1e9)
        (total,) = summarize(rows)
        assert (total.requests, total.total, total.cache_hits, total.saved) == (3, 11, 2, 22)
        report = format_report("daily", [total, *summarize([]), total], "EUR")
        lines = report.splitlines()
        header, first = lines[1], lines[3]
        assert header.split()[-2:] == ["cache_hits", "tokens_saved"] and first.split()[-2:] == ["2", "22"]
    finally:
        await harness.close()


async def test_many_identical_requests_at_once_all_answer_and_leave_one_entry(harness: GatewayHarness) -> None:
    import asyncio

    key = harness.consumer("burst", cache=ON)
    responses = await asyncio.gather(*(post(harness, key, EMBED) for _ in range(50)))
    assert all(r.status_code == 200 for r in responses)
    states = [r.headers["x-gateway-cache"] for r in responses]
    assert set(states) <= {"hit", "miss"} and states.count("miss") == calls(harness)
    assert len({r.content for r in responses}) == 1
    cache = harness.services.cache
    assert cache is not None and cache.entries == 1
    await cache.flush()
    assert len(harness.answer_store.entries) == 1 and (await post(harness, key, EMBED)).headers["x-gateway-cache"] == "hit"


async def test_without_a_memory_layer_every_hit_is_read_from_the_store() -> None:
    harness = GatewayHarness(env={"GATEWAY_CACHE_MEMORY_MB": "0"})
    try:
        key = harness.consumer("app", cache=ON)
        await post(harness, key, EMBED)
        cache = harness.services.cache
        assert cache is not None and cache.entries == 0
        await cache.flush()
        for _ in range(3):
            assert (await post(harness, key, EMBED)).headers["x-gateway-cache"] == "hit"
        assert harness.answer_store.reads == 4 and calls(harness) == 1
    finally:
        await harness.close()
