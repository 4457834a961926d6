"""The request flow: identify -> check -> limit -> route with failover -> relay -> account -> emit.

Nothing here touches a framework or a socket: the edge hands over a GatewayRequest, the upstream module does the I/O,
and accounting on the way out is synchronous (in-memory), so it also runs when a client disconnects mid-stream and the
relay is cancelled.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_none

from shared.clock import Clock
from shared.config import Backend, Settings
from shared.edge.consumers import Consumer, ConsumerDirectory, key_from_headers
from shared.edge.errors import GatewayError, bad_request, error_body, render, throttle_reason
from shared.edge.messages import GatewayRequest, GatewayResponse
from shared.flow import responses, tokens
from shared.flow.credentials import BackendAuth
from shared.flow.translate import (
    FOLLOW_UPS,
    FORWARDED_RESPONSE_HEADERS,
    CallShape,
    Operation,
    Route,
    backend_body,
    backend_url,
    check_api_version,
    check_body,
    match_route,
    parse_body,
    request_headers,
)
from shared.flow.upstream import Answer, UpstreamBroken, UpstreamClient, UpstreamError
from shared.flow.usage import SseRelay, TokenUsage, combined, usage_from_body
from shared.limits.contract import Limiter, Ticket
from shared.outcomes import (
    AttemptFailure,
    DeploymentNotAllowed,
    DeploymentNotFound,
    FailureKind,
    MalformedAnswer,
    Refusal,
)
from shared.routing.breaker import retry_after_s
from shared.routing.pinning import Holder, Pinning
from shared.routing.router import Router
from shared.storage.memory import MemoryResponseStore
from shared.storage.protocols import ResponseStore
from shared.telemetry.events import NULL_TRACE, RequestRecord, Telemetry, Trace
from shared.telemetry.usage_rows import UsageRecorder

log = logging.getLogger(__name__)

JSON = "application/json"
SSE = "text/event-stream"


@dataclass
class Services:
    settings: Settings
    clock: Clock
    consumers: ConsumerDirectory
    router: Router
    upstream: UpstreamClient
    auth: BackendAuth
    limiter: Limiter
    telemetry: Telemetry
    usage: UsageRecorder
    responses: ResponseStore = field(default_factory=MemoryResponseStore)  # where stored responses live


@dataclass(slots=True)
class Call:
    """One admitted request on its way through the gateway."""

    request: GatewayRequest
    route: Route
    consumer: Consumer
    shape: CallShape
    body: dict[str, Any]
    api_version: str | None
    started: float
    user_id: str
    ticket: Ticket
    trace: Trace
    prompt_estimate: int | None = None
    lost: TokenUsage | None = None  # what attempts whose body broke off cost (charged with the answer)
    pinned: Holder | None = None  # continues a stored response: only the backend holding it may answer
    asked: dict[str, float] | None = None  # backend id -> when it said (Retry-After) it would serve again


class _Retryable(Exception):
    """An attempt failed before anything reached the client; the next candidate may answer."""


class _NoCandidate(Exception):
    """Every remaining candidate's breaker is open (or its probe is taken)."""


