"""The gateway's own answers, rendered in one place: each refusal (shared/outcomes.py) becomes an OpenAI-shaped body
`{"error": {"message", "type", "param", "code"}}` with its status and headers, and each throttle gets its metric reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import orjson

from shared.edge.messages import TOKENS_CONSUMED_HEADER
from shared.outcomes import (
    MAX_USER_ID_CHARS,
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
from shared.waits import whole_seconds


class GatewayError(Refusal):
    """A refusal that is already an answer: status, OpenAI error fields, extra headers. Raised as such for requests
    whose shape is wrong (path, method, body, media type), where the status is the whole meaning; `render` builds
    the others."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


# Azure OpenAI's own words for a prompt its content filter refuses; the gateway's refusal is the same answer.
CONTENT_FILTER_MESSAGE = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. Please modify "
    "your prompt and retry. To learn more about our content filtering policies please read our documentation: "
    "https://go.microsoft.com/fwlink/?linkid=2198766"
)


class ContentFilterError(GatewayError):
    """Azure OpenAI's 400 for a filtered prompt: `code: content_filter`, `param: prompt`, and the categories in
    `innererror.content_filter_result` (the openai SDK raises BadRequestError with `code == "content_filter"`)."""

    def __init__(self, result: Mapping[str, object]) -> None:
        super().__init__(400, CONTENT_FILTER_MESSAGE, code="content_filter", param="prompt",
                         headers={TOKENS_CONSUMED_HEADER: "0"})
        self.result = dict(result)

    def body(self) -> bytes:
        return orjson.dumps({"error": {
            "message": self.message, "type": None, "param": "prompt", "code": "content_filter", "status": 400,
            "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": self.result},
        }})


# Client text an error message repeats (an id, a type name) is cut to this many characters: enough to recognise,
# never a way to make the gateway echo a large body back.
ECHO_CHARS = 64


def echoed(text: str) -> str:
    return text[:ECHO_CHARS]


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, code=code, param=param)


def not_found(message: str, code: str = "not_found") -> GatewayError:
    return GatewayError(404, message, code=code)


def unauthorized(message: str, code: str = "invalid_api_key") -> GatewayError:
    return GatewayError(401, message, type="authentication_error", code=code, headers={"www-authenticate": "Bearer"})


def forbidden(message: str, code: str = "permission_denied") -> GatewayError:
    return GatewayError(403, message, type="permission_error", code=code)


_KEY_MESSAGES = {
    KeyProblem.MISSING: "No API key was sent. Send your gateway key in the 'api-key' header or as "
    "'Authorization: Bearer <key>'.",
    KeyProblem.REPEATED: "More than one credential header was sent; send exactly one key.",
    KeyProblem.NOT_BEARER: "The Authorization header must be 'Bearer <key>'.",
    KeyProblem.CONFLICTING: "The api-key and Authorization headers carry different keys; send exactly one key.",
    KeyProblem.UNKNOWN: "The API key is not valid.",
    KeyProblem.EXPIRED: "The API key is not valid.",  # as for a made-up key: an answer never confirms a key existed
}


def _retry_headers(wait_ms: float) -> dict[str, str]:
    """Retry-After (whole seconds, rounded up) and retry-after-ms (the milliseconds, rounded up) for a wait."""
    wait_ms = max(1.0, wait_ms)
    return {"retry-after": str(whole_seconds(wait_ms / 1000)), "retry-after-ms": str(math.ceil(wait_ms))}


def _retry_after(seconds: int) -> dict[str, str]:
    """Retry-After alone, for a wait the raiser already holds in whole seconds."""
    return {"retry-after": str(seconds)}


# Who a limit belongs to, as a refusal names it.
_WHOSE = {"team": "This key's team", "user": "This end user", "deployment": "This key, for this deployment,"}
_WHOSE_QUOTA = {"team": "This key's team's", "user": "This end user's"}
_WHOSE_NEVER = {"team": "this key's team", "user": "each end user of this key"}
_END_USER_SOURCE_NAMES = {"entra": "the signed-in person of an Entra ID token", "field": "the body's `user` field",
                          "header": "the x-gateway-user header"}


def _end_user_sources(sources: tuple[str, ...]) -> str:
    return ", else ".join(_END_USER_SOURCE_NAMES[s] for s in sources if s in _END_USER_SOURCE_NAMES)


def _scope(level: str) -> dict[str, str]:
    return {"x-gateway-limit-scope": level or "consumer"}


def _server_error(status: int, message: str, code: str, headers: Mapping[str, str] | None = None) -> GatewayError:
    return GatewayError(status, message, type="server_error", code=code, headers=headers)


def render(refusal: Refusal) -> GatewayError:
    """The answer to a refusal: its status, OpenAI error fields and headers."""
    if isinstance(refusal, GatewayError):
        return refusal
    for group in _GROUPS:
        answer = group(refusal)
        if answer is not None:
            return answer
    raise TypeError(f"no rendering for {type(refusal).__name__}")


