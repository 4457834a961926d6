"""Dispatch with failover: the one place a request is sent to backends, and sent again elsewhere when an attempt
fails before anything has reached the client.

A plain loop over the candidates, not tenacity: the attempt number picks the backend, nothing waits between attempts,
the stop is the number of candidates, and a request that runs out of candidates needs its own answer (why they all
failed); tenacity's stop/wait/retry objects would only restate those four lines, and its bookkeeping was measurable on
the first attempt that nearly every request is. The breakers, not this loop, remember which backends are unhealthy.

Across models, the same loop walks the request's chain of deployments (shared/flow/checks.py): it moves to the next
only when every region of the current one was throttled, open or failed for this request (never on an answer, a 4xx
included: a content filter's or a too-long prompt's refusal is the answer), before any byte reached the client, and
skips a deployment whose context window cannot hold the prompt plus the requested output. A move translates the body
for the target's family (shared/flow/family.py) and moves the reservation to the target's scope (Admission.readmit;
docs/architecture.md says why the books stay exact).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial

import orjson

from shared.clock import Clock
from shared.config import Backend, Settings
from shared.edge.errors import bad_request
from shared.flow import offload
from shared.flow.admission import Admission
from shared.flow.credentials import BackendAuth
from shared.flow.exchange import Checked, Chosen, Exchange, LostAttempt
from shared.flow.family import for_family
from shared.flow.pinning import Holder, Pinning
from shared.flow.settlement import Books
from shared.flow.translate import FOLLOW_UPS, backend_body, backend_method, backend_url, request_headers
from shared.flow.upstream import Answer, UpstreamBroken, UpstreamClient, UpstreamError
from shared.limits.tickets import UnlimitedTicket
from shared.outcomes import AttemptFailure, BackendsBusy, FailureKind, Refusal, TooLargeForBackends
from shared.routing.breaker import SIZE
from shared.routing.router import Router
from shared.telemetry.protocol import Telemetry
from shared.waits import retry_after_s


class _Failed(Exception):
    """An attempt failed before anything reached the client; the next candidate may answer."""

    def __init__(self, failure: AttemptFailure, too_large: bool = False) -> None:
        self.failure = failure
        self.too_large = too_large  # refused for the request's size, not the backend's load


@dataclass(frozen=True, slots=True)
class _Exhausted:
    """How one deployment's regions ended for the request: the refusal they make, whether an attempt was made, and
    whether every region was tried or passed over (else a limit on attempts or timeout replays stopped the loop)."""

    refusal: Refusal
    attempted: bool
    every_region: bool


class Failover:
    def __init__(
        self, settings: Settings, clock: Clock, router: Router, upstream: UpstreamClient, auth: BackendAuth,
        telemetry: Telemetry, pinning: Pinning, admission: Admission | None = None, books: Books | None = None,
    ) -> None:
        self._catalog = settings.catalog
        self._admission = admission
        self._books = books
        self._max_attempts = settings.max_attempts
        self._timeout_replays = settings.timeout_replays
        self._clock = clock
        self._router = router
        self._upstream = upstream
        self._auth = auth
        self._telemetry = telemetry
        self._pinning = pinning

    async def dispatch(self, exchange: Exchange) -> Chosen:
        """Send to the best candidate that answers: on 429, 5xx, 401/403, a timeout, a connection error or a whole
        answer that breaks off, try the next candidate at once with the same body; when every region of the
        deployment failed the request, the next deployment of its chain. Raises the router's refusal (BackendsBusy,
        NoBackend, BackendsFailed, ...) when none answers."""
        pinned = exchange.checked.pinned
        if pinned is not None:
            return await self._dispatch_pinned(exchange, pinned)
        chain = exchange.checked.chain or (exchange.deployment,)
        ended: list[_Exhausted] = []
        skipped: Refusal | None = None
        for step, deployment in enumerate(chain):
            if deployment != exchange.deployment or (step == 0 and exchange.checked.requested not in ("", deployment)):
                attempted = any(e.attempted for e in ended)
                if attempted and not exchange.checked.fall_back or ended and not ended[-1].every_region:
                    break
                if not await self._fits(exchange, deployment):
                    continue
                if deployment == exchange.deployment:  # an alias's first entry: reserved for already
                    exchange.checked = await self._translated(exchange, deployment)
                else:
                    refused = await self._move(exchange, deployment, step, ended[-1].refusal if ended else None)
                    if refused is not None:
                        skipped = skipped or refused
                        continue
            chosen_or_end = await self._dispatch_one(exchange)
            if isinstance(chosen_or_end, Chosen):
                return chosen_or_end
            ended.append(chosen_or_end)
        if not ended:
            if skipped is not None:
                raise skipped
            raise bad_request(
                f"The prompt and the requested output fit no deployment of '{exchange.checked.requested}'.",
                code="context_length_exceeded",
            )
        if all(isinstance(e.refusal, BackendsBusy) for e in ended):
            # A client that waits this long finds some deployment of its chain ready.
            raise BackendsBusy(min(e.refusal.wait_ms for e in ended if isinstance(e.refusal, BackendsBusy)))
        raise ended[0].refusal

    async def _fits(self, exchange: Exchange, deployment: str) -> bool:
        """Whether the deployment can hold the prompt plus the requested output (counted only where a window is set)."""
        spec = self._catalog.spec(deployment)
        if spec.context_window is None and spec.max_output_tokens is None:
            return True
        prompt = await exchange.counted_prompt()
        return self._catalog.fits(deployment, prompt, exchange.shape.max_tokens or 0)

    async def _move(self, exchange: Exchange, deployment: str, step: int, why: Refusal | None) -> Refusal | None:
        """Settle the reservation at the current deployment, reserve at `deployment`, and send the body as its family
        takes it. Returns the limiter's refusal when the consumer cannot be admitted there (the request then holds
        no reservation: nothing more to settle)."""
        assert self._admission is not None and self._books is not None
        target = await self._translated(exchange, deployment)
        previous = exchange.deployment
        self._books.moved(exchange)
        try:
            ticket, reserve, target = await self._admission.readmit(exchange, target)
        except Refusal as refusal:
            exchange.moved(target, UnlimitedTicket(), 0, step)
            return refusal
        exchange.moved(target, ticket, reserve, step)
        self._telemetry.model_fallback(previous, deployment, _reason(why))
        return None

    async def _translated(self, exchange: Exchange, deployment: str) -> Checked:
        """The request for `deployment`: the client's body as that deployment's family takes it (a large one
        translated and serialised off the event loop)."""
        if len(exchange.request.body) <= offload.ON_LOOP_BYTES:
            return self._translate(exchange.checked, deployment)
        return await offload.run(partial(self._translate, exchange.checked, deployment))

    def _translate(self, checked: Checked, deployment: str) -> Checked:
        client = checked.original if checked.original is not None else checked.body
        body = for_family(client, checked.route.operation, self._catalog.spec(deployment).family)
        shape = checked.shape if checked.shape.deployment == deployment else replace(checked.shape, deployment=deployment)
        if body is client:
            return replace(checked, body=client, shape=shape, original=None, raw=None)
        return replace(checked, body=dict(body), shape=shape, original=client, raw=orjson.dumps(body))

    async def _dispatch_one(self, exchange: Exchange) -> Chosen | _Exhausted:
        """Every region of the exchange's current deployment, best first, until one answers."""
        deployment = exchange.deployment
        candidates = self._router.candidates(deployment, exchange.reserve, exchange.consumer.priority)
        last_resort = not candidates
        if last_resort:
            # Every region is out of rotation. Those out only on the gateway's own judgement (a trip it chose, a
            # probe still out) may serve: try them rather than answer 503; a region that asked for a wait is left be.
            candidates = self._router.last_resort(deployment)
        limit = min(self._max_attempts or len(candidates), len(candidates))
        headers = request_headers(exchange.request.headers)
        failures: list[AttemptFailure] = []
        previous: Backend | None = None
        too_large = [False]
        acquired = self._acquired(candidates, deployment, last_resort, _size(exchange), too_large)
        every_region = True
        for number in range(1, limit + 1):
            if exchange.timeouts > self._timeout_replays:
                # Each replay of a request that outruns the timeout may be billed again, and time out again. Checked
                # before the next backend is claimed: a half-open one claimed and not tried would stay out.
                every_region = False
                break
            backend = next(acquired, None)  # claimed only when it is about to be tried
            if backend is None:
                break
            if previous is not None:
                self._telemetry.failover(previous.id, backend.id, failures[-1].reason)
            try:
                return Chosen(backend, await self._attempt(exchange, backend, headers, number), number)
            except _Failed as failed:
                failures.append(failed.failure)
                previous = backend
                too_large[0] = too_large[0] or failed.too_large
        else:
            every_region = limit == len(candidates)
        if too_large[0]:
            # Refused for its size: a region is tried after that only if it has served a request this large; the
            # client is told why rather than sent on to open every region (and the chain stops here).
            return _Exhausted(TooLargeForBackends(_size(exchange), deployment), True, False)
        refusal = self._router.exhausted(deployment, failures, exchange.asked)
        return _Exhausted(refusal, bool(failures), every_region)

    def _acquired(
        self, candidates: list[Backend], deployment: str, last_resort: bool = False, tokens: int = 0,
        too_large: list[bool] | None = None,
    ) -> Iterator[Backend]:
        """The candidates in order that may be tried now (a half-open breaker lets one probe through: claiming it is
        acquiring it, so the generator is advanced only for an attempt that will be made). Once a backend refused the
        request for its size (`too_large[0]`), only those that have admitted `tokens` before."""
        for backend in candidates:
            if too_large is not None and too_large[0] and not self._router.has_admitted(backend, deployment, tokens):
                continue
            if self._router.acquire(backend, deployment, last_resort=last_resort):
                yield backend

    async def _dispatch_pinned(self, exchange: Exchange, holder: Holder) -> Chosen:
        """One attempt, at the backend that holds the continued response: no other region could answer it."""
        self._pinning.claim(holder, exchange.deployment, _generates(exchange))
        try:
            answer = await self._attempt(exchange, holder.backend, request_headers(exchange.request.headers), 1)
        except _Failed as failed:
            if failed.too_large:
                raise TooLargeForBackends(_size(exchange), exchange.deployment) from None
            raise self._pinning.unavailable(holder, exchange.deployment, _in_words(failed.failure)) from None
        return Chosen(holder.backend, answer, 1)

    async def _attempt(self, exchange: Exchange, backend: Backend, headers: dict[str, str], number: int) -> Answer:
        """One attempt. Cancelled while the backend has the request (the client left, the host ended the call), it
        leaves `exchange.awaiting_backend` set: the backend may generate and bill it to its cap, like a timeout."""
        try:
            answer = await self._attempt_once(exchange, backend, headers, number)
        except asyncio.CancelledError:
            raise
        except BaseException:
            exchange.awaiting_backend = False
            raise
        exchange.awaiting_backend = False
        return answer

    async def _attempt_once(self, exchange: Exchange, backend: Backend, headers: dict[str, str], number: int) -> Answer:
        router = self._router
        deployment = exchange.deployment
        checked = exchange.checked
        # A follow-up of a stored response (a read, a delete, a cancel) generates nothing: no PTU throughput, nothing
        # billed when it fails; it is sent with the client's method and the query parameters it may carry.
        generates = _generates(exchange)
        url = backend_url(backend, checked.route, deployment, checked.api_version, exchange.request.query)
        method = backend_method(checked.route.operation)
        raw = checked.raw if checked.raw is not None else exchange.request.body
        if not generates:
            body = raw if method == "POST" else b""
        elif len(raw) <= offload.ON_LOOP_BYTES:
            body = backend_body(raw, checked.body, backend, deployment, checked.shape, checked.api_version)
        else:  # re-serialising a large body (a changed model name, stream options or cap) takes milliseconds
            body = await offload.run(
                partial(backend_body, raw, checked.body, backend, deployment, checked.shape, checked.api_version))
        send_headers = {**headers, **(await self._auth.headers(backend))}
        span = exchange.trace.attempt(backend.id, backend.region, url.split("?", 1)[0], number)
        exchange.awaiting_backend = generates
        try:
            answer = await self._upstream.send(backend, url, send_headers, body, method=method)
        except UpstreamError as exc:
            span.end(None, exc.kind.value)
            if exc.kind is FailureKind.TIMEOUT and generates:
                # The backend read the request and may still be generating (and billing) it: the prompt is charged,
                # and the breaker counts it only as one of a rate across callers.
                router.record_timeout(backend, deployment, exchange.consumer.id)
                exchange.timeouts += 1
                duration_ms = (self._clock.monotonic() - exchange.started) * 1000
                exchange.lost.append(LostAttempt(backend, await exchange.prompt_only(), number, duration_ms, 504))
            else:
                router.record_error(backend, deployment, exc.kind, generates)
            raise _Failed(AttemptFailure(exc.kind)) from None
        span.end(answer.status)
        if answer.status in (401, 403):
            # The backend refused the gateway's credential: no request will succeed there until it is fixed.
            router.record_auth_failure(backend, deployment, answer.status)
            answer.release()
            raise _Failed(AttemptFailure.of_status(answer.status))
        size = _size(exchange) if generates else 0
        kind = router.refusal_kind(backend, deployment, size, answer.headers) if answer.status == 429 else None
        if kind is not None:
            # No statement about the backend's load: its breaker is left as it was. Refused for its size, the request
            # goes on only to regions that served one as large; the day-long Retry-After is not the client's wait.
            answer.release()
            raise _Failed(AttemptFailure.of_status(429), too_large=kind == SIZE)
        if router.is_failure(backend, answer.status):
            asked = retry_after_s(answer.headers, self._clock.now())
            if asked is not None:
                # Capped like the breaker's trip: past that the gateway tries the backend again anyway.
                exchange.asked[backend.id] = self._clock.now() + min(asked, backend.breaker.max_trip_s)
            router.record_failure(backend, deployment, answer.status, answer.headers, generates)
            answer.release()
            raise _Failed(AttemptFailure.of_status(answer.status))
        if not (checked.shape.stream and answer.status == 200):
            # A whole answer is read before it is chosen: if its body breaks off, nothing has reached the client yet
            # and the next candidate can still answer. The broken attempt's prompt was billed; the books charge it.
            try:
                await answer.read()
            except UpstreamBroken:
                if generates:
                    duration_ms = (self._clock.monotonic() - exchange.started) * 1000
                    exchange.lost.append(LostAttempt(backend, await exchange.prompt_only(), number, duration_ms))
                router.record_error(backend, deployment, FailureKind.BROKEN, generates)
                raise _Failed(AttemptFailure(FailureKind.BROKEN)) from None
        router.record_success(backend, deployment, answer.headers, size if answer.status == 200 else 0)
        return answer


def _generates(exchange: Exchange) -> bool:
    """Whether the request has a model generate (every request but a follow-up of a stored response)."""
    return exchange.route.operation not in FOLLOW_UPS


def _size(exchange: Exchange) -> int:
    """The request's size as a backend's token limit sees it: the reservation, or (for a consumer without limits,
    who reserves nothing) the prompt as counted, or its free lower bound, plus the output it asks for."""
    if exchange.reserve > 0:
        return exchange.reserve
    return exchange.prompt_spent() + (exchange.shape.max_tokens or 0) * exchange.shape.choices


def _reason(refusal: Refusal | None) -> str:
    """Why the previous deployment could not serve, for the fallback metric."""
    if refusal is None:
        return "skipped"
    return type(refusal).__name__


def _in_words(failure: AttemptFailure) -> str:
    """A failed attempt, in words for the client."""
    if failure.kind is FailureKind.THROTTLED:
        return "it is throttling (429)"
    if failure.status is not None:
        return f"it answered {failure.status}"
    words = {FailureKind.TIMEOUT: "it did not answer in time", FailureKind.CONNECTION: "it could not be reached",
             FailureKind.BROKEN: "its answer broke off"}
    return words.get(failure.kind, str(failure.kind.value))
