"""What the request flow hands to telemetry: the metric and dimension names, the RequestRecord, the Telemetry protocol,
and two implementations every sink builds on: NullTelemetry (does nothing) and ForwardingTelemetry (hands every call
to an inner sink; a wrapper overrides only what it adds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from shared.records.usage import TokenUsage

# Metric names: the token metrics keep API Management's names so existing queries and dashboards carry over.
PROMPT_TOKENS = "Prompt Tokens"
COMPLETION_TOKENS = "Completion Tokens"
TOTAL_TOKENS = "Total Tokens"
CACHED_TOKENS = "Cached Tokens"
REASONING_TOKENS = "Reasoning Tokens"
# Of Total Tokens, those the gateway counted itself because the backend reported none (a stream cut or abandoned, an
# api-version or server without streamed usage): the rest are the service's own figures.
COUNTED_TOKENS = "Counted Tokens"
GATEWAY_REQUESTS = "Gateway Requests"
THROTTLED_REQUESTS = "Throttled Requests"
FAILOVERS = "Failovers"
MODEL_FALLBACKS = "Model Fallbacks"  # a request moved to the next deployment of its chain (GATEWAY_DEPLOYMENTS)
BREAKER_TRANSITIONS = "Breaker Transitions"
REQUEST_DURATION = "Request Duration"
TIME_TO_FIRST_TOKEN = "Time To First Token"
STORE_FALLBACKS = "Limiter Store Fallbacks"
COST = "Cost"  # in the price table's currency (GATEWAY_PRICES); pay-as-you-go answers only, PTU adds 0
AUTH_FAILURES = "Authentication Failures"
TOOL_CALLS = "Tool Calls"  # built-in tool calls the service bills per call (per container, per image), by Tool
CACHE_REQUESTS = "Cache Requests"  # requests of consumers with the response cache on, by Cache (hit | miss | bypass)
TOKENS_SAVED = "Tokens Saved"  # what the backend billed for the answers that cache hits served again
# Requests of consumers with a safety policy (docs/safety.md), by Safety (passed | redacted | blocked | unchecked |
# unavailable) and Category (what blocked: jailbreak, hate, ..., pii; the service that could not be asked)
SAFETY_CHECKS = "Safety Checks"
AUDIT_RECORDS_LOST = "Audit Records Lost"  # audit records that could not be written to Blob Storage (after retries)

# Dimension names.
SUBSCRIPTION_ID = "Subscription ID"
TEAM = "Team"  # the consumer's team ("" for none): one per consumer, so it adds no series
CLIENT_IP = "Client IP"
API_ID = "API ID"
OPERATION_ID = "Operation ID"
USER_ID = "User ID"
BACKEND_ID = "Backend ID"
LOCATION = "Location"
DEPLOYMENT = "Deployment"
MODEL = "Model"
GATEWAY_ID = "Gateway ID"
STREAM = "Stream"
STATUS_CODE = "Status Code"
PTU = "PTU"
REASON = "Reason"
FROM_BACKEND = "From Backend"
FROM_DEPLOYMENT = "From Deployment"
TO_DEPLOYMENT = "To Deployment"
REQUESTED_DEPLOYMENT = "Requested Deployment"  # per-request log: the name the client used (a deployment or an alias)
TO_BACKEND = "To Backend"
STATE = "State"
TOOL = "Tool"  # web_search | file_search | code_interpreter | image_generation | computer_use | mcp
# Per-request log fields beyond the dimension names above.
USAGE_SOURCE = "Usage Source"  # reported (by the backend) | counted (by the gateway) | none
CURRENCY = "Currency"
CACHE = "Cache"  # hit | miss | bypass | off
SAFETY = "Safety"  # passed | redacted | blocked | unchecked | unavailable; "off" in the log where no policy applies
SAFETY_POLICY = "Safety Policy"
CATEGORY = "Category"
SAFETY_DETAIL = "Safety Detail"  # per-request log: what blocked, the PII categories masked and how many (never values)
RECORD_KIND = "Kind"  # request | lost attempt (an attempt whose body broke off before failover; its tokens were charged)


@dataclass(slots=True)
class RequestRecord:
    """Everything metrics need about one finished request; built by the request flow, never parsed from bodies."""

    consumer_id: str
    client_ip: str
    api: str
    operation: str
    user_id: str
    deployment: str
    status: int
    duration_ms: float
    stream: bool = False
    backend_id: str = ""
    region: str = ""
    ptu: bool = False
    model: str = ""
    usage: TokenUsage | None = None
    ttft_ms: float | None = None
    attempts: int = 0
    requested: str = ""  # the deployment or alias the client named ("": the deployment that served)
    step: int = 0  # the served deployment's place in the request's chain: 0 unless it fell back
    reason: str = ""  # a refusal's error code, when the gateway answered itself (a fixed word, never client input)
    team: str = ""  # the consumer's team ("": none)
    cache: str = ""  # hit | miss | bypass; "" where the consumer has the response cache off
    saved: TokenUsage | None = None  # a cache hit: the tokens the stored answer cost the backend (usage is None)
    safety: str = ""  # the safety policy's outcome ("": no policy applies)
    safety_policy: str = ""
    safety_detail: str = ""  # fixed words and counts: what blocked, or PII categories with their counts


class Attempt(Protocol):
    def end(self, status: int | None, error: str | None = None) -> None: ...


class Trace(Protocol):
    """One request's span, and one child span per backend attempt (App Insights: a request and its dependencies)."""

    def attempt(self, backend_id: str, region: str, target: str, number: int) -> Attempt: ...

    def end(self, record: RequestRecord) -> None: ...


