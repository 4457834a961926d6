"""The safety policy in the request flow (docs/safety.md): after the check (the consumer and its body are known), before
the response cache and admission, so a blocked prompt never reaches a model and costs the consumer no tokens.

    screen   the consumer's policy, if any: Prompt Shields and text:analyze on what the model would see, PII detection,
             all at once; blocked (ContentFiltered, answered as Azure's content filter), unavailable (closed: 503;
             open: forwarded and counted), or passed, with PII masked in the body that goes to the model
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from shared.config import SafetySettings
from shared.flow.exchange import Checked
from shared.flow.translate import Operation
from shared.outcomes import ContentFiltered, SafetyInputTooLarge, SafetyUnavailable
from shared.records.safety import SafetyPolicy
from shared.safety import texts
from shared.safety.services import CONCURRENT_CALLS, ContentSafety, Language, ServiceFailure
from shared.safety.verdicts import Analysis, Shield, judge, pii_verdict
from shared.waits import whole_seconds

_KINDS = {Operation.CHAT: "chat", Operation.RESPONSES: "responses", Operation.COMPLETIONS: "completions",
          Operation.EMBEDDINGS: "embeddings"}
PASSED = "passed"
BLOCKED = "blocked"
REDACTED = "redacted"
UNCHECKED = "unchecked"  # a service could not be asked and the policy is open: forwarded as it came
UNAVAILABLE = "unavailable"  # ... and the policy is closed: refused with 503


@dataclass(frozen=True, slots=True)
class Screened:
    """What the policy did to a request that goes on: for the per-request log, metrics and the audit trail."""

    policy: SafetyPolicy
    outcome: str  # passed | redacted | unchecked
    redactions: Mapping[str, int] = field(default_factory=dict)  # PII category -> how many were masked (never values)
    unchecked: tuple[str, ...] = ()  # the services that could not be asked (policy open)

    @property
    def detail(self) -> str:
        if self.unchecked:
            return ",".join(self.unchecked)
        return ",".join(f"{c}={n}" for c, n in sorted(self.redactions.items()))


class Screening:
    def __init__(self, settings: SafetySettings, content_safety: ContentSafety | None, language: Language | None) -> None:
        self._settings = settings
        self._content_safety = content_safety
        self._language = language

    def services(self) -> tuple[ContentSafety | Language, ...]:
        return tuple(s for s in (self._content_safety, self._language) if s is not None)

    def policy_for(self, checked: Checked) -> SafetyPolicy | None:
        name = checked.consumer.safety_policy(self._settings.default_policy)
        if name is None:
            return None
        policy = self._settings.policies.get(name)
        if policy is None:
            # Named on the consumer's record, gone from GATEWAY_SAFETY_POLICIES since: never served unchecked.
            raise SafetyUnavailable(service="policy", retry_after_s=60, policy=name)
        return policy

    async def screen(self, checked: Checked) -> tuple[Checked, Screened | None]:
        kind = _KINDS.get(checked.route.operation)
        policy = self.policy_for(checked) if kind is not None else None
        if policy is None or kind is None:
            return checked, None
        found = texts.pieces(kind, checked.body)
        size = texts.total_chars(found)
        if size > texts.MAX_CHARS:
            raise SafetyInputTooLarge(chars=size, limit=texts.MAX_CHARS)
        content = asyncio.ensure_future(self._content_safety_verdict(policy, found))
        pii = asyncio.ensure_future(self._pii(policy, found))
        try:
            await asyncio.wait([content, pii])
        except BaseException:
            content.cancel()
            pii.cancel()
            raise
        unchecked: list[str] = []
        failures = [f for f in (content.exception(), pii.exception()) if f is not None]
        for failure in failures:
            if not isinstance(failure, ServiceFailure):
                raise failure
            if policy.on_unavailable == "closed":
                raise SafetyUnavailable(service=failure.service, retry_after_s=whole_seconds(failure.retry_after_s),
                                        policy=policy.name)
            unchecked.append(failure.service)
        if content.exception() is None:
            verdict = content.result()
            if verdict is not None and not verdict.passed:
                raise ContentFiltered(blocked=verdict.blocked, result=verdict.result, policy=policy.name)
        redacted: dict[str, str] = {}
        counts: dict[str, int] = {}
        if pii.exception() is None:
            redacted, counts = pii.result()
        if counts and policy.pii.mode == "block":
            verdict = pii_verdict(counts)
            raise ContentFiltered(blocked=verdict.blocked, result=verdict.result, policy=policy.name)
        if redacted:
            checked = _with_redactions(checked, redacted)
        outcome = UNCHECKED if unchecked else REDACTED if redacted else PASSED
        return checked, Screened(policy, outcome, counts, tuple(sorted(set(unchecked))))

    async def _content_safety_verdict(self, policy: SafetyPolicy, found: list[texts.Piece]) -> Any:
        service = self._content_safety
        if not policy.content_safety or service is None or not found:
            return None
        limit = asyncio.Semaphore(CONCURRENT_CALLS)

        async def shield(prompt: str, documents: tuple[str, ...]) -> Shield:
            async with limit:
                return await service.shield(prompt, documents)

        async def analyze(text: str) -> Analysis:
            async with limit:
                return await service.analyze(text, sorted(policy.categories), policy.blocklists)

        shielded = [shield(p, d) for p, d in texts.shield_calls(found)] if policy.shield_prompt else []
        analysed = [analyze(t) for t in texts.analyze_texts(found)] if policy.analyze else []
        # Both kinds at once: the request waits for the slower of the service's calls, not their sum.
        shields, analyses = await asyncio.gather(asyncio.gather(*shielded), asyncio.gather(*analysed))
        return judge(policy, shields, analyses)

    async def _pii(self, policy: SafetyPolicy, found: list[texts.Piece]) -> tuple[dict[str, str], dict[str, int]]:
        service = self._language
        if policy.pii.mode == "off" or service is None or not found:
            return {}, {}
        unique = list(dict.fromkeys(p.text for p in found))
        results = await service.pii(unique, policy.pii.categories)
        redacted: dict[str, str] = {}
        counts: dict[str, int] = {}
        for text, (masked, found_counts) in zip(unique, results, strict=True):
            if found_counts and masked != text:
                redacted[text] = masked
            for category, count in found_counts.items():
                counts[category] = counts.get(category, 0) + count
        return redacted, counts


def _with_redactions(checked: Checked, redacted: Mapping[str, str]) -> Checked:
    """The request with every string that had PII replaced by its masked form: what the model gets (and what the
    response cache keys on, and what is counted). `raw` holds the client's body so redacted (see client_bytes)."""
    body = _replace_strings(checked.body, redacted)
    original = _replace_strings(checked.original, redacted) if checked.original is not None else None
    return replace(checked, body=body, original=original, raw=orjson.dumps(body))


def client_bytes(checked: Checked) -> bytes:
    """The client's body as the model may see it (redacted), for the request the flow carries on with: every later
    phase that sends or translates the body (failover, fallback) starts from it."""
    return orjson.dumps(checked.original if checked.original is not None else checked.body)


def _replace_strings(value: Any, redacted: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return redacted.get(value, value)
    if isinstance(value, dict):
        return {k: _replace_strings(v, redacted) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_strings(v, redacted) for v in value]
    return value
