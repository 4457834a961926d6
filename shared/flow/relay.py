"""Relay: the chosen backend's answer to the client, whole or as a stream, and what it cost to the books.

A stream is relayed chunk by chunk as the backend produces it, and charged as it goes (every GATEWAY_STREAM_SETTLE_S);
whatever ends it (its end, a break, the client leaving and the relay being cancelled) it is settled once, in
`finally`, with the usage the backend reported (read on for a short while when the client left) or, failing that, the
prompt and the completion tokens the backend sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial

import orjson
import tiktoken

from shared.clock import Clock
from shared.config import Backend, Settings
from shared.edge.errors import error_body, render
from shared.edge.messages import TOKENS_CONSUMED_HEADER, GatewayResponse
from shared.flow import offload, responses, tokens
from shared.flow.answer_forms import StreamAssembler
from shared.flow.audit import Auditing
from shared.flow.backend_api import api_of
from shared.flow.cache import ResponseCache, cache_headers
from shared.flow.exchange import Chosen, Exchange, Served
from shared.flow.holds import BackgroundHolds, record_fields
from shared.flow.pinning import Pinning
from shared.flow.settlement import Books
from shared.flow.translate import FORWARDED_RESPONSE_HEADERS, Operation
from shared.flow.upstream import Answer, UpstreamBroken
from shared.flow.usage import SseRelay
from shared.outcomes import MalformedAnswer
from shared.records.usage import TokenUsage

JSON = "application/json"
SSE = "text/event-stream"


class Relay:
    def __init__(
        self, clock: Clock, books: Books, pinning: Pinning, settings: Settings, holds: BackgroundHolds,
        cache: ResponseCache | None = None, audit: Auditing | None = None,
    ) -> None:
        self._cache = cache
        self._audit = audit
        self._clock = clock
        self._books = books
        self._pinning = pinning
        self._holds = holds
        self._settle_every = settings.stream_settle_s
        self._drain_s = settings.abandoned_drain_s

    async def answer(self, exchange: Exchange, chosen: Chosen) -> GatewayResponse:
        if exchange.shape.stream and chosen.answer.status == 200:
            return self._stream(exchange, chosen)
        return await self._whole(exchange, chosen)

    def _headers(self, exchange: Exchange, chosen: Chosen, limits: bool = True) -> dict[str, str]:
        """The answer's headers for the client; `limits`: with the consumer's x-ratelimit-* now (a whole answer adds
        them once settled instead)."""
        headers = {k: v for k, v in chosen.answer.headers.items() if k in FORWARDED_RESPONSE_HEADERS}
        headers["x-gateway-backend"] = chosen.backend.id
        headers["x-gateway-deployment"] = exchange.deployment
        headers["x-gateway-attempts"] = str(chosen.attempts)
        headers.setdefault("x-ms-region", chosen.backend.region)
        if limits:
            headers.update(exchange.ticket.headers)
        headers.update(cache_headers(exchange.cache))
        return headers

    async def _whole(self, exchange: Exchange, chosen: Chosen) -> GatewayResponse:
        headers = self._headers(exchange, chosen, limits=False)
        raw = await chosen.answer.read()  # already read by the attempt
        status = chosen.answer.status
        usage, model = await _usage(chosen.backend, raw) if status == 200 else (None, None)
        if status == 200 and usage is None:
            # A 200 whose body cannot be read: the backend may still have billed the prompt; charge what we can count.
            usage = await exchange.prompt_only()
            try:
                orjson.loads(raw)
            except orjson.JSONDecodeError:
                error = render(MalformedAnswer())
                self._books.settle(exchange, Served(chosen.backend, error.status, usage, None, chosen.attempts))
                return GatewayResponse(error.status, {"content-type": JSON, **error.headers}, error.body())
        if status == 200 and exchange.route.operation is Operation.RESPONSES:
            created = _created(raw)
            if created is not None and created.background and usage is not None and not usage.reported:
                # Queued in the background, without usage yet: its reservation holds the consumer's limits until the
                # finished response is read and settled (shared/flow/holds.py).
                spent = await self._hold(exchange, chosen, created, Served(chosen.backend, status, None, model,
                                                                           chosen.attempts))
                headers[TOKENS_CONSUMED_HEADER] = str(spent)
                headers.update(exchange.ticket.headers)
                return GatewayResponse(status, headers, raw)
            if created is not None:
                await self._pinning.remember(created, chosen.backend, exchange.consumer.id, exchange.deployment, usage)
        spent = self._books.settle(exchange, Served(chosen.backend, status, usage, model, chosen.attempts))
        headers[TOKENS_CONSUMED_HEADER] = str(spent)
        headers.update(exchange.ticket.headers)
        if status == 200 and self._cache is not None:
            self._cache.keep(exchange, raw, usage, model)
        if self._audit is not None and self._audit.wanted(exchange):
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                parsed = None
            self._audit.whole(exchange, status, parsed, model)
        return GatewayResponse(status, headers, raw)

    def _stream(self, exchange: Exchange, chosen: Chosen) -> GatewayResponse:
        headers = self._headers(exchange, chosen)
        headers["content-type"] = SSE
        headers["cache-control"] = "no-cache"
        return GatewayResponse(200, headers, stream=self._events(exchange, chosen))

    async def _events(self, exchange: Exchange, chosen: Chosen) -> AsyncIterator[bytes]:
        """The stream, chunk by chunk; whatever ends it (its end, a break, the client leaving), settled once."""
        upstream: Answer = chosen.answer
        encoding = tokens.encoding_for(exchange.deployment)
        relay = _relay_for(exchange, encoding)
        assembler = self._cache.assembler(exchange) if self._cache is not None else None
        collector = self._audit.collector(exchange) if self._audit is not None else None
        progress = _Progress(self._clock, self._settle_every if exchange.limited else None)
        clean = False
        abandoned = False
        try:
            while chunk := await upstream.next_chunk():
                if exchange.prompt_estimate is None and isinstance(relay, SseRelay) and relay.would_count_usage(chunk):
                    await exchange.counted_prompt()  # the usage chunk the gateway is about to write needs it
                if assembler is not None:
                    assembler.feed(chunk)
                if collector is not None:
                    collector.feed(chunk)
                out = relay.feed(chunk)
                if progress.due():
                    # A limited consumer's stream is charged as it goes: what it delivered so far, every few seconds.
                    exchange.ticket.progress(exchange.prompt_spent() + relay.delivered_completion_tokens(encoding))
                if out:
                    progress.first_byte()
                    if isinstance(relay, responses.ResponsesRelay):
                        await self._record_before_client(exchange, chosen.backend, relay)
                    yield out
            await self._count_for_usage(exchange, relay)
            tail = relay.flush()
            if tail:
                yield tail
            if relay.done:
                clean = True
            else:
                yield _stream_error("The backend ended the stream early.", relay)
        except UpstreamBroken:
            await self._count_for_usage(exchange, relay)
            yield _stream_error("The backend's stream broke off.", relay)
        except (asyncio.CancelledError, GeneratorExit):
            abandoned = True  # the client left
            raise
        finally:
            if abandoned and relay.usage is None and not relay.done:
                # What the backend reports is the true cost (hidden reasoning included): wait a little for it.
                clean = await self._drain(upstream, relay)
            if clean:
                upstream.release()
            else:
                upstream.close()
            ttft = None if progress.first_at is None else (progress.first_at - exchange.started) * 1000
            cancelled = await self._settle_stream(exchange, chosen, relay, ttft, clean, assembler)
            if collector is not None and self._audit is not None:
                ended = "complete" if relay.done else "abandoned" if abandoned else "broken"
                self._audit.streamed(exchange, collector, relay.model, ended)
            if cancelled is not None:
                raise cancelled

    async def _record_before_client(self, exchange: Exchange, backend: Backend, relay: responses.ResponsesRelay) -> None:
        """Where a streamed response lives is recorded before its id reaches the client, so a follow-up sent at once,
        to any instance, finds it; and again with the usage (the context a continuation adds) and the output's items
        before the client sees the end: a request naming those items may follow at once, on any instance."""
        if relay.created_pending:
            relay.created_pending = False
            relay.context_recorded = relay.done
            await self._remember_streamed(exchange, backend, relay)
        if relay.done and not relay.context_recorded:
            relay.context_recorded = True
            await self._remember_streamed(exchange, backend, relay)

    async def _settle_stream(
        self, exchange: Exchange, chosen: Chosen, relay: SseRelay | responses.ResponsesRelay, ttft: float | None,
        clean: bool, assembler: StreamAssembler | None,
    ) -> asyncio.CancelledError | None:
        """The stream's books, once, however it ended; returns a cancellation that came meanwhile (raised by the
        caller once everything is settled)."""
        cancelled: asyncio.CancelledError | None = None
        created = relay.created if isinstance(relay, responses.ResponsesRelay) else None
        if created is not None and created.background and created.store and not relay.done:
            # A background response goes on at the backend after its stream ends here: what was delivered is not
            # its cost. Held at its reservation until it is read finished, like a queued one (the hold is booked
            # before the record is written, so a second cancellation cannot drop it).
            try:
                await self._hold(exchange, chosen, created, Served(chosen.backend, 200, None, relay.model, chosen.attempts,
                                                                   ttft))
            except asyncio.CancelledError as again:
                cancelled = again
            return cancelled
        usage = relay.usage
        if usage is None:
            try:
                prompt = await exchange.counted_prompt()
            except asyncio.CancelledError as again:
                # Cancelled again while a large prompt was counted off the loop: its upper bound is charged rather
                # than nothing, and the cancellation goes on once the books are settled.
                prompt, cancelled = exchange.prompt_ceiling(), again
            encoding = tokens.encoding_for(relay.model or exchange.deployment)
            completion = relay.delivered_completion_tokens(encoding)
            tools = relay.tools.counts() if isinstance(relay, responses.ResponsesRelay) else ()
            usage = TokenUsage(prompt, completion, prompt + completion, reported=False, tools=tools)
        self._books.settle(exchange, Served(chosen.backend, 200, usage, relay.model, chosen.attempts, ttft))
        if clean and assembler is not None and self._cache is not None and (whole := assembler.answer()):
            self._cache.keep(exchange, whole, relay.usage, relay.model)
        return cancelled

    @staticmethod
    async def _count_for_usage(exchange: Exchange, relay: SseRelay | responses.ResponsesRelay) -> None:
        """The prompt counted (off the loop if large) before a usage chunk of the gateway's own is written."""
        if exchange.prompt_estimate is None and isinstance(relay, SseRelay) and relay.owes_usage:
            await exchange.counted_prompt()

    async def _drain(self, upstream: Answer, relay: SseRelay | responses.ResponsesRelay) -> bool:
        """Read the rest of an abandoned stream, unseen, for at most GATEWAY_ABANDONED_STREAM_DRAIN_S, so that its
        usage chunk (the backend's own figure) can be charged; True if the stream ended within it."""
        if self._drain_s <= 0:
            return False
        try:
            async with asyncio.timeout(self._drain_s):
                while not relay.done and (chunk := await upstream.next_chunk()):
                    relay.feed(chunk)
                return relay.done
        except (TimeoutError, UpstreamBroken):
            return False

    async def _hold(self, exchange: Exchange, chosen: Chosen, created: responses.Created, served: Served) -> int:
        """Hold a background response's reservation and record where, before its id reaches the client (or, for a
        stream left early, before the relay ends), where any instance's sweep finds it."""
        held = exchange.reserve
        spent, parked = self._books.hold(exchange, served, held, self._holds.until())
        await self._pinning.remember(created, chosen.backend, exchange.consumer.id, exchange.deployment, None, held,
                                     record_fields(parked))
        self._holds.start()  # (every instance sweeps from its first request; this one may have had none before)
        return spent

    async def _remember_streamed(self, exchange: Exchange, backend: Backend, relay: responses.ResponsesRelay) -> None:
        if relay.created is not None:
            await self._pinning.remember(relay.created, backend, exchange.consumer.id, exchange.deployment, relay.usage)


