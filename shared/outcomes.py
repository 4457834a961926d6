"""What went wrong, as values: the refusals the gateway answers itself, and the ways one backend attempt fails.

Numbers, not HTTP. The limiter, the router and the consumer directory raise these; shared/edge/errors.py renders each
one, in one place, as an OpenAI-shaped error with its status and headers, and names the metric reason of a throttle.

Refusals are plain (not frozen) dataclasses: Python writes to an exception as it travels (`__traceback__`, notes).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# An end user's id, and the User ID a request is recorded under (header, token claim): at most this many characters.
MAX_USER_ID_CHARS = 128


class Refusal(Exception):
    """A request the gateway answers itself, without a backend's answer."""

    # Set by the request flow once the deployment is known, for metrics; never by the raiser.
    deployment: str | None = None


# ---- who is calling ------------------------------------------------------------------------------------------------


class KeyProblem(Enum):
    MISSING = "missing"
    REPEATED = "repeated"  # a credential header sent more than once
    NOT_BEARER = "not_bearer"  # an Authorization header that is not 'Bearer <key>'
    CONFLICTING = "conflicting"  # api-key and Authorization carry different keys
    UNKNOWN = "unknown"  # no consumer has this key
    EXPIRED = "expired"  # a rotated consumer's previous key, past its grace period


@dataclass(eq=False)
class InvalidKey(Refusal):
    problem: KeyProblem
    consumer_id: str = ""  # known for an expired key: for logs and metrics, never for the answer


@dataclass(eq=False)
class InvalidToken(Refusal):
    """An Entra ID access token that admits no one. `reason` goes to logs and metrics; `message` to the client."""

    reason: str
    message: str = "The access token is not valid."


@dataclass(eq=False)
class ConsumerDisabled(Refusal):
    consumer_id: str


@dataclass(eq=False)
class AuthThrottled(Refusal):
    """Too many failed authentications from the client's address: no key is looked up for `retry_after_s`."""

    retry_after_s: int


@dataclass(eq=False)
class AuthStoreUnavailable(Refusal):
    """A key not in the cache could not be looked up: not a verdict on the key."""

    retry_after_s: int = 1


# ---- what it asks for ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class DeploymentNotFound(Refusal):
    name: str


@dataclass(eq=False)
class DeploymentNotAllowed(Refusal):
    name: str


@dataclass(eq=False)
class EndUserRefused(Refusal):
    """The request names no end user where its consumer requires one (`missing`), or one that is too long or not
    printable text; `sources` are where the consumer looks for one."""

    missing: bool
    sources: tuple[str, ...]


# ---- the consumer's own limits -------------------------------------------------------------------------------------


@dataclass(eq=False)
class RateLimited(Refusal):
    """Over a tokens-per-minute limit: admissible again in `wait_ms`."""

    limit: int
    wait_ms: float
    remaining: int = 0
    need: int = 0  # what the refused request reserves (its prompt and output cap), when known
    level: str = ""  # which level refused: team, consumer, deployment or user ("": consumer)


@dataclass(eq=False)
class NeverAdmissible(Refusal):
    """The request alone needs more than the whole per-minute limit."""

    need: int
    limit: int
    level: str = ""


@dataclass(eq=False)
class TooLargeForBackends(Refusal):
    """Every backend tried refused the request for its size (a 429 that shows room, or asks for more than a minute
    for a request larger than any it admitted): larger than the deployment's whole tokens per minute there. Sending
    it on to every region would only open them all; it is answered instead."""

    need: int
    deployment: str


@dataclass(eq=False)
class QuotaExhausted(Refusal):
    limit: int
    period: str
    resets_at_s: float  # epoch seconds
    resets_in_s: float
    level: str = ""


@dataclass(eq=False)
class BudgetExceeded(Refusal):
    """The consumer has spent its budget (in currency) for the period."""

    period: str
    spent: float
    budget: float
    currency: str
    level: str = ""


@dataclass(eq=False)
class LimiterUnavailable(Refusal):
    """The limiter's store is away and the limiter fails closed."""

    retry_after_s: int = 1


# ---- the backends --------------------------------------------------------------------------------------------------


