"""The response cache in the request flow: looked up after the checks (the deployment is one the consumer may use),
before admission, so a hit is never charged to the consumer's limits; the backend's answer to a miss is kept after
it has reached the client.

    look_up   hit (answered here, as the backend answered), miss, or bypass (not cacheable, or opted out)
    answer    a hit as JSON, or as SSE chunks for a streamed request (with the usage chunk where asked)
    keep      a successful, unfiltered, uncapped answer with the backend's usage: into memory now, Blob soon

Nothing crosses a scope: the scope is part of the key's digest and is checked again on every entry read.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import orjson

from shared.cache import rules
from shared.cache.entry import CachedAnswer
from shared.cache.key import cache_key, scope_of
from shared.cache.layer import AnswerCache
from shared.cache.lookup import BYPASS, HIT, MISS, Lookup
from shared.clock import Clock
from shared.edge.errors import bad_request
from shared.edge.messages import TOKENS_CONSUMED_HEADER, GatewayRequest, GatewayResponse
from shared.flow import answer_forms, offload
from shared.flow.exchange import Checked, Exchange
from shared.flow.settlement import Books
from shared.flow.translate import Operation
from shared.records.usage import TokenUsage
from shared.telemetry.protocol import RequestRecord, Trace

JSON = "application/json"
SSE = "text/event-stream"
STREAMABLE = (Operation.CHAT, Operation.COMPLETIONS)  # the operations whose stream the cache rebuilds and replays


class ResponseCache:
    def __init__(self, layer: AnswerCache | None, clock: Clock, books: Books, *, seed_deterministic: bool = False) -> None:
        self._layer = layer
        self._clock = clock
        self._books = books
        self._seed = seed_deterministic

    async def look_up(self, request: GatewayRequest, checked: Checked) -> Lookup | None:
        """None when the cache is not in play for this consumer (its policy has it off); else what it says."""
        policy = checked.consumer.cache_policy
        if not policy.enabled or self._layer is None:
            return None
        try:
            asked = rules.directive(request.headers.get(rules.HEADER))
        except rules.BadDirective:
            raise bad_request(
                "The x-gateway-cache header takes no-store (not served from the cache, not stored) or no-cache "
                "(not served from the cache).", param=rules.HEADER, code="invalid_cache_directive",
            ) from None
        operation = checked.route.operation
        verdict = rules.verdict(operation.path, checked.body, policy, asked, seed_deterministic=self._seed)
        if verdict.bypass:
            return Lookup(BYPASS, reason=verdict.reason)
        scope = scope_of(policy, checked.consumer.id, checked.consumer.team)
        material = (scope, operation.path, checked.shape.deployment, checked.api_version, checked.body)
        if len(request.body) <= offload.ON_LOOP_BYTES:
            key = cache_key(*material)
        else:  # a sorted serialisation and a digest of the whole body: milliseconds for a large one
            key = await offload.run(partial(cache_key, *material))
        if verdict.serve:
            answer = await self._layer.get(key, scope, policy.ttl_s)
            if answer is not None:
                return Lookup(HIT, key, scope, store=False, answer=answer)
        return Lookup(MISS, key, scope, store=verdict.store)

    def answer(
        self, lookup: Lookup, request: GatewayRequest, checked: Checked, started: float, trace: Trace, user_id: str,
        safety: tuple[str, str, str] | None = None,
    ) -> GatewayResponse:
        """A hit, answered as the backend answered it; recorded as cached (no backend tokens, the tokens saved)."""
        answer = lookup.answer
        assert answer is not None
        stream = checked.shape.stream and checked.route.operation in STREAMABLE
        headers = {
            rules.HEADER: HIT,
            TOKENS_CONSUMED_HEADER: "0",
            "age": str(max(0, int(self._clock.now() - answer.stored_at))),
        }
        if answer.model:
            headers["openai-model"] = answer.model
        record = RequestRecord(
            consumer_id=checked.consumer.id, client_ip=request.client_ip, api=checked.route.api,
            operation=checked.route.operation.operation_id, user_id=user_id, deployment=checked.shape.deployment,
            status=200, duration_ms=(self._clock.monotonic() - started) * 1000, stream=checked.shape.stream,
            model=answer.model, cache=HIT, saved=answer.usage,
        )
        if safety is not None:  # (outcome, policy, detail) of the consumer's safety policy: the hit passed it too
            record.safety, record.safety_policy, record.safety_detail = safety
        self._books.hit(record, trace)
        if stream:
            headers.update({"content-type": SSE, "cache-control": "no-cache"})
            return GatewayResponse(200, headers, answer_forms.as_events(answer.body, checked.shape.client_wants_usage))
        headers["content-type"] = JSON
        return GatewayResponse(200, headers, answer.body)

    def keep(self, exchange: Exchange, body: bytes, usage: TokenUsage | None, model: str | None) -> bool:
        """Keep the answer a miss got, if it may be kept: the backend's own usage (not a count of the gateway's), an
        answer not shortened by the gateway's output cap, complete and unfiltered. Never waits for the store."""
        lookup = exchange.cache
        if lookup is None or not lookup.store or self._layer is None or usage is None or not usage.reported:
            return False
        if exchange.shape.capped:
            return False  # shortened by this consumer's cap of the moment: not the answer to the request as sent
        if exchange.step:
            # Served by a fallback (another model): its key names the deployment asked for, whose answer this is not;
            # kept, it would serve another model to a consumer with fallback off, and for as long as the entry lives.
            return False
        try:
            parsed: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        if not answer_forms.complete_answer(parsed):
            return False
        return self._layer.put(CachedAnswer(lookup.scope, lookup.key, self._clock.now(), usage, model or "", body))

    def assembler(self, exchange: Exchange) -> answer_forms.StreamAssembler | None:
        """For a streamed miss whose answer may be kept: builds it whole as it passes (bounded by the size cap)."""
        lookup = exchange.cache
        if lookup is None or not lookup.store or self._layer is None or exchange.route.operation not in STREAMABLE:
            return None
        return answer_forms.StreamAssembler(self._layer.max_entry_bytes * 2)


def cache_headers(lookup: Lookup | None) -> Mapping[str, str]:
    return {} if lookup is None else {rules.HEADER: lookup.state}
