"""The relay of a follow-up of a stored response: GET, DELETE, GET input_items, POST cancel.

A follow-up goes through the phases every request does (shared/flow/gateway.py): the caller is identified, the check
finds the backend holding the response (the consumer must own it, shared/routing/pinning.py) and names the caller as
admission does, with nothing reserved (no tokens are spent), and the failover's pinned dispatch sends it to that one
backend or refuses with a retryable 503. This module is its relay: the answer passed through (a `GET ...?stream=true`
replay as a stream, event by event), the response forgotten once the backend no longer has it, a background response
found finished settled, and the request counted by the books like any other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

from shared.edge.messages import GatewayResponse
from shared.flow import responses
from shared.flow.exchange import Chosen, Exchange, Served
from shared.flow.holds import BackgroundHolds
from shared.flow.pinning import Holder, Pinning
from shared.flow.settlement import Books
from shared.flow.translate import FORWARDED_RESPONSE_HEADERS, Operation
from shared.flow.upstream import UpstreamBroken
from shared.outcomes import FailureKind
from shared.routing.router import Router
from shared.telemetry.protocol import RequestRecord


class FollowUps:
    def __init__(self, router: Router, pinning: Pinning, books: Books, holds: BackgroundHolds) -> None:
        self._router = router
        self.pinning = pinning
        self.books = books
        self.holds = holds

    async def answer(self, exchange: Exchange, chosen: Chosen) -> GatewayResponse:
        """The backend's answer to the client (dispatched by Failover to the holder alone)."""
        holder = exchange.checked.pinned
        assert holder is not None and exchange.route.response_id is not None
        upstream = chosen.answer
        headers = {k: v for k, v in upstream.headers.items() if k in FORWARDED_RESPONSE_HEADERS}
        headers["x-gateway-backend"] = chosen.backend.id
        headers.setdefault("x-ms-region", chosen.backend.region)
        if upstream.status == 200 and upstream.headers.get("content-type", "").startswith("text/event-stream"):
            headers["cache-control"] = "no-cache"
            return GatewayResponse(200, headers, stream=self._replay(exchange, chosen, holder))
        try:
            body = await upstream.read()
        except UpstreamBroken:  # asked for a replay, answered with a body that broke off
            self._router.record_error(chosen.backend, exchange.deployment, FailureKind.BROKEN, generates=False)
            raise self.pinning.unavailable(holder, exchange.deployment, "its answer broke off") from None
        record = self.books.passed(exchange, _served(chosen))
        if (exchange.route.operation is Operation.RESPONSE_DELETE and upstream.status == 200) or upstream.status == 404:
            await self.pinning.forget(exchange.route.response_id)  # the backend no longer has it
        elif upstream.status == 200 and holder.record.unsettled:
            await self._settle(holder, body, record)
        return GatewayResponse(upstream.status, headers, body)

    async def _settle(self, holder: Holder, body: bytes, record: RequestRecord) -> None:
        """A background response read (or cancelled) after it finished: its hold is given back and its usage charged,
        exactly once, whichever instance claims the settlement, and whether or not the consumer is over its limit."""
        try:
            response = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        await self.holds.settle(holder, response, record)

    async def _replay(self, exchange: Exchange, chosen: Chosen, holder: Holder) -> AsyncIterator[bytes]:
        """A stored response's events, replayed by the backend: passed through as they arrive. Nothing is charged for
        the replay; a background response still unsettled is settled from its terminal event's usage."""
        upstream = chosen.answer
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
            record = self.books.passed(exchange, _served(chosen))
            if watch is not None and watch.done and watch.final is not None:
                await self.holds.settle(holder, watch.final, record)


def _served(chosen: Chosen) -> Served:
    return Served(chosen.backend, chosen.answer.status, None, None, chosen.attempts)

