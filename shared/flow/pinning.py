"""Follow-ups of a stored response go to the backend that holds it, and only for the consumer that created it.

Azure keeps a stored response (`store: true`, the default) in the resource that produced it, for 30 days; a
`previous_response_id`, GET, DELETE, input_items or cancel sent anywhere else fails there as "not found". So when a
response is created the gateway records which backend produced it and for whom, and every follow-up, on any instance,
reads that record and goes to that backend only: never failed over, and when that backend is out, refused with a
retryable 503 naming the reason. A consumer asking about a response it did not create gets exactly the answer an
unknown id gets.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from shared.clock import Clock
from shared.config import Backend
from shared.flow.responses import RESPONSE_ID_RE, Created, context_tokens
from shared.limits.local_rate import PerKeyRate
from shared.outcomes import (
    ResponseBackendUnavailable,
    ResponseNotFound,
    ResponseReadsThrottled,
    ResponseStateUnavailable,
)
from shared.records.responses import StoredResponse
from shared.records.usage import TokenUsage
from shared.routing.router import Router
from shared.storage.protocols import ResponseStore, StoreUnavailable
from shared.waits import whole_seconds

log = logging.getLogger(__name__)

# Items of earlier responses are recorded beside the responses, under this prefix (not a character a response id can
# hold, so no item row can be read as a response).
ITEM_PREFIX = "item:"


def item_key(item_id: str) -> str:
    return ITEM_PREFIX + item_id


# Azure OpenAI keeps stored responses for 30 days.
RETENTION_S = 30 * 24 * 3600.0
_WRITE_TRIES = 3


@dataclass(frozen=True, slots=True)
class Holder:
    record: StoredResponse
    backend: Backend


class Pinning:
    def __init__(
        self, store: ResponseStore, backends: tuple[Backend, ...], router: Router, clock: Clock,
        retention_s: float = RETENTION_S, reads: PerKeyRate | None = None,
    ) -> None:
        self._store = store
        self._reads = reads  # per consumer: no admission charges a read, so this is what bounds a flood of them
        self._backends = {b.id: b for b in backends}
        self._router = router
        self._clock = clock
        self._retention_s = retention_s
        self.unrecorded = 0  # responses whose location could not be written (their follow-ups will be refused)

    async def holder(self, response_id: str, consumer_id: str, *, previous: bool) -> Holder:
        """Where `response_id` lives, if `consumer_id` created it; else the not-found answer. Each costs one read of
        the responses table, so a consumer past its read rate on this instance is refused (429) before the read."""
        if self._reads is not None:
            wait = self._reads.take(consumer_id)
            if wait is not None:
                raise ResponseReadsThrottled(wait)
        try:
            record = await self._store.get(response_id, self._clock.now())
        except StoreUnavailable:
            raise ResponseStateUnavailable() from None
        if record is None or record.consumer_id != consumer_id:
            raise ResponseNotFound(response_id, previous)
        backend = self._backends.get(record.backend_id)
        if backend is None or not backend.serves(record.deployment):
            # The region that holds it is no longer configured: nothing can reach the response any more.
            raise ResponseNotFound(response_id, previous)
        return Holder(record, backend)

    def claim(self, holder: Holder, deployment: str, generates: bool = True) -> None:
        """Refuse (503, retryable) unless the holder may be sent to now; a half-open breaker lets one probe through.
        `generates`: a continuation (charged to a PTU's model), not a read of what is stored."""
        if not self._router.acquire(holder.backend, deployment, generates):
            raise self.unavailable(holder, deployment, "its circuit breaker is open")

    def unavailable(self, holder: Holder, deployment: str, reason: str) -> ResponseBackendUnavailable:
        """The refusal when the only backend that can serve a follow-up cannot serve it now."""
        backend = holder.backend
        return ResponseBackendUnavailable(
            holder.record.response_id.removeprefix(ITEM_PREFIX), backend.region, backend.id, reason,
            self._recovers_in(backend, deployment),
        )

    def _recovers_in(self, backend: Backend, deployment: str) -> int:
        for entry in self._router.health()["backends"]:
            if entry["id"] == backend.id:
                seconds = entry["deployments"].get(deployment, {}).get("recovers_in_s")
                if isinstance(seconds, int | float):
                    return whole_seconds(seconds)
        return 1

    async def remember(
        self, created: Created, backend: Backend, consumer_id: str, deployment: str, usage: TokenUsage | None,
        charged_until_settled: int | None = None, held: tuple[int, str] = (0, ""),
    ) -> None:
        """Record where a new stored response lives (written before the client can learn its id), and where its items
        live (every output item of a stored response, the encrypted reasoning of an unstored one); `held`: where a
        background response's hold sits (until ms, places), while it is charged until settled."""
        expires = self._clock.now() + self._retention_s
        writes = [self._put(StoredResponse(item_key(item), backend.id, consumer_id, deployment, expires))
                  for item in created.items]
        if created.store:
            writes.append(self._put(StoredResponse(
                created.response_id, backend.id, consumer_id, deployment, expires,
                context_tokens(usage), charged_until_settled is not None, charged_until_settled or 0, *held,
            )))
        self._count_unwritten(await asyncio.gather(*writes), [*map(item_key, created.items), created.response_id])

    async def remember_items(self, items: tuple[str, ...], backend: Backend, consumer_id: str, deployment: str) -> None:
        """Record where the output items of a response already recorded live (a background response read finished)."""
        expires = self._clock.now() + self._retention_s
        writes = [self._put(StoredResponse(item_key(item), backend.id, consumer_id, deployment, expires))
                  for item in items]
        self._count_unwritten(await asyncio.gather(*writes), [item_key(item) for item in items])

    def _count_unwritten(self, written: list[bool], keys: list[str]) -> None:
        for ok, key in zip(written, keys, strict=False):
            if not ok:
                self.unrecorded += 1
                log.warning("could not record where %s is stored; requests naming it will be refused", key)

    async def _put(self, record: StoredResponse) -> bool:
        for _ in range(_WRITE_TRIES):
            try:
                await self._store.put(record)
                return True
            except StoreUnavailable:
                continue
        return False

    async def item_holder(self, item_id: str, consumer_id: str) -> Holder | None:
        """Where an item of an earlier response lives, if `consumer_id` made it; None when unknown, expired, another
        consumer's or held by a region no longer configured (the caller answers all of these alike)."""
        if not RESPONSE_ID_RE.fullmatch(item_id):
            return None
        try:
            return await self.holder(item_key(item_id), consumer_id, previous=False)
        except ResponseNotFound:
            return None

    async def settle(self, response_id: str) -> bool:
        """Claim the settlement of an unsettled background response; True for exactly one caller, on any instance."""
        try:
            return await self._store.settle(response_id)
        except StoreUnavailable:
            return False  # a later read settles it

    async def rehold(self, record: StoredResponse, held_until_ms: int) -> bool:
        """Record that a hold moved; False when the response was settled (or moved) elsewhere meanwhile."""
        try:
            return await self._store.rehold(record.response_id, held_until_ms, record.held_until_ms)
        except StoreUnavailable:
            return False

    async def due(self, by_ms: int, now_ms: int, claim_until_ms: int, limit: int) -> list[tuple[str, str]]:
        """Unsettled responses whose hold ends by `by_ms`, claimed for this sweeper until `claim_until_ms` (one query,
        any instance's records; storage/protocols.py: ResponseStore.due); none while the table is out."""
        try:
            return await self._store.due(by_ms, now_ms, claim_until_ms, limit)
        except StoreUnavailable:
            return []

    async def unindex(self, response_id: str) -> None:
        try:
            await self._store.unindex(response_id)
        except StoreUnavailable:
            pass  # the next sweep that finds it tries again

    async def forget(self, response_id: str) -> None:
        try:
            await self._store.forget(response_id)
        except StoreUnavailable:
            log.info("could not forget deleted response %s; it expires with the retention", response_id)
