"""Background responses: held at their prompt and output cap until their usage is known, then settled exactly once.

A `background` create is answered `queued`, without usage, and generates on at the backend for as long as it takes.
Its reservation (the prompt and the output cap, which admission writes into the body) is therefore held in the
consumer's window (limits.tickets.Held) until HOLD_S from now, and the response's record says where. Whatever first
sees the finished response settles it: a GET (plain or `?stream=true`), a cancel, or the sweep. Every instance sweeps,
not only the one that created the response: each SWEEP_EVERY_S it reads, in one query of the responses table's
`sweep:` partition, the unsettled responses (of any instance) whose hold ends within SWEEP_AHEAD_S, each claimed for it
alone by a conditional write (CLAIM_S), and reads each at its backend: settles it, or, still running, moves its hold
on. A hold that ended unswept (every instance was down) is settled all the same when the sweep next finds it. A
settlement gives the hold back and charges the backend's usage, whoever asks and whether or not the consumer is over
its limit; the record's conditional write makes it happen once across instances.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import orjson

from shared.background import keep_running
from shared.edge.errors import GatewayError
from shared.flow import responses
from shared.flow.pinning import Holder, Pinning
from shared.flow.translate import request_headers
from shared.flow.upstream import UpstreamBroken, UpstreamError
from shared.flow.usage import usage_from_object
from shared.limits.tickets import Held
from shared.outcomes import Refusal, ResponseNotFound
from shared.records.responses import StoredResponse
from shared.records.usage import TokenUsage
from shared.telemetry.protocol import RequestRecord

if TYPE_CHECKING:
    from shared.flow.exchange import Services
    from shared.flow.settlement import Books

log = logging.getLogger(__name__)

HOLD_S = 600.0  # a hold lasts this long from its last move
SWEEP_AHEAD_S = 120.0  # a held response is read this long before its hold ends
SWEEP_EVERY_S = 30.0  # one query of the sweep partition per instance this often (docs/architecture.md)
SWEEP_BATCH = 100  # at most this many due responses claimed per sweep (one page of the query)
CLAIM_S = 60.0  # a response claimed by a sweeper is not offered to another for this long (its read failed: retried then)
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


class BackgroundHolds:
    def __init__(self, services: Services, pinning: Pinning, books: Books) -> None:
        self.s = services
        self.pinning = pinning
        self.books = books
        self._task: asyncio.Task[None] | None = None
        self.settled = 0
        self.extended = 0

    def until(self) -> float:
        return self.s.clock.now() + HOLD_S

    def start(self) -> None:
        """Sweep from now on (every instance, from its first request: the records it sweeps are any instance's)."""
        self._task = keep_running(self._task, self._sweep_forever)

    async def _sweep_forever(self) -> None:
        while True:
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
        """One query for the unsettled responses (any instance's) whose hold nears its end, each claimed for this
        sweeper: settle it, or move its hold on while it runs."""
        now = self.s.clock.now()
        now_ms = int(now * 1000)
        due = await self.pinning.due(now_ms + int(SWEEP_AHEAD_S * 1000), now_ms, now_ms + int(CLAIM_S * 1000),
                                     SWEEP_BATCH)
        for response_id, consumer_id in due:
            try:
                await self._sweep_one(response_id, consumer_id)
            except ResponseNotFound:
                await self.pinning.unindex(response_id)  # deleted, expired, or its region is no longer configured
            except (Refusal, GatewayError, UpstreamError, UpstreamBroken) as exc:
                # The holder is out (or the record unreadable): its claim lapses and a later sweep (any instance's)
                # tries again (after its hold's end too: it is settled, as debt, once its backend answers).
                log.info("background response %s not swept (%s); trying again", response_id, type(exc).__name__)

    async def _sweep_one(self, response_id: str, consumer_id: str) -> None:
        holder = await self.pinning.holder(response_id, consumer_id, previous=False)
        record = holder.record
        if not record.unsettled:
            await self.pinning.unindex(response_id)  # settled already; its row was left behind
            return
        held = held_of(record)
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
            return  # settled elsewhere meanwhile
        if not held.expiry_ms:
            await self.pinning.unindex(response_id)  # a record from before holds were kept: a read settles it
            return
        until_ms = -(-int(self.until() * 1000) // 500) * 500
        # The record first (a conditional write): if another instance settled or moved it meanwhile, nothing moves.
        if not await self.pinning.rehold(record, until_ms):
            return
        self.s.limiter.extend(held, until_ms / 1000)
        self.extended += 1

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