class _Progress:
    """When a stream's first byte went out, and when its next charge while it runs is due (None: never, an
    unlimited consumer's stream is charged once, at its end)."""

    __slots__ = ("_clock", "_every", "_next", "first_at")

    def __init__(self, clock: Clock, every_s: float | None) -> None:
        self._clock = clock
        self._every = every_s
        self._next = clock.monotonic() + every_s if every_s is not None else None
        self.first_at: float | None = None

    def due(self) -> bool:
        if self._next is None or self._every is None:
            return False
        now = self._clock.monotonic()
        if now < self._next:
            return False
        self._next = now + self._every
        return True

    def first_byte(self) -> None:
        if self.first_at is None:
            self.first_at = self._clock.monotonic()


def _relay_for(exchange: Exchange, encoding: tiktoken.Encoding) -> SseRelay | responses.ResponsesRelay:
    """The event parser for the stream's API: it forwards events, picks out the usage and counts what was delivered."""
    if exchange.route.operation is Operation.RESPONSES:
        return responses.ResponsesRelay(encoding)
    return SseRelay(forward_usage_chunk=exchange.shape.client_wants_usage, encoding=encoding,
                    prompt_tokens=exchange.prompt_tokens)


def _stream_error(message: str, relay: SseRelay | responses.ResponsesRelay) -> bytes:
    if isinstance(relay, responses.ResponsesRelay):
        return relay.interrupted(message)
    body = error_body(message, "server_error", "stream_interrupted")
    # The usage chunk the client asked for comes before the error (the SDK raises on the error event).
    return relay.missing_usage() + b"data: " + body + b"\n\n"


async def _usage(backend: Backend, raw: bytes) -> tuple[TokenUsage | None, str | None]:
    """The answer's usage and model: its parse, for a large answer (many embeddings), in the worker thread."""
    read = api_of(backend).usage
    if len(raw) <= offload.ON_LOOP_BYTES:
        return read(raw)
    return await offload.run(partial(read, raw))


def _created(raw: bytes) -> responses.Created | None:
    try:
        return responses.created_from_object(orjson.loads(raw))
    except orjson.JSONDecodeError:
        return None