class FailureKind(Enum):
    THROTTLED = "throttled"  # 429
    AUTH = "auth"  # 401/403: the backend refused the gateway's own credential
    STATUS = "status"  # another status the backend's breaker counts as a failure (5xx by default)
    TIMEOUT = "timeout"  # no answer in time
    CONNECTION = "connection"  # refused, reset, unreachable
    BROKEN = "broken"  # the body broke off after the answer began


@dataclass(frozen=True, slots=True)
class AttemptFailure:
    """Why one attempt at one backend did not answer the request."""

    kind: FailureKind
    status: int | None = None

    @classmethod
    def of_status(cls, status: int) -> AttemptFailure:
        if status == 429:
            return cls(FailureKind.THROTTLED, status)
        return cls(FailureKind.AUTH if status in (401, 403) else FailureKind.STATUS, status)

    @property
    def reason(self) -> str:
        """As metrics and breakers name it: the status ("429", "500") or the kind ("timeout", "broken")."""
        return str(self.status) if self.status is not None else self.kind.value


@dataclass(eq=False)
class BackendsBusy(Refusal):
    """Every backend for the deployment is throttled; the soonest recovers in `wait_ms`."""

    wait_ms: int


@dataclass(eq=False)
class NoBackend(Refusal):
    """No backend could serve the request; the soonest recovers in `wait_ms`."""

    wait_ms: int


@dataclass(eq=False)
class BackendsFailed(Refusal):
    """Every attempt failed the same way: `kind` is TIMEOUT, BROKEN or CONNECTION (connection errors and broken bodies
    mixed)."""

    kind: FailureKind


@dataclass(eq=False)
class BackendAuthFailed(Refusal):
    """The backend refused the gateway's own credential (401/403)."""


@dataclass(eq=False)
class MalformedAnswer(Refusal):
    """The backend said 200 with a body that is not JSON."""


# ---- stored responses (the Responses API) ----------------------------------------------------------------------------


@dataclass(eq=False)
class ResponseNotFound(Refusal):
    """An id this consumer may not continue: unknown, expired, another consumer's, or held by a region no longer
    configured. One answer for all of them, so that ids cannot be probed. `previous`: it was named as
    `previous_response_id` in a body (400, as the service answers) rather than in the path (404)."""

    response_id: str
    previous: bool


@dataclass(eq=False)
class BodiesBusy(Refusal):
    """This worker's budget of memory for large request bodies stayed spent while the request waited for a share."""

    retry_after_s: int


@dataclass(eq=False)
class ItemNotFound(Refusal):
    """An item of an earlier response named in a create body (`item_reference`, a reasoning item by id) that this
    consumer may not read: unknown, expired, another consumer's. One answer for all of them (404, as the service
    answers an unknown item), so that item ids cannot be probed."""

    item_id: str


@dataclass(eq=False)
class ResponseReadsThrottled(Refusal):
    """This consumer made this instance read stored responses' records faster than it may (no admission charges a
    read): 429 until its bucket refills."""

    retry_after_s: int


@dataclass(eq=False)
class ResponseStateUnavailable(Refusal):
    """Where a response is stored could not be looked up (the store is away): not a verdict on the id."""

    retry_after_s: int = 1


@dataclass(eq=False)
class ResponseBackendUnavailable(Refusal):
    """The one backend holding a stored response cannot serve it now, and no other region can continue it."""

    response_id: str
    region: str
    backend_id: str
    reason: str
    wait_s: int


# ---- safety policies (shared/flow/safety.py) ------------------------------------------------------------------------


@dataclass(eq=False)
class ContentFiltered(Refusal):
    """A prompt the consumer's safety policy blocks. `blocked`: the content filter keys that blocked (for metrics and
    the log); `result`: Azure OpenAI's innererror.content_filter_result. Never sent to a model, never charged."""

    blocked: tuple[str, ...]
    result: dict[str, object]
    policy: str = ""


@dataclass(eq=False)
class SafetyUnavailable(Refusal):
    """The consumer's policy says closed, and a safety service cannot be asked now (its breaker, a failure)."""

    service: str
    retry_after_s: int
    policy: str = ""


@dataclass(eq=False)
class SafetyInputTooLarge(Refusal):
    """More text than a policy checks for one request (shared/safety/texts.py MAX_CHARS)."""

    chars: int
    limit: int


@dataclass(eq=False)
class AuditUnavailable(Refusal):
    """The consumer's policy says `audit: required`, and the audit trail cannot take records now."""

    retry_after_s: int
    policy: str = ""
