"""An answer's two forms: a stream assembled into the whole answer, a whole answer replayed as a stream, and back."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from shared.flow import sse
from shared.flow.answer_forms import StreamAssembler, as_events, complete_answer
from tests.fakes.upstream import sse_events


def event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


FILTER = {"hate": {"filtered": False, "severity": "safe"}}
# As Azure OpenAI streams a chat answer: a first event with only the prompt's filter results and every head field
# empty, the role, the words, the finish, the usage.
AZURE = (
    event({"choices": [], "created": 0, "id": "", "model": "", "object": "",
           "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": FILTER}]}),
    event({"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 7, "model": "gpt-4o-2024-11-20",
           "choices": [{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None},
                        "finish_reason": None, "logprobs": None, "content_filter_results": {}}]}),
    *(event({"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 7, "model": "gpt-4o-2024-11-20",
             "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None, "content_filter_results": FILTER}]})
      for w in ("Red", ", green", " and blue.")),
    event({"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 7, "model": "gpt-4o-2024-11-20",
           "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "content_filter_results": {}}]}),
    event({"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 7, "model": "gpt-4o-2024-11-20",
           "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}}),
    b"data: [DONE]\n\n",
)


def assemble(events: tuple[bytes, ...] | list[bytes], split: int = 7) -> dict[str, Any] | None:
    assembler = StreamAssembler(1_000_000)
    data = b"".join(events)
    for start in range(0, len(data), split):  # pieces that cut events anywhere
        assembler.feed(data[start:start + split])
    whole = assembler.answer()
    return None if whole is None else orjson.loads(whole)


def replayed_text(body: bytes, include_usage: bool) -> tuple[str, Any]:
    text, usage = [], None
    for raw in sse.split_events(as_events(body, include_usage))[0]:
        obj = sse.event_object(raw)
        if obj is None:
            continue
        for choice in obj["choices"]:
            text.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
        usage = obj.get("usage") or usage
    return "".join(text), usage


def test_an_azure_stream_is_assembled_into_its_whole_answer_and_replayed_the_same() -> None:
    whole = assemble(AZURE)
    assert whole is not None and whole["object"] == "chat.completion" and whole["id"] == "chatcmpl-9"
    assert whole["model"] == "gpt-4o-2024-11-20" and whole["created"] == 7
    assert whole["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Red, green and blue."},
                                 "finish_reason": "stop", "logprobs": None}]
    assert whole["usage"]["total_tokens"] == 15 and whole["prompt_filter_results"][0]["prompt_index"] == 0
    body = orjson.dumps(whole)
    assert replayed_text(body, include_usage=False) == ("Red, green and blue.", None)
    assert replayed_text(body, include_usage=True)[1] == whole["usage"]
    again = assemble(list(sse.split_events(as_events(body, include_usage=True))[0]))
    assert again == whole  # replaying and assembling again changes nothing


def test_tool_calls_and_completions_are_rebuilt() -> None:
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    calls = [
        event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_", "arguments": ""}}]}}]}),
        event({**head, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"name": "weather", "arguments": '{"city":'}}]}}]}),
        event({**head, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": '"Paris"}'}}]}}]}),
        event({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        event({**head, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}),
        b"data: [DONE]\n\n",
    ]
    whole = assemble(calls)
    assert whole is not None
    assert whole["choices"][0]["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    assert assemble(list(sse.split_events(as_events(orjson.dumps(whole), True))[0])) == whole

    text = [event({"id": "t", "object": "text_completion", "created": 1, "model": "m",
                   "choices": [{"index": 0, "text": w, "finish_reason": None, "logprobs": None}]}) for w in ("a", "b")]
    text += [event({"id": "t", "object": "text_completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": None}]}),
             event({"id": "t", "object": "text_completion", "created": 1, "model": "m", "choices": [],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}),
             b"data: [DONE]\n\n"]
    whole = assemble(text)
    assert whole is not None and whole["object"] == "text_completion" and whole["choices"][0]["text"] == "ab"
    assert replayed_text(orjson.dumps(whole), False)[0] == "ab"


@pytest.mark.parametrize("events", [
    sse_events(5)[:-1],  # no [DONE]: broken off
    sse_events(5, with_usage=False),  # no usage: the backend's figures are what a hit saves
    tuple(e.replace(b'"finish_reason":"length"', b'"finish_reason":"content_filter"') for e in sse_events(5)),
    tuple(e.replace(b'"delta":{"content"', b'"logprobs":{"content":[]},"delta":{"content"', 1) for e in sse_events(5)),
    tuple(e.replace(b'"delta":{"content"', b'"delta":{"audio":{"data":"AAA"},"content"', 1) for e in sse_events(5)),
    (event({"choices": [{"index": 0, "delta": {"content": "x"}, "content_filter_results":
                        {"violence": {"filtered": True}}}]}), *sse_events(1)),
])
def test_a_stream_that_cannot_be_kept_whole_is_not(events: tuple[bytes, ...]) -> None:
    assert assemble(events) is None


def test_assembly_stops_at_its_limit() -> None:
    assembler = StreamAssembler(100)
    for piece in sse_events(50):
        assembler.feed(piece)
    assert assembler.broken and assembler.answer() is None


@pytest.mark.parametrize(("answer", "complete"), [
    ({"choices": [{"finish_reason": "stop"}]}, True),
    ({"choices": [{"finish_reason": "content_filter"}]}, False),
    ({"choices": [{"finish_reason": "stop", "content_filter_results": {"sexual": {"filtered": True}}}]}, False),
    ({"prompt_filter_results": [{"content_filter_results": {"jailbreak": {"filtered": True, "detected": True}}}],
      "choices": [{"finish_reason": "stop"}]}, False),
    ({"object": "response", "status": "incomplete"}, False),
    ({"object": "response", "status": "completed"}, True),
    ({"object": "list", "data": []}, True),
    ([], False),
])
def test_which_whole_answers_are_complete(answer: Any, complete: bool) -> None:
    assert complete_answer(answer) is complete