class Telemetry(Protocol):
    def begin(self, method: str, route: str) -> Trace:
        """A request span named `METHOD route-template` (no query string, no deployment name)."""
        ...

    def request_done(self, record: RequestRecord, trace: Trace | None = None) -> None: ...

    def tokens_spent(self, record: RequestRecord) -> None:
        """Tokens an attempt cost that did not become the request's answer (a body that broke off before failover):
        token metrics only, under that attempt's backend; the request itself is counted once, by request_done."""
        ...

    def throttled(self, consumer_id: str, deployment: str, reason: str) -> None: ...

    def failover(self, from_backend: str, to_backend: str, reason: str) -> None: ...

    def model_fallback(self, from_deployment: str, to_deployment: str, reason: str) -> None: ...

    def breaker_transition(self, backend_id: str, region: str, state: str) -> None: ...

    def store_fallback(self, reason: str) -> None: ...

    def auth_refused(self, reason: str) -> None:
        """A credential was refused; `reason` is one of a fixed set, never client input."""
        ...

    def cache_used(self, record: RequestRecord) -> None:
        """A request of a consumer with the response cache on (record.cache): counted by outcome, and a hit's saved
        tokens. Called beside request_done, which counts the request itself."""
        ...

    def safety_checked(self, record: RequestRecord) -> None:
        """A request of a consumer with a safety policy (record.safety), beside request_done."""
        ...

    def audit_lost(self, count: int) -> None:
        """Audit records given up on (the trail's memory full, or Blob Storage failing past the retries)."""
        ...


class _NullAttempt:
    def end(self, status: int | None, error: str | None = None) -> None:
        pass


class NullTrace:
    def attempt(self, backend_id: str, region: str, target: str, number: int) -> Attempt:
        return _NULL_ATTEMPT

    def end(self, record: RequestRecord) -> None:
        pass


_NULL_ATTEMPT = _NullAttempt()
NULL_TRACE = NullTrace()


class NullTelemetry:
    def begin(self, method: str, route: str) -> Trace:
        return NULL_TRACE

    def request_done(self, record: RequestRecord, trace: Trace | None = None) -> None:
        pass

    def tokens_spent(self, record: RequestRecord) -> None:
        pass

    def throttled(self, consumer_id: str, deployment: str, reason: str) -> None:
        pass

    def failover(self, from_backend: str, to_backend: str, reason: str) -> None:
        pass

    def model_fallback(self, from_deployment: str, to_deployment: str, reason: str) -> None:
        pass

    def breaker_transition(self, backend_id: str, region: str, state: str) -> None:
        pass

    def store_fallback(self, reason: str) -> None:
        pass

    def auth_refused(self, reason: str) -> None:
        pass

    def cache_used(self, record: RequestRecord) -> None:
        pass

    def safety_checked(self, record: RequestRecord) -> None:
        pass

    def audit_lost(self, count: int) -> None:
        pass


class ForwardingTelemetry:
    """Hands every Telemetry call to `inner`. A wrapper (spend, the console line, the traffic counter) subclasses it and
    overrides only the calls it adds to, so a call added to the protocol reaches the inner sink without each wrapper
    repeating it (tests/test_telemetry_forwarding.py checks every method of the protocol). A wrapper that wraps the
    trace too must give the inner sink its own trace back in request_done (TrafficCounter does)."""

    def __init__(self, inner: Telemetry) -> None:
        self._inner = inner

    def begin(self, method: str, route: str) -> Trace:
        return self._inner.begin(method, route)

    def request_done(self, record: RequestRecord, trace: Trace | None = None) -> None:
        self._inner.request_done(record, trace)

    def tokens_spent(self, record: RequestRecord) -> None:
        self._inner.tokens_spent(record)

    def throttled(self, consumer_id: str, deployment: str, reason: str) -> None:
        self._inner.throttled(consumer_id, deployment, reason)

    def failover(self, from_backend: str, to_backend: str, reason: str) -> None:
        self._inner.failover(from_backend, to_backend, reason)

    def model_fallback(self, from_deployment: str, to_deployment: str, reason: str) -> None:
        self._inner.model_fallback(from_deployment, to_deployment, reason)

    def breaker_transition(self, backend_id: str, region: str, state: str) -> None:
        self._inner.breaker_transition(backend_id, region, state)

    def store_fallback(self, reason: str) -> None:
        self._inner.store_fallback(reason)

    def auth_refused(self, reason: str) -> None:
        self._inner.auth_refused(reason)

    def cache_used(self, record: RequestRecord) -> None:
        self._inner.cache_used(record)

    def safety_checked(self, record: RequestRecord) -> None:
        self._inner.safety_checked(record)

    def audit_lost(self, count: int) -> None:
        self._inner.audit_lost(count)
