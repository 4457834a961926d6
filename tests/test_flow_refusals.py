"""The request flow in-process, requests the gateway refuses itself: every refusal is an OpenAI-shaped error with the
right status and code, is counted, never reaches a backend, and echoes no secret."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionMessageParam

from tests.fakes.gateway import GatewayHarness

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
AZURE_CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    # Neither a backend's key nor its address: the harness's are backend-key-<id> at https://<id>.openai.azure.example.
    assert "backend-key-uksouth-ptu" not in response.text and ".openai.azure.example" not in response.text
    return dict(error)


async def test_no_key_a_wrong_key_and_a_disabled_consumer_are_401(harness: GatewayHarness) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES}
    missing = await harness.post(CHAT, None, body)
    assert assert_openai_error(missing, 401, "invalid_api_key")["type"] == "authentication_error"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_openai_error(await harness.post(CHAT, "gw-not-a-real-key", body), 401, "invalid_api_key")
    disabled = harness.consumer("off", enabled=False)
    # A disabled consumer's key is answered exactly as a made-up one; the reason is in logs and the metric's consumer.
    refused = await harness.post(CHAT, disabled, body)
    made_up = await harness.post(CHAT, "gw-not-a-real-key", body)
    assert_openai_error(refused, 401, "invalid_api_key")
    assert (refused.content, refused.headers["www-authenticate"]) == (made_up.content, made_up.headers["www-authenticate"])
    assert harness.telemetry.requests[-2].consumer_id == "off"
    assert harness.upstream.sent == []
    with pytest.raises(openai.AuthenticationError):
        await harness.openai("gw-not-a-real-key").chat.completions.create(model="gpt-4o", messages=MESSAGES)


@pytest.mark.parametrize(
    "credentials",
    [
        [("api-key", "{key}"), ("api-key", "{key}")],
        [("api-key", "{key}"), ("api-key", "gw-other")],
        [("authorization", "Bearer {key}"), ("authorization", "Bearer gw-other")],
        [("api-key", "{key}"), ("authorization", "Bearer gw-other")],
        [("authorization", "Basic dXNlcjpwYXNz")],
    ],
)
async def test_duplicated_and_conflicting_credentials_are_401(
    harness: GatewayHarness, credentials: list[tuple[str, str]]
) -> None:
    key = harness.consumer()
    headers = [(name, value.format(key=key)) for name, value in credentials] + [("content-type", "application/json")]
    response = await harness.http.post(CHAT, content=b'{"model":"gpt-4o","messages":[{"role":"user"}]}', headers=headers)
    assert_openai_error(response, 401)
    assert harness.upstream.sent == []


async def test_a_deployment_the_key_may_not_use_looks_like_one_that_does_not_exist_and_is_counted(
    harness: GatewayHarness,
) -> None:
    key = harness.consumer("limited", deployments=["text-embedding-3-small"])
    with pytest.raises(openai.NotFoundError) as hidden:
        await harness.openai(key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError) as missing:
        await harness.openai(key).chat.completions.create(model="gpt-4p", messages=MESSAGES)
    assert hidden.value.code == missing.value.code == "DeploymentNotFound"
    assert str(hidden.value.message).replace("gpt-4o", "X") == str(missing.value.message).replace("gpt-4p", "X")
    # Worded so it is true in both cases, and points at the list this key may use.
    assert "does not exist or this key may not use it" in str(hidden.value.message)
    assert "/v1/models" in str(hidden.value.message)
    record = harness.telemetry.requests[-2]
    assert (record.status, record.consumer_id, record.deployment) == (404, "limited", "gpt-4o")
    assert harness.telemetry.requests[-1].deployment == ""  # a made-up name is no metric dimension


async def test_revealing_deployments_keeps_the_distinct_403() -> None:
    harness = GatewayHarness(env={"GATEWAY_REVEAL_DEPLOYMENTS": "true"})
    try:
        key = harness.consumer("limited", deployments=["text-embedding-3-small"])
        with pytest.raises(openai.PermissionDeniedError) as forbidden:
            await harness.openai(key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert forbidden.value.code == "deployment_not_allowed"
    finally:
        await harness.close()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "gpt-5-unknown", "messages": MESSAGES}, 404, "DeploymentNotFound"),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 300_000}]}, 413, "request_too_large"),
        ({"model": "gpt-4o", "messages": []}, 400, "invalid_type"),
    ],
)
async def test_errors_are_openai_shaped_through_the_sdk(
    harness: GatewayHarness, body: dict[str, object], status: int, code: str
) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        await harness.openai(harness.consumer()).chat.completions.create(**body)  # type: ignore[call-overload]
    assert caught.value.status_code == status and caught.value.code == code
    assert harness.upstream.sent == []


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", CHAT, None, 405, "method_not_allowed"),
        ("PUT", CHAT, b"{}", 405, "method_not_allowed"),
        ("DELETE", "/openai/deployments/gpt-4o/embeddings?api-version=x", None, 405, "method_not_allowed"),
        ("POST", "/v1/models", b"{}", 405, "method_not_allowed"),
        ("POST", CHAT, b"{not json", 400, None),
        ("POST", CHAT, b"\xff\xfe", 400, None),
        ("POST", CHAT, b"", 400, "invalid_json"),
        ("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=../x", b'{"messages":[{"role":"user"}]}', 400,
         "invalid_api_version"),
        ("POST", "/v1/images/generations", b"{}", 404, None),
        ("POST", "/openai/deployments/a%2Fb/chat/completions", b'{"messages":[{"role":"user"}]}', 404, "DeploymentNotFound"),
    ],
)
async def test_bad_requests(
    harness: GatewayHarness, method: str, path: str, body: bytes | None, status: int, code: str | None
) -> None:
    response = await harness.http.request(
        method, path, content=body, headers={"api-key": harness.consumer(), "content-type": "application/json"}
    )
    assert_openai_error(response, status, code)
    if status == 405:
        assert response.headers["allow"] in ("GET", "POST")
    assert harness.upstream.sent == []


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data",
                                          "application/xml"])
async def test_a_body_that_is_not_json_is_415(harness: GatewayHarness, content_type: str) -> None:
    response = await harness.http.post(CHAT, content=b"model=gpt-4o", headers={"api-key": harness.consumer(),
                                                                              "content-type": content_type})
    assert_openai_error(response, 415, "unsupported_media_type")


async def test_a_declared_body_over_the_limit_is_413_before_it_is_read(harness: GatewayHarness) -> None:
    response = await harness.http.post(
        CHAT, content=b"{}", headers={"api-key": harness.consumer(), "content-length": str(10**9)}
    )
    assert_openai_error(response, 413, "request_too_large")


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"model": "gpt-4o", "messages": [' + b'{"role":"user","content":"x"},' * 20_000 + b'{"role":"user"}]}',
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\xff\xfe\xfd"}]}',
        b'{"model": null, "messages": null, "stream": null, "max_tokens": null}',
        b'{"model": "gpt-4o", "messages": [{"role": "user"}], "max_tokens": 1e400}',
        b"\x00" * 1000,
    ],
)
async def test_pathological_bodies_are_4xx(harness: GatewayHarness, body: bytes) -> None:
    response = await harness.http.post(CHAT, content=body, headers={"api-key": harness.consumer(),
                                                                   "content-type": "application/json"})
    assert 400 <= response.status_code < 500
    assert_openai_error(response, response.status_code)
    assert harness.upstream.sent == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(body=st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode())))
async def test_malformed_and_mistyped_bodies_never_get_a_5xx(body: bytes) -> None:
    harness = GatewayHarness()
    try:
        key = harness.consumer(tpm=100_000_000)
        for path in (CHAT, "/openai/deployments/gpt-4o/embeddings?api-version=2024-10-21"):
            response = await harness.http.post(path, content=body, headers={"api-key": key, "content-type": "application/json"})
            if response.status_code >= 400:
                assert_openai_error(response, response.status_code)
            assert response.status_code < 500
        for sent in harness.upstream.sent:  # whatever was valid enough to send went to a configured deployment only
            assert sent.path.split("/")[3] in ("gpt-4o", "gpt-4o-mini", "text-embedding-3-small")
    finally:
        await harness.close()


@FUZZ
@given(name=st.one_of(st.text(max_size=40), st.sampled_from(
    ["..", "../..", "%2e%2e", "a%2Fb", "http:%2F%2Fevil.example", "//evil.example", "gpt-4o%00", "x" * 300, "%25",
     "\\..\\", "gpt-4o/../gpt-4o-mini", "~root"])),
    version=st.text(max_size=60))
async def test_hostile_deployment_names_and_api_versions_reach_no_backend_unnamed(name: str, version: str) -> None:
    harness = GatewayHarness()
    try:
        key = harness.consumer()
        body = {"messages": MESSAGES, "max_tokens": 1}
        try:
            response = await harness.http.post(f"/openai/deployments/{name}/chat/completions", params={"api-version": version},
                                               json=body, headers={"api-key": key})
        except (httpx.InvalidURL, httpx.UnsupportedProtocol):
            response = None  # the client itself refuses to build such a URL
        if response is not None and response.status_code >= 400:
            assert_openai_error(response, response.status_code)
            assert response.status_code < 500
        response = await harness.http.post(CHAT, json={**body, "model": name}, headers={"api-key": key})
        assert response.status_code < 500
        for sent in harness.upstream.sent:
            assert sent.path == f"/openai/deployments/{sent.path.split('/')[3]}/chat/completions"
            assert sent.path.split("/")[3] in ("gpt-4o", "gpt-4o-mini", "text-embedding-3-small")
            assert "api-version=" in sent.url and all(c.isalnum() or c in ".-" for c in sent.url.split("api-version=")[1])
    finally:
        await harness.close()


# ---- the consumer's own limits -----------------------------------------------------------------------------------


async def test_over_its_rate_a_consumer_gets_429_with_the_true_wait_and_another_keeps_going(harness: GatewayHarness) -> None:
    small = harness.consumer("small", tpm=200)
    other = harness.consumer("other", tpm=100_000)
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50}
    statuses = [(await harness.post(CHAT, small, body)).status_code for _ in range(5)]
    assert statuses[0] == 200 and statuses[-1] == 429
    refused = await harness.post(CHAT, small, body)
    assert_openai_error(refused, 429, "rate_limit_exceeded")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert int(refused.headers["retry-after-ms"]) <= 60_000
    assert (await harness.post(CHAT, other, body)).status_code == 200
    assert ("small", "gpt-4o", "rate") in harness.telemetry.throttles
    harness.clock.advance(61)  # the window slides past every admission
    assert (await harness.post(CHAT, small, body)).status_code == 200


async def test_a_request_larger_than_the_whole_limit_is_refused_at_once(harness: GatewayHarness) -> None:
    key = harness.consumer("tiny", tpm=100)
    response = await harness.post(CHAT, key, {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 500})
    assert_openai_error(response, 429, "tokens_exceed_limit")
    assert response.headers["x-should-retry"] == "false" and harness.upstream.sent == []


async def test_an_exhausted_quota_is_403_with_its_reset_time(harness: GatewayHarness) -> None:
    key = harness.consumer("quota", quota=40, quota_period="daily")
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 10}
    assert (await harness.post(CHAT, key, body)).status_code == 200
    await harness.settle()  # the first answer's usage reaches the shared ledger
    refusals = [await harness.post(CHAT, key, body) for _ in range(3)]
    refused = refusals[-1]
    assert_openai_error(refused, 403, "quota_exceeded")
    assert refused.headers["x-ratelimit-remaining-quota-tokens"] == "0"
    assert refused.headers["x-gateway-quota-resets-at"].endswith("T00:00:00Z")
    assert ("quota", "gpt-4o", "quota") in harness.telemetry.throttles


async def test_an_image_is_reserved_at_what_the_deployments_model_bills_for_it(harness: GatewayHarness) -> None:
    """gpt-4o-mini bills a 1024x1024 image at ~25,500 tokens, gpt-4o at 765 (issue 24): a 20,000 TPM key's request with
    one image is admitted on gpt-4o and refused as larger than its minute on gpt-4o-mini, before anything is sent."""
    key = harness.consumer("pictures", tpm=20_000)
    content = [{"type": "text", "text": "What is in it?"},
               {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 10}
    assert (await harness.post("/v1/chat/completions", key, {**body, "model": "gpt-4o"})).status_code == 200
    sent = len(harness.upstream.sent)
    refused = await harness.post("/v1/chat/completions", key, {**body, "model": "gpt-4o-mini"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "tokens_exceed_limit"
    assert len(harness.upstream.sent) == sent


@pytest.mark.parametrize(("setting", "reasoning_cap", "chat_cap"), [
    (None, 25_000, None),  # the default, "reasoning": capped on the reasoning deployment only
    ("on", 25_000, 1_024),
    ("off", None, None),
])
async def test_the_output_cap_is_on_by_default_for_reasoning_models(
    setting: str | None, reasoning_cap: int | None, chat_cap: int | None
) -> None:
    from tests.fakes.gateway import backend

    region = backend("swedencentral", "swedencentral", 1, deployments={"thinker": "o4-mini", "gpt-4o": "gpt-4o"})
    harness = GatewayHarness([region], env={"GATEWAY_OUTPUT_CAP": setting} if setting else None)
    try:
        key = harness.consumer("app", tpm=100_000)
        messages = [{"role": "user", "content": "Think."}]
        for model, expected in (("thinker", reasoning_cap), ("gpt-4o", chat_cap)):
            answer = await harness.post("/v1/chat/completions", key, {"model": model, "messages": messages})
            assert answer.status_code == 200
            sent = harness.upstream.sent[-1].json
            assert sent.get("max_completion_tokens", sent.get("max_tokens")) == expected, model
    finally:
        await harness.close()
