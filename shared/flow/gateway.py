"""The request flow, as API Management names its sections: inbound (authenticate, check, admit), backend (dispatch
with failover), outbound (relay, settle), on-error (a refusal rendered once). Each phase is a module of its own; this
one hands the request from phase to phase and is the only place a refusal becomes an answer:

    authenticate  shared/edge/consumers.py   who is calling (InvalidKey, ConsumerDisabled, ...)
    check         shared/flow/checks.py      a well-formed request for a deployment the key may use -> Checked
    admit         shared/flow/admission.py   its largest cost reserved against the consumer's limits -> Exchange
    dispatch      shared/flow/failover.py    the best backend that answers, failing over before any byte is sent -> Chosen
    relay         shared/flow/relay.py       the answer to the client, whole or streamed
    settle        shared/flow/settlement.py       charged = recorded = emitted, in one function

Nothing here touches a framework or a socket: the edge hands over a GatewayRequest, the upstream module does the I/O.
"""

from __future__ import annotations

import hmac
from dataclasses import replace
from functools import partial

import orjson

from shared.edge.consumers import hash_key, key_from_headers
from shared.edge.errors import render, throttle_reason
from shared.edge.messages import GatewayRequest, GatewayResponse
from shared.flow import bodies, offload
from shared.flow.admission import Admission
from shared.flow.audit import Auditing
from shared.flow.bodies import BodyBudget, Held
from shared.flow.cache import ResponseCache
from shared.flow.checks import Checks
from shared.flow.exchange import Services
from shared.flow.failover import Failover
from shared.flow.followups import FollowUps
from shared.flow.holds import BackgroundHolds
from shared.flow.pinning import Pinning
from shared.flow.relay import JSON, Relay
from shared.flow.safety import BLOCKED, UNAVAILABLE, Screening, client_bytes
from shared.flow.settlement import Books
from shared.flow.translate import FOLLOW_UPS, Operation, Route, match_route
from shared.limits.local_rate import PerKeyRate
from shared.outcomes import ConsumerDisabled, ContentFiltered, InvalidKey, KeyProblem, Refusal, SafetyUnavailable
from shared.records.consumers import Consumer
from shared.telemetry.protocol import NULL_TRACE, Trace


