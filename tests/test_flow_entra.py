"""Entra ID callers in-process: the official SDK's token provider against the real edge and gateway, signing keys from
a local OpenID endpoint on 127.0.0.1; the mapped consumer is charged and metered, refusals are typed and rendered."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import openai
import pytest

from tests.fakes.gateway import API_VERSION, BASE_URL, GatewayHarness
from tools.entra import AUDIENCE, TENANT, Authority, served

APP = "6d6d6d6d-1111-4222-8333-444455556666"


@pytest.fixture(scope="module")
def authority() -> Iterator[Authority]:
    entra = Authority()
    with served(entra):
        yield entra


@pytest.fixture
async def entra_harness(authority: Authority) -> AsyncIterator[GatewayHarness]:
    harness = GatewayHarness(env={
        "GATEWAY_ENTRA_TENANT_IDS": TENANT, "GATEWAY_ENTRA_AUDIENCES": AUDIENCE,
        "GATEWAY_ENTRA_AUTHORITY": authority.base_url, "GATEWAY_ENTRA_USER_ID_CLAIM": "oid",
    })
    yield harness
    await harness.close()


def client(harness: GatewayHarness, token: str) -> openai.AsyncAzureOpenAI:
    return openai.AsyncAzureOpenAI(azure_endpoint=BASE_URL, azure_ad_token_provider=lambda: token,
                                   api_version=API_VERSION, max_retries=0, http_client=harness.http)


async def test_a_token_caller_is_its_consumer_in_the_books(entra_harness: GatewayHarness, authority: Authority) -> None:
    harness = entra_harness
    harness.consumer("billing", tpm=100_000)
    store = harness.consumer_store.consumers
    store["billing"] = replace(store["billing"], entra=frozenset({f"app:{APP}"}))
    answer = await client(harness, authority.token(azp=APP, issued_at=harness.clock.now())).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert answer.usage is not None
    assert await harness.charged("billing") == answer.usage.total_tokens
    record = harness.telemetry.requests[-1]
    assert (record.consumer_id, record.status) == ("billing", 200)
    assert record.user_id == authority.claims()["oid"]  # the User ID dimension from the configured claim
    assert "authorization" not in {k.lower() for k in harness.upstream.sent[-1].headers}  # the token stays here


async def test_a_refused_token_is_a_401_counted_by_reason(entra_harness: GatewayHarness, authority: Authority) -> None:
    harness = entra_harness
    with pytest.raises(openai.AuthenticationError) as caught:
        await client(harness, authority.token(aud="api://not-the-gateway", issued_at=harness.clock.now())).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "invalid_token"
    assert harness.telemetry.auth_failures == ["wrong_audience"]
    assert harness.upstream.sent == []


async def test_the_signed_in_person_is_the_end_user_and_an_application_alone_is_none(
    entra_harness: GatewayHarness, authority: Authority
) -> None:
    """Issue 27: with end-user limits, a delegated token's person is the end user (before the body's user field); a
    token an application got for itself names no person, so the body's user field is taken."""
    from shared.edge.consumers import UserLimits

    harness = entra_harness
    harness.consumer("chat", users=UserLimits(tokens_per_minute=100_000, required=True))
    store = harness.consumer_store.consumers
    store["chat"] = replace(store["chat"], entra=frozenset({f"app:{APP}"}))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "user": "from-body"}
    person = authority.token(azp=APP, oid="7e1f0c4b-2d3a-4e5f-8a9b-0c1d2e3f4a5b", scp="Gateway.Call",
                             issued_at=harness.clock.now())
    app_only = authority.token(azp=APP, issued_at=harness.clock.now())
    for token, expected in ((person, "7e1f0c4b-2d3a-4e5f-8a9b-0c1d2e3f4a5b"), (app_only, "from-body")):
        response = await harness.http.post("/v1/chat/completions", json=body,
                                           headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 200
        assert harness.telemetry.requests[-1].user_id == expected
    missing = await harness.http.post("/v1/chat/completions", json={**body, "user": None},
                                      headers={"authorization": f"Bearer {app_only}"})
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "user_required"
