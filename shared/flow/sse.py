"""Server-sent events as the OpenAI and Azure OpenAI streams frame them: whole events out of a byte stream, and the
data they carry. Shared by the chat/completions relay (shared/flow/usage.py) and the Responses relay
(shared/flow/responses.py), which differ in what they read from an event, not in how they find it.
"""

from __future__ import annotations

from typing import Any

import orjson

# Streams keep at most this many bytes of events not yet counted, then count them and let them go: a stream's memory
# stays bounded by this plus the current event however long it runs (n=128 choices kept every event: ~220 MB for one
# request), and a stream shorter than this whose backend reports usage is never parsed at all.
PENDING_LIMIT_BYTES = 64 * 1024


def split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete events (each with its terminating blank line) and the incomplete rest. Expects `\\n` line ends: the
    relays turn `\\r\\n` into `\\n` before they split."""
    events: list[bytes] = []
    start = 0
    while (end := buffer.find(b"\n\n", start)) >= 0:
        events.append(buffer[start : end + 2])
        start = end + 2
    return events, buffer[start:]


class Framer:
    """Cuts a stream's bytes, as they arrive in pieces of any size, into whole events."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The events this piece completes, with `\r\n` line ends made `\n` (some servers send them)."""
        buffer = self._rest + data if self._rest else data
        if b"\r\n" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events, self._rest = split_events(buffer)
        return events

    def may_hold(self, data: bytes, marker: bytes) -> bool:
        """`marker` is in this piece, or begins in the incomplete event before it."""
        return marker in (self._rest[-len(marker):] + data if self._rest else data)

    def flush(self) -> bytes:
        """Whatever incomplete event is left when the stream closes."""
        rest, self._rest = self._rest, b""
        return rest


def event_data(event: bytes) -> bytes | None:
    """The event's data: its `data:` lines joined by newlines, or None when it has none."""
    data = [line[5:].lstrip(b" ") for line in event.replace(b"\r\n", b"\n").split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(data) if data else None


def event_object(event: bytes) -> dict[str, Any] | None:
    """The event's data as a JSON object, or None (no data, `[DONE]`, not JSON, not an object)."""
    data = event_data(event)
    if data is None:
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None