def _identity(refusal: Refusal) -> GatewayError | None:
    """Who is calling: keys, tokens, end users and what the caller may use."""
    match refusal:
        case InvalidKey(problem=problem):
            return unauthorized(_KEY_MESSAGES[problem])
        case InvalidToken(message=message):
            return GatewayError(
                401, message, type="authentication_error", code="invalid_token",
                headers={"www-authenticate": 'Bearer error="invalid_token"'},
            )
        case ConsumerDisabled():
            # Answered exactly as a made-up key, so the answer never confirms that a key is valid (the reason is in
            # the logs and in the request metric's consumer id).
            return unauthorized(_KEY_MESSAGES[KeyProblem.UNKNOWN])
        case AuthThrottled(retry_after_s=seconds):
            return GatewayError(
                429, "Too many failed authentications from this address; try again later.",
                type="authentication_error", code="too_many_failed_authentications", headers=_retry_after(seconds),
            )
        case AuthStoreUnavailable(retry_after_s=seconds):
            return _server_error(503, "The gateway cannot check keys right now; try again shortly.",
                                 "auth_store_unavailable", _retry_after(seconds))
        case DeploymentNotFound(name=name):
            # True whichever it is (unknown, or hidden from this key), and says where to look: never which.
            return not_found(
                f"The deployment '{name}' does not exist or this key may not use it; "
                "GET /v1/models lists the deployments this key may use.",
                code="DeploymentNotFound",
            )
        case EndUserRefused(missing=True, sources=sources):
            return bad_request(
                "This key requires an end user for every request: " + _end_user_sources(sources) + ".",
                param="user", code="user_required",
            )
        case EndUserRefused(sources=sources):
            return bad_request(
                f"The end user must be printable text of at least 1 and at most {MAX_USER_ID_CHARS} characters "
                "(from " + _end_user_sources(sources) + ").", param="user", code="invalid_user",
            )
        case DeploymentNotAllowed(name=name):
            return forbidden(f"This key may not use the deployment '{name}'.", code="deployment_not_allowed")
    return None


def _rate_limited(refusal: RateLimited) -> GatewayError:
    limit, remaining, need, level = refusal.limit, refusal.remaining, refusal.need, refusal.level
    headers = _retry_headers(refusal.wait_ms)
    seconds = headers["retry-after"]
    used = f"has {remaining} of its {limit} tokens per minute left" if remaining else f"has used its {limit} tokens per minute"
    wanted = f" and this request reserves up to {need} (its prompt and output cap)" if need > remaining else ""
    return GatewayError(
        429, f"{_WHOSE.get(level, 'This key')} {used}{wanted}; retry after {seconds} seconds.",
        type="rate_limit_error", code="rate_limit_exceeded",
        headers={
            **_scope(level),
            **headers,
            "x-ratelimit-limit-tokens": str(limit),
            "x-ratelimit-reset-tokens": f"{seconds}s",
            "x-ratelimit-remaining-tokens": str(remaining),
        },
    )


def _quota_exhausted(refusal: QuotaExhausted) -> GatewayError:
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(refusal.resets_at_s))
    whose = _WHOSE_QUOTA.get(refusal.level, "The")
    return GatewayError(
        403, f"{whose} token quota of {refusal.limit} per {refusal.period} period is used up; it resets at {reset}.",
        type="insufficient_quota", code="quota_exceeded",
        headers={
            **_scope(refusal.level),
            "x-ratelimit-limit-quota-tokens": str(refusal.limit),
            "x-ratelimit-remaining-quota-tokens": "0",
            "x-ratelimit-reset-quota-tokens": f"{whole_seconds(refusal.resets_in_s)}s",
            "x-gateway-quota-resets-at": reset,
        },
    )


def _limits(refusal: Refusal) -> GatewayError | None:
    """The caller's limits: rate, quota and budget, and the gateway's own bounds on what it takes in at once."""
    match refusal:
        case RateLimited():
            return _rate_limited(refusal)
        case NeverAdmissible(need=need, limit=limit, level=level):
            return GatewayError(
                429,
                f"This request needs up to {need} tokens, more than the {limit} tokens per minute "
                f"{_WHOSE_NEVER.get(level, 'this key')} may use; it can never be admitted. Lower max_tokens or "
                "shorten the prompt.",
                type="rate_limit_error", code="tokens_exceed_limit",
                headers={"x-should-retry": "false", "x-ratelimit-limit-tokens": str(limit), **_scope(level)},
            )
        case QuotaExhausted():
            return _quota_exhausted(refusal)
        case BudgetExceeded(period=period, spent=spent, budget=budget, currency=currency, level=level):
            whose = "This key's team has" if level == "team" else "This key has"
            return GatewayError(
                403, f"{whose} spent its {period} budget ({spent:.2f} of {budget:.2f} {currency}).",
                type="insufficient_quota", code="budget_exceeded", headers=_scope(level),
            )
        case LimiterUnavailable(retry_after_s=seconds):
            return _server_error(503, "The rate limiter's store is unavailable; try again shortly.",
                                 "limiter_unavailable", _retry_after(seconds))
        case BodiesBusy(retry_after_s=seconds):
            return _server_error(503, "The gateway is busy with other large requests; retry after the time given.",
                                 "server_busy", _retry_headers(seconds * 1000))
        case ResponseReadsThrottled(retry_after_s=seconds):
            return GatewayError(
                429, f"Too many reads of stored responses with this key; retry after {seconds} seconds.",
                type="rate_limit_error", code="rate_limit_exceeded", headers=_retry_headers(seconds * 1000),
            )
    return None


