"""The Responses API's pure parts: body checks, the input estimate, the backend URL, usage, and the event relay."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from shared.config import Backend
from shared.edge.errors import GatewayError
from shared.flow import responses, tokens
from shared.flow.responses import (
    ResponsesRelay,
    backend_url,
    check_create,
    count_input,
    created_from_object,
)
from shared.flow.tokens import (
    FILE_BYTES_PER_TOKEN,
    FILE_REFERENCE_TOKENS,
    IMAGE_HIGH_DEFAULT,
    IMAGE_LOW,
    REPLY_PRIMING,
    TOKENS_PER_MESSAGE,
    count_text,
    count_tools,
    get_encoding,
)
from shared.flow.usage import usage_from_body
from shared.records.usage import TokenUsage
from tools.simulator.responses_api import _finished, _response, stream_events

ENC = get_encoding("o200k_base")
AZURE = Backend(id="uk", endpoint="https://uk.openai.azure.com", region="uksouth", deployments={"gpt-4o": "gpt-4o-ptu"})
COMPATIBLE = Backend(id="oss", endpoint="http://10.0.0.5:8000/v1", region="onprem", deployments={"gpt-4o": "llama"}, api="openai")


@pytest.mark.parametrize(
    "body",
    [
        {"input": "hi"},
        {"input": [{"role": "user", "content": "hi"}], "instructions": "be brief", "max_output_tokens": 16},
        {"input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"},
                                                                   {"type": "input_image", "image_url": "https://x"}]}]},
        {"input": [{"type": "function_call_output", "call_id": "c1", "output": "42"}], "previous_response_id": "resp_1"},
        {"previous_response_id": "resp_abc-1", "tools": [{"type": "function", "name": "f", "parameters": {}}]},
        {"input": "x", "stream": None, "store": None, "background": None},
        {"prompt": {"id": "pmpt_1"}},
    ],
)
def test_valid_bodies(body: dict[str, Any]) -> None:
    check_create(body)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": 5}, "input"),
        ({"input": {"role": "user"}}, "input"),
        ({"input": ["hi"]}, "input[0]"),
        ({"input": [{"content": "hi"}]}, "input[0]"),
        ({"input": [{"type": "message", "content": "hi"}]}, "input[0].role"),
        ({"input": [{"role": 1, "content": "hi"}]}, "input[0]"),
        ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
        ({"input": [{"role": "user", "content": [{"text": "no type"}]}]}, "input[0].content[0]"),
        ({"input": "x", "instructions": ["a"]}, "instructions"),
        ({"input": "x", "tools": {"type": "function"}}, "tools"),
        ({"input": "x", "tools": [{"name": "f"}]}, "tools[0]"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "max_output_tokens": True}, "max_output_tokens"),
        ({"input": "x", "max_output_tokens": "16"}, "max_output_tokens"),
        ({"input": "x", "previous_response_id": "../resp_1"}, "previous_response_id"),
        ({"input": "x", "previous_response_id": "resp/1"}, "previous_response_id"),
        ({"input": "x", "previous_response_id": "r" * 201}, "previous_response_id"),
        ({"input": "x", "previous_response_id": 7}, "previous_response_id"),
        ({"input": "x", "stream": "true"}, "stream"),
        ({"input": "x", "store": 1}, "store"),
        ({"input": "x", "background": True, "store": False}, "store"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ],
)
def test_bad_bodies_are_400_naming_the_parameter(body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as caught:
        check_create(body)
    assert caught.value.status == 400 and caught.value.param == param


def test_shape() -> None:
    shape = check_create({"input": "x", "max_output_tokens": 64, "stream": True, "background": True, "previous_response_id": "resp_9"})
    assert (shape.max_output_tokens, shape.stream, shape.store, shape.background, shape.previous_response_id) == (
        64, True, True, True, "resp_9")
    assert check_create({"input": "x", "store": False}).store is False


def test_string_input_and_instructions() -> None:
    body = {"input": "Tell me about the fox.", "instructions": "Be brief."}
    expected = REPLY_PRIMING + 2 * TOKENS_PER_MESSAGE + count_text(body["input"], ENC) + count_text(body["instructions"], ENC)
    assert count_input(body, ENC) == expected
    assert count_input(body, ENC, context_tokens=1000) == expected + 1000


def test_items_with_images_and_files() -> None:
    blob = base64.b64encode(b"\0" * 40_000).decode()
    body = {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "look"},
        {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"},
        {"type": "input_image", "file_id": "file-1"},
        {"type": "input_file", "file_id": "file-2"},
        {"type": "input_file", "file_url": "https://x/doc.pdf"},
        {"type": "input_file", "filename": "a.pdf", "file_data": f"data:application/pdf;base64,{blob}"},
    ]}]}
    expected = (REPLY_PRIMING + TOKENS_PER_MESSAGE + count_text("user", ENC) + count_text("look", ENC) + IMAGE_LOW
                + IMAGE_HIGH_DEFAULT + 2 * FILE_REFERENCE_TOKENS + count_text("a.pdf", ENC)
                - (-40_000 // FILE_BYTES_PER_TOKEN))
    assert count_input(body, ENC) == expected


def test_inline_file_is_estimated_by_size_not_tokenized() -> None:
    # 6 MB of base64 that would tokenize to millions of tokens (and seconds of CPU) is estimated from its length.
    blob = base64.b64encode(bytes(range(256)) * 18_000).decode()
    body = {"input": [{"role": "user", "content": [{"type": "input_file", "file_data": blob}]}]}
    assert count_input(body, ENC) == REPLY_PRIMING + TOKENS_PER_MESSAGE + 1 + 256 * 18_000 // FILE_BYTES_PER_TOKEN


@pytest.mark.parametrize("content", [
    {"file_data": "data:application/pdf;base64," + base64.b64encode(b"\1" * 30_001).decode(), "filename": "a.pdf"},
    {"file_data": base64.b64encode(b"x").decode()},  # smaller than a page image
    {"file_id": "file-1"},
    {"file_id": "file-1", "filename": "quarterly report.pdf"},
])
def test_a_file_costs_the_same_in_a_chat_and_a_responses_body(content: dict[str, str]) -> None:
    chat = {"messages": [{"role": "user", "content": [{"type": "file", "file": content}]}]}
    items = {"input": [{"role": "user", "content": [{"type": "input_file", **content}]}]}
    text_only = count_input({"input": [{"role": "user", "content": []}]}, ENC)
    chat_text_only = tokens.count_chat_prompt({"messages": [{"role": "user", "content": []}]}, ENC)
    assert count_input(items, ENC) - text_only == tokens.count_chat_prompt(chat, ENC) - chat_text_only > 0


@pytest.mark.parametrize(("audio_format", "size"), [("wav", 80_000), ("mp3", 60_001), ("pcm16", 3)])
def test_input_audio_costs_the_same_in_a_chat_and_a_responses_body(audio_format: str, size: int) -> None:
    audio = {"format": audio_format, "data": base64.b64encode(b"\0" * size).decode()}
    part = {"type": "input_audio", "input_audio": audio}
    chat = tokens.count_chat_prompt({"messages": [{"role": "user", "content": [part]}]}, ENC)
    chat_empty = tokens.count_chat_prompt({"messages": [{"role": "user", "content": []}]}, ENC)
    items = count_input({"input": [{"role": "user", "content": [part]}]}, ENC)
    items_empty = count_input({"input": [{"role": "user", "content": []}]}, ENC)
    assert items - items_empty == chat - chat_empty > 0


@pytest.mark.parametrize("detail", ["low", "high", "auto", None])
def test_an_image_costs_the_same_in_a_chat_and_a_responses_body(detail: str | None) -> None:
    url: dict[str, str] = {"url": "https://x/y.png", **({"detail": detail} if detail else {})}
    chat = tokens.count_chat_prompt({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": url}]}]}, ENC)
    chat_empty = tokens.count_chat_prompt({"messages": [{"role": "user", "content": []}]}, ENC)
    image = {"type": "input_image", "image_url": url["url"], **({"detail": detail} if detail else {})}
    items = count_input({"input": [{"role": "user", "content": [image]}]}, ENC)
    items_empty = count_input({"input": [{"role": "user", "content": []}]}, ENC)
    assert items - items_empty == chat - chat_empty == (IMAGE_LOW if detail == "low" else IMAGE_HIGH_DEFAULT)


def test_tool_calls_and_outputs_and_unknown_items() -> None:
    call = {"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": '{"city":"Paris"}'}
    output = {"type": "function_call_output", "call_id": "c", "output": "sunny"}
    other = {"type": "web_search_call", "id": "ws_1", "status": "completed"}
    reference = {"type": "item_reference", "id": "msg_1"}
    total = count_input({"input": [call, output, other, reference]}, ENC)
    assert total == (REPLY_PRIMING + 3 * TOKENS_PER_MESSAGE + count_text("get_weather", ENC) + count_text(call["arguments"], ENC)
                     + count_text("sunny", ENC) + count_text(orjson.dumps(other).decode(), ENC))


def test_flat_function_tools_count_as_chat_tools() -> None:
    parameters = {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}}}
    flat = [{"type": "function", "name": "get_weather", "description": "Weather.", "parameters": parameters},
            {"type": "web_search_preview"}]
    nested = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": parameters}},
              {"type": "web_search_preview"}]
    assert count_input({"input": "x", "tools": flat}, ENC) == count_input({"input": "x"}, ENC) + count_tools(nested, ENC)


def test_hostile_shapes_do_not_break_the_estimate() -> None:
    for value in (None, 5, [None, 1, "x", {"type": 5}, {"role": "user", "content": {"a": 1}}], {"a": 1}):
        assert count_input({"input": value, "tools": "nope", "instructions": 5}, ENC) >= REPLY_PRIMING


def test_backend_urls() -> None:
    assert backend_url(AZURE, True, "2025-04-01-preview") == "https://uk.openai.azure.com/openai/responses?api-version=2025-04-01-preview"
    assert backend_url(AZURE, True, None) == "https://uk.openai.azure.com/openai/v1/responses"
    assert backend_url(AZURE, False, None, "/resp_1/input_items") == "https://uk.openai.azure.com/openai/v1/responses/resp_1/input_items"
    assert backend_url(AZURE, False, "preview") == "https://uk.openai.azure.com/openai/v1/responses?api-version=preview"
    assert backend_url(COMPATIBLE, True, "2025-04-01-preview", "/resp_1") == "http://10.0.0.5:8000/v1/responses/resp_1"


def test_usage_from_a_response_body() -> None:
    body = {"id": "resp_1", "object": "response", "model": "gpt-4o", "usage": {
        "input_tokens": 1200, "input_tokens_details": {"cached_tokens": 1024}, "output_tokens": 70,
        "output_tokens_details": {"reasoning_tokens": 30}, "total_tokens": 1270}}
    usage, model = usage_from_body(orjson.dumps(body))
    assert usage == TokenUsage(prompt=1200, completion=70, total=1270, cached=1024, reasoning=30)
    assert model == "gpt-4o"
    assert usage_from_body(b'{"object":"response","usage":null,"status":"queued"}')[0] is None


def test_created_from_object() -> None:
    assert created_from_object({"id": "resp_1", "object": "response", "model": "m", "store": True}) == responses.Created(
        "resp_1", "m", True, False)
    assert created_from_object({"id": "resp_1", "object": "response", "store": False, "background": True}) == responses.Created(
        "resp_1", None, False, True)
    for hostile in (None, [], {"id": "a/b", "object": "response"}, {"id": 5}, {"id": "resp_1", "object": "list"}):
        assert created_from_object(hostile) is None


def recorded_stream(words: int = 9) -> tuple[bytes, dict[str, Any]]:
    body = {"model": "gpt-4o", "input": "hi"}
    response = _response(body, "gpt-4o-2024-11-20", "completed")
    vocabulary = tuple(f" w{i}" for i in range(words))
    final = _finished(response, vocabulary, 17, False)
    return b"".join(stream_events(response, vocabulary, final)), response


@pytest.mark.parametrize("size", [1, 7, 64, 100_000])
def test_relay_passes_every_byte_through_and_reads_created_and_usage(size: int) -> None:
    raw, response = recorded_stream()
    relay = ResponsesRelay()
    out = b"".join(relay.feed(raw[i : i + size]) for i in range(0, len(raw), size)) + relay.flush()
    assert out == raw
    assert relay.done and relay.status == "completed"
    assert relay.usage == TokenUsage(17, 9, 26)
    # Its output's items are known once it is done: a stored response's items may be referenced later.
    items = tuple(item["id"] for item in orjson.loads(raw.split(b"event: response.completed\ndata: ")[1].split(b"\n")[0])[
        "response"]["output"])
    assert items and relay.created == responses.Created(response["id"], "gpt-4o-2024-11-20", True, False, items)
    assert relay.created_pending and relay.model == "gpt-4o-2024-11-20"
    assert relay.events_forwarded == raw.count(b"\n\n")


def test_relay_forwards_each_event_as_soon_as_it_is_whole() -> None:
    raw, _ = recorded_stream()
    first_end = raw.index(b"\n\n") + 2
    relay = ResponsesRelay()
    assert relay.feed(raw[: first_end - 1]) == b""
    assert relay.feed(raw[first_end - 1 : first_end]) == raw[:first_end]


def test_a_cut_stream_counts_what_was_delivered() -> None:
    raw, _ = recorded_stream()
    cut = raw[: raw.index(b"event: response.output_text.done")]
    relay = ResponsesRelay()
    relay.feed(cut)
    assert not relay.done and relay.usage is None
    assert relay.delivered_completion_tokens(ENC) == count_text("".join(f" w{i}" for i in range(9)), ENC)


def test_relay_memory_stays_bounded_however_long_the_stream() -> None:
    """Deltas are counted and let go past PENDING_LIMIT_BYTES: a long Responses stream holds no more than that plus
    the current event, and what it delivered is still counted whole."""
    import tracemalloc

    from shared.flow.sse import PENDING_LIMIT_BYTES

    delta = b"event: response.output_text.delta\ndata: " + orjson.dumps(
        {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0,
         "delta": " word"}) + b"\n\n"
    piece = delta * 50
    relay = ResponsesRelay(ENC)
    tracemalloc.start()
    try:
        for _ in range(200):  # ~1.5 MB of delta events
            relay.feed(piece)
        current, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current < 4 * PENDING_LIMIT_BYTES + len(piece)
    assert relay.delivered_completion_tokens() == 10_000


def test_events_without_event_lines_and_with_crlf() -> None:
    raw, _ = recorded_stream(3)
    data_only = b"".join(line + b"\n" for line in raw.split(b"\n") if not line.startswith(b"event:")).replace(b"\n\n\n", b"\n\n")
    crlf = raw.replace(b"\n", b"\r\n")
    for variant in (data_only, crlf):
        relay = ResponsesRelay()
        relay.feed(variant)
        assert relay.done and relay.usage == TokenUsage(17, 3, 20) and relay.created is not None
        assert relay.delivered_completion_tokens(ENC) == count_text(" w0 w1 w2", ENC)


def test_incomplete_and_failed_end_the_stream() -> None:
    for kind, status in ((b"response.incomplete", "incomplete"), (b"response.failed", "failed")):
        event = b"event: " + kind + b"\ndata: " + orjson.dumps(
            {"type": kind.decode(), "response": {"status": status, "usage": {"input_tokens": 5, "output_tokens": 1}}}) + b"\n\n"
        relay = ResponsesRelay()
        relay.feed(event)
        assert relay.done and relay.status == status and relay.usage == TokenUsage(5, 1, 6)


def test_the_interruption_event_is_a_typed_error_the_sdk_raises() -> None:
    relay = ResponsesRelay()
    relay.feed(b'event: response.in_progress\ndata: {"type":"response.in_progress"}\n\n')
    event = relay.interrupted("The backend's stream broke off.")
    assert event.startswith(b"event: error\ndata: ")
    body = orjson.loads(event.split(b"data: ", 1)[1])
    assert body["type"] == "error" and body["code"] == "stream_interrupted" and body["sequence_number"] == 1
    assert body["error"]["code"] == "stream_interrupted"
