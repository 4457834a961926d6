"""The request flow in-process, streams: what the client receives when a backend's stream breaks, ends early or the
client leaves, and that each is charged exactly what was billed and delivered."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import cast

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from shared.flow.tokens import count_chat_prompt, encoding_for
from tests.fakes.gateway import GatewayHarness, gateway_request
from tests.fakes.upstream import Reply, sse_events, stream_reply, words

MINI = "gpt-4o-mini"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a long story."}]
PROMPT = count_chat_prompt({"messages": MESSAGES}, encoding_for(MINI))
STREAM = {"model": MINI, "messages": MESSAGES, "stream": True}


def data_lines(raw: bytes) -> list[str]:
    return [line for line in raw.decode().split("\n") if line.startswith("data: ")]


async def test_a_stream_cut_mid_way_ends_with_an_error_event_and_is_charged_what_was_delivered(
    harness: GatewayHarness,
) -> None:
    key = harness.consumer("streamer", tpm=100_000)
    # The role event, then 5 words, then the connection drops.
    harness.upstream.script("uksouth-ptu", stream_reply(40, breaks_after=6))
    words: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in await harness.openai(key).chat.completions.create(**STREAM):  # type: ignore[call-overload]
            if chunk.choices and chunk.choices[0].delta.content:
                words.append(chunk.choices[0].delta.content)
    assert len(words) == 5 and "stream" in str(caught.value.message)

    harness.upstream.script("uksouth-ptu", stream_reply(40, breaks_after=3))
    response = await harness.post("/v1/chat/completions", key, STREAM)
    lines = data_lines(response.content)
    assert lines[-1].startswith('data: {"error"') and '"code":"stream_interrupted"' in lines[-1]
    assert all(a.closed and not a.released for a in harness.upstream.answers)  # a broken stream is not reused

    # Each cut stream is charged its prompt plus the words delivered before the cut (5 and 2), counted by the gateway.
    assert await harness.charged("streamer") == 2 * PROMPT + 5 + 2
    assert harness.telemetry.tokens_emitted() == 2 * PROMPT + 5 + 2
    assert [r.usage.reported for r in harness.telemetry.requests if r.usage] == [False, False]


async def test_a_stream_that_ends_without_its_end_marker_gets_an_error_event(harness: GatewayHarness) -> None:
    events = sse_events(4)
    harness.upstream.script("uksouth-ptu", Reply(200, {"content-type": "text/event-stream"}, pieces=events[:3]))
    response = await harness.post("/v1/chat/completions", harness.consumer("early", tpm=100_000), STREAM)
    assert "ended the stream early" in data_lines(response.content)[-1]
    assert await harness.charged("early") == PROMPT + 2


async def test_events_split_across_pieces_are_relayed_whole_and_the_usage_is_read(harness: GatewayHarness) -> None:
    whole = b"".join(sse_events(6, prompt=PROMPT))
    pieces = tuple(whole[i : i + 7] for i in range(0, len(whole), 7))  # boundaries fall anywhere, even inside "\n\n"
    harness.upstream.script("uksouth-ptu", Reply(200, {"content-type": "text/event-stream"}, pieces=pieces))
    response = await harness.post("/v1/chat/completions", harness.consumer("split", tpm=100_000), STREAM)
    lines = data_lines(response.content)
    assert lines[-1] == "data: [DONE]"
    assert [orjson.loads(line[6:])["choices"][0]["delta"].get("content") for line in lines[1:7]] == words(6)
    assert all('"usage"' not in line for line in lines)  # the client did not ask for the usage chunk
    assert await harness.charged("split") == PROMPT + 6
    assert response.headers["content-type"] == "text/event-stream" and response.headers["cache-control"] == "no-cache"


async def test_a_client_leaving_mid_stream_closes_the_backend_stream_and_is_charged_what_was_delivered(
    harness: GatewayHarness,
) -> None:
    key = harness.consumer("leaver", tpm=100_000)
    harness.upstream.script("uksouth-ptu", stream_reply(40, stalls_after=4))  # 3 words, then the backend is slow
    gateway = await harness.gateway()
    response = await gateway.handle(gateway_request("POST", "/v1/chat/completions", key, STREAM))
    assert response.status == 200 and response.stream is not None
    received = [await anext(response.stream) for _ in range(4)]
    assert words(3)[-1].encode() in received[-1]
    await cast(AsyncGenerator[bytes, None], response.stream).aclose()  # what the edge does when the client leaves
    answer = harness.upstream.answers[-1]
    assert answer.closed and not answer.released
    # Charged: the prompt and the 3 words that reached the client; not the 40 the answer would have had.
    assert await harness.charged("leaver") == PROMPT + 3
    assert sum(r.total for r in await harness.usage_rows("leaver")) == PROMPT + 3
    assert harness.telemetry.requests[-1].status == 200


def usage_of(raw: bytes) -> dict[str, int] | None:
    found = [orjson.loads(line[6:]) for line in data_lines(raw) if line.startswith('data: {"') and '"usage":{' in line]
    return found[-1]["usage"] if found else None


@pytest.mark.parametrize(("ending", "ends_well"), [
    (b"[DONE]", True),  # Microsoft's aoai-api-simulator: no field name, no blank line
    (b"data:[DONE]", True),
    (b"data: [DONE]\n", True),
    (b"[DONE]\n\n", True),
    (b"", False),  # the backend closes the connection after its last chunk
    (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delt', False),  # mid-event
])
async def test_a_usage_chunk_asked_for_comes_however_the_backend_ends_its_stream(
    harness: GatewayHarness, ending: bytes, ends_well: bool,
) -> None:
    key = harness.consumer("asker", tpm=100_000)
    events = sse_events(4, with_usage=False)[:-1]  # the role chunk, 4 words, the finish chunk; no [DONE]
    harness.upstream.script("uksouth-ptu", Reply(200, {"content-type": "text/event-stream"},
                                                 pieces=(*events, ending) if ending else events))
    body = {**STREAM, "stream_options": {"include_usage": True}}
    response = await harness.post("/v1/chat/completions", key, body)
    lines = data_lines(response.content)
    assert usage_of(response.content) == {"prompt_tokens": PROMPT, "completion_tokens": 4, "total_tokens": PROMPT + 4}
    if ends_well:
        assert lines[-1] == "data: [DONE]" and lines[-2].startswith('data: {"id"') and '"usage":{' in lines[-2]
    else:
        assert '"stream_interrupted"' in lines[-1] and '"usage":{' in lines[-2]
    assert await harness.charged("asker") == PROMPT + 4


async def test_a_usage_chunk_asked_for_comes_before_the_error_of_a_broken_stream(harness: GatewayHarness) -> None:
    key = harness.consumer("asker", tpm=100_000)
    harness.upstream.script("uksouth-ptu", Reply(200, {"content-type": "text/event-stream"},
                                                 pieces=sse_events(40, with_usage=False), breaks_after=4))
    chunks = []
    with pytest.raises(openai.APIError):
        async for chunk in await harness.openai(key).chat.completions.create(  # type: ignore[call-overload]
            **STREAM, stream_options={"include_usage": True}):
            chunks.append(chunk)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.prompt_tokens == PROMPT and await harness.charged("asker") == PROMPT + 3


async def test_the_sdk_reads_a_stream_ended_by_a_bare_done_to_its_usage(harness: GatewayHarness) -> None:
    key = harness.consumer("asker", tpm=100_000)
    events = sse_events(3, with_usage=False)[:-1]
    harness.upstream.script("uksouth-ptu", Reply(200, {"content-type": "text/event-stream"}, pieces=(*events, b"[DONE]")))
    chunks = [c async for c in await harness.openai(key).chat.completions.create(  # type: ignore[call-overload]
        **STREAM, stream_options={"include_usage": True})]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == PROMPT + 3
