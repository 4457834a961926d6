"""From what the services found to a verdict, and the verdict as Azure OpenAI's content filter reports it. Pure.

A blocked request is answered as Azure OpenAI answers a prompt its own filter refuses (400, code `content_filter`,
`innererror.content_filter_result`), so code written for Azure's filter handles the gateway's too."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.records.safety import SafetyPolicy

# Content Safety's category names -> Azure OpenAI's content filter result keys.
FILTER_KEYS = {"Hate": "hate", "SelfHarm": "self_harm", "Sexual": "sexual", "Violence": "violence"}
JAILBREAK = "jailbreak"
INDIRECT_ATTACK = "indirect_attack"
BLOCKLIST = "custom_blocklists"
PII = "pii"


def severity_label(severity: int) -> str:
    """Azure OpenAI's words for Content Safety's 0-7 scale."""
    return "safe" if severity < 2 else "low" if severity < 4 else "medium" if severity < 6 else "high"


@dataclass(frozen=True, slots=True)
class Analysis:
    """One text:analyze answer: the severity of each category, the blocklists that matched."""

    severities: Mapping[str, int] = field(default_factory=dict)
    blocklists: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Shield:
    """One text:shieldPrompt answer."""

    prompt_attack: bool = False
    document_attack: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    blocked: tuple[str, ...]  # the content filter keys that blocked (jailbreak, hate, custom_blocklists, ...)
    result: dict[str, Any]  # innererror.content_filter_result

    @property
    def passed(self) -> bool:
        return not self.blocked


def judge(policy: SafetyPolicy, shields: Iterable[Shield], analyses: Iterable[Analysis]) -> Verdict:
    prompt_attack = document_attack = False
    for shield in shields:
        prompt_attack |= shield.prompt_attack
        document_attack |= shield.document_attack
    worst: dict[str, int] = {}
    matched: set[str] = set()
    for analysis in analyses:
        for category, severity in analysis.severities.items():
            worst[category] = max(worst.get(category, 0), severity)
        matched |= analysis.blocklists
    blocked: list[str] = []
    result: dict[str, Any] = {}
    for category, key in FILTER_KEYS.items():
        severity = worst.get(category, 0)
        threshold = policy.categories.get(category)
        filtered = threshold is not None and severity >= threshold
        result[key] = {"filtered": filtered, "severity": severity_label(severity)}
        if filtered:
            blocked.append(key)
    if policy.shield_prompt:
        result[JAILBREAK] = {"filtered": prompt_attack, "detected": prompt_attack}
        result[INDIRECT_ATTACK] = {"filtered": document_attack, "detected": document_attack}
        blocked += [k for k, hit in ((JAILBREAK, prompt_attack), (INDIRECT_ATTACK, document_attack)) if hit]
    if policy.blocklists:
        names = sorted(matched & set(policy.blocklists))
        result[BLOCKLIST] = {"filtered": bool(names), "details": [{"filtered": True, "id": n} for n in names]}
        if names:
            blocked.append(BLOCKLIST)
    return Verdict(tuple(blocked), result)


def pii_verdict(counts: Mapping[str, int]) -> Verdict:
    """A request blocked for PII (policy pii: block): the categories found, counted, never the values."""
    return Verdict((PII,), {PII: {"filtered": True, "detected": True,
                                  "details": [{"category": c, "count": n} for c, n in sorted(counts.items())]}})
