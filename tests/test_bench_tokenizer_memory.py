"""bench.tokenizer_memory: the split it times against tiktoken is the encoding's own (every piece is at least one
token, and the pieces rejoin into the text), and its report states the figures it measured."""

from __future__ import annotations

import regex

from bench.exact_bpe import Counter
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


def test_the_counter_it_measures_instead_counts_exactly_as_tiktoken() -> None:
    texts = [sample_text(), "naïve café — 東京 🚀🚀 x" * 7, "  \n\n\t  ", "a" * 300, "<|endoftext|> 12345678 don't"]
    for name in ("o200k_base", "cl100k_base"):
        encoding = tokens.get_encoding(name)
        for form in ("dict", "sorted"):
            counter = Counter(name, form)
            for text in texts:
                assert counter.count(text) == len(encoding.encode_ordinary(text)), (name, form, text[:20])


def test_the_report_states_the_own_counters_figures() -> None:
    own = {f"{name} {form}": {"added_mb": mb, "exact": True, "cold_over_tiktoken": cold, "warm_over_tiktoken": 1.5}
           for (name, form, mb, cold) in (("o200k_base", "dict", 30.0, 3.4), ("o200k_base", "sorted", 21.0, 5.5),
                                           ("cl100k_base", "dict", 16.0, 2.3), ("cl100k_base", "sorted", 13.0, 3.4))}
    results = {"date": "d", "machine": "m", "floor": {"rss_mb": 68.0}, "own": own,
               "cpu": {name: {"tokens": 1000, "pieces": 900, "tiktoken_ms": 0.4, "regex_split_ms": 0.8,
                              "split_over_count": 2.0} for name in ("o200k_base", "cl100k_base")} | {"chars": 4000},
               "o200k_base": {"added_mb": 43.0, "build_s": 0.4}, "cl100k_base": {"added_mb": 23.0, "build_s": 0.2}}
    text = markdown(results)
    assert "| o200k_base | sorted | 21.0 MB | yes | 5.5x | 1.5x |" in text
    assert "would start at 102.00 MB" in text and "(still over the goal" in text and "2.3 to 5.5 times slower" in text
    own["o200k_base sorted"]["added_mb"] = 18.0
    assert "would start at 99.00 MB with the two tables the default\ndeployments need (within the goal" in markdown(results)
