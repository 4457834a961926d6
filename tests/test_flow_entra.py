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
    from shared.records.consumers import UserLimits

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


async def test_a_token_callers_follow_ups_are_recorded_as_its_create_is(
    entra_harness: GatewayHarness, authority: Authority
) -> None:
    """Issue 25: a follow-up of a stored response (GET, a replay, input_items, cancel, DELETE) goes through the same
    phases as the create, so its request record names the same caller: the user id from the token's claim, not from a
    header the token caller never sends."""
    import orjson

    from tests.fakes.upstream import json_reply

    harness = entra_harness
    harness.team("finance")
    harness.consumer("billing", tpm=100_000, team="finance")
    store = harness.consumer_store.consumers
    store["billing"] = replace(store["billing"], entra=frozenset({f"app:{APP}"}))
    # The OpenAI-style client on /openai/v1 sends the token as its bearer (the Azure client's Responses paths too).
    api = openai.AsyncOpenAI(base_url=BASE_URL + "/openai/v1", api_key=authority.token(azp=APP, issued_at=harness.clock.now()),
                             max_retries=0, http_client=harness.http)
    made = orjson.dumps({"id": "resp_entra", "object": "response", "model": "gpt-4o", "status": "completed",
                         "output": [], "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}})
    harness.upstream.script("uksouth-ptu", json_reply(made), json_reply(made),
                            json_reply(b'{"object": "list", "data": []}'),
                            json_reply(b'{"id": "resp_entra", "object": "response", "deleted": true}'))
    await api.responses.create(model="gpt-4o", input="hi")
    create = harness.telemetry.requests[-1]
    assert create.user_id == authority.claims()["oid"]
    await api.responses.retrieve("resp_entra")
    await api.responses.input_items.list("resp_entra")
    await api.responses.delete("resp_entra")
    follow_ups = harness.telemetry.requests[-3:]
    assert [r.operation for r in follow_ups] == ["Responses_Get", "Responses_ListInputItems", "Responses_Delete"]
    for record in follow_ups:
        assert record.status == 200
        assert (record.consumer_id, record.user_id, record.team, record.client_ip) == (
            create.consumer_id, create.user_id, create.team, create.client_ip)
        assert (record.deployment, record.backend_id, record.region) == (
            create.deployment, create.backend_id, create.region)
