"""The books: the one place a request's tokens are written down.

What the consumer is charged (its limiter ticket), what its usage rows record, and what the token metrics emit are
computed here, from the same values, in one synchronous function per outcome: so charged = recorded = emitted holds
by construction, and a stream the client abandons (its relay cancelled) is still settled.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from shared.clock import Clock
from shared.config import Backend
from shared.edge.messages import GatewayRequest
from shared.flow.exchange import Exchange, LostAttempt, Served
from shared.flow.gates import norm
from shared.flow.translate import Operation, Route
from shared.limits.tickets import Held, Limiter
from shared.records.prices import PriceTable
from shared.records.usage import TokenUsage, add_tools, combined
from shared.telemetry.protocol import RequestRecord, Telemetry, Trace
from shared.telemetry.usage_rows import UsageRecorder


class Capacity(Protocol):
    def settled(self, backend: Backend, deployment: str, tokens: int) -> None:
        """A call the backend answered has ended and used `tokens` (a PTU's learnt capacity is corrected with it)."""


class Books:
    def __init__(self, clock: Clock, usage: UsageRecorder, telemetry: Telemetry, capacity: Capacity | None = None,
                 prices: PriceTable | None = None) -> None:
        self._clock = clock
        self._usage = usage
        self._telemetry = telemetry
        self._capacity = capacity
        self._prices = prices or PriceTable()

    def _cost(self, exchange: Exchange, served: tuple[Backend, TokenUsage | None] | None = None) -> float:
        """What the answer and the attempts that broke off cost, each at its own backend (a PTU's: 0 at the margin)."""
        parts = [(a.backend, a.usage) for a in exchange.lost] + ([served] if served is not None else [])
        return sum(self._prices.cost(exchange.deployment, backend.ptu, usage) for backend, usage in parts)

    def settle(self, exchange: Exchange, served: Served) -> int:
        """An answer reached the client (whole, cut, or abandoned): charge the answer's usage plus every attempt whose
        body broke off before it; emit each under the backend that spent it, and the request once. Returns the tokens
        charged (the x-gateway-tokens-consumed header)."""
        served = _with_chat_search(exchange, served)
        charged = combined(served.usage, self._lost(exchange))
        spent = charged.total if charged is not None else 0
        exchange.ticket.settle(spent)
        if self._capacity is not None:
            self._capacity.settled(served.backend, exchange.deployment, served.usage.total if served.usage else 0)
        self._usage.record(exchange.consumer.id, exchange.deployment, charged,
                           cost=self._cost(exchange, (served.backend, served.usage)))
        self._emit_lost(exchange)
        record = self._record(exchange, served.backend, served.status, served.usage, served.model, served.attempts,
                              served.ttft_ms)
        self._telemetry.request_done(record, exchange.trace)
        if record.cache:
            self._telemetry.cache_used(record)
        if record.safety:
            self._telemetry.safety_checked(record)
        return spent

    def hit(self, record: RequestRecord, trace: Trace) -> None:
        """An answer the response cache served: no backend tokens (nothing charged to the limiter), the request and
        the tokens it saved in the usage rows, the request log and the metrics."""
        self._usage.record(record.consumer_id, record.deployment, None, saved=record.saved,
                           cost=self._prices.cost(record.deployment, record.ptu, None, record.saved))
        self._telemetry.request_done(record, trace)
        self._telemetry.cache_used(record)
        if record.safety:
            self._telemetry.safety_checked(record)

    def hold(self, exchange: Exchange, served: Served, held: int, until_s: float) -> tuple[int, Held | None]:
        """A background response answered without its final usage (queued, or a stream left after it started): its
        reservation (`held`: prompt and output cap) holds the consumer's limits until `until_s` or until its usage is
        read (`settle_later`, shared/flow/holds.py); the rows and metrics wait for the backend's figures (the request
        itself is counted now). Returns the tokens charged and where they are held."""
        lost = self._lost(exchange)
        spent = lost.total if lost is not None else 0
        parked = exchange.ticket.hold(held, until_s, spent)
        self._usage.record(exchange.consumer.id, exchange.deployment, lost, cost=self._cost(exchange))
        self._emit_lost(exchange)
        record = self._record(exchange, served.backend, served.status, None, served.model, served.attempts, served.ttft_ms)
        self._telemetry.request_done(record, exchange.trace)
        return held + spent, parked

    def settle_later(self, limiter: Limiter, consumer_id: str, held: Held, usage: TokenUsage, record: RequestRecord) -> None:
        """The backend's usage of a background response, learnt from a follow-up or the sweep: its hold is given back
        and its usage charged now, never refused (a consumer over its limit pays its corrections too); the rows and
        token metrics get the backend's figures under the create operation, its request counted already."""
        limiter.release(held, usage.total)
        self._usage.record(consumer_id, record.deployment, usage, requests=0,
                           cost=self._prices.cost(record.deployment, record.ptu, usage))
        self._telemetry.tokens_spent(replace(record, operation=Operation.RESPONSES.operation_id, usage=usage))

    def passed(self, exchange: Exchange, served: Served) -> RequestRecord:
        """An answer passed through that spent no tokens (a follow-up of a stored response: a read, a replay, a
        delete, a cancel): counted as the request it is, under the same dimensions as any other; nothing charged or
        recorded in the usage rows (a background response it finds finished is settled by shared/flow/holds.py)."""
        record = self._record(exchange, served.backend, served.status, None, served.model, served.attempts)
        self._telemetry.request_done(record, exchange.trace)
        return record

    def unanswered(self, exchange: Exchange) -> None:
        """No backend answered: only the attempts whose body broke off were billed by their backends. (The request
        itself is counted by `refused` when its refusal is rendered.)"""
        lost = self._lost(exchange)
        spent = lost.total if lost is not None else 0
        # A request that timed out, or was cancelled while a backend had it, may still be generating (and billed) up
        # to its cap: what it was charged for (its reservation) is not refunded.
        sent = exchange.timeouts > exchange.timeouts_before or exchange.awaiting_backend
        exchange.ticket.settle(max(exchange.reserve, spent) if sent else spent)
        if lost is not None:
            self._usage.record(exchange.consumer.id, exchange.deployment, lost, cost=self._cost(exchange))
        self._emit_lost(exchange)

    def moved(self, exchange: Exchange) -> None:
        """The request leaves its deployment for the next of its chain (shared/flow/failover.py): its reservation there
        is settled as for an unanswered request, and the attempts whose bodies broke off there are charged, recorded
        and emitted under that deployment, which spent them."""
        self.unanswered(exchange)

    def refused(
        self, request: GatewayRequest, route: Route, consumer_id: str, client_ip: str, deployment: str, status: int,
        started: float, trace: Trace, reason: str = "", safety: tuple[str, str, str] | None = None,
    ) -> None:
        """A request the gateway answered itself: counted, with no tokens, under the dimensions the caller vouches for
        (the gateway passes none that an unauthenticated client chose)."""
        record = RequestRecord(
            consumer_id=consumer_id,
            client_ip=client_ip,
            api=route.api,
            operation=route.operation.operation_id,
            user_id="",
            deployment=deployment,
            status=status,
            duration_ms=(self._clock.monotonic() - started) * 1000,
            reason=reason,
        )
        if safety is not None:  # (outcome, policy, detail): a refusal of the consumer's safety policy
            record.safety, record.safety_policy, record.safety_detail = safety
        self._telemetry.request_done(record, trace)
        if record.safety:
            self._telemetry.safety_checked(record)

    @staticmethod
    def _lost(exchange: Exchange) -> TokenUsage | None:
        lost: TokenUsage | None = None
        for attempt in exchange.lost:
            lost = combined(lost, attempt.usage)
        return lost

    def _emit_lost(self, exchange: Exchange) -> None:
        for attempt in exchange.lost:
            self._telemetry.tokens_spent(self._lost_record(exchange, attempt))

    def _lost_record(self, exchange: Exchange, attempt: LostAttempt) -> RequestRecord:
        record = self._record(exchange, attempt.backend, attempt.status, attempt.usage, None, attempt.number)
        record.duration_ms = attempt.duration_ms
        return record

    def _record(
        self, exchange: Exchange, backend: Backend, status: int, usage: TokenUsage | None, model: str | None,
        attempts: int, ttft_ms: float | None = None,
    ) -> RequestRecord:
        return RequestRecord(
            consumer_id=exchange.consumer.id,
            client_ip=exchange.request.client_ip,
            api=exchange.route.api,
            operation=exchange.route.operation.operation_id,
            user_id=exchange.user_id,
            deployment=exchange.deployment,
            status=status,
            duration_ms=(self._clock.monotonic() - exchange.started) * 1000,
            stream=exchange.shape.stream,
            backend_id=backend.id,
            region=backend.region,
            ptu=backend.ptu,
            model=model or "",
            usage=usage,
            ttft_ms=ttft_ms,
            attempts=attempts,
            requested=exchange.checked.requested,
            step=exchange.step,
            team=exchange.consumer.team or "",
            cache=exchange.cache.state if exchange.cache is not None else "",
            safety=exchange.screened.outcome if exchange.screened is not None else "",
            safety_policy=exchange.screened.policy.name if exchange.screened is not None else "",
            safety_detail=exchange.screened.detail if exchange.screened is not None else "",
        )


def _with_chat_search(exchange: Exchange, served: Served) -> Served:
    """A chat completion asked to search the web (`web_search_options`, gated by the web_search capability) is billed
    one search call when answered: counted with its tokens, so it reaches the rows, the metrics and the budget."""
    usage = served.usage
    if served.status != 200 or usage is None or exchange.route.operation is not Operation.CHAT:
        return served
    if not any(isinstance(k, str) and norm(k) == "websearchoptions" for k in exchange.checked.body):
        return served
    return replace(served, usage=replace(usage, tools=add_tools(usage.tools, (("web_search", 1),))))
