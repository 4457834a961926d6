"""Entra ID callers end to end: a local OpenID metadata + JWKS endpoint, a gateway process configured for it, and the
official SDK's `azure_ad_token_provider`; the consumer the token maps to is charged, limited and metered."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import jwt
import openai
import pytest

from shared.telemetry import protocol as names
from tests.conftest import unique
from tests.e2e import Stack, wait_for
from tools import stack
from tools.capture import Capture
from tools.entra import AUDIENCE, CALLER_APP, OTHER_TENANT, TENANT, Authority, new_rsa_key, served

pytestmark = pytest.mark.e2e
API_VERSION = "2024-10-21"
MESSAGES = [{"role": "user", "content": "Who am I?"}]


@pytest.fixture(scope="module")
def authority() -> Iterator[Authority]:
    entra = Authority(tenants=(TENANT, OTHER_TENANT))
    with served(entra):
        yield entra


@pytest.fixture
def capture(log_dir: Path) -> Iterator[Capture]:
    sink = Capture()
    yield sink
    sink.stop()
    (log_dir / f"{unique('capture')}.json").write_text(json.dumps(sink.envelopes))


def entra_env(authority: Authority, **extra: str) -> dict[str, str]:
    return {
        "GATEWAY_ENTRA_TENANT_IDS": TENANT,
        "GATEWAY_ENTRA_AUDIENCES": AUDIENCE,
        "GATEWAY_ENTRA_AUTHORITY": authority.base_url,
        "GATEWAY_ENTRA_KEYS_MIN_REFRESH_S": "0.5",
        **extra,
    }


def test_the_sdks_token_provider_calls_as_the_mapped_consumer_streamed_and_not(
    e2e: Stack, authority: Authority, capture: Capture, gateway_factory: Callable[..., stack.Child]
) -> None:
    gateway = gateway_factory(extra=entra_env(
        authority,
        GATEWAY_ENTRA_USER_ID_CLAIM="preferred_username",
        APPLICATIONINSIGHTS_CONNECTION_STRING=capture.connection_string,
        OTEL_METRIC_EXPORT_INTERVAL="500",
    ))
    consumer = unique("entra-app")
    key = e2e.create_consumer(consumer, tpm=1_000_000)
    app_id = CALLER_APP.replace("8d7c", "8d7d")  # a caller of this test's own
    e2e.update_consumer(consumer, entra=frozenset({f"app:{app_id}"}))
    issued: list[str] = []

    def provider() -> str:
        issued.append(authority.token(azp=app_id, preferred_username="ana@contoso.com"))
        return issued[-1]

    client = openai.AzureOpenAI(azure_endpoint=gateway.url, azure_ad_token_provider=provider, api_version=API_VERSION,
                                max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    answer = raw.parse()
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    streamed = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True, max_tokens=4,
                                                   stream_options={"include_usage": True}))
    usage = [c.usage for c in streamed if c.usage is not None][0]
    # The key of the same consumer works side by side.
    by_key = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    keyed = by_key.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)
    assert keyed.usage is not None
    spent = answer.usage.total_tokens + usage.total_tokens + keyed.usage.total_tokens
    assert e2e.charged(consumer) == spent  # the same ledger, whichever way the caller came in
    wait_for(lambda: capture.total(names.TOTAL_TOKENS, **{names.SUBSCRIPTION_ID: consumer}) >= spent)
    assert capture.total(names.TOTAL_TOKENS, **{names.SUBSCRIPTION_ID: consumer}) == spent
    assert capture.total(names.TOTAL_TOKENS, **{names.USER_ID: "ana@contoso.com"}) == spent - keyed.usage.total_tokens
    for token in issued:
        assert token not in gateway.log() and token.split(".")[2] not in gateway.log()


def test_limits_and_allowed_deployments_apply_to_token_callers(
    e2e: Stack, authority: Authority, gateway_factory: Callable[..., stack.Child]
) -> None:
    gateway = gateway_factory(extra=entra_env(authority))
    consumer = unique("entra-limited")
    e2e.create_consumer(consumer, tpm=1_000, deployments=["gpt-4o-mini"])
    oid = "2b3c4d5e-6f70-4a8b-9c0d-1e2f3a4b5c6e"
    e2e.update_consumer(consumer, entra=frozenset({f"oid:{oid}"}))
    client = openai.AzureOpenAI(azure_endpoint=gateway.url, azure_ad_token_provider=lambda: authority.token(oid=oid),
                                api_version=API_VERSION, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as limited:
        for _ in range(20):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=200)
    assert int(limited.value.response.headers["retry-after"]) >= 1


def test_every_bad_token_is_a_401_with_an_openai_error_never_a_500(
    e2e: Stack, authority: Authority, gateway_factory: Callable[..., stack.Child]
) -> None:
    gateway = gateway_factory(extra=entra_env(authority))
    consumer = unique("entra-bad")
    e2e.create_consumer(consumer)
    e2e.update_consumer(consumer, entra=frozenset({f"app:{CALLER_APP}"}))
    bad = {
        "wrong audience": authority.token(aud="api://another-api"),
        "wrong tenant": authority.token(tenant=OTHER_TENANT),
        "expired": authority.token(lifetime_s=-3600),
        "bad signature": authority.token()[:-8] + "AAAAAAAA",
        "alg none": jwt.encode(authority.claims(), key=None, algorithm="none", headers={"kid": "key-1"}),
        "unknown kid": _forged(authority),
        "no consumer": authority.token(azp="9e9e9e9e-9e9e-4e9e-8e9e-9e9e9e9e9e9e"),
        "not a JWT at all": "eyJhbGciOiJSUzI1NiJ9.eyJ.x",
    }
    for what, token in bad.items():
        response = httpx.post(f"{gateway.url}/openai/deployments/gpt-4o-mini/chat/completions?api-version={API_VERSION}",
                              headers={"authorization": f"Bearer {token}"}, json={"messages": MESSAGES}, timeout=10)
        assert response.status_code == 401, what
        error = response.json()["error"]
        assert error["code"] == "invalid_token" and error["type"] == "authentication_error", what
        assert token not in response.text
    log = gateway.log()
    for token in bad.values():
        signature = token.split(".")[-1]
        assert len(signature) < 8 or signature not in log


def test_a_rotated_signing_key_is_picked_up_and_an_unknown_one_after_refresh_is_refused(
    e2e: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    entra = Authority()
    with served(entra):
        gateway = gateway_factory(extra=entra_env(entra))
        consumer = unique("entra-rotate")
        app = "4c4c4c4c-1111-4222-8333-444455556666"  # each test maps its own caller: a shared mapping admits no one
        e2e.create_consumer(consumer)
        e2e.update_consumer(consumer, entra=frozenset({f"app:{app}"}))
        url = f"{gateway.url}/v1/chat/completions"
        body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 2}

        def call(token: str) -> int:
            return httpx.post(url, headers={"authorization": f"Bearer {token}"}, json=body, timeout=10).status_code

        assert call(entra.token(azp=app)) == 200
        entra.rotate("key-2")
        wait_for(lambda: call(entra.token(kid="key-2", azp=app)) == 200, timeout_s=10)
        assert call(_forged(entra)) == 401


def _forged(authority: Authority) -> str:
    return jwt.encode(authority.claims(), new_rsa_key(), algorithm="RS256", headers={"kid": "never-published"})


def test_the_admin_command_maps_callers_and_refuses_a_mapping_two_consumers_would_share(e2e: Stack) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "GATEWAY_TABLE_CONNECTION_STRING": stack.table_connection_string(e2e.table_port)}

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shared.admin", "--settings", "", "consumers", *args],
                              env=env, capture_output=True, text=True, timeout=60)

    first, second = unique("mapped"), unique("other")
    app = "7e7e7e7e-1234-4abc-8def-0123456789ab"
    created = admin("create", first, "--id", first, "--entra-app-id", app.upper(), "--no-key", "--tpm", "1000", "--all-deployments")
    assert created.returncode == 0, created.stderr
    record = json.loads(created.stdout.split("\n}\n", 1)[0] + "\n}")
    assert record["entra"] == [f"app:{app}"] and "key" not in record
    clash = admin("create", second, "--id", second, "--entra-app-id", app, "--all-deployments")
    assert clash.returncode != 0 and "already mapped" in clash.stderr
    assert admin("create", second, "--id", second, "--no-key", "--all-deployments").returncode != 0  # neither a key nor a mapping
    assert admin("create", second, "--id", second, "--entra-object-id", "not-a-guid", "--all-deployments").returncode != 0
    updated = admin("set", first, "--entra-role", "Reports.Writer")
    assert updated.returncode == 0, updated.stderr
    assert json.loads(updated.stdout)["entra"] == [f"app:{app}", "role:Reports.Writer"]
    replaced = admin("set", first, "--clear-entra", "--entra-group", "0a0a0a0a-0b0b-4c0c-8d0d-0e0e0e0e0e0e")
    assert json.loads(replaced.stdout)["entra"] == ["group:0a0a0a0a-0b0b-4c0c-8d0d-0e0e0e0e0e0e"]
    # A mapping for another allowed tenant names it; without --entra-tenant a mapping is the first tenant's only.
    partner = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
    tenanted = admin("set", first, "--entra-tenant", partner.upper(), "--entra-app-id", app)
    assert tenanted.returncode == 0, tenanted.stderr
    assert json.loads(tenanted.stdout)["entra"] == [f"app:{app}@{partner}", "group:0a0a0a0a-0b0b-4c0c-8d0d-0e0e0e0e0e0e"]
    assert admin("set", first, "--entra-tenant", "contoso.onmicrosoft.com", "--entra-app-id", app).returncode != 0
