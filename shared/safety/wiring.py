"""The safety services of one worker, built once from the settings (shared/app.py calls this)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from shared.clock import Clock
from shared.config import SafetySettings
from shared.safety.http import AiohttpPoster
from shared.safety.services import CONTENT_SAFETY, LANGUAGE, Auth, ContentSafety, Language, VerdictCache

COGNITIVE_SCOPE = "https://cognitiveservices.azure.com/.default"  # Content Safety and Language, by Entra ID


def service_auth(key: str | None, token: Callable[[], Any] | None) -> Auth:
    """The key where one is set, else a bearer token of the gateway's managed identity (role: Cognitive Services
    User). `token` is an awaitable getter of a cached, refreshed token."""

    if key is not None:
        headers: Mapping[str, str] = {"ocp-apim-subscription-key": key}

        async def by_key() -> Mapping[str, str]:
            return headers

        return by_key
    if token is None:
        raise ValueError("a safety service without a key needs the managed identity")

    async def by_identity() -> Mapping[str, str]:
        return {"authorization": f"Bearer {await token()}"}

    return by_identity


def build(settings: SafetySettings, clock: Clock, token: Callable[[], Any] | None
          ) -> tuple[ContentSafety | None, Language | None]:
    policies = settings.policies.values()
    cache = VerdictCache(clock, settings.verdict_ttl_s)
    content_safety = language = None
    if settings.content_safety_endpoint and any(p.content_safety for p in policies):
        content_safety = ContentSafety(
            settings.content_safety_endpoint, AiohttpPoster(CONTENT_SAFETY),
            service_auth(settings.content_safety_key, token), clock, cache, settings.timeout_s)
    if settings.language_endpoint and any(p.pii.mode != "off" for p in policies):
        language = Language(
            settings.language_endpoint, AiohttpPoster(LANGUAGE), service_auth(settings.language_key, token), clock,
            cache, settings.timeout_s)
    return content_safety, language
