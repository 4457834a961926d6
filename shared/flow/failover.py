"""Dispatch with failover: the one place a request is sent to backends, and sent again elsewhere when an attempt
fails before anything has reached the client.

A plain loop over the candidates, not tenacity: the attempt number picks the backend, nothing waits between attempts,
the stop is the number of candidates, and a request that runs out of candidates needs its own answer (why they all
failed); tenacity's stop/wait/retry objects would only restate those four lines, and its bookkeeping was measurable on
the first attempt that nearly every request is. The breakers, not this loop, remember which backends are unhealthy.
"""

from __future__ import annotations

from collections.abc import Iterator

from shared.clock import Clock
from shared.config import Backend, Settings
from shared.flow.credentials import BackendAuth
from shared.flow.exchange import Chosen, Exchange, LostAttempt
from shared.flow.translate import backend_body, backend_url, request_headers
from shared.flow.upstream import Answer, UpstreamBroken, UpstreamClient, UpstreamError
from shared.outcomes import AttemptFailure, FailureKind
from shared.routing.breaker import retry_after_s
from shared.routing.pinning import Holder, Pinning
from shared.routing.router import Router
from shared.telemetry.events import Telemetry


class _Failed(Exception):
    """An attempt failed before anything reached the client; the next candidate may answer."""

    def __init__(self, failure: AttemptFailure) -> None:
        self.failure = failure


class Failover:
    def __init__(
        self, settings: Settings, clock: Clock, router: Router, upstream: UpstreamClient, auth: BackendAuth,
        telemetry: Telemetry, pinning: Pinning,
    ) -> None:
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
        answer that breaks off, try the next candidate at once with the same body. Raises the router's refusal
        (BackendsBusy, NoBackend, BackendsFailed, ...) when none answers."""
        pinned = exchange.checked.pinned
        if pinned is not None:
            return await self._dispatch_pinned(exchange, pinned)
        deployment = exchange.deployment
        candidates = self._router.candidates(deployment, exchange.reserve, exchange.consumer.priority)
        limit = min(self._max_attempts or len(candidates), len(candidates))
        headers = request_headers(exchange.request.headers)
        failures: list[AttemptFailure] = []
        previous: Backend | None = None
        acquired = self._acquired(candidates, deployment)
        for number in range(1, limit + 1):
            backend = next(acquired, None)  # claimed only when it is about to be tried
            if backend is None:
                break
            if exchange.timeouts > self._timeout_replays:
                break  # each replay of a request that outruns the timeout may be billed again, and time out again
            if previous is not None:
                self._telemetry.failover(previous.id, backend.id, failures[-1].reason)
            try:
                return Chosen(backend, await self._attempt(exchange, backend, headers, number), number)
            except _Failed as failed:
                failures.append(failed.failure)
                previous = backend
        raise self._router.exhausted(deployment, failures, exchange.asked)

    def _acquired(self, candidates: list[Backend], deployment: str) -> Iterator[Backend]:
        """The candidates in order that may be tried now (a half-open breaker lets one probe through: claiming it is
        acquiring it, so the generator is advanced only for an attempt that will be made)."""
        return (backend for backend in candidates if self._router.acquire(backend, deployment))

    async def _dispatch_pinned(self, exchange: Exchange, holder: Holder) -> Chosen:
        """One attempt, at the backend that holds the continued response: no other region could answer it."""
        self._pinning.claim(holder, exchange.deployment)
        try:
            answer = await self._attempt(exchange, holder.backend, request_headers(exchange.request.headers), 1)
        except _Failed as failed:
            raise self._pinning.unavailable(holder, exchange.deployment, _in_words(failed.failure)) from None
        return Chosen(holder.backend, answer, 1)

    async def _attempt(self, exchange: Exchange, backend: Backend, headers: dict[str, str], number: int) -> Answer:
        router = self._router
        deployment = exchange.deployment
        checked = exchange.checked
        url = backend_url(backend, checked.route, deployment, checked.api_version)
        body = backend_body(exchange.request.body, checked.body, backend, deployment, checked.shape, checked.api_version)
        send_headers = {**headers, **(await self._auth.headers(backend))}
        span = exchange.trace.attempt(backend.id, backend.region, url.split("?", 1)[0], number)
        try:
            answer = await self._upstream.send(backend, url, send_headers, body)
        except UpstreamError as exc:
            span.end(None, exc.kind.value)
            if exc.kind is FailureKind.TIMEOUT:
                # The backend read the request and may still be generating (and billing) it: the prompt is charged,
                # and the breaker counts it only as one of a rate across callers.
                router.record_timeout(backend, deployment, exchange.consumer.id)
                exchange.timeouts += 1
                duration_ms = (self._clock.monotonic() - exchange.started) * 1000
                exchange.lost.append(LostAttempt(backend, await exchange.prompt_only(), number, duration_ms, 504))
            else:
                router.record_error(backend, deployment, exc.kind)
            raise _Failed(AttemptFailure(exc.kind)) from None
        span.end(answer.status)
        if answer.status in (401, 403):
            # The backend refused the gateway's credential: no request will succeed there until it is fixed.
            router.record_auth_failure(backend, deployment, answer.status)
            answer.release()
            raise _Failed(AttemptFailure.of_status(answer.status))
        if router.is_failure(backend, answer.status):
            asked = retry_after_s(answer.headers, self._clock.now())
            if asked is not None:
                # Capped like the breaker's trip: past that the gateway tries the backend again anyway.
                exchange.asked[backend.id] = self._clock.now() + min(asked, backend.breaker.max_trip_s)
            router.record_failure(backend, deployment, answer.status, answer.headers)
            answer.release()
            raise _Failed(AttemptFailure.of_status(answer.status))
        if not (checked.shape.stream and answer.status == 200):
            # A whole answer is read before it is chosen: if its body breaks off, nothing has reached the client yet
            # and the next candidate can still answer. The broken attempt's prompt was billed; the books charge it.
            try:
                await answer.read()
            except UpstreamBroken:
                duration_ms = (self._clock.monotonic() - exchange.started) * 1000
                exchange.lost.append(LostAttempt(backend, await exchange.prompt_only(), number, duration_ms))
                router.record_error(backend, deployment, FailureKind.BROKEN)
                raise _Failed(AttemptFailure(FailureKind.BROKEN)) from None
        router.record_success(backend, deployment, answer.headers)
        return answer


def _in_words(failure: AttemptFailure) -> str:
    """A failed attempt, in words for the client."""
    if failure.kind is FailureKind.THROTTLED:
        return "it is throttling (429)"
    if failure.status is not None:
        return f"it answered {failure.status}"
    words = {FailureKind.TIMEOUT: "it did not answer in time", FailureKind.CONNECTION: "it could not be reached",
             FailureKind.BROKEN: "its answer broke off"}
    return words.get(failure.kind, str(failure.kind.value))
