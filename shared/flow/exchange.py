"""The request as one object, phase by phase: what the check found (Checked), what admission reserved (Exchange),
which backend answered (Chosen) and what it served (Served). shared/flow/gateway.py hands it from phase to phase:

    authenticate -> check -> admit -> dispatch with failover -> relay -> settle

Services are what the phases share: built once per worker (shared/app.py), never per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from shared.cache.layer import AnswerCache
from shared.cache.lookup import Lookup
from shared.clock import Clock
from shared.config import Backend, Settings
from shared.edge.consumers import ConsumerDirectory
from shared.edge.identity import Identifier
from shared.edge.messages import GatewayRequest
from shared.flow import offload, responses, tokens
from shared.flow.credentials import BackendAuth
from shared.flow.pinning import Holder
from shared.flow.translate import CallShape, Operation, Route
from shared.flow.upstream import Answer, UpstreamClient
from shared.limits.tickets import Limiter, Ticket
from shared.records.consumers import Consumer
from shared.records.usage import TokenUsage
from shared.routing.router import Router
from shared.storage.protocols import ResponseStore
from shared.telemetry.protocol import Telemetry, Trace
from shared.telemetry.usage_rows import UsageRecorder


@dataclass
class Services:
    settings: Settings
    clock: Clock
    consumers: ConsumerDirectory
    identity: Identifier
    router: Router
    upstream: UpstreamClient
    auth: BackendAuth
    limiter: Limiter
    telemetry: Telemetry
    usage: UsageRecorder
    responses: ResponseStore  # where stored responses live
    cache: AnswerCache | None = None  # the response cache's layers (None: no consumer can use it)
    safety: Any = None  # shared/flow/safety.Screening (None: no safety policies are defined)
    audit: Any = None  # shared/safety/audit.AuditTrail (None: no policy audits)


@dataclass(frozen=True, slots=True)
class Checked:
    """A well-formed request for a deployment this consumer may use (the check phase's verdict)."""

    route: Route
    consumer: Consumer
    body: dict[str, Any]
    shape: CallShape
    api_version: str | None
    pinned: Holder | None = None  # continues a stored response: only the backend holding it may answer
    # The deployments that may serve it, in order (shape.deployment first): the requested one (or an alias's entries)
    # and the fallbacks this consumer may use. `fall_back`: it may move on after an attempt failed (else only an
    # alias's entries that could not be tried are passed over).
    chain: tuple[str, ...] = ()
    fall_back: bool = True
    requested: str = ""  # the name the client used: a deployment or an alias
    original: dict[str, Any] | None = None  # the client's body, when `body` was translated for the deployment's family
    raw: bytes | None = None  # then `body`'s bytes (else the client's are sent)


@dataclass(frozen=True, slots=True)
class LostAttempt:
    """An attempt that got no whole answer after its backend read the request (its body broke off, or it ran past the
    read timeout): its backend billed the prompt it read."""

    backend: Backend
    usage: TokenUsage
    number: int
    duration_ms: float
    status: int = 502  # 504 for an attempt that ran past the read timeout


@dataclass(slots=True)
class Exchange:
    """One admitted request on its way through the gateway."""

    request: GatewayRequest
    checked: Checked
    started: float
    trace: Trace
    user_id: str
    ticket: Ticket
    reserve: int
    prompt_estimate: int | None = None  # the prompt as counted: at admission, or when first needed
    end_user: str | None = None  # the end user's ledger id (shared/flow/end_users.py), when its consumer limits them
    prompt_bound: int | None = None  # admitted on this upper bound of the prompt instead, uncounted (shared/flow/admission.py)
    prompt_floor: int | None = None  # a large body's lower bound, walked off the event loop at admission
    lost: list[LostAttempt] = field(default_factory=list)
    asked: dict[str, float] = field(default_factory=dict)  # backend id -> when it said (Retry-After) it would serve
    timeouts: int = 0  # attempts that ran past the read timeout
    awaiting_backend: bool = False  # an attempt is sent and not answered (left set when the call is cancelled then)
    timeouts_before: int = 0  # of which before the current deployment of the chain
    step: int = 0  # the place in the chain of the deployment being tried (0: the requested one)

    def moved(self, checked: Checked, ticket: Ticket, reserve: int, step: int) -> None:
        """Now for another deployment of the chain, reserved anew against it (shared/flow/failover.py): what the
        attempts at the previous one lost was settled there, and their Retry-After is about that deployment."""
        self.checked = checked
        self.ticket = ticket
        self.reserve = reserve
        self.step = step
        self.lost = []
        self.asked = {}
        self.timeouts_before = self.timeouts
    cache: Lookup | None = None  # what the response cache said (None: not in play for this consumer)
    screened: Any = None  # what the safety policy did (shared/flow/safety.Screened; None: no policy applies)

    @property
    def route(self) -> Route:
        return self.checked.route

    @property
    def consumer(self) -> Consumer:
        return self.checked.consumer

    @property
    def shape(self) -> CallShape:
        return self.checked.shape

    @property
    def deployment(self) -> str:
        return self.checked.shape.deployment

    @property
    def limited(self) -> bool:
        """Admission reserved the prompt (counted or bounded) against the consumer's limits."""
        return self.prompt_estimate is not None or self.prompt_bound is not None

    def prompt_tokens(self) -> int:
        """The prompt as the gateway counts it, counted in place if it was not yet: for callers that cannot wait, once
        `counted_prompt` has run or where the body is small."""
        if self.prompt_estimate is not None:
            return self.prompt_estimate
        return self._counted(count_prompt(self.checked))

    async def counted_prompt(self) -> int:
        """The prompt as the gateway counts it (counted once, at admission or when first needed: off the event loop
        for a large body)."""
        if self.prompt_estimate is not None:
            return self.prompt_estimate
        if len(self.request.body) <= offload.ON_LOOP_BYTES:
            return self._counted(count_prompt(self.checked))
        return self._counted(await offload.count(partial(count_prompt, self.checked)))

    def _counted(self, count: int) -> int:
        if self.prompt_estimate is None:  # else counted meanwhile by another caller
            self.prompt_estimate = count
            if self.prompt_bound is not None:
                # From now on the reservation is the count's, not the bound's (what a timed-out request keeps).
                self.reserve += count - self.prompt_bound
        return self.prompt_estimate

    def prompt_spent(self) -> int:
        """Prompt tokens surely spent, for charges made while a request runs (never refunded): the count, or, before
        it, the prompt's free lower bound."""
        if self.prompt_estimate is not None:
            return self.prompt_estimate
        if self.prompt_floor is not None:
            return self.prompt_floor
        return tokens.prompt_lower_bound(self.checked.body)

    def prompt_ceiling(self) -> int:
        """The count, or else the prompt's upper bound: what to charge when the count cannot be waited for."""
        if self.prompt_estimate is not None:
            return self.prompt_estimate
        return self.prompt_bound if self.prompt_bound is not None else prompt_bound(self.checked)

    async def prompt_only(self) -> TokenUsage:
        """What a backend bills for a request it read but never answered whole: the prompt."""
        prompt = await self.counted_prompt()
        return TokenUsage(prompt, 0, prompt, reported=False)


@dataclass(frozen=True, slots=True)
class Chosen:
    """The backend whose answer the client gets (a whole answer already read, or a stream about to be relayed)."""

    backend: Backend
    answer: Answer
    attempts: int


@dataclass(frozen=True, slots=True)
class Served:
    """What one answer cost and how it went, as the books take it."""

    backend: Backend
    status: int
    usage: TokenUsage | None
    model: str | None
    attempts: int
    ttft_ms: float | None = None


def count_prompt(checked: Checked, measure: tokens.Measure | None = None) -> int:
    """The prompt's tokens as the gateway counts them (with `measure`: measured by it instead, see prompt_bound)."""
    encoding = measure if measure is not None else tokens.encoding_for(checked.shape.deployment)
    operation, body = checked.route.operation, checked.body
    if operation is Operation.RESPONSES:
        context = checked.pinned.record.context_tokens if checked.pinned is not None else 0
        return responses.count_input(body, encoding, context)
    if operation is Operation.CHAT:
        return tokens.count_chat_prompt(body, encoding)
    if operation is Operation.COMPLETIONS:
        return tokens.count_completion_prompt(body, encoding)
    return tokens.count_embedding_input(body, encoding)


def prompt_bound(checked: Checked) -> int:
    """At least the prompt's count, at the cost of reading it: the count's own walk (framing, names, tools, images,
    files, audio, token-id lists) with each text's UTF-8 bytes in place of its tokens (tokens.Utf8Bytes)."""
    return count_prompt(checked, tokens.UTF8_BYTES)
