"""bench.tokenizer_memory: the split it times against tiktoken is the encoding's own (every piece is at least one
token, and the pieces rejoin into the text), and its report states the figures it measured."""

from __future__ import annotations

import regex

from bench.tokenizer_memory import markdown, sample_text, split_against_count
from shared.flow import tokens


def test_the_split_it_times_is_the_encodings_own_split() -> None:
    text = sample_text()
    for name in ("o200k_base", "cl100k_base"):
        encoding = tokens.get_encoding(name)
        pieces = regex.compile(encoding._pat_str).findall(text)
        assert "".join(pieces) == text  # the pattern covers the text: what is timed is a whole split
        assert sum(len(encoding.encode_ordinary(p)) for p in pieces) == len(encoding.encode_ordinary(text))


def test_the_report_carries_the_measured_figures() -> None:
    cpu = split_against_count(1)
    for name in ("o200k_base", "cl100k_base"):
        assert cpu[name]["tokens"] >= cpu[name]["pieces"] > 1_000
        assert cpu[name]["split_over_count"] > 0
    results = {"date": "d", "machine": "m", "floor": {"rss_mb": 68.0}, "cpu": cpu,
               "o200k_base": {"added_mb": 43.0, "build_s": 0.4}, "cl100k_base": {"added_mb": 23.0, "build_s": 0.2}}
    text = markdown(results)
    assert "**68.0 MB**" in text and "| o200k_base | 43.0 MB | 0.40 s |" in text
    assert "worker holds 134 MB" in text and "o200k_base alone 111 MB" in text
