"""Backend credentials: each identity backend gets a token for its own scope, other backends none."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shared.clock import FakeClock
from shared.config import load_settings
from shared.flow.credentials import BackendAuth


@dataclass
class AccessToken:
    token: str
    expires_on: float


class RecordingCredential:
    def __init__(self) -> None:
        self.scopes: list[str] = []

    async def get_token(self, *scopes: str) -> Any:
        self.scopes.extend(scopes)
        return AccessToken(f"token-for-{scopes[0]}", 1_700_000_000.0 + 3600)


def backends() -> Any:
    raw = [
        {"id": "aoai", "endpoint": "https://aoai.openai.azure.com", "region": "uksouth", "deployments": ["gpt-4o"], "auth": "identity"},
        {"id": "aoai-2", "endpoint": "https://aoai2.openai.azure.com", "region": "uksouth", "deployments": ["gpt-4o"], "auth": "identity"},
        {"id": "foundry", "endpoint": "https://proj.services.ai.azure.com", "region": "uksouth", "deployments": ["gpt-4o"],
         "auth": "identity", "token_scope": "https://ai.azure.com/.default"},
        {"id": "third-party", "endpoint": "https://llm.example/v1", "region": "eu", "deployments": ["gpt-4o"], "api": "openai",
         "auth": "key", "api_key_setting": "THIRD_KEY"},
        {"id": "open", "endpoint": "https://open.example/v1", "region": "eu", "deployments": ["gpt-4o"], "api": "openai", "auth": "none"},
    ]
    env = {"GATEWAY_BACKENDS": json.dumps(raw), "THIRD_KEY": "k3", "GATEWAY_TABLE_CONNECTION_STRING": "UseDevelopmentStorage=true"}
    return load_settings(env).backends


async def test_each_backend_gets_a_token_for_its_own_scope_and_others_none() -> None:
    credential = RecordingCredential()
    all_backends = backends()
    auth = BackendAuth(all_backends, FakeClock(), lambda: credential)
    sent = {b.id: dict(await auth.headers(b)) for b in all_backends}
    assert sent["aoai"] == sent["aoai-2"] == {"authorization": "Bearer token-for-https://cognitiveservices.azure.com/.default"}
    assert sent["foundry"] == {"authorization": "Bearer token-for-https://ai.azure.com/.default"}
    assert sent["third-party"] == {"authorization": "Bearer k3"}
    assert sent["open"] == {}
    assert sorted(credential.scopes) == ["https://ai.azure.com/.default", "https://cognitiveservices.azure.com/.default"]
