"""Every refusal rendered once: status, OpenAI error fields and headers from numbers; the metric reason of throttles."""

from __future__ import annotations

import orjson
import pytest

from shared.edge.errors import CONTENT_FILTER_MESSAGE, GatewayError, render, throttle_reason
from shared.outcomes import (
    AttemptFailure,
    AuditUnavailable,
    AuthStoreUnavailable,
    AuthThrottled,
    BackendAuthFailed,
    BackendsBusy,
    BackendsFailed,
    BodiesBusy,
    BudgetExceeded,
    ConsumerDisabled,
    ContentFiltered,
    DeploymentNotAllowed,
    DeploymentNotFound,
    EndUserRefused,
    FailureKind,
    InvalidKey,
    InvalidToken,
    ItemNotFound,
    KeyProblem,
    LimiterUnavailable,
    MalformedAnswer,
    NeverAdmissible,
    NoBackend,
    QuotaExhausted,
    RateLimited,
    Refusal,
    ResponseBackendUnavailable,
    ResponseNotFound,
    ResponseReadsThrottled,
    ResponseStateUnavailable,
    SafetyInputTooLarge,
    SafetyUnavailable,
    TooLargeForBackends,
)

RESETS_AT = 1_700_006_400.0  # 2023-11-15T00:00:00Z


@pytest.mark.parametrize(
    ("refusal", "status", "type_", "code", "headers"),
    [
        (InvalidKey(KeyProblem.MISSING), 401, "authentication_error", "invalid_api_key", {"www-authenticate": "Bearer"}),
        (InvalidKey(KeyProblem.UNKNOWN), 401, "authentication_error", "invalid_api_key", {"www-authenticate": "Bearer"}),
        (ConsumerDisabled("app"), 401, "authentication_error", "invalid_api_key", {"www-authenticate": "Bearer"}),
        (InvalidKey(KeyProblem.EXPIRED, "app"), 401, "authentication_error", "invalid_api_key", {"www-authenticate": "Bearer"}),
        (AuthThrottled(37), 429, "authentication_error", "too_many_failed_authentications", {"retry-after": "37"}),
        (ResponseReadsThrottled(2), 429, "rate_limit_error", "rate_limit_exceeded", {"retry-after": "2"}),
        (BodiesBusy(5), 503, "server_error", "server_busy", {"retry-after": "5"}),
        (InvalidToken("expired", "The access token has expired."), 401, "authentication_error", "invalid_token",
         {"www-authenticate": 'Bearer error="invalid_token"'}),
        (AuthStoreUnavailable(), 503, "server_error", "auth_store_unavailable", {"retry-after": "1"}),
        (DeploymentNotFound("gpt-9"), 404, "invalid_request_error", "DeploymentNotFound", {}),
        (DeploymentNotAllowed("gpt-4o"), 403, "permission_error", "deployment_not_allowed", {}),
        (EndUserRefused(True, ("entra", "field")), 400, "invalid_request_error", "user_required", {}),
        (EndUserRefused(False, ("header",)), 400, "invalid_request_error", "invalid_user", {}),
        (RateLimited(1000, 1500.2, level="user"), 429, "rate_limit_error", "rate_limit_exceeded",
         {"x-gateway-limit-scope": "user", "retry-after": "2"}),
        (QuotaExhausted(40, "daily", RESETS_AT, 3600.5, level="team"), 403, "insufficient_quota", "quota_exceeded",
         {"x-gateway-limit-scope": "team"}),
        (BudgetExceeded("monthly", 10.004, 10.0, "USD", level="team"), 403, "insufficient_quota", "budget_exceeded",
         {"x-gateway-limit-scope": "team"}),
        (RateLimited(1000, 1500.2, remaining=0), 429, "rate_limit_error", "rate_limit_exceeded",
         {"retry-after": "2", "retry-after-ms": "1501", "x-ratelimit-limit-tokens": "1000",
          "x-ratelimit-reset-tokens": "2s", "x-ratelimit-remaining-tokens": "0"}),
        (RateLimited(1000, 0.0, remaining=250), 429, "rate_limit_error", "rate_limit_exceeded",
         {"retry-after": "1", "retry-after-ms": "1", "x-ratelimit-remaining-tokens": "250"}),
        (NeverAdmissible(need=5000, limit=100), 429, "rate_limit_error", "tokens_exceed_limit",
         {"x-should-retry": "false", "x-ratelimit-limit-tokens": "100"}),
        (QuotaExhausted(40, "daily", RESETS_AT, 3600.5), 403, "insufficient_quota", "quota_exceeded",
         {"x-ratelimit-limit-quota-tokens": "40", "x-ratelimit-remaining-quota-tokens": "0",
          "x-ratelimit-reset-quota-tokens": "3601s", "x-gateway-quota-resets-at": "2023-11-15T00:00:00Z"}),
        (LimiterUnavailable(), 503, "server_error", "limiter_unavailable", {"retry-after": "1"}),
        (BudgetExceeded("monthly", 10.004, 10.0, "USD"), 403, "insufficient_quota", "budget_exceeded", {}),
        (BackendsBusy(6001), 429, "rate_limit_error", "backends_busy", {"retry-after": "7", "retry-after-ms": "6001"}),
        (NoBackend(10_000), 503, "server_error", "service_unavailable", {"retry-after": "10", "retry-after-ms": "10000"}),
        (BackendsFailed(FailureKind.TIMEOUT), 504, "server_error", "backend_timeout", {}),
        (BackendsFailed(FailureKind.BROKEN), 502, "server_error", "backend_error", {}),
        (BackendsFailed(FailureKind.CONNECTION), 502, "server_error", "backend_unreachable", {}),
        (BackendAuthFailed(), 502, "server_error", "backend_auth_failed", {}),
        (MalformedAnswer(), 502, "server_error", "backend_malformed_response", {}),
        (SafetyUnavailable("content_safety", 10), 503, "server_error", "safety_unavailable",
         {"retry-after": "10", "retry-after-ms": "10000"}),
        (SafetyInputTooLarge(300_000, 200_000), 400, "invalid_request_error", "safety_input_too_large", {}),
    ],
)
def test_each_refusal_renders_as_an_openai_error(
    refusal: Refusal, status: int, type_: str, code: str, headers: dict[str, str]
) -> None:
    error = render(refusal)
    body = orjson.loads(error.body())["error"]
    assert (error.status, body["type"], body["code"]) == (status, type_, code)
    assert isinstance(body["message"], str) and body["message"] and set(body) == {"message", "type", "param", "code"}
    assert {k: error.headers[k] for k in headers} == headers


