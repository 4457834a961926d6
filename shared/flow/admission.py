"""Admission: what the request may cost at most, reserved against the consumer's limits before anything is sent."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from shared.config import Settings
from shared.edge.messages import GatewayRequest
from shared.flow import offload, tokens
from shared.flow.end_users import caller_user_id, end_user, ledger_id
from shared.flow.exchange import Checked, Exchange, count_prompt, prompt_bound
from shared.flow.translate import CallShape, Operation
from shared.limits.tickets import Limiter, Ticket, UnlimitedTicket
from shared.records.consumers import Consumer
from shared.telemetry.protocol import Trace

# A large prompt is admitted on its upper bound, uncounted, only when the bound and the output fit this many times in
# what the consumer has left: the bound holds up to ~4x the prompt's tokens (English text is ~4 bytes a token) until
# the backend's usage settles it, and it must not crowd out the consumer's other requests meanwhile.
BOUND_ROOM_FACTOR = 2
# A reasoning model's hidden reasoning counts as output: a cap of GATEWAY_DEFAULT_MAX_TOKENS (1,024) would cut most
# answers off before they begin. OpenAI's reasoning guide suggests reserving at least 25,000 tokens for reasoning and
# output; the cap is this or what fits in the consumer's minute, whichever is smaller.
REASONING_DEFAULT_OUTPUT = 25_000
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5", "codex")


def is_reasoning_model(name: str) -> bool:
    """Whether a model (or deployment) name is of a reasoning family (o-series, gpt-5 but its chat model, codex)."""
    lowered = name.lower()
    return lowered.startswith(_REASONING_PREFIXES) and not lowered.startswith("gpt-5-chat")


class Admission:
    def __init__(self, settings: Settings, limiter: Limiter) -> None:
        self._default_max_tokens = settings.default_max_tokens
        self._output_cap = settings.output_cap
        self._admit_on_bound = settings.admit_on_bound
        self._user_id_header = settings.user_id_header
        self._user_key = (settings.user_id_hash_key or "").encode()
        self._limiter = limiter
        # The model names each deployment is served as (its own name too): what an image costs depends on them.
        models: dict[str, set[str]] = {}
        for backend in settings.backends:
            for deployment, upstream in backend.deployments.items():
                models.setdefault(deployment, {deployment}).add(upstream)
        self._models = {deployment: tuple(sorted(names)) for deployment, names in models.items()}
        self._reasoning = frozenset(
            deployment for deployment, names in self._models.items()
            if settings.catalog.spec(deployment).family == "reasoning" or any(map(is_reasoning_model, names))
        )

    async def admit(
        self, request: GatewayRequest, checked: Checked, started: float, trace: Trace, user_id: str | None = None,
        person: str | None = None,
    ) -> Exchange:
        """Reserve the request's largest possible cost at every level it belongs to, or raise the limiter's refusal
        (RateLimited, QuotaExhausted, NeverAdmissible, ...). The prompt is estimated only for a consumer with limits.
        `user_id` is the caller's from its token, when the settings take it from a claim; else the User ID header's.
        `person`: the object id of the person an Entra ID token speaks for. Where the consumer limits its end users,
        the end user (end_users.py) is admitted against its own level and is the request's user id in metrics."""
        consumer = checked.consumer
        deployment = checked.shape.deployment
        user_id, user = self.caller(request, checked, user_id, person, required=True)
        prompt: int | None = None
        counted = True
        floor: int | None = None
        reserve = 0
        if self._limiter.needs_estimate(consumer, deployment, user):
            prompt, counted, floor = await self._estimate(request, checked, user)
            if b"image" in request.body:
                prompt = max(0, prompt + tokens.image_adjustment(checked.body, self._models.get(deployment, (deployment,))))
            capped = self._capped(checked.route.operation, consumer, checked.shape, prompt)
            if capped is not checked.shape:
                checked = replace(checked, shape=capped)
            reserve = prompt + self._completion(checked)
        ticket = await self._limiter.admit(consumer, deployment, reserve, user)
        return Exchange(
            request=request,
            checked=checked,
            started=started,
            trace=trace,
            user_id=user_id,
            ticket=ticket,
            reserve=reserve,
            prompt_estimate=prompt if counted else None,
            prompt_bound=None if counted else prompt,
            prompt_floor=floor,
            end_user=user,
        )

    def unreserved(
        self, request: GatewayRequest, checked: Checked, started: float, trace: Trace, user_id: str | None = None,
        person: str | None = None,
    ) -> Exchange:
        """A request that spends no tokens (a follow-up of a stored response: a read, a delete, a cancel): nothing is
        reserved, and its caller is named as `admit` names it (an end user is not required of it)."""
        user_id_, _ = self.caller(request, checked, user_id, person, required=False)
        return Exchange(request=request, checked=checked, started=started, trace=trace, user_id=user_id_,
                        ticket=UnlimitedTicket(), reserve=0)

    def caller(
        self, request: GatewayRequest, checked: Checked, user_id: str | None, person: str | None, *,
        required: bool = True,
    ) -> tuple[str, str | None]:
        """The request's user id in metrics and the end user's ledger id (None: not limited as an end user), named
        the same way for an admitted request, a cache hit and a follow-up: the end user, where the consumer limits
        them and the request names one (`required`: refused where the consumer requires one and none is named);
        else the caller's from its token, when the settings take it from a claim; else the User ID header's."""
        consumer = checked.consumer
        users = consumer.users
        if users.limited or users.required:
            named = end_user(users if required else replace(users, required=False), person, checked.body,
                             request.headers)
            if named is not None:
                return named, ledger_id(consumer.id, named, self._user_key)
        return caller_user_id(user_id, request.headers, self._user_id_header), None

    async def readmit(self, exchange: Exchange, checked: Checked) -> tuple[Ticket, int, Checked]:
        """Reserve the request anew for the deployment it falls back to (`checked`), once its reservation at the one it
        leaves was settled: the same prompt (counted, or the same bound) and output, against the target's scopes. Raises
        the limiter's refusal when the consumer cannot be admitted there. See docs/architecture.md, "Fallback and the
        books"."""
        reserve = 0
        deployment = checked.shape.deployment
        if self._limiter.needs_estimate(checked.consumer, deployment, exchange.end_user):
            if exchange.prompt_estimate is not None:
                prompt = exchange.prompt_estimate
            elif exchange.prompt_bound is not None:
                prompt = exchange.prompt_bound
            else:
                prompt = await exchange.counted_prompt()
            capped = self._capped(checked.route.operation, checked.consumer, checked.shape, prompt)
            if capped is not checked.shape:
                checked = replace(checked, shape=capped)
            reserve = prompt + self._completion(checked)
        ticket = await self._limiter.admit(checked.consumer, deployment, reserve, exchange.end_user)
        return ticket, reserve, checked

    def _completion(self, checked: Checked) -> int:
        """Every choice the backend generates (n, best_of) may run to the cap, and is billed."""
        if checked.route.operation is Operation.EMBEDDINGS:
            return 0
        return checked.shape.choices * (checked.shape.max_tokens or self._default_max_tokens)

    async def _estimate(
        self, request: GatewayRequest, checked: Checked, user: str | None
    ) -> tuple[int, bool, int | None]:
        """The prompt's tokens for admission, whether they were counted (else bounded from above), and for a large
        body its free lower bound (kept for the charges made while it streams, Exchange.prompt_spent).

        A body up to offload.ON_LOOP_BYTES is counted in place (a few milliseconds at most). Counting costs about a
        second per 4 MiB of text, so a larger one is first checked against what this instance already knows and
        against a lower bound of its size (a consumer over its limit, or a prompt larger than its whole minute, is
        refused before anything is counted); then, when its upper bound (its UTF-8 bytes, see prompt_bound) and
        the output fit BOUND_ROOM_FACTOR times in what the consumer has left, it is admitted on that bound and counted
        only if the books come to need the figure (Exchange.counted_prompt); otherwise it is counted now. Every walk
        of a large body (the bounds visit each message and part: over a second for 200,000 small messages) runs in
        the one worker thread, off the event loop, so other requests keep moving."""
        if len(request.body) <= offload.ON_LOOP_BYTES:
            return count_prompt(checked), True, None
        consumer, deployment = checked.consumer, checked.shape.deployment
        floor = await offload.run(partial(tokens.prompt_lower_bound, checked.body))
        self._limiter.precheck(consumer, deployment, floor, user)
        if self._admit_on_bound:
            bound = await offload.run(partial(prompt_bound, checked))
            room = self._limiter.room(consumer, deployment, user)
            if room is None or (bound + self._completion(checked)) * BOUND_ROOM_FACTOR <= room:
                return bound, False, floor
        return await offload.count(partial(count_prompt, checked)), True, floor

    def _capped(self, operation: Operation, consumer: Consumer, shape: CallShape, prompt: int) -> CallShape:
        """With the output cap on (for the consumer, or by default), a request that asks no cap, or more than the
        consumer may have in a minute, is sent with one the gateway sets: then no request can outrun its
        reservation (the trade-off: such a request is answered shorter, finish_reason "length", instead of refused
        or let run)."""
        reasoning = shape.deployment in self._reasoning
        enabled = consumer.limits.output_cap
        if enabled is None:
            enabled = self._output_cap == "on" or (self._output_cap == "reasoning" and reasoning)
        if operation is Operation.RESPONSES and shape.background:
            # A background response runs on after its answer and is held at its reservation until its usage is read
            # (shared/flow/holds.py): without a cap that hold would bound nothing.
            enabled = True
        elif not enabled or operation not in (Operation.CHAT, Operation.COMPLETIONS, Operation.RESPONSES):
            return shape
        limits = [consumer.limits.tokens_per_minute, consumer.limits.deployment_tokens_per_minute.get(shape.deployment, 0)]
        minute = min((limit for limit in limits if limit > 0), default=0)
        most = (minute - prompt) // shape.choices if minute > 0 else None
        default = max(self._default_max_tokens, REASONING_DEFAULT_OUTPUT) if reasoning else self._default_max_tokens
        cap = shape.max_tokens or default
        if most is not None and cap > most >= 1:
            cap = most
        if cap == shape.max_tokens:
            return shape
        return replace(shape, max_tokens=cap, capped=True)
