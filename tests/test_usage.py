from __future__ import annotations

from pathlib import Path

import pytest

from shared.flow.tokens import get_encoding
from shared.flow.usage import SseRelay, TokenUsage, combined, usage_from_body

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
    # Content, then the tool call's name and argument fragment, in the order they arrived; the torn event is not counted.
    assert relay.delivered_completion_tokens(encoding) == len(encoding.encode(' one twoget_weather{"city"'))
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
