from __future__ import annotations

from pathlib import Path

import pytest

from shared.flow.tokens import get_encoding
from shared.flow.usage import SseRelay, usage_from_body
from shared.records.usage import TokenUsage, combined

FIXTURES = Path(__file__).parent / "fixtures"


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_usage_from_a_chat_completion_body_with_cached_and_reasoning_tokens() -> None:
    usage, model = usage_from_body((FIXTURES / "chat_completion.json").read_bytes())
    assert usage == TokenUsage(prompt=1200, completion=7, total=1207, cached=1024, reasoning=3)
    assert model == "gpt-4o-2024-11-20"


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"id": "x"}', b'{"usage": null}', b""])
def test_no_usage_where_there_is_none(raw: bytes) -> None:
    assert usage_from_body(raw)[0] is None


def test_embeddings_usage_has_no_completion() -> None:
    usage, _ = usage_from_body(b'{"object":"list","data":[],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}')
    assert usage == TokenUsage(prompt=8, completion=0, total=8)


@pytest.mark.parametrize("piece", [1, 7, 64, 100_000])
@pytest.mark.parametrize("client_asked", [False, True])
def test_relay_reads_the_usage_chunk_and_hides_it_from_a_client_that_did_not_ask(piece: int, client_asked: bool) -> None:
    raw = (FIXTURES / "stream_with_usage.sse").read_bytes()
    relay = SseRelay(forward_usage_chunk=client_asked)
    out = b"".join(relay.feed(p) for p in chunked(raw, piece)) + relay.flush()
    assert relay.usage == TokenUsage(prompt=19, completion=2, total=21)
    assert relay.model == "gpt-4o-2024-11-20"
    assert relay.done
    assert (b'"usage":{"completion_tokens"' in out) is client_asked
    expected = raw if client_asked else raw.replace(raw.split(b"\n\n")[5] + b"\n\n", b"")
    assert out == expected


def test_relay_forwards_whole_events_as_soon_as_they_are_complete() -> None:
    relay = SseRelay(forward_usage_chunk=False)
    assert relay.feed(b'data: {"choices":[{"delta":{"content":" a"}}]}') == b""
    assert relay.feed(b"\n\ndata: {") == b'data: {"choices":[{"delta":{"content":" a"}}]}\n\n'


def test_relay_counts_what_was_delivered_when_the_stream_breaks() -> None:
    raw = (FIXTURES / "stream_cut.sse").read_bytes()
    relay = SseRelay(forward_usage_chunk=False)
    relay.feed(raw)
    assert relay.usage is None and not relay.done
    encoding = get_encoding("o200k_base")
    # Content, then the tool call's name and argument fragment, each delta as it arrived; the torn event is not counted.
    pieces = [" one", " two", "get_weather", '{"city"']
    assert relay.delivered_completion_tokens(encoding) == sum(len(encoding.encode(p)) for p in pieces)
    assert relay.model == "gpt-4o-2024-11-20"


def test_relay_accepts_crlf_event_boundaries() -> None:
    relay = SseRelay(forward_usage_chunk=False)
    out = relay.feed(b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\r\n\r\ndata: [DONE]\r\n\r\n')
    assert relay.usage == TokenUsage(1, 1, 2)
    assert out == b"data: [DONE]\n\n" and relay.done


def test_combined_usage_adds_every_count_and_is_reported_only_if_both_were() -> None:
    broken = TokenUsage(100, 0, 100, reported=False)
    answer = TokenUsage(100, 20, 120, cached=64, reasoning=5)
    assert combined(None, None) is None
    assert combined(answer, None) == answer and combined(None, broken) == broken
    assert combined(answer, broken) == TokenUsage(200, 20, 220, cached=64, reasoning=5, reported=False)



def event(delta: dict[str, object], **extra: object) -> bytes:
    import orjson

    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "gpt-4o-2024-11-20",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}], **extra}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def test_relay_memory_stays_bounded_however_long_the_stream() -> None:
    import tracemalloc

    from shared.flow.sse import PENDING_LIMIT_BYTES

    encoding = get_encoding("o200k_base")
    piece = event({"content": " word"}) * 50
    relay = SseRelay(forward_usage_chunk=False, encoding=encoding)
    tracemalloc.start()
    try:
        for _ in range(400):  # ~0.9 MB of events, as n=128 choices send for a short answer
            relay.feed(piece)
        current, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current < 4 * PENDING_LIMIT_BYTES + len(piece)
    assert relay.delivered_completion_tokens() == 20_000


def test_relay_counts_everything_the_backend_bills_as_completion() -> None:
    import base64

    encoding = get_encoding("o200k_base")
    relay = SseRelay(forward_usage_chunk=False, encoding=encoding)
    relay.feed(event({"reasoning_content": "let me think"}))
    relay.feed(event({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": '{"a":1}'}}]}))
    relay.feed(event({"function_call": {"name": "g", "arguments": "{}"}}))
    relay.feed(event({"audio": {"transcript": "hello there", "data": base64.b64encode(b"\0" * 999).decode()}}))
    relay.feed(event({"refusal": "no"}))
    expected = sum(len(encoding.encode(t)) for t in ["let me think", "f", '{"a":1}', "g", "{}", "hello there", "no"])
    assert relay.delivered_completion_tokens() == expected + 10  # 999 bytes of audio: 10 audio tokens at most


@pytest.mark.parametrize("asked", [True, False])
def test_a_client_that_asked_for_usage_gets_it_when_the_backend_sends_none(asked: bool) -> None:
    import orjson

    encoding = get_encoding("o200k_base")
    relay = SseRelay(forward_usage_chunk=asked, encoding=encoding, prompt_tokens=lambda: 12)
    out = relay.feed(event({"role": "assistant", "content": ""}) + event({"content": " Hello"}) + event({"content": " world"}))
    out += relay.feed(event({}, system_fingerprint="fp_1") + b"data: [DONE]\n\n")
    events = [e for e in out.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    if not asked:
        assert b'"usage"' not in out and not relay.synthesized
        return
    chunk = orjson.loads(events[-2][6:])
    assert chunk["choices"] == [] and chunk["id"] == "chatcmpl-1" and chunk["model"] == "gpt-4o-2024-11-20"
    assert chunk["usage"] == {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
    assert chunk["system_fingerprint"] == "fp_1"
    assert relay.synthesized and relay.usage == TokenUsage(12, 2, 14, reported=False)


@pytest.mark.parametrize("cut", [0, 3, 7, 9, 11])
def test_the_relay_says_before_feeding_a_piece_that_it_would_count_usage_even_when_done_is_split(cut: int) -> None:
    asked, not_asked = SseRelay(forward_usage_chunk=True), SseRelay(forward_usage_chunk=False)
    event = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    end = b"data: [DONE]\n\n"
    for relay in (asked, not_asked):
        assert not relay.would_count_usage(event)
        relay.feed(event + end[:cut])
    assert asked.would_count_usage(end[cut:]) and not not_asked.would_count_usage(end[cut:])
