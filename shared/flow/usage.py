"""Token usage as the backend reported it: from a JSON body, or from the usage chunk of an SSE stream."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import tiktoken

from shared.flow.tokens import count_text


@dataclass(frozen=True, slots=True)
class TokenUsage:
    prompt: int
    completion: int
    total: int
    cached: int = 0
    reasoning: int = 0
    # False when the backend never reported usage and the figures were counted by the gateway (a cut stream).
    reported: bool = True


def combined(first: TokenUsage | None, second: TokenUsage | None) -> TokenUsage | None:
    """The sum of two usages (either may be None); reported only if both were."""
    if first is None or second is None:
        return first if second is None else second
    return TokenUsage(
        first.prompt + second.prompt,
        first.completion + second.completion,
        first.total + second.total,
        first.cached + second.cached,
        first.reasoning + second.reasoning,
        first.reported and second.reported,
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_from_object(obj: Any) -> TokenUsage | None:
    """The `usage` member of a completion, chat completion, embeddings or Responses API object, if it has one."""
    if not isinstance(obj, Mapping):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, Mapping):
        return None
    if "input_tokens" in usage or "output_tokens" in usage:
        return _responses_usage(usage)
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    total = _int(usage.get("total_tokens")) or prompt + completion
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    cached = _int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, Mapping) else 0
    reasoning = _int(completion_details.get("reasoning_tokens")) if isinstance(completion_details, Mapping) else 0
    return TokenUsage(prompt, completion, total, cached, reasoning)


def _responses_usage(usage: Mapping[str, Any]) -> TokenUsage:
    """The Responses API names the same figures input/output tokens."""
    prompt = _int(usage.get("input_tokens"))
    completion = _int(usage.get("output_tokens"))
    total = _int(usage.get("total_tokens")) or prompt + completion
    input_details = usage.get("input_tokens_details")
    output_details = usage.get("output_tokens_details")
    cached = _int(input_details.get("cached_tokens")) if isinstance(input_details, Mapping) else 0
    reasoning = _int(output_details.get("reasoning_tokens")) if isinstance(output_details, Mapping) else 0
    return TokenUsage(prompt, completion, total, cached, reasoning)


def usage_from_body(raw: bytes) -> tuple[TokenUsage | None, str | None]:
    """(usage, model) from a non-streaming response body; (None, None) when it is not JSON or has none."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, None
    model = obj.get("model") if isinstance(obj, dict) else None
    return usage_from_object(obj), model if isinstance(model, str) else None


def _split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete SSE events (each with its terminating blank line) and the incomplete rest."""
    events: list[bytes] = []
    start = 0
    while True:
        end = buffer.find(b"\n\n", start)
        if end < 0:
            break
        events.append(buffer[start : end + 2])
        start = end + 2
    return events, buffer[start:]


def _event_data(event: bytes) -> bytes | None:
    data = [line[5:].lstrip(b" ") for line in event.replace(b"\r\n", b"\n").split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(data) if data else None


class SseRelay:
    """Passes an OpenAI SSE stream through event by event, picking out the usage chunk.

    The gateway always asks the backend for usage; a client that did not ask for it must not see the extra chunk.
    Events are kept (as references, not parsed) so that, if the stream breaks before usage arrives, the tokens that
    did reach the client can be counted.
    """

    def __init__(self, forward_usage_chunk: bool) -> None:
        self._forward_usage = forward_usage_chunk
        self._rest = b""
        self._events: list[bytes] = []
        self.usage: TokenUsage | None = None
        self.model: str | None = None
        self.done = False
        self.events_forwarded = 0

    def feed(self, data: bytes) -> bytes:
        """Bytes to send on to the client for this piece of the backend's stream."""
        buffer = self._rest + data if self._rest else data
        if b"\r\n" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events, self._rest = _split_events(buffer)
        if not events:
            return b""
        out: list[bytes] = []
        for event in events:
            if b'"usage":' in event and not event.endswith(b'"usage":null}\n\n') and self._take_usage(event):
                if self._forward_usage:
                    out.append(event)
                continue
            if event.startswith(b"data: [DONE]"):
                self.done = True
            else:
                self._events.append(event)
            out.append(event)
        self.events_forwarded += len(out)
        return b"".join(out)

    def flush(self) -> bytes:
        """Whatever incomplete event is left when the backend closes the stream."""
        rest, self._rest = self._rest, b""
        return rest

    def _take_usage(self, event: bytes) -> bool:
        """Record the usage of a usage-bearing chunk; True when the chunk carries nothing else (empty choices)."""
        data = _event_data(event)
        if data is None:
            return False
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
        usage = usage_from_object(obj)
        if usage is None:
            return False
        self.usage = usage
        model = obj.get("model")
        if isinstance(model, str) and model:
            self.model = model
        choices = obj.get("choices")
        return not choices

    def delivered_completion_tokens(self, encoding: tiktoken.Encoding) -> int:
        """Count the completion text (content, refusals, tool-call arguments) forwarded so far."""
        pieces: list[str] = []
        for event in self._events:
            data = _event_data(event)
            if data is None:
                continue
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            if self.model is None and isinstance(obj.get("model"), str) and obj["model"]:
                self.model = obj["model"]
            for choice in obj.get("choices") or ():
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    for key in ("content", "refusal"):
                        if isinstance(delta.get(key), str):
                            pieces.append(delta[key])
                    for call in delta.get("tool_calls") or ():
                        function = call.get("function") if isinstance(call, dict) else None
                        if isinstance(function, dict):
                            for key in ("name", "arguments"):
                                if isinstance(function.get(key), str):
                                    pieces.append(function[key])
                elif isinstance(choice.get("text"), str):
                    pieces.append(choice["text"])
        return count_text("".join(pieces), encoding) if pieces else 0