def test_every_key_problem_a_client_can_fix_has_its_own_message_and_refused_keys_share_one() -> None:
    # Missing, repeated, malformed or conflicting headers: the client's own mistake, said plainly. A key that exists
    # but is refused (expired after rotation, or its consumer disabled) reads exactly as a made-up one.
    fixable = [p for p in KeyProblem if p not in (KeyProblem.UNKNOWN, KeyProblem.EXPIRED)]
    messages = {render(InvalidKey(problem)).message for problem in fixable}
    assert len(messages) == len(fixable)
    refused = [render(r) for r in (InvalidKey(KeyProblem.UNKNOWN), InvalidKey(KeyProblem.EXPIRED, "a"), ConsumerDisabled("a"))]
    assert len({(e.status, e.body(), tuple(sorted(e.headers.items()))) for e in refused}) == 1


def test_a_gateway_error_is_already_its_own_answer() -> None:
    error = GatewayError(415, "Send JSON.", code="unsupported_media_type")
    assert render(error) is error


def test_a_blocked_prompt_is_azures_content_filter_answer() -> None:
    result = {"jailbreak": {"filtered": True, "detected": True}}
    error = render(ContentFiltered(("jailbreak",), result, "strict"))
    assert (error.status, error.headers) == (400, {"x-gateway-tokens-consumed": "0"})
    assert orjson.loads(error.body()) == {"error": {
        "message": CONTENT_FILTER_MESSAGE, "type": None, "param": "prompt", "code": "content_filter", "status": 400,
        "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": result}}}
    assert "strict" not in error.body().decode()  # the policy's name is the operator's, not the caller's


def test_every_refusal_kind_has_a_rendering() -> None:
    kinds = {cls for cls in Refusal.__subclasses__() if cls is not GatewayError}
    samples = {
        InvalidKey(KeyProblem.MISSING), InvalidToken("bad_signature"), ConsumerDisabled("a"), AuthThrottled(1), AuthStoreUnavailable(), DeploymentNotFound("d"),
        DeploymentNotAllowed("d"), EndUserRefused(True, ("field",)), RateLimited(1, 1), NeverAdmissible(2, 1), QuotaExhausted(1, "daily", RESETS_AT, 1),
        LimiterUnavailable(), BudgetExceeded("monthly", 1, 1, "EUR"), BackendsBusy(1), NoBackend(1), BackendsFailed(FailureKind.TIMEOUT), BackendAuthFailed(),
        MalformedAnswer(), ResponseNotFound("resp_1", True), ItemNotFound("msg_1"), TooLargeForBackends(9, "d"), ResponseStateUnavailable(), ResponseReadsThrottled(1), BodiesBusy(1),
        ResponseBackendUnavailable("resp_1", "uksouth", "uksouth-ptu", "its circuit breaker is open", 8),
        ContentFiltered(("jailbreak",), {"jailbreak": {"filtered": True, "detected": True}}),
        SafetyUnavailable("content_safety", 10), SafetyInputTooLarge(300_000, 200_000), AuditUnavailable(5),
    }
    assert {type(s) for s in samples} == kinds  # a new refusal gets a sample here, and so a rendering
    for sample in samples:
        assert 400 <= render(sample).status < 600


@pytest.mark.parametrize(
    ("refusal", "reason"),
    [
        (RateLimited(1, 1), "rate"), (NeverAdmissible(2, 1), "rate"), (QuotaExhausted(1, "daily", RESETS_AT, 1), "quota"),
        (BackendsBusy(1), "backends"), (BudgetExceeded("monthly", 1, 1, "EUR"), "budget"), (NoBackend(1), None), (InvalidKey(KeyProblem.UNKNOWN), None),
        (LimiterUnavailable(), None), (DeploymentNotAllowed("d"), None),
    ],
)
def test_throttles_name_their_metric_reason(refusal: Refusal, reason: str | None) -> None:
    assert throttle_reason(refusal) == reason


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (AttemptFailure.of_status(429), "429"), (AttemptFailure.of_status(503), "503"), (AttemptFailure.of_status(401), "401"),
        (AttemptFailure(FailureKind.TIMEOUT), "timeout"), (AttemptFailure(FailureKind.CONNECTION), "connection"),
        (AttemptFailure(FailureKind.BROKEN), "broken"),
    ],
)
def test_attempt_failures_keep_the_reasons_metrics_and_breakers_have_always_used(failure: AttemptFailure, reason: str) -> None:
    assert failure.reason == reason
    assert (failure.kind is FailureKind.THROTTLED) == (reason == "429")
    assert (failure.kind is FailureKind.AUTH) == (reason in ("401", "403"))