class Gateway:
    def __init__(self, services: Services) -> None:
        self.s = services
        self._deployments = services.settings.deployments()
        self.pinning = Pinning(
            services.responses, services.settings.backends, services.router, services.clock,
            reads=PerKeyRate(services.settings.response_reads_per_s, services.clock),
        )
        self.bodies = BodyBudget(max(services.settings.body_memory_mb << 20, services.settings.max_body_bytes))
        self.books = Books(services.clock, services.usage, services.telemetry, services.router, services.settings.prices)
        self.checks = Checks(
            self._deployments, self.pinning, reveal_deployments=services.settings.reveal_deployments,
            api_versions=services.settings.api_versions, catalog=services.settings.catalog,
        )
        self.admission = Admission(services.settings, services.limiter)
        self.failover = Failover(
            services.settings, services.clock, services.router, services.upstream, services.auth, services.telemetry,
            self.pinning, self.admission, self.books,
        )
        self.screening: Screening | None = services.safety
        self.cache = ResponseCache(services.cache, services.clock, self.books,
                                   seed_deterministic=services.settings.cache_seed)
        self.holds = BackgroundHolds(services, self.pinning, self.books)
        self.auditing = Auditing(services.audit, services.clock)
        self.relay = Relay(services.clock, self.books, self.pinning, services.settings, self.holds, self.cache,
                           self.auditing)
        self.follow_ups = FollowUps(services.router, self.pinning, self.books, self.holds)

    async def handle(self, request: GatewayRequest) -> GatewayResponse:
        self.holds.start()  # every instance sweeps every instance's background responses (shared/flow/holds.py)
        held = Held(self.bodies)
        try:
            response = await self._handle(request, held)
        except BaseException:
            held.give_back()
            raise
        if held.weight and response.stream is not None:
            return replace(response, stream=held.until_done(response.stream))
        held.give_back()
        return response

    async def _handle(self, request: GatewayRequest, held: Held) -> GatewayResponse:
        started = self.s.clock.monotonic()
        route: Route | None = None
        consumer: Consumer | None = None
        deployment: str | None = None
        trace: Trace = NULL_TRACE
        try:
            route = match_route(request.method, request.raw_path)
            if route.operation is Operation.HEALTH:
                return self._health(details=False)
            if route.operation is Operation.HEALTH_DETAILS:
                self._check_admin_key(request)
                return self._health(details=True)
            trace = self.s.telemetry.begin(request.method, route.template)
            caller = await self.s.identity.identify(request.headers, request.repeated, request.client_ip)
            consumer = caller.consumer
            if route.operation is Operation.MODELS:
                return self._models(consumer)
            if request.read_body is not None:
                # Read only now: an unauthenticated client never makes the gateway take in a body.
                request = GatewayRequest(request.method, request.raw_path, request.query, request.headers,
                                         await request.read_body(), request.client_ip, request.repeated)
            if route.operation in FOLLOW_UPS:
                checked = await self.checks.follow_up(request, route, consumer)
                deployment = checked.shape.deployment
                exchange = self.admission.unreserved(request, checked, started, trace, caller.user_id, caller.person)
                return await self.follow_ups.answer(exchange, await self.failover.dispatch(exchange))
            if len(request.body) > offload.ON_LOOP_BYTES:
                # Its parse may take many times its size: within this worker's budget for large bodies, held to the end.
                held.weight = await self.bodies.take(await offload.run(partial(bodies.estimate, request.body)))
            parsed = await self.checks.parse(request, route)
            deployment = parsed.shape.deployment
            checked = await self.checks.allow(parsed, consumer)
            screened = None
            if self.screening is not None:
                checked, screened = await self.screening.screen(checked)
                if screened is not None and screened.redactions:
                    # What the model gets from here on, whichever phase sends or translates the body.
                    request = replace(request, body=client_bytes(checked))
                self.auditing.check(screened.policy if screened is not None else None)
            lookup = await self.cache.look_up(request, checked)
            if lookup is not None and lookup.answer is not None:
                user_id, _ = self.admission.caller(request, checked, caller.user_id, caller.person)
                safety = None if screened is None else (screened.outcome, screened.policy.name, screened.detail)
                return self.cache.answer(lookup, request, checked, started, trace, user_id, safety)
            exchange = await self.admission.admit(request, checked, started, trace, caller.user_id, caller.person)
            exchange.cache = lookup
            exchange.screened = screened
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
        safety = _safety_refusal(refusal)
        if route is not None and route.operation not in (Operation.HEALTH, Operation.HEALTH_DETAILS):
            reason = throttle_reason(refusal)
            if reason is not None and consumer is not None:
                self.s.telemetry.throttled(consumer.id, deployment or route.deployment or "", reason)
            # A refusal before authentication carries nothing the client chose (its address, a made-up deployment
            # name): metric series stay bounded by what the operator configured, whatever unauthenticated clients send.
            named = deployment or route.deployment or ""
            self.books.refused(
                request, route, consumer.id if consumer else _refused_consumer(refusal),
                request.client_ip if consumer else "", named if named in self._deployments else "",
                error.status, started, trace, error.code or "", safety,
            )
        return GatewayResponse(error.status, {"content-type": JSON, **error.headers}, error.body())

    def _check_admin_key(self, request: GatewayRequest) -> None:
        """The health details need the gateway admin key (its SHA-256 is the setting GATEWAY_ADMIN_KEY_SHA256); failures
        count against the client's address like any failed authentication."""
        directory = self.s.consumers
        directory.check_throttle(request.client_ip)
        key = key_from_headers(request.headers, request.repeated)
        expected = self.s.settings.admin_key_sha256
        if expected is None or not hmac.compare_digest(hash_key(key), expected):
            raise directory.refuse(request.client_ip, InvalidKey(KeyProblem.UNKNOWN))

    def _models(self, consumer: Consumer) -> GatewayResponse:
        """The deployments this consumer may use, and the aliases with at least one of them."""
        names = sorted(d for d in self._deployments if consumer.may_use(d))
        names += sorted(a for a in self.s.settings.catalog.aliases if self.checks.chain(a, consumer))
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "gateway"} for name in names]
        return GatewayResponse(200, {"content-type": JSON}, orjson.dumps({"object": "list", "data": data}))

    def _health(self, details: bool) -> GatewayResponse:
        """Public: only whether the gateway can serve. The details (backends, regions, breaker reasons and recovery
        times) need the admin key."""
        health = self.s.router.health()
        serving = health["status"] != "degraded"
        status = 200 if serving else 503
        if details:
            return GatewayResponse(status, {"content-type": JSON}, orjson.dumps(health))
        return GatewayResponse(status, {"content-type": JSON}, orjson.dumps({"status": "ok" if serving else "unavailable"}))


def _safety_refusal(refusal: Refusal) -> tuple[str, str, str] | None:
    """(outcome, policy, detail) of a refusal of a safety policy, for its metric and the per-request log."""
    match refusal:
        case ContentFiltered(blocked=blocked, policy=policy):
            return BLOCKED, policy, ",".join(blocked)
        case SafetyUnavailable(service=service, policy=policy):
            return UNAVAILABLE, policy, service
    return None


def _refused_consumer(refusal: Refusal) -> str:
    """The consumer a refused key belongs to (disabled, or a rotated key past its grace), for the request metric: the
    reason of a refusal the client is told nothing about. Consumer ids are the operator's, so the series stay bounded."""
    match refusal:
        case ConsumerDisabled(consumer_id=consumer_id) | InvalidKey(consumer_id=consumer_id):
            return consumer_id
    return ""
