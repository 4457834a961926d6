"""The simulator's bodies and stream events: exact, re-countable completions and Azure's shapes."""

from __future__ import annotations

import base64
import struct

import orjson
import pytest

from shared.flow.tokens import count_text, get_encoding
from tools.simulator.responses import VOCABULARY, ChunkWriter, completion_words, embeddings


@pytest.mark.parametrize("encoding", ["o200k_base", "cl100k_base"])
def test_vocabulary_words_are_single_tokens(encoding: str) -> None:
    enc = get_encoding(encoding)
    assert len(set(VOCABULARY)) == len(VOCABULARY)
    assert [w for w in VOCABULARY if len(enc.encode(w)) != 1] == []


@pytest.mark.parametrize("encoding", ["o200k_base", "cl100k_base"])
@pytest.mark.parametrize(("count", "seed"), [(1, 0), (12, 5), (40, 123), (500, 7)])
def test_a_completion_of_n_words_is_n_tokens(encoding: str, count: int, seed: int) -> None:
    words = completion_words(count, seed)
    assert len(words) == count
    assert count_text("".join(words), get_encoding(encoding)) == count


def test_completions_walk_the_whole_vocabulary() -> None:
    assert set(completion_words(len(VOCABULARY), 3)) == set(VOCABULARY)


def test_stream_events_are_valid_json_with_usage_null_only_when_usage_is_asked_for() -> None:
    for include_usage in (False, True):
        writer = ChunkWriter("gpt-4o-2024-11-20", chat=True, include_usage=include_usage)
        chunk = orjson.loads(writer.word(" fox")[len(b"data: "):])
        assert chunk["choices"][0]["delta"] == {"content": " fox"} and chunk["id"] == writer.id
        assert ("usage" in chunk) is include_usage and chunk.get("usage") is None
    text = ChunkWriter("m", chat=False, include_usage=False)
    assert orjson.loads(text.word(" fox")[6:])["choices"][0]["text"] == " fox"


def test_embeddings_in_both_formats_agree_and_are_unit_vectors() -> None:
    floats = orjson.loads(embeddings("m", 2, 8, False, 3))
    packed = orjson.loads(embeddings("m", 2, 8, True, 3))
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    for as_floats, as_base64 in zip(floats["data"], packed["data"], strict=True):
        decoded = list(struct.unpack("<8f", base64.b64decode(as_base64["embedding"])))
        assert decoded == as_floats["embedding"]
        assert sum(v * v for v in decoded) == pytest.approx(1.0, abs=1e-5)
    assert floats["data"][0]["embedding"] != floats["data"][1]["embedding"]