class Gateway:
    def __init__(self, services: Services) -> None:
        self.s = services
        self._deployments = services.settings.deployments()
        self.pinning = Pinning(services.responses, services.settings.backends, services.router, services.clock)
        # Imported here: the follow-up flow builds on this module's records and headers.
        from shared.flow.followups import FollowUps

        self._follow_ups = FollowUps(services, self.pinning)

    async def handle(self, request: GatewayRequest) -> GatewayResponse:
        started = self.s.clock.monotonic()
        route: Route | None = None
        consumer: Consumer | None = None
        trace: Trace = NULL_TRACE
        try:
            route = match_route(request.method, request.raw_path)
            if route.operation is Operation.HEALTH:
                return self._health()
            trace = self.s.telemetry.begin(request.method, route.template)
            consumer = await self.s.consumers.authenticate(key_from_headers(request.headers, request.repeated))
            if route.operation is Operation.MODELS:
                return self._models(consumer)
            if route.operation in FOLLOW_UPS:
                return await self._follow_ups.handle(request, route, consumer, started, trace)
            return await self._proxy(request, route, consumer, started, trace)
        except Refusal as refusal:
            reason = throttle_reason(refusal)
            if reason is not None and route is not None and consumer is not None:
                self.s.telemetry.throttled(consumer.id, refusal.deployment or route.deployment or "", reason)
            return self._error_response(refusal, request, route, consumer, started, trace)

    # ---- admission ---------------------------------------------------------------------------------------------

    async def _proxy(
        self, request: GatewayRequest, route: Route, consumer: Consumer, started: float, trace: Trace
    ) -> GatewayResponse:
        api_version = check_api_version(request.query)
        content_type = request.headers.get("content-type", "application/json").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            raise GatewayError(415, "Send the request body as application/json.", code="unsupported_media_type")
        body = parse_body(request.body)
        shape = check_body(route, body)
        route = Route(route.api, route.operation, shape.deployment)
        try:
            return await self._admitted(request, route, consumer, started, trace, api_version, body, shape)
        except Refusal as refusal:
            refusal.deployment = shape.deployment
            raise

    async def _admitted(
        self, request: GatewayRequest, route: Route, consumer: Consumer, started: float, trace: Trace,
        api_version: str | None, body: dict[str, Any], shape: CallShape,
    ) -> GatewayResponse:
        if shape.deployment not in self._deployments:
            raise DeploymentNotFound(shape.deployment)
        if not consumer.may_use(shape.deployment):
            raise DeploymentNotAllowed(shape.deployment)

        pinned = await self._pin(route, consumer, body, shape)
        prompt_estimate: int | None = None
        reserve = 0
        if self.s.limiter.needs_estimate(consumer, shape.deployment):
            prompt_estimate = self._count_prompt(route.operation, body, shape.deployment, pinned)
            # Every choice the backend generates (n, best_of) may run to the cap, and is billed.
            completion = 0 if route.operation is Operation.EMBEDDINGS else shape.choices * (
                shape.max_tokens or self.s.settings.default_max_tokens
            )
            reserve = prompt_estimate + completion
        ticket = await self.s.limiter.admit(consumer, shape.deployment, reserve)
        call = Call(
            request=request,
            route=route,
            consumer=consumer,
            shape=shape,
            body=body,
            api_version=api_version,
            started=started,
            user_id=request.headers.get(self.s.settings.user_id_header, "")[:128],
            ticket=ticket,
            trace=trace,
            prompt_estimate=prompt_estimate,
            pinned=pinned,
        )
        try:
            backend, response, attempts = await self._dispatch(call, reserve)
        except BaseException:
            # Nothing answered; attempts whose body broke off were still billed by their backends.
            ticket.settle(call.lost.total if call.lost is not None else 0)
            if call.lost is not None:
                self.s.usage.record(consumer.id, shape.deployment, call.lost)
            raise
        if shape.stream and response.status == 200:
            return self._stream(call, backend, response, attempts)
        return await self._complete(call, backend, response, attempts)

    async def _pin(self, route: Route, consumer: Consumer, body: dict[str, Any], shape: CallShape) -> Holder | None:
        """The backend holding the response this request continues, if it continues one."""
        previous = body.get("previous_response_id") if route.operation is Operation.RESPONSES else None
        if not isinstance(previous, str):
            return None
        holder = await self.pinning.holder(previous, consumer.id, previous=True)
        if not holder.backend.serves(shape.deployment):
            raise bad_request(
                f"The deployment '{shape.deployment}' is not available in the region that stores the previous response.",
                param="model",
                code="deployment_not_in_response_region",
            )
        return holder

    def _count_prompt(self, operation: Operation, body: dict[str, Any], deployment: str, pinned: Holder | None = None) -> int:
        encoding = tokens.encoding_for(deployment)
        if operation is Operation.RESPONSES:
            return responses.count_input(body, encoding, pinned.record.context_tokens if pinned is not None else 0)
        if operation is Operation.CHAT:
            return tokens.count_chat_prompt(body, encoding)
        if operation is Operation.COMPLETIONS:
            return tokens.count_completion_prompt(body, encoding)
        return tokens.count_embedding_input(body, encoding)

    def _prompt_tokens(self, call: Call) -> int:
        if call.prompt_estimate is None:
            call.prompt_estimate = self._count_prompt(call.route.operation, call.body, call.shape.deployment, call.pinned)
        return call.prompt_estimate

    def _prompt_only(self, call: Call) -> TokenUsage:
        """What a backend bills for a request it read but never answered whole: the prompt, as the gateway counts it."""
        prompt = self._prompt_tokens(call)
        return TokenUsage(prompt, 0, prompt, reported=False)

    # ---- routing and failover ----------------------------------------------------------------------------------

    async def _dispatch(self, call: Call, need_tokens: int) -> tuple[Backend, Answer, int]:
        """Send to the best candidate that answers: on 429, 5xx, a timeout or a connection error, before anything has
        reached the client, try the next one at once with the same body. All failover happens here; the breakers, not
        this loop, remember which backends are unhealthy."""
        if call.pinned is not None:
            return await self._dispatch_pinned(call, call.pinned)
        router = self.s.router
        deployment = call.shape.deployment
        candidates = router.candidates(deployment, need_tokens, call.consumer.priority)
        remaining = iter(candidates)
        headers = request_headers(call.request.headers)
        failures: list[AttemptFailure] = []
        first = next((b for b in remaining if router.acquire(b, deployment)), None)
        if first is None:
            raise router.exhausted(deployment, [], call.asked)
        # The first attempt runs outside the retry machinery: it is the one nearly every request needs, and tenacity's
        # bookkeeping would be most of what the gateway spends on it.
        try:
            return first, await self._attempt(call, first, headers, failures, 1), 1
        except _Retryable:
            pass
        previous = first
        attempts = min(self.s.settings.max_attempts or len(candidates), len(candidates)) - 1
        if attempts <= 0:
            raise router.exhausted(deployment, failures, call.asked)
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(attempts),
                retry=retry_if_exception_type(_Retryable),
                wait=wait_none(),
                reraise=True,
            ):
                with attempt:
                    backend = next((b for b in remaining if router.acquire(b, deployment)), None)
                    if backend is None:
                        raise _NoCandidate()
                    self.s.telemetry.failover(previous.id, backend.id, failures[-1].reason)
                    previous = backend
                    number = attempt.retry_state.attempt_number + 1
                    return backend, await self._attempt(call, backend, headers, failures, number), number
        except (_Retryable, _NoCandidate):
            raise router.exhausted(deployment, failures, call.asked) from None
        raise AssertionError("unreachable")

    async def _dispatch_pinned(self, call: Call, holder: Holder) -> tuple[Backend, Answer, int]:
        """One attempt, at the backend that holds the continued response: no other region could answer it."""
        self.pinning.claim(holder, call.shape.deployment)
        failures: list[AttemptFailure] = []
        try:
            response = await self._attempt(call, holder.backend, request_headers(call.request.headers), failures, 1)
        except _Retryable:
            raise self.pinning.unavailable(holder, call.shape.deployment, _reason(failures[-1])) from None
        return holder.backend, response, 1

    async def _attempt(
        self, call: Call, backend: Backend, headers: dict[str, str], failures: list[AttemptFailure], number: int
    ) -> Answer:
        router = self.s.router
        deployment = call.shape.deployment
        url = backend_url(backend, call.route, deployment, call.api_version)
        body = backend_body(call.request.body, call.body, backend, deployment, call.shape)
        send_headers = {**headers, **(await self.s.auth.headers(backend))}
        span = call.trace.attempt(backend.id, backend.region, url.split("?", 1)[0], number)
        try:
            response = await self.s.upstream.send(backend, url, send_headers, body)
        except UpstreamError as exc:
            span.end(None, exc.kind.value)
            router.record_error(backend, deployment, exc.kind)
            failures.append(AttemptFailure(exc.kind))
            raise _Retryable() from None
        span.end(response.status)
        if response.status in (401, 403):
            # The backend refused the gateway's credential: no request will succeed there until it is fixed.
            router.record_auth_failure(backend, deployment, response.status)
            failures.append(AttemptFailure.of_status(response.status))
            response.release()
            raise _Retryable()
        if router.is_failure(backend, response.status):
            asked = retry_after_s(response.headers, self.s.clock.now())
            if asked is not None:
                # Capped like the breaker's trip: past that the gateway tries the backend again anyway.
                call.asked = call.asked or {}
                call.asked[backend.id] = self.s.clock.now() + min(asked, backend.breaker.max_trip_s)
            router.record_failure(backend, deployment, response.status, response.headers)
            failures.append(AttemptFailure.of_status(response.status))
            response.release()
            raise _Retryable()
        if not (call.shape.stream and response.status == 200):
            # A whole answer is read before it is chosen: if its body breaks off, nothing has reached the client yet
            # and the next candidate can still answer. The broken attempt's prompt was billed; it is charged.
            try:
                await response.read()
            except UpstreamBroken:
                self._broken_attempt(call, backend, number)
                router.record_error(backend, deployment, FailureKind.BROKEN)
                failures.append(AttemptFailure(FailureKind.BROKEN))
                raise _Retryable() from None
        router.record_success(backend, deployment, response.headers)
        return response

    def _broken_attempt(self, call: Call, backend: Backend, number: int) -> None:
        usage = self._prompt_only(call)
        call.lost = combined(call.lost, usage)
        self.s.telemetry.tokens_spent(self._record(call, backend, 502, usage, None, number))

    # ---- responses ---------------------------------------------------------------------------------------------

    def _response_headers(
        self, call: Call, backend: Backend, upstream: Answer, attempts: int
    ) -> dict[str, str]:
        headers = {k: v for k, v in upstream.headers.items() if k in FORWARDED_RESPONSE_HEADERS}
        headers["x-gateway-backend"] = backend.id
        headers["x-gateway-attempts"] = str(attempts)
        headers.setdefault("x-ms-region", backend.region)
        headers.update(call.ticket.headers)
        return headers

    async def _complete(
        self, call: Call, backend: Backend, upstream: Answer, attempts: int
    ) -> GatewayResponse:
        headers = self._response_headers(call, backend, upstream, attempts)
        raw = await upstream.read()  # already read by the attempt
        status = upstream.status
        usage, model = usage_from_body(raw) if status == 200 else (None, None)
        if status == 200 and usage is None:
            # A 200 whose body cannot be read: the backend may still have billed the prompt; charge what we can count.
            usage = self._prompt_only(call)
            try:
                orjson.loads(raw)
            except orjson.JSONDecodeError:
                return self._fail(call, backend, usage, attempts, MalformedAnswer())
        if status == 200 and call.route.operation is Operation.RESPONSES:
            created = _created(raw)
            if created is not None:
                await self.pinning.remember(created, backend, call.consumer.id, call.shape.deployment, usage)
        tokens_used = self._account(call, backend, status, usage, model, attempts)
        headers["x-gateway-tokens-consumed"] = str(tokens_used)
        headers.update(call.ticket.headers)
        return GatewayResponse(status, headers, raw)

    def _fail(
        self, call: Call, backend: Backend, usage: TokenUsage | None, attempts: int, refusal: Refusal
    ) -> GatewayResponse:
        """An error answer for a request a backend did serve: accounted once, here, with what it cost."""
        error = render(refusal)
        self._account(call, backend, error.status, usage, None, attempts)
        return GatewayResponse(error.status, {"content-type": JSON, **error.headers}, error.body())

    def _stream(self, call: Call, backend: Backend, upstream: Answer, attempts: int) -> GatewayResponse:
        headers = self._response_headers(call, backend, upstream, attempts)
        headers["content-type"] = SSE
        headers["cache-control"] = "no-cache"
        return GatewayResponse(200, headers, stream=self._relay(call, backend, upstream, attempts))

    async def _relay(
        self, call: Call, backend: Backend, upstream: Answer, attempts: int
    ) -> AsyncIterator[bytes]:
        relay: SseRelay | responses.ResponsesRelay
        relay = (
            responses.ResponsesRelay() if call.route.operation is Operation.RESPONSES
            else SseRelay(forward_usage_chunk=call.shape.client_wants_usage)
        )
        first_at: float | None = None
        clean = False
        context_recorded = False
        try:
            while chunk := await upstream.next_chunk():
                out = relay.feed(chunk)
                if out:
                    if first_at is None:
                        first_at = self.s.clock.monotonic()
                    if isinstance(relay, responses.ResponsesRelay) and relay.created_pending:
                        # Where the response lives is recorded before its id reaches the client, so a follow-up
                        # sent at once, to any instance, finds it.
                        relay.created_pending = False
                        context_recorded = relay.done
                        await self._remember_streamed(call, backend, relay)
                    yield out
                    if isinstance(relay, responses.ResponsesRelay) and relay.done and not context_recorded:
                        context_recorded = True  # again with the usage: the context a continuation adds
                        await self._remember_streamed(call, backend, relay)
            tail = relay.flush()
            if tail:
                yield tail
            if relay.done:
                clean = True
            else:
                yield _stream_error("The backend ended the stream early.", relay)
        except UpstreamBroken:
            yield _stream_error("The backend's stream broke off.", relay)
        finally:
            if clean:
                upstream.release()
            else:
                upstream.close()
            usage = relay.usage
            if usage is None:
                prompt = self._prompt_tokens(call)
                completion = relay.delivered_completion_tokens(tokens.encoding_for(relay.model or call.shape.deployment))
                usage = TokenUsage(prompt, completion, prompt + completion, reported=False)
            ttft = None if first_at is None else (first_at - call.started) * 1000
            self._account(call, backend, 200, usage, relay.model, attempts, ttft)

    async def _remember_streamed(self, call: Call, backend: Backend, relay: responses.ResponsesRelay) -> None:
        if relay.created is not None:
            await self.pinning.remember(relay.created, backend, call.consumer.id, call.shape.deployment, relay.usage)

    def _account(
        self,
        call: Call,
        backend: Backend,
        status: int,
        usage: TokenUsage | None,
        model: str | None,
        attempts: int,
        ttft_ms: float | None = None,
    ) -> int:
        """Settle the consumer's reservation and emit the request's metrics; synchronous so it cannot be cancelled.
        Returns the tokens charged: the answer's, plus what attempts whose body broke off cost (emitted already)."""
        charged = combined(usage, call.lost)
        spent = charged.total if charged is not None else 0
        call.ticket.settle(spent)
        self.s.usage.record(call.consumer.id, call.shape.deployment, charged)
        self.s.telemetry.request_done(self._record(call, backend, status, usage, model, attempts, ttft_ms), call.trace)
        return spent

    def _record(
        self,
        call: Call,
        backend: Backend,
        status: int,
        usage: TokenUsage | None,
        model: str | None,
        attempts: int,
        ttft_ms: float | None = None,
    ) -> RequestRecord:
        return RequestRecord(
            consumer_id=call.consumer.id,
            client_ip=call.request.client_ip,
            api=call.route.api,
            operation=call.route.operation.operation_id,
            user_id=call.user_id,
            deployment=call.shape.deployment,
            status=status,
            duration_ms=(self.s.clock.monotonic() - call.started) * 1000,
            stream=call.shape.stream,
            backend_id=backend.id,
            region=backend.region,
            ptu=backend.ptu,
            model=model or "",
            usage=usage,
            ttft_ms=ttft_ms,
            attempts=attempts,
        )

    def _error_response(
        self,
        refusal: Refusal,
        request: GatewayRequest,
        route: Route | None,
        consumer: Consumer | None,
        started: float,
        trace: Trace,
    ) -> GatewayResponse:
        error = render(refusal)
        if route is not None and route.operation is not Operation.HEALTH:
            self.s.telemetry.request_done(
                RequestRecord(
                    consumer_id=consumer.id if consumer else "",
                    client_ip=request.client_ip,
                    api=route.api,
                    operation=route.operation.operation_id,
                    user_id="",
                    deployment=refusal.deployment or route.deployment or "",
                    status=error.status,
                    duration_ms=(self.s.clock.monotonic() - started) * 1000,
                ),
                trace,
            )
        headers = {"content-type": JSON, **error.headers}
        return GatewayResponse(error.status, headers, error.body())

    def _models(self, consumer: Consumer) -> GatewayResponse:
        names = sorted(d for d in self._deployments if consumer.may_use(d))
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "gateway"} for name in names]
        return GatewayResponse(200, {"content-type": JSON}, orjson.dumps({"object": "list", "data": data}))

    def _health(self) -> GatewayResponse:
        return GatewayResponse(200, {"content-type": JSON}, orjson.dumps(self.s.router.health()))


def _stream_error(message: str, relay: SseRelay | responses.ResponsesRelay) -> bytes:
    if isinstance(relay, responses.ResponsesRelay):
        return relay.interrupted(message)
    body = error_body(message, "server_error", "stream_interrupted")
    return b"data: " + body + b"\n\n"


def _created(raw: bytes) -> responses.Created | None:
    try:
        return responses.created_from_object(orjson.loads(raw))
    except orjson.JSONDecodeError:
        return None


def _reason(failure: AttemptFailure) -> str:
    """A failed attempt's kind, in words for the client."""
    if failure.kind is FailureKind.THROTTLED:
        return "it is throttling (429)"
    if failure.status is not None:
        return f"it answered {failure.status}"
    words = {FailureKind.TIMEOUT: "it did not answer in time", FailureKind.CONNECTION: "it could not be reached",
             FailureKind.BROKEN: "its answer broke off"}
    return words.get(failure.kind, str(failure.kind.value))
