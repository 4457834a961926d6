"""The audit trail in the request flow (shared/safety/audit.py writes it): a record of what the model was asked (as it
saw it: PII masked where the policy masks it) and what it answered (a stream's text reassembled as it passes), with
consumer, team, end user, deployment, request id and time, for consumers whose policy says `audit`."""

from __future__ import annotations

import time
import uuid
from typing import Any

from shared.clock import Clock
from shared.flow import sse
from shared.flow.exchange import Exchange
from shared.flow.translate import Operation
from shared.outcomes import AuditUnavailable
from shared.safety import texts
from shared.safety.audit import AuditTrail

_KINDS = {Operation.CHAT: "chat", Operation.RESPONSES: "responses", Operation.COMPLETIONS: "completions",
          Operation.EMBEDDINGS: "embeddings"}
MAX_COMPLETION_CHARS = 1_000_000  # a stream's text kept for its record at most (the rest is cut, and said so)


class TextCollector:
    """The text of a chat, completions or Responses stream, from its events as they pass."""

    def __init__(self) -> None:
        self._framer = sse.Framer()
        self._parts: list[str] = []
        self._size = 0
        self.cut = False

    def feed(self, data: bytes) -> None:
        for event in self._framer.feed(data):
            obj = sse.event_object(event)
            if obj is not None:
                for text in _event_texts(obj):
                    if self._size + len(text) > MAX_COMPLETION_CHARS:
                        self.cut = True
                        return
                    self._parts.append(text)
                    self._size += len(text)

    def text(self) -> str:
        return "".join(self._parts)


def _event_texts(obj: dict[str, Any]) -> list[str]:
    if obj.get("type") == "response.output_text.delta" and isinstance(obj.get("delta"), str):
        return [obj["delta"]]
    found: list[str] = []
    for choice in obj.get("choices") or ():
        if isinstance(choice, dict):
            delta = choice.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                found.append(delta["content"])
            elif isinstance(choice.get("text"), str):
                found.append(choice["text"])
    return found


def answer_text(operation: Operation, answer: Any) -> str:
    """The text of a whole answer (none for embeddings)."""
    if not isinstance(answer, dict):
        return ""
    if operation is Operation.RESPONSES:
        return "".join(part.get("text", "") for item in answer.get("output") or () if isinstance(item, dict)
                       for part in item.get("content") or () if isinstance(part, dict)
                       and part.get("type") == "output_text" and isinstance(part.get("text"), str))
    parts: list[str] = []
    for choice in answer.get("choices") or ():
        if isinstance(choice, dict):
            message = choice.get("message")
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                parts.append(message["content"])
            elif isinstance(choice.get("text"), str):
                parts.append(choice["text"])
    return "\n".join(parts)


class Auditing:
    def __init__(self, trail: AuditTrail | None, clock: Clock) -> None:
        self._trail = trail
        self._clock = clock

    def check(self, exchange_policy: Any) -> None:
        """Before anything is sent: a policy with `audit: required` is refused while the trail cannot take records."""
        if exchange_policy is None or exchange_policy.audit != "required":
            return
        if self._trail is None or not self._trail.ready():
            raise AuditUnavailable(retry_after_s=5, policy=exchange_policy.name)

    def wanted(self, exchange: Exchange) -> bool:
        screened = exchange.screened
        return self._trail is not None and screened is not None and screened.policy.audited

    def collector(self, exchange: Exchange) -> TextCollector | None:
        return TextCollector() if self.wanted(exchange) else None

    def whole(self, exchange: Exchange, status: int, answer: Any, model: str | None) -> None:
        if self.wanted(exchange):
            self._offer(exchange, status, answer_text(exchange.route.operation, answer), model, cut=False)

    def streamed(self, exchange: Exchange, collector: TextCollector, model: str | None, ended: str) -> None:
        if self.wanted(exchange):
            self._offer(exchange, 200, collector.text(), model, cut=collector.cut, ended=ended)

    def _offer(self, exchange: Exchange, status: int, completion: str, model: str | None, *, cut: bool,
               ended: str = "") -> None:
        assert self._trail is not None
        kind = _KINDS.get(exchange.route.operation, "")
        headers = exchange.request.headers
        record: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._clock.now())),
            "request_id": headers.get("x-ms-client-request-id") or headers.get("x-request-id") or str(uuid.uuid4()),
            "consumer": exchange.consumer.id,
            "team": exchange.consumer.team or "",
            "end_user": exchange.end_user or exchange.user_id or "",
            "deployment": exchange.deployment,
            "model": model or "",
            "operation": exchange.route.operation.operation_id,
            "policy": exchange.screened.policy.name,
            "status": status,
            "stream": exchange.shape.stream,
            "prompt": [{"kind": p.kind, "text": p.text} for p in texts.pieces(kind, exchange.checked.body)],
            "completion": completion,
        }
        if exchange.screened.redactions:
            record["redacted"] = dict(exchange.screened.redactions)
        if cut:
            record["completion_cut"] = True
        if ended:
            record["ended"] = ended
        self._trail.offer(record)
