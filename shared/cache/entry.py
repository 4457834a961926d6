"""A cached answer and its stored form: one line of JSON (who it belongs to, when it was stored, what it cost the
backend) and the answer's body as the backend sent it, byte for byte."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from shared.records.usage import TokenUsage

FORMAT = 1


class BadEntry(ValueError):
    """Stored bytes that are not an entry of this format: read as a miss."""


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    scope: str
    key: str
    stored_at: float  # wall-clock seconds: entries are shared by instances
    usage: TokenUsage  # what the backend billed for the answer: the tokens each hit saves
    model: str
    body: bytes  # the whole JSON answer (a streamed answer is kept in this form too, and replayed as chunks)

    @property
    def size(self) -> int:
        return len(self.body) + len(self.scope) + len(self.model) + 256

    def fresh(self, now: float, ttl_s: float) -> bool:
        return now - self.stored_at < ttl_s


def encode(answer: CachedAnswer) -> bytes:
    usage = answer.usage
    head = {
        "format": FORMAT, "scope": answer.scope, "key": answer.key, "stored_at": answer.stored_at,
        "model": answer.model,
        "usage": [usage.prompt, usage.completion, usage.total, usage.cached, usage.reasoning],
    }
    return orjson.dumps(head) + b"\n" + answer.body


def decode(data: bytes) -> CachedAnswer:
    head_bytes, newline, body = data.partition(b"\n")
    try:
        head = orjson.loads(head_bytes)
    except orjson.JSONDecodeError:
        raise BadEntry("head is not JSON") from None
    if not newline or not isinstance(head, dict) or head.get("format") != FORMAT:
        raise BadEntry("not an entry of this format")
    scope, key, stored_at, model, usage = (head.get(n) for n in ("scope", "key", "stored_at", "model", "usage"))
    if not (isinstance(scope, str) and isinstance(key, str) and isinstance(model, str)):
        raise BadEntry("scope, key, model")
    if isinstance(stored_at, bool) or not isinstance(stored_at, (int, float)):
        raise BadEntry("stored_at")
    if not (isinstance(usage, list) and len(usage) == 5
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in usage)):
        raise BadEntry("usage")
    return CachedAnswer(scope, key, float(stored_at), TokenUsage(*usage), model, body)