def _backends(refusal: Refusal) -> GatewayError | None:
    """What the backends could or would not do."""
    match refusal:
        case TooLargeForBackends(need=need, deployment=deployment):
            # Azure's own answer to such a request is 429 with a Retry-After of up to a day: the same status, but
            # told not to retry (the SDKs honour x-should-retry), since no wait makes it fit.
            return GatewayError(
                429,
                f"This request needs up to {need} tokens, more than the deployment '{deployment}' admits in a minute "
                "in the regions that could serve it; it will not be admitted later either. Lower max_tokens or "
                "shorten the prompt.",
                type="rate_limit_error", code="tokens_exceed_backend_limit", param="max_tokens",
                headers={"x-should-retry": "false"},
            )
        case BackendsBusy(wait_ms=wait_ms):
            return GatewayError(
                429, "Every backend for this deployment is at capacity; retry after the time given.",
                type="rate_limit_error", code="backends_busy", headers=_retry_headers(wait_ms),
            )
        case NoBackend(wait_ms=wait_ms):
            return _server_error(503, "No backend could serve the request; retry after the time given.",
                                 "service_unavailable", _retry_headers(wait_ms))
        case BackendsFailed(kind=FailureKind.TIMEOUT):
            return _server_error(504, "The backend did not answer in time.", "backend_timeout")
        case BackendsFailed(kind=FailureKind.BROKEN):
            return _server_error(502, "The backend's response broke off.", "backend_error")
        case BackendsFailed():
            return _server_error(502, "The backend could not be reached.", "backend_unreachable")
        case BackendAuthFailed():
            return _server_error(502, "The gateway could not authenticate to the backend.", "backend_auth_failed")
        case MalformedAnswer():
            return _server_error(502, "The backend returned a malformed response.", "backend_malformed_response")
    return None


def _stored_responses(refusal: Refusal) -> GatewayError | None:
    """Responses stored at a backend: the ids, and where they live."""
    match refusal:
        case ResponseNotFound(response_id=response_id, previous=True):
            return bad_request(
                f"Previous response with id '{response_id}' not found.", param="previous_response_id",
                code="previous_response_not_found",
            )
        case ResponseNotFound(response_id=response_id):
            return not_found(f"Response with id '{response_id}' not found.", code="response_not_found")
        case ItemNotFound(item_id=item_id):
            return GatewayError(404, f"Item with id '{echoed(item_id)}' not found.", param="input", code="item_not_found")
        case ResponseStateUnavailable(retry_after_s=seconds):
            return _server_error(
                503, "The gateway cannot look up where this response is stored right now; retry shortly.",
                "response_state_unavailable", _retry_headers(seconds * 1000),
            )
        case ResponseBackendUnavailable(
            response_id=response_id, region=region, backend_id=backend_id, reason=reason, wait_s=seconds
        ):
            return _server_error(
                503,
                f"Response '{response_id}' is stored in region {region} (backend {backend_id}), which cannot serve it "
                f"now ({reason}); no other region can continue it. Retry after {seconds} s.",
                "response_backend_unavailable", _retry_headers(seconds * 1000),
            )
    return None


def _policies(refusal: Refusal) -> GatewayError | None:
    """What a key's safety and audit policies require."""
    match refusal:
        case ContentFiltered(result=result):
            return ContentFilterError(result)
        case SafetyUnavailable(retry_after_s=seconds):
            return _server_error(
                503, "The content safety service this key's policy requires cannot be reached; the request was not "
                "sent to a model. Retry after the time given.", "safety_unavailable", _retry_headers(seconds * 1000),
            )
        case AuditUnavailable(retry_after_s=seconds):
            return _server_error(
                503, "The audit trail this key's policy requires cannot take records now; the request was not sent "
                "to a model. Retry after the time given.", "audit_unavailable", _retry_headers(seconds * 1000),
            )
        case SafetyInputTooLarge(chars=chars, limit=limit):
            return GatewayError(
                400, f"The request carries {chars} characters of text; this key's safety policy checks at most "
                f"{limit} for one request.", code="safety_input_too_large",
            )
    return None


_GROUPS = (_identity, _limits, _backends, _stored_responses, _policies)


def throttle_reason(refusal: Refusal) -> str | None:
    """The Reason dimension of the Throttled Requests metric, or None for a refusal that is not a throttle."""
    match refusal:
        case RateLimited() | NeverAdmissible():
            return "rate"
        case QuotaExhausted():
            return "quota"
        case BudgetExceeded():
            return "budget"
        case BackendsBusy():
            return "backends"
    return None
