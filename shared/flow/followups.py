"""Follow-ups of a stored response: GET, DELETE, GET input_items, POST cancel, each sent to the backend holding it.

No tokens are spent, so there is no admission; the consumer must own the response (shared/routing/pinning.py), the
request goes to that one backend or is refused with a retryable 503, and the answer is passed through (a
`GET ...?stream=true` replay as a stream, event by event).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import orjson

from shared.config import Backend
from shared.edge.consumers import Consumer
from shared.edge.messages import GatewayRequest, GatewayResponse
from shared.flow import responses
from shared.flow.translate import (
    AZURE_API,
    FORWARDED_RESPONSE_HEADERS,
    Operation,
    Route,
    check_api_version,
    request_headers,
)
from shared.flow.upstream import Answer, UpstreamBroken, UpstreamError
from shared.outcomes import DeploymentNotAllowed, FailureKind
from shared.routing.pinning import Holder, Pinning
from shared.telemetry.events import RequestRecord, Trace

if TYPE_CHECKING:
    from shared.flow.books import Books
    from shared.flow.exchange import Services
    from shared.flow.holds import BackgroundHolds

log = logging.getLogger(__name__)
JSON = "application/json"
_FINISHED = frozenset({"completed", "incomplete", "failed", "cancelled"})
_METHODS = {
    Operation.RESPONSE_GET: "GET",
    Operation.RESPONSE_DELETE: "DELETE",
    Operation.RESPONSE_INPUT_ITEMS: "GET",
    Operation.RESPONSE_CANCEL: "POST",
}
# Query parameters a follow-up may carry on to the backend (include[], pagination, the replay of a stream).
_QUERY = frozenset({"include", "include[]", "stream", "starting_after", "after", "before", "limit", "order"})


class FollowUps:
    def __init__(self, services: Services, pinning: Pinning, books: Books, holds: BackgroundHolds) -> None:
        self.s = services
        self.pinning = pinning
        self.books = books
        self.holds = holds

    async def handle(
        self, request: GatewayRequest, route: Route, consumer: Consumer, started: float, trace: Trace
    ) -> GatewayResponse:
        assert route.response_id is not None
        api_version = check_api_version(request.query, self.s.settings.api_versions)
        holder = await self.pinning.holder(route.response_id, consumer.id, previous=False)
        deployment = holder.record.deployment
        if not consumer.may_use(deployment):
            raise DeploymentNotAllowed(deployment)
        self.pinning.claim(holder, deployment, generates=False)  # a read, a delete, a cancel: no PTU throughput
        upstream = await self._send(request, route, holder, api_version, trace)
        record = self._record(request, route, consumer, holder.backend, deployment, upstream.status, started)
        headers = {k: v for k, v in upstream.headers.items() if k in FORWARDED_RESPONSE_HEADERS}
        headers["x-gateway-backend"] = holder.backend.id
        headers.setdefault("x-ms-region", holder.backend.region)
        if upstream.status == 200 and upstream.headers.get("content-type", "").startswith("text/event-stream"):
            headers["cache-control"] = "no-cache"
            return GatewayResponse(200, headers, stream=self._replay(upstream, record, trace, holder))
        try:
            body = await upstream.read()
        except UpstreamBroken:
            self.s.router.record_error(holder.backend, deployment, FailureKind.BROKEN, generates=False)
            raise self.pinning.unavailable(holder, deployment, "its answer broke off") from None
        if (route.operation is Operation.RESPONSE_DELETE and upstream.status == 200) or upstream.status == 404:
            await self.pinning.forget(route.response_id)  # the backend no longer has it
        elif upstream.status == 200 and holder.record.unsettled:
            await self._settle(holder, body, record)
        self.s.telemetry.request_done(record, trace)
        return GatewayResponse(upstream.status, headers, body)

    async def _settle(self, holder: Holder, body: bytes, record: RequestRecord) -> None:
        """A background response read (or cancelled) after it finished: its hold is given back and its usage charged,
        exactly once, whichever instance claims the settlement, and whether or not the consumer is over its limit."""
        try:
            response = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        await self.holds.settle(holder, response, record)

    async def _send(
        self, request: GatewayRequest, route: Route, holder: Holder, api_version: str | None, trace: Trace
    ) -> Answer:
        backend = holder.backend
        deployment = holder.record.deployment
        tail = f"/{route.response_id}{route.operation.path}"
        url = responses.backend_url(backend, route.api == AZURE_API, api_version, tail)
        query = {k: v for k, v in request.query.items() if k in _QUERY}
        if query:
            url += ("&" if "?" in url else "?") + urlencode(query)
        headers = {**request_headers(request.headers), **(await self.s.auth.headers(backend))}
        method = _METHODS[route.operation]
        body = request.body if method == "POST" else b""
        span = trace.attempt(backend.id, backend.region, url.split("?", 1)[0], 1)
        try:
            upstream = await self.s.upstream.send(backend, url, headers, body, method=method)
        except UpstreamError as exc:
            span.end(None, exc.kind.value)
            self.s.router.record_error(backend, deployment, exc.kind, generates=False)
            raise self.pinning.unavailable(holder, deployment, f"{exc.kind.value} error") from None
        span.end(upstream.status)
        if self.s.router.is_failure(backend, upstream.status):
            self.s.router.record_failure(backend, deployment, upstream.status, upstream.headers, generates=False)
            upstream.release()
            raise self.pinning.unavailable(holder, deployment, f"it answered {upstream.status}")
        self.s.router.record_success(backend, deployment, upstream.headers)
        return upstream

    async def _replay(
        self, upstream: Answer, record: RequestRecord, trace: Trace, holder: Holder
    ) -> AsyncIterator[bytes]:
        """A stored response's events, replayed by the backend: passed through as they arrive. Nothing is charged for
        the replay; a background response still unsettled is settled from its terminal event's usage."""
        clean = False
        watch = responses.ResponsesRelay() if holder.record.unsettled else None
        try:
            while chunk := await upstream.next_chunk():
                if watch is not None:
                    watch.feed(chunk)
                yield chunk
            clean = True
        except UpstreamBroken:
            yield responses.ResponsesRelay().interrupted("The backend's stream broke off.")
        finally:
            if clean:
                upstream.release()
            else:
                upstream.close()
            self.s.telemetry.request_done(record, trace)
            if watch is not None and watch.done and watch.final is not None:
                await self.holds.settle(holder, watch.final, record)

    def _record(
        self, request: GatewayRequest, route: Route, consumer: Consumer, backend: Backend, deployment: str,
        status: int, started: float,
    ) -> RequestRecord:
        return RequestRecord(
            consumer_id=consumer.id,
            client_ip=request.client_ip,
            api=route.api,
            operation=route.operation.operation_id,
            user_id=request.headers.get(self.s.settings.user_id_header, "")[:128],
            deployment=deployment,
            status=status,
            duration_ms=(self.s.clock.monotonic() - started) * 1000,
            stream=False,
            backend_id=backend.id,
            region=backend.region,
            ptu=backend.ptu,
            team=consumer.team or "",
        )



