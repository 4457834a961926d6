"""Token counts against known values; encodings load from the installed package, never the network."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator

import pytest

from shared.flow import tokens


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("token counting tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield


def test_encodings_load_offline_and_match_tiktoken(no_network: None) -> None:
    tokens._encodings.clear()
    assert tokens.get_encoding("o200k_base").encode("hello world") == [24912, 2375]
    assert tokens.get_encoding("cl100k_base").encode("hello world") == [15339, 1917]


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-2024-11-20", "o200k_base"),
        ("gpt-4.1-mini", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("gpt-4", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("my-custom-deployment", "o200k_base"),
        (None, "o200k_base"),
    ],
)
def test_encoding_for_model_and_deployment_names(model: str | None, encoding: str) -> None:
    assert tokens.encoding_name_for(model) == encoding


# Prompt token counts as reported by the OpenAI API for these requests (the counting guide's published examples).
COOKBOOK_MESSAGES = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
]


@pytest.mark.parametrize(("model", "expected"), [("gpt-4o", 124), ("gpt-4", 129), ("gpt-3.5-turbo", 129)])
def test_chat_prompt_matches_the_apis_count(model: str, expected: int) -> None:
    encoding = tokens.encoding_for(model)
    assert tokens.count_chat_prompt({"messages": COOKBOOK_MESSAGES}, encoding) == expected


def test_chat_with_tools_matches_the_apis_count() -> None:
    # The counting guide's function-calling example: 101 prompt tokens on gpt-4o.
    body = {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
            {"role": "user", "content": "What's the weather like in San Francisco?"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_current_weather",
                    "description": "Get the current weather in a given location",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                            "unit": {"type": "string", "description": "The unit of temperature to return", "enum": ["celsius", "fahrenheit"]},
                        },
                        "required": ["location"],
                    },
                },
            }
        ],
    }
    assert tokens.count_chat_prompt(body, tokens.encoding_for("gpt-4o")) == 101


def test_assistant_tool_calls_and_tool_results_are_counted() -> None:
    encoding = tokens.encoding_for("gpt-4o")
    plain = {"messages": [{"role": "user", "content": "Weather in Paris?"}]}
    with_call = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        ]
    }
    base = tokens.count_chat_prompt(plain, encoding)
    call = 3 + len(encoding.encode("get_weather")) + len(encoding.encode('{"city":"Paris"}'))
    tool_message = 3 + len(encoding.encode("tool")) + len(encoding.encode("call_1")) + len(encoding.encode('{"temp": 21}'))
    assistant = 3 + len(encoding.encode("assistant")) + call
    assert tokens.count_chat_prompt(with_call, encoding) == base + assistant + tool_message


def test_multimodal_parts_count_text_and_price_images() -> None:
    encoding = tokens.encoding_for("gpt-4o")
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/x.png"}},
    ]}]}
    text = len(encoding.encode("What is in this image?"))
    expected = 3 + 3 + len(encoding.encode("user")) + text + tokens.IMAGE_LOW + tokens.IMAGE_HIGH_DEFAULT
    assert tokens.count_chat_prompt(body, encoding) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hello world", 2),
        (["hello world", "hello"], 3),
        ([24912, 2375, 1], 3),
        ([[24912, 2375], [1]], 3),
        (None, 0),
    ],
)
def test_completions_prompt_and_embeddings_input(value: object, expected: int) -> None:
    encoding = tokens.get_encoding("o200k_base")
    assert tokens.count_completion_prompt({"prompt": value}, encoding) == expected
    assert tokens.count_embedding_input({"input": value}, encoding) == expected


def test_special_token_text_is_counted_not_rejected() -> None:
    encoding = tokens.get_encoding("o200k_base")
    assert tokens.count_text("<|endoftext|>", encoding) > 1


# ---- text the backend bills as prompt that is not in a message's text ---------------------------------------------

HIDDEN = " ".join(f"word{i % 997} detail" for i in range(14_000))  # about 40,000 tokens of schema-like text
BASE = {"messages": [{"role": "user", "content": "hi"}]}


def _hidden_bodies() -> list[tuple[str, dict[str, object]]]:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "description": HIDDEN}
    return [
        ("response_format", {**BASE, "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}}),
        ("tool $defs", {**BASE, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "$defs": {"x": {"description": HIDDEN}}}}}]}),
        ("tool schema description", {**BASE, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "description": HIDDEN, "properties": {}}}}]}),
        ("prediction", {**BASE, "prediction": {"type": "content", "content": HIDDEN}}),
        ("prediction parts", {**BASE, "prediction": {"type": "content", "content": [{"type": "text", "text": HIDDEN}]}}),
        ("unknown part", {"messages": [{"role": "user", "content": [{"type": "future_part", "future_part": {"text": HIDDEN}}]}]}),
    ]


@pytest.mark.parametrize(("name", "body"), _hidden_bodies(), ids=[n for n, _ in _hidden_bodies()])
def test_hidden_prompt_text_is_estimated(name: str, body: dict[str, object]) -> None:
    encoding = tokens.get_encoding()
    hidden = len(encoding.encode(HIDDEN))
    assert hidden > 35_000
    assert tokens.count_chat_prompt(body, encoding) >= hidden


def test_completion_suffix_is_estimated() -> None:
    encoding = tokens.get_encoding()
    assert tokens.count_completion_prompt({"prompt": "def f():", "suffix": HIDDEN}, encoding) >= len(encoding.encode(HIDDEN))


def test_files_and_audio_are_bounded_by_their_size() -> None:
    import base64

    encoding = tokens.get_encoding()
    text = HIDDEN.encode()
    data = "data:text/plain;base64," + base64.b64encode(text).decode()
    part = {"type": "file", "file": {"filename": "notes.txt", "file_data": data}}
    estimate = tokens.count_chat_prompt({"messages": [{"role": "user", "content": [part]}]}, encoding)
    assert estimate >= len(encoding.encode(HIDDEN))
    # A file by id (size unknown) still costs something.
    by_id = {"type": "file", "file": {"file_id": "file-1"}}
    assert tokens.count_chat_prompt({"messages": [{"role": "user", "content": [by_id]}]}, encoding) >= tokens.FILE_MIN_TOKENS
    # Ten seconds of 8 kHz 8-bit wav is about 100 audio tokens; 60 s of 8 kbit/s mp3 about 600.
    wav = {"type": "input_audio", "input_audio": {"format": "wav", "data": base64.b64encode(b"\0" * 80_000).decode()}}
    mp3 = {"type": "input_audio", "input_audio": {"format": "mp3", "data": base64.b64encode(b"\0" * 60_000).decode()}}
    assert tokens.count_chat_prompt({"messages": [{"role": "user", "content": [wav]}]}, encoding) >= 100
    assert tokens.count_chat_prompt({"messages": [{"role": "user", "content": [mp3]}]}, encoding) >= 600


def test_long_texts_are_counted_in_pieces_close_to_a_whole_count() -> None:
    encoding = tokens.get_encoding()
    text = "The quick brown fox jumps over the lazy dog. " * 5_000
    whole = len(encoding.encode(text))
    tokens._counts.clear()
    pieces = tokens.count_text(text, encoding)
    assert whole <= pieces <= whole * 1.002
    # One long "word": no whitespace to cut at; still linear, still an upper-side count.
    word = "a" * 200_000
    assert len(encoding.encode(word)) <= tokens.count_text(word, encoding) <= len(encoding.encode(word)) * 1.01


def test_the_count_cache_keeps_no_prompt_text_and_stays_bounded() -> None:
    encoding = tokens.get_encoding()
    tokens._counts.clear()
    text = "secret prompt " * 100
    tokens.count_text(text, encoding)
    for i in range(tokens._CACHE_MAX_ENTRIES + 100):
        tokens.count_text(f"{i} distinct prompt text, long enough to be cached by the counter ....", encoding)
    assert len(tokens._counts) == tokens._CACHE_MAX_ENTRIES  # the oldest went first
    assert (encoding.name, tokens.text_digest(text)) not in tokens._counts
    for name, digest in tokens._counts:  # an encoding name and a 16-byte digest: never the text
        assert name in tokens.SUPPORTED_ENCODINGS and isinstance(digest, bytes) and len(digest) == 16


def test_texts_whose_python_hashes_collide_never_share_a_count(monkeypatch: pytest.MonkeyPatch) -> None:
    encoding = tokens.get_encoding()
    tokens._counts.clear()
    # Every hash() the counting module takes now collides, as two texts of a caller's choosing could under a key of
    # (length, hash): the second text must still get its own count, not the first one's.
    monkeypatch.setattr(tokens, "hash", lambda _value: 0, raising=False)
    letters, words = "a" * 100, " a" * 50
    assert len(letters) == len(words) and len(encoding.encode(letters)) != len(encoding.encode(words))
    assert tokens.count_text(letters, encoding) == len(encoding.encode(letters))
    assert tokens.count_text(words, encoding) == len(encoding.encode(words))
    assert tokens.count_text(letters, encoding) == len(encoding.encode(letters))


def test_a_text_with_lone_surrogates_is_counted_and_keyed_apart_from_its_replacement() -> None:
    encoding = tokens.get_encoding()
    tokens._counts.clear()
    padding = " word" * 20
    lone, replaced = "\ud800" + padding, "?" + padding
    assert tokens.text_digest(lone) != tokens.text_digest(replaced)
    assert tokens.count_text(lone, encoding) >= 20
    assert tokens.count_text(replaced, encoding) == len(encoding.encode(replaced))


# ---- images by model family (issue 24) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "high", "low"),
    [
        ("gpt-4o", 765, 85),  # tiles: 85 + 170 per 512-px tile, 1024x1024 -> 768x768 -> 4 tiles
        ("gpt-4o-2024-11-20", 765, 85),
        ("gpt-4o-mini", 25_501, 2_833),  # the same tiles, billed at 2,833 + 5,667 each
        ("gpt-4o-mini-2024-07-18", 25_501, 2_833),
        ("gpt-4.1", 765, 85),
        ("gpt-4.1-mini", 1_659, 1_659),  # patches: 1,024 of 32 px, x 1.62, whatever the detail
        ("gpt-4.1-nano", 2_520, 2_520),
        ("o4-mini", 1_762, 1_762),
        ("gpt-5", 630, 70),
        ("gpt-5-mini", 1_659, 1_659),
        ("o3", 675, 75),
        ("my-deployment", 765, 85),  # a name that says nothing: the gpt-4o figures
    ],
)
def test_an_image_is_estimated_by_model_family(model: str, high: int, low: int) -> None:
    from shared.flow.tokens import image_tokens

    assert image_tokens(model, "high") == high == image_tokens(model, "auto")
    assert image_tokens(model, "low") == low


def test_the_image_adjustment_takes_the_costliest_model_a_deployment_is_served_as() -> None:
    from shared.flow.tokens import image_adjustment

    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/b.png", "detail": "low"}},
    ]}]}
    assert image_adjustment(body, ("gpt-4o",)) == 0
    assert image_adjustment(body, ("vision", "gpt-4o-mini")) == (25_501 - 765) + (2_833 - 85)
    responses_body = {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}
    assert image_adjustment(responses_body, ("gpt-4o-mini",)) == 25_501 - 765


def test_the_readme_states_the_size_bounds_the_estimate_uses() -> None:
    import pathlib

    readme = " ".join((pathlib.Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8").split())
    assert f"a file at {tokens.FILE_BYTES_PER_TOKEN} bytes a token" in readme
    assert f"as {tokens.FILE_REFERENCE_TOKENS:,} tokens" in readme


def test_a_bpe_file_is_read_only_when_it_is_the_one_tiktoken_expects() -> None:
    raw = b"IQ== 0\nIg== 1\n\nIyM= 2\n"  # "!", '"', "##"; a blank line is no entry
    digest = hashlib.sha256(raw).hexdigest()
    assert tokens.parse_ranks("x", raw, digest) == {b"!": 0, b'"': 1, b"##": 2}
    with pytest.raises(tokens.EncodingUnavailable, match="expected hash"):
        tokens.parse_ranks("x", raw + b"JA== 3\n", digest)
    with pytest.raises(tokens.EncodingUnavailable, match="not token-rank pairs"):
        tokens.parse_ranks("x", b"IQ== 0\nIg==\n", None)
