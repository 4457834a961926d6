"""The request flow, as API Management names its sections: inbound (authenticate, check, admit), backend (dispatch
with failover), outbound (relay, settle), on-error (a refusal rendered once). Each phase is a module of its own; this
one hands the request from phase to phase and is the only place a refusal becomes an answer:

    authenticate  shared/edge/consumers.py   who is calling (InvalidKey, ConsumerDisabled, ...)
    check         shared/flow/checks.py      a well-formed request for a deployment the key may use -> Checked
    admit         shared/flow/admission.py   its largest cost reserved against the consumer's limits -> Exchange
    dispatch      shared/flow/failover.py    the best backend that answers, failing over before any byte is sent -> Chosen
    relay         shared/flow/relay.py       the answer to the client, whole or streamed
    settle        shared/flow/books.py       charged = recorded = emitted, in one function

Nothing here touches a framework or a socket: the edge hands over a GatewayRequest, the upstream module does the I/O.
"""

from __future__ import annotations

import orjson

from shared.edge.consumers import Consumer
from shared.edge.errors import render, throttle_reason
from shared.edge.messages import GatewayRequest, GatewayResponse
from shared.flow.admission import Admission
from shared.flow.books import Books
from shared.flow.checks import Checks
from shared.flow.exchange import Services as Services
from shared.flow.failover import Failover
from shared.flow.relay import JSON, Relay
from shared.flow.translate import FOLLOW_UPS, Operation, Route, match_route
from shared.outcomes import Refusal
from shared.routing.pinning import Pinning
from shared.telemetry.events import NULL_TRACE, Trace


class Gateway:
    def __init__(self, services: Services) -> None:
        self.s = services
        self._deployments = services.settings.deployments()
        self.pinning = Pinning(services.responses, services.settings.backends, services.router, services.clock)
        self.books = Books(services.clock, services.usage, services.telemetry)
        self.checks = Checks(self._deployments, self.pinning)
        self.admission = Admission(services.settings, services.limiter)
        self.failover = Failover(
            services.settings, services.clock, services.router, services.upstream, services.auth, services.telemetry,
            self.pinning,
        )
        self.relay = Relay(services.clock, self.books, self.pinning, services.settings)
        # Imported here: the follow-up flow is built on the exchange's services.
        from shared.flow.followups import FollowUps

        self._follow_ups = FollowUps(services, self.pinning, self.books)

    async def handle(self, request: GatewayRequest) -> GatewayResponse:
        started = self.s.clock.monotonic()
        route: Route | None = None
        consumer: Consumer | None = None
        deployment: str | None = None
        trace: Trace = NULL_TRACE
        try:
            route = match_route(request.method, request.raw_path)
            if route.operation is Operation.HEALTH:
                return self._health()
            trace = self.s.telemetry.begin(request.method, route.template)
            caller = await self.s.identity.identify(request.headers, request.repeated)
            consumer = caller.consumer
            if route.operation is Operation.MODELS:
                return self._models(consumer)
            if route.operation in FOLLOW_UPS:
                return await self._follow_ups.handle(request, route, consumer, started, trace)
            parsed = await self.checks.parse(request, route)
            deployment = parsed.shape.deployment
            checked = await self.checks.allow(parsed, consumer)
            exchange = await self.admission.admit(request, checked, started, trace, caller.user_id)
            try:
                chosen = await self.failover.dispatch(exchange)
            except BaseException:
                self.books.unanswered(exchange)
                raise
            return await self.relay.answer(exchange, chosen)
        except Refusal as refusal:
            return self._refused(refusal, request, route, consumer, deployment, started, trace)

    def _refused(
        self, refusal: Refusal, request: GatewayRequest, route: Route | None, consumer: Consumer | None,
        deployment: str | None, started: float, trace: Trace,
    ) -> GatewayResponse:
        """On-error: the refusal rendered once, counted once (and as a throttle when it is one)."""
        error = render(refusal)
        if route is not None:
            reason = throttle_reason(refusal)
            if reason is not None and consumer is not None:
                self.s.telemetry.throttled(consumer.id, deployment or route.deployment or "", reason)
            self.books.refused(request, route, consumer, deployment, error.status, started, trace)
        return GatewayResponse(error.status, {"content-type": JSON, **error.headers}, error.body())

    def _models(self, consumer: Consumer) -> GatewayResponse:
        names = sorted(d for d in self._deployments if consumer.may_use(d))
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "gateway"} for name in names]
        return GatewayResponse(200, {"content-type": JSON}, orjson.dumps({"object": "list", "data": data}))

    def _health(self) -> GatewayResponse:
        return GatewayResponse(200, {"content-type": JSON}, orjson.dumps(self.s.router.health()))
