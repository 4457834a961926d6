"""The edge's security rules through the real gateway in-process (tests/fakes: the real edge and Gateway over in-memory
stores, a fake clock, a scripted upstream and the recording telemetry sink)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from tests.fakes.gateway import GatewayHarness, gateway_request

CHAT = "/v1/chat/completions"
AZURE_CHAT = "/openai/deployments/gpt-4o/chat/completions"
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
ADMIN_KEY = "gw-admin-" + "x" * 40


@pytest.fixture
async def secured() -> AsyncIterator[GatewayHarness]:
    import hashlib

    built = GatewayHarness(env={"GATEWAY_ADMIN_KEY_SHA256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(),
                                "GATEWAY_AUTH_FAILURES_PER_MINUTE": "5"})
    yield built
    await built.close()


async def test_a_disabled_consumers_refusal_is_logged_with_its_reason_but_not_told(
    secured: GatewayHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    key = secured.consumer("team-off", enabled=False)
    off = await secured.post(CHAT, key, BODY)
    bogus = await secured.post(CHAT, "gw-" + "B" * 43, BODY)
    assert off.status_code == bogus.status_code == 401 and off.content == bogus.content
    assert "consumer disabled (consumer team-off)" in caplog.text and key not in caplog.text


async def test_the_body_is_not_read_before_the_key_is_accepted(secured: GatewayHarness) -> None:
    key = secured.consumer()
    gateway = await secured.gateway()
    reads = 0

    async def body() -> bytes:
        nonlocal reads
        reads += 1
        return b'{"model": "nope", "messages": [{"role": "user"}]}'

    for sent in (None, "gw-unknown"):
        response = await gateway.handle(replace(gateway_request("POST", CHAT, sent, b""), read_body=body))
        assert response.status == 401
    assert reads == 0
    response = await gateway.handle(replace(gateway_request("POST", CHAT, key, b""), read_body=body))
    assert response.status == 404 and reads == 1


async def test_failed_authentications_are_throttled_per_address_and_known_keys_still_work(secured: GatewayHarness) -> None:
    gateway = await secured.gateway()
    key = secured.consumer()

    async def call(sent: str, client: str) -> int:
        request = replace(gateway_request("GET", "/v1/models", sent), client_ip=client)
        return (await gateway.handle(request)).status

    for i in range(5):
        assert await call(f"gw-guess-{i}", "203.0.113.9") == 401
    lookups = secured.consumer_store.calls
    assert await call("gw-guess-x", "203.0.113.9") == 429
    assert secured.consumer_store.calls == lookups  # a throttled address costs the store nothing
    assert await call("gw-guess-y", "203.0.113.10") == 401  # other addresses are not affected
    assert await call(key, "203.0.113.9") == 200  # a key the gateway knows still works from there
    secured.clock.advance(61)
    assert await call("gw-guess-z", "203.0.113.9") == 401


async def test_public_health_says_only_whether_the_gateway_can_serve(secured: GatewayHarness) -> None:
    public = await secured.http.get("/health")
    assert public.status_code == 200 and public.json() == {"status": "ok"}
    for headers in ({}, {"api-key": "wrong"}, {"api-key": secured.consumer()}):
        refused = await secured.http.get("/health/details", headers=headers)
        assert refused.status_code == 401 and "uksouth" not in refused.text, headers
    details = await secured.http.get("/health/details", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert details.status_code == 200 and details.json()["backends"][0]["region"] == "uksouth"


async def test_health_details_are_refused_when_no_admin_key_is_configured() -> None:
    harness = GatewayHarness(env={"GATEWAY_ADMIN_KEY_SHA256": ""})
    try:
        assert (await harness.http.get("/health/details", headers={"api-key": ADMIN_KEY})).status_code == 401
    finally:
        await harness.close()


async def test_public_health_is_503_when_no_backend_can_serve(secured: GatewayHarness) -> None:
    for backend in secured.settings.backends:
        for deployment in backend.deployments:
            secured.router.record_failure(backend, deployment, 500, {})
    public = await secured.http.get("/health")
    assert public.status_code == 503 and public.json() == {"status": "unavailable"}


@pytest.mark.parametrize("field", ["data_sources", "dataSources"])
async def test_data_sources_need_the_consumers_capability(secured: GatewayHarness, field: str) -> None:
    plain = secured.consumer("plain")
    granted = secured.consumer("granted", capabilities=["data_sources"])
    body = {**BODY, field: [{"type": "azure_search", "parameters": {"endpoint": "https://evil.example"}}]}
    refused = await secured.post(AZURE_CHAT + "?api-version=2024-10-21", plain, body)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "capability_not_allowed"
    assert secured.upstream.sent == []
    passed = await secured.post(AZURE_CHAT + "?api-version=2024-10-21", granted, body)
    assert passed.status_code == 200 and len(secured.upstream.sent) == 1


async def test_api_versions_outside_the_allow_list_are_refused() -> None:
    harness = GatewayHarness(env={"GATEWAY_API_VERSIONS": "2024-10-21, 2025-01-01-preview"})
    try:
        key = harness.consumer()
        for version in ("2024-02-01", "2024-10-21%0A"):
            response = await harness.post(f"{AZURE_CHAT}?api-version={version}", key, BODY)
            assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_api_version", version
        assert harness.upstream.sent == []
        assert (await harness.post(f"{AZURE_CHAT}?api-version=2024-10-21", key, BODY)).status_code == 200
    finally:
        await harness.close()


async def test_refusals_before_authentication_carry_no_client_input_into_metrics(secured: GatewayHarness) -> None:
    gateway = await secured.gateway()
    key = secured.consumer()
    for i in range(300):
        client = f"198.51.{i // 250}.{i % 250}"
        path = f"/openai/deployments/made-up-{i}/chat/completions"
        for sent in (f"gw-bogus-{i}", None, key):
            await gateway.handle(replace(gateway_request("POST", path, sent, BODY), client_ip=client))
    records = secured.telemetry.requests
    assert len(records) == 900
    dimensions = {(r.consumer_id, r.client_ip, r.deployment, r.status) for r in records}
    # Unauthenticated: one series per status (401, and 429 once addresses are throttled), none per name or address;
    # the consumer's own 404s name no made-up deployment (its address is its own, as for any of its requests).
    unauthenticated = {d for d in dimensions if d[0] == ""}
    assert unauthenticated <= {("", "", "", 401), ("", "", "", 429)}
    assert all(d[2] == "" for d in dimensions)
    directory = (await secured.gateway()).s.consumers
    assert len(directory.unknown) <= 10_000 and len(directory.throttle) <= 10_000
