"""The prompt's upper bound (tokens.Utf8Bytes through the counter's own walk) is never below the exact count, for any
text and any shape of request: admission reserves it in place of the count, so it must never under-reserve."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.flow import responses, tokens

ENCODINGS = [tokens.get_encoding(name) for name in tokens.SUPPORTED_ENCODINGS]
SPECIAL = ["<|endoftext|>", "<|endofprompt|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|start|>"]
SNIPPETS = ["中文字符", "😀", "👩‍👩‍👧", "é", "\u0000", "\t\r\n", "  ", "aaaaaaaaaaaaaaaa", "1234567890", "{\"a\": [1]}"]

# Text as a body can carry it (orjson never yields a lone surrogate): any character, special-token text, emoji, CJK,
# control characters, long runs.
piece = st.one_of(st.text(max_size=30), st.sampled_from(SPECIAL), st.sampled_from(SNIPPETS))
text = st.builds(lambda parts, times: "".join(parts) * times, st.lists(piece, max_size=8),
                 st.sampled_from([1, 1, 1, 3, 40, 300]))
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3),
    max_leaves=8,
)
base64_data = st.binary(max_size=3_000).map(lambda raw: base64.b64encode(raw).decode())

part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, text),
    st.builds(lambda d: {"type": "image_url", "image_url": {"url": "https://example.test/a.png", "detail": d}},
              st.sampled_from(["low", "high", "auto"])),
    st.builds(lambda f, d: {"type": "input_audio", "input_audio": {"format": f, "data": d}},
              st.sampled_from(["wav", "mp3", "pcm16"]), base64_data),
    st.builds(lambda n, d: {"type": "file", "file": {"filename": n, "file_data": d}}, text, base64_data),
    st.builds(lambda i: {"type": "file", "file": {"file_id": i}}, text),
    st.builds(lambda t: {"type": "refusal", "refusal": t}, text),
    st.builds(lambda k, v: {"type": "x-unknown", k: v}, text, json_value),
)
call = st.builds(lambda n, a: {"id": "call_1", "type": "function", "function": {"name": n, "arguments": a}}, text, text)
message = st.builds(
    lambda role, content, extra: {"role": role, "content": content, **extra},
    st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
    st.one_of(st.none(), text, st.lists(part, max_size=4)),
    st.fixed_dictionaries({}, optional={
        "name": text, "tool_calls": st.lists(call, max_size=2), "tool_call_id": text,
        "function_call": st.builds(lambda n, a: {"name": n, "arguments": a}, text, text),
    }),
)
prop = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["string", "integer", "object", "array"]), "description": text,
    "enum": st.lists(st.one_of(text, st.integers()), max_size=3), "items": json_value, "properties": json_value,
})
function = st.fixed_dictionaries({"name": text}, optional={
    "description": text,
    "parameters": st.one_of(
        st.fixed_dictionaries({"type": st.just("object")}, optional={
            "properties": st.dictionaries(text, st.one_of(prop, json_value), max_size=3),
            "required": st.lists(text, max_size=2), "$defs": json_value, "description": text,
        }),
        json_value,
    ),
})
tool = st.one_of(st.builds(lambda f: {"type": "function", "function": f}, function),
                 st.builds(lambda v: {"type": "custom", "spec": v}, json_value))
chat_body = st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}, optional={
    "tools": st.lists(tool, max_size=2),
    "functions": st.lists(function, max_size=2),
    "response_format": st.one_of(
        st.builds(lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}, json_value),
        st.just({"type": "json_object"}),
    ),
    "prediction": st.builds(lambda c: {"type": "content", "content": c}, st.one_of(text, st.lists(part, max_size=2))),
})
token_ids = st.lists(st.integers(0, 100_000), min_size=1, max_size=50)
inputs = st.one_of(text, st.lists(text, max_size=4), token_ids, st.lists(token_ids, max_size=3))
item = st.one_of(
    st.builds(lambda r, c: {"type": "message", "role": r, "content": c}, st.sampled_from(["user", "assistant"]),
              st.one_of(text, st.lists(st.one_of(
                  st.builds(lambda t: {"type": "input_text", "text": t}, text),
                  st.builds(lambda d: {"type": "input_image", "detail": d}, st.sampled_from(["low", "high"])),
                  st.builds(lambda d: {"type": "input_file", "file_data": d}, base64_data),
              ), max_size=3))),
    st.builds(lambda n, a: {"type": "function_call", "name": n, "arguments": a, "call_id": "c"}, text, text),
    st.builds(lambda o: {"type": "function_call_output", "call_id": "c", "output": o}, text),
    st.builds(lambda s: {"type": "reasoning", "summary": [{"type": "summary_text", "text": s}]}, text),
    st.builds(lambda v: {"type": "web_search_call", "action": v}, json_value),
)
responses_body = st.fixed_dictionaries({}, optional={
    "instructions": text, "input": st.one_of(text, st.lists(item, max_size=4)),
    "tools": st.lists(st.builds(lambda f: {"type": "function", **f}, function), max_size=2),
})

EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@EXAMPLES
@given(st.text(alphabet=st.characters(exclude_categories=()), max_size=300), st.sampled_from([1, 2, 50]))
def test_any_text_has_no_more_tokens_than_utf8_bytes(value: str, times: int) -> None:
    value = value * times  # lone surrogates included: tiktoken encodes them as U+FFFD, 3 bytes like theirs here
    for encoding in ENCODINGS:
        assert tokens.count_text(value, tokens.UTF8_BYTES) >= tokens.count_text(value, encoding)


@EXAMPLES
@given(chat_body)
def test_the_chat_bound_is_never_below_the_count(body: dict[str, Any]) -> None:
    for encoding in ENCODINGS:
        assert tokens.count_chat_prompt(body, tokens.UTF8_BYTES) >= tokens.count_chat_prompt(body, encoding)


@EXAMPLES
@given(inputs, st.one_of(st.none(), text))
def test_the_completions_and_embeddings_bounds_are_never_below_the_count(value: Any, suffix: str | None) -> None:
    body = {"prompt": value, "input": value, **({"suffix": suffix} if suffix is not None else {})}
    for encoding in ENCODINGS:
        assert tokens.count_completion_prompt(body, tokens.UTF8_BYTES) >= tokens.count_completion_prompt(body, encoding)
        assert tokens.count_embedding_input(body, tokens.UTF8_BYTES) >= tokens.count_embedding_input(body, encoding)


@EXAMPLES
@given(responses_body, st.integers(0, 10_000))
def test_the_responses_bound_is_never_below_the_count(body: dict[str, Any], context: int) -> None:
    for encoding in ENCODINGS:
        assert responses.count_input(body, tokens.UTF8_BYTES, context) >= responses.count_input(body, encoding, context)


@pytest.mark.parametrize("value, expected", [("", 0), ("hello", 5), ("é", 2), ("中", 3), ("😀", 4), ("\ud800", 3)])
def test_utf8_length(value: str, expected: int) -> None:
    assert tokens.utf8_length(value) == expected
