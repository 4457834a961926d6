"""The pure parts of the safety policies: what text is checked and as what, how it is cut to the services' limits,
verdicts as Azure's content filter reports them, the breaker and the verdict cache on a fake clock."""

from __future__ import annotations

import pytest

from shared.clock import FakeClock
from shared.records.safety import parse_policy
from shared.safety import texts
from shared.safety.services import Breaker, ServiceFailure, VerdictCache
from shared.safety.verdicts import Analysis, Shield, judge, severity_label


def test_chat_roles_become_prompts_documents_and_the_applications_own_text() -> None:
    body = {"messages": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "tool_call_id": "1", "content": "fetched page"},
        {"role": "user", "content": "   "},
    ]}
    assert texts.pieces("chat", body) == [
        texts.Piece("system", "Be kind."), texts.Piece("prompt", "Hi"), texts.Piece("document", "fetched page")]


def test_responses_completions_and_embeddings() -> None:
    body = {"instructions": "Short answers.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Q"}]},
        {"type": "function_call_output", "call_id": "c", "output": "tool says"},
        {"type": "reasoning", "summary": []}]}
    assert [(p.kind, p.text) for p in texts.pieces("responses", body)] == [
        ("system", "Short answers."), ("prompt", "Q"), ("document", "tool says")]
    assert texts.pieces("completions", {"prompt": ["a", [1, 2]]}) == [texts.Piece("prompt", "a")]
    assert texts.pieces("embeddings", {"input": [[1, 2, 3]]}) == []  # token ids: no text to check


@pytest.mark.parametrize("size", [0, 1, 9_999, 10_000, 10_001, 25_000, 100_003])
def test_cutting_loses_no_character_and_respects_the_limit(size: int) -> None:
    text = ("abcd efgh " * (size // 10 + 1))[:size]
    parts = list(texts.cut(text, texts.ANALYZE_CHARS))
    assert "".join(parts) == text and all(len(p) <= texts.ANALYZE_CHARS for p in parts)
    unbroken = "x" * size  # no space to cut at
    assert "".join(texts.cut(unbroken, texts.ANALYZE_CHARS)) == unbroken


def test_documents_are_grouped_by_five_and_ten_thousand_characters() -> None:
    found = [texts.Piece("document", "d" * 3_000) for _ in range(7)] + [texts.Piece("prompt", "p")]
    calls = texts.shield_calls(found)
    assert calls[0] == ("p", ())
    groups = [docs for prompt, docs in calls[1:]]
    assert all(prompt == "" for prompt, _ in calls[1:])
    assert all(len(g) <= 5 and sum(map(len, g)) <= 10_000 for g in groups)
    assert sum(len(g) for g in groups) == 7


def test_the_verdict_reports_every_category_as_azure_does() -> None:
    policy = parse_policy("p", {"categories": {"Violence": 4}, "blocklists": ["b"]})
    verdict = judge(policy, [Shield()], [Analysis({"Violence": 4, "Hate": 6}), Analysis({}, frozenset({"b", "x"}))])
    assert verdict.blocked == ("violence", "custom_blocklists")
    assert verdict.result["violence"] == {"filtered": True, "severity": "medium"}
    assert verdict.result["hate"] == {"filtered": False, "severity": "high"}  # reported, not a category of the policy
    assert verdict.result["jailbreak"] == {"filtered": False, "detected": False}
    assert verdict.result["custom_blocklists"]["details"] == [{"filtered": True, "id": "b"}]
    assert judge(policy, [Shield(prompt_attack=True)], []).blocked == ("jailbreak",)
    assert [severity_label(s) for s in range(8)] == ["safe", "safe", "low", "low", "medium", "medium", "high", "high"]


def test_the_breaker_trips_once_for_a_requests_failures_doubles_and_resets() -> None:
    clock = FakeClock()
    breaker = Breaker("content_safety", clock)
    breaker.check()
    assert breaker.failure(None) == 10
    assert breaker.failure(None) == 10 and breaker.trips == 1  # a concurrent call of the same moment
    breaker.success()  # a call begun before the trip: the trip stands
    with pytest.raises(ServiceFailure) as refused:
        breaker.check()
    assert refused.value.retry_after_s == 10
    clock.advance(10)
    breaker.check()
    assert breaker.failure(None) == 20  # failing again: twice as long
    clock.advance(20)
    breaker.success()
    assert breaker.failure(None) == 10  # after a success the trip starts over
    clock.advance(10)
    assert breaker.failure(1_000) == 300  # a Retry-After is honoured up to the cap


def test_the_verdict_cache_expires_and_stays_bounded() -> None:
    clock = FakeClock()
    cache = VerdictCache(clock, ttl_s=60, entries=100)
    for i in range(1_000):
        cache.put(VerdictCache.key("analyze", str(i)), i)
    assert len(cache) == 100 and cache.get(VerdictCache.key("analyze", "999")) == 999
    assert cache.get(VerdictCache.key("analyze", "0")) is None
    clock.advance(61)
    assert cache.get(VerdictCache.key("analyze", "999")) is None
    assert VerdictCache.key("shield", "a", ["b"]) != VerdictCache.key("shield", "a", [], "b")
    off = VerdictCache(clock, ttl_s=0)
    off.put("k", 1)
    assert off.get("k") is None
