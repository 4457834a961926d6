"""Background responses: held at their prompt and output cap until their usage is known, then settled exactly once.

A `background` create is answered `queued`, without usage, and generates on at the backend for as long as it takes.
Its reservation (the prompt and the output cap, which admission writes into the body) is therefore held in the
consumer's window (limits.contract.Held) until HOLD_S from now, and the response's record says where. Whatever first
sees the finished response settles it: a GET (plain or `?stream=true`), a cancel, or this module's sweep, which reads
each response it holds shortly before its hold ends and either settles it or, still running, moves the hold on. A
settlement gives the hold back and charges the backend's usage, whoever asks and whether or not the consumer is over
its limit; the record's conditional write makes it happen once across instances.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import orjson

from shared.background import keep_running
from shared.edge.errors import GatewayError
from shared.flow import responses
from shared.flow.translate import request_headers
from shared.flow.upstream import UpstreamBroken, UpstreamError
from shared.flow.usage import TokenUsage, usage_from_object
from shared.limits.contract import Held
from shared.outcomes import Refusal
from shared.routing.pinning import Holder, Pinning, StoredResponse
from shared.telemetry.events import RequestRecord

if TYPE_CHECKING:
    from shared.flow.books import Books
    from shared.flow.exchange import Services

log = logging.getLogger(__name__)

HOLD_S = 600.0  # a hold lasts this long from its last move
SWEEP_AHEAD_S = 120.0  # a held response is read this long before its hold ends
SWEEP_EVERY_S = 15.0
FINISHED = frozenset({"completed", "incomplete", "failed", "cancelled"})


def held_of(record: StoredResponse) -> Held:
    return Held.decode(record.charged, record.held_until_ms, record.held_places)


def record_fields(held: Held | None) -> tuple[int, str]:
    """What a response's record keeps of its hold (pinning.remember's `held`)."""
    if held is None:
        return (0, "")
    return (held.expiry_ms, held.encode())


def finished_usage(response: Any) -> TokenUsage | None:
    """The usage of a finished Response object; None while it runs (or if it is not one)."""
    if not isinstance(response, Mapping) or response.get("status") not in FINISHED:
        return None
    return usage_from_object(response)


def _finished_without_usage(response: Any) -> bool:
    return isinstance(response, Mapping) and response.get("status") in FINISHED and usage_from_object(response) is None


@dataclass
class _Watch:
    consumer_id: str
    ends_s: float  # when its hold ends
    due_s: float  # when to read it (SWEEP_AHEAD_S before its hold ends, then again while its backend fails)


class BackgroundHolds:
    def __init__(self, services: Services, pinning: Pinning, books: Books) -> None:
        self.s = services
        self.pinning = pinning
        self.books = books
        self._watched: dict[str, _Watch] = {}
        self._task: asyncio.Task[None] | None = None
        self.settled = 0
        self.extended = 0

    def until(self) -> float:
        return self.s.clock.now() + HOLD_S

    def watch(self, response_id: str, consumer_id: str, held: Held | None) -> None:
        """Sweep this response before its hold ends (the instance that created it watches it)."""
        if held is not None:
            ends = held.expiry_ms / 1000
            self._watched[response_id] = _Watch(consumer_id, ends, ends - SWEEP_AHEAD_S)
            self._task = keep_running(self._task, self._sweep_forever)

    async def _sweep_forever(self) -> None:
        while self._watched:
            await asyncio.sleep(SWEEP_EVERY_S)
            try:
                await self.sweep()
            except Exception:
                log.exception("background-response sweep failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def settle(
        self, holder: Holder, response: Any, base: RequestRecord, usage: TokenUsage | None = None
    ) -> bool:
        """Settle the held response from a Response object read at its backend, if it is finished: give back its hold
        and charge its usage (`usage`, when the backend gives none), once, whichever instance claims the record first.
        True if this call settled it."""
        record = holder.record
        usage = finished_usage(response) or usage
        if usage is None or not record.unsettled:
            return False
        if not await self.pinning.settle(record.response_id):
            return False
        self._watched.pop(record.response_id, None)
        model = response.get("model") if isinstance(response, Mapping) else None
        self.books.settle_later(self.s.limiter, record.consumer_id, held_of(record), usage,
                                replace(base, model=model if isinstance(model, str) else ""))
        self.settled += 1
        # Its output was not known when it was created: its items can be referenced from now on.
        finished = responses.created_from_object(response)
        if finished is not None and finished.items:
            await self.pinning.remember_items(finished.items, holder.backend, record.consumer_id, record.deployment)
        return True

    async def sweep(self) -> None:
        """Read every watched response whose hold nears its end: settle it, or move its hold on while it runs."""
        now = self.s.clock.now()
        for response_id, watch in [(r, w) for r, w in self._watched.items() if w.due_s <= now]:
            try:
                await self._sweep_one(response_id, watch)
            except (Refusal, GatewayError, UpstreamError, UpstreamBroken) as exc:
                # The holder is out (or the record unreadable): try again at the next sweep, the hold still running.
                if now >= watch.ends_s:
                    # Its hold has ended: nothing left to move; a later read (GET, on any instance) charges its usage.
                    self._watched.pop(response_id, None)
                    continue
                log.info("background response %s not swept (%s); trying again", response_id, type(exc).__name__)
                watch.due_s = now + min(30.0, SWEEP_AHEAD_S / 4)

    async def _sweep_one(self, response_id: str, watch: _Watch) -> None:
        holder = await self.pinning.holder(response_id, watch.consumer_id, previous=False)
        record = holder.record
        if not record.unsettled:
            self._watched.pop(response_id, None)
            return
        status, response = await self._read(holder)
        base = RequestRecord(
            consumer_id=record.consumer_id, client_ip="", api="", operation="", user_id="",
            deployment=record.deployment, status=200, duration_ms=0.0, backend_id=holder.backend.id,
            region=holder.backend.region, ptu=holder.backend.ptu,
        )
        # Gone from its backend (deleted, expired), or finished without usage figures: nothing will ever tell its cost,
        # so what it holds (its prompt and cap) is what it is charged, and it is no longer held.
        unknown = status == 404 or _finished_without_usage(response)
        charged = TokenUsage(record.charged, 0, record.charged, reported=False) if unknown else None
        if await self.settle(holder, response, base, charged):
            return
        if unknown or finished_usage(response) is not None:
            self._watched.pop(response_id, None)  # settled elsewhere meanwhile
            return
        held = held_of(record)
        if not held.expiry_ms:
            self._watched.pop(response_id, None)  # a record from before holds were kept: a read settles it
            return
        until_ms = -(-int(self.until() * 1000) // 500) * 500
        # The record first (a conditional write): if another instance settled or moved it meanwhile, nothing moves.
        if not await self.pinning.rehold(record, until_ms):
            self._watched.pop(response_id, None)
            return
        moved = self.s.limiter.extend(held, until_ms / 1000)
        self.extended += 1
        watch.ends_s = moved.expiry_ms / 1000
        watch.due_s = watch.ends_s - SWEEP_AHEAD_S

    async def _read(self, holder: Holder) -> tuple[int, Any]:
        """(status, Response object) of the held response at its backend; raises while the backend fails."""
        backend = holder.backend
        url = responses.backend_url(backend, False, None, f"/{holder.record.response_id}")
        headers = {**request_headers({}), **(await self.s.auth.headers(backend))}
        answer = await self.s.upstream.send(backend, url, headers, b"", method="GET")
        if answer.status == 404:
            answer.release()
            return 404, None
        if answer.status != 200:
            answer.release()
            raise UpstreamBroken(f"status {answer.status}")
        body = await answer.read()
        try:
            return 200, orjson.loads(body)
        except orjson.JSONDecodeError:
            return 200, None
