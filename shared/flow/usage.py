"""Token usage as the backend reported it: from a JSON body, or from the usage chunk of an SSE stream."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson
import tiktoken

from shared.flow import sse
from shared.flow.tokens import COMPRESSED_AUDIO_BYTES_PER_TOKEN, base64_bytes, count_text, get_encoding
from shared.records.usage import TOOL_ITEMS, TokenUsage


class ToolCalls:
    """Counts the built-in tool calls among output items, each item once (a stream shows an item when it is added and
    again when it is done)."""

    __slots__ = ("_seen", "_containers", "_counts")

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._containers: set[str] = set()
        self._counts: dict[str, int] = {}

    def add(self, item: Any) -> None:
        if not isinstance(item, Mapping):
            return
        tool = TOOL_ITEMS.get(item.get("type"))  # type: ignore[arg-type]
        if tool is None:
            return
        item_id = item.get("id")
        if isinstance(item_id, str):
            if item_id in self._seen:
                return
            self._seen.add(item_id)
        if tool == "code_interpreter":
            container = item.get("container_id")
            key = container if isinstance(container, str) else f"item:{item_id}"
            if key in self._containers:
                return
            self._containers.add(key)
        self._counts[tool] = self._counts.get(tool, 0) + 1

    def counts(self) -> tuple[tuple[str, int], ...]:
        return tuple(sorted(self._counts.items()))


def tool_calls(output: Any) -> tuple[tuple[str, int], ...]:
    """The built-in tool calls of a Responses object's `output`."""
    if not isinstance(output, list):
        return ()
    calls = ToolCalls()
    for item in output:
        calls.add(item)
    return calls.counts()


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_from_object(obj: Any) -> TokenUsage | None:
    """The `usage` member of a completion, chat completion, embeddings or Responses API object, if it has one."""
    if type(obj) is not dict and not isinstance(obj, Mapping):
        return None
    usage = obj.get("usage")
    if type(usage) is not dict and not isinstance(usage, Mapping):
        return None
    if "input_tokens" in usage or "output_tokens" in usage:
        return _responses_usage(usage, tool_calls(obj.get("output")))
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    total = _int(usage.get("total_tokens")) or prompt + completion
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    cached = _int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, Mapping) else 0
    reasoning = _int(completion_details.get("reasoning_tokens")) if isinstance(completion_details, Mapping) else 0
    return TokenUsage(prompt, completion, total, cached, reasoning)


def _responses_usage(usage: Mapping[str, Any], tools: tuple[tuple[str, int], ...] = ()) -> TokenUsage:
    """The Responses API names the same figures input/output tokens."""
    prompt = _int(usage.get("input_tokens"))
    completion = _int(usage.get("output_tokens"))
    total = _int(usage.get("total_tokens")) or prompt + completion
    input_details = usage.get("input_tokens_details")
    output_details = usage.get("output_tokens_details")
    cached = _int(input_details.get("cached_tokens")) if isinstance(input_details, Mapping) else 0
    reasoning = _int(output_details.get("reasoning_tokens")) if isinstance(output_details, Mapping) else 0
    return TokenUsage(prompt, completion, total, cached, reasoning, tools=tools)


def usage_from_body(raw: bytes) -> tuple[TokenUsage | None, str | None]:
    """(usage, model) from a non-streaming response body; (None, None) when it is not JSON or has none."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, None
    model = obj.get("model") if isinstance(obj, dict) else None
    return usage_from_object(obj), model if isinstance(model, str) else None


class SseRelay:
    """Passes an OpenAI SSE stream through event by event, picking out the usage chunk.

    The gateway asks the backend for usage where the api-version allows it; a client that did not ask for it must not
    see the extra chunk. A client that asked for it gets one even when the backend sends none (older api-versions,
    some OpenAI-compatible servers): computed by the gateway, and marked so in the books (`reported=False`).
    What was delivered is counted as it goes (content, refusals, reasoning, tool-call names and arguments, audio), so
    a stream can be charged while it runs and when it breaks off, with memory bounded by sse.PENDING_LIMIT_BYTES.
    """

    def __init__(
        self,
        forward_usage_chunk: bool,
        encoding: tiktoken.Encoding | None = None,
        prompt_tokens: Callable[[], int] | None = None,
    ) -> None:
        self._forward_usage = forward_usage_chunk
        self._encoding = encoding
        self._prompt_tokens = prompt_tokens
        self._framer = sse.Framer()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._counted = 0
        self._last_event = b""
        self.usage: TokenUsage | None = None
        self.model: str | None = None
        self.done = False
        self.synthesized = False
        self.events_forwarded = 0

    def feed(self, data: bytes) -> bytes:
        """Bytes to send on to the client for this piece of the backend's stream."""
        events = self._framer.feed(data)
        if not events:
            return b""
        out: list[bytes] = []
        for event in events:
            if b'"usage":' in event and not event.endswith(b'"usage":null}\n\n') and self._take_usage(event):
                if self._forward_usage:
                    out.append(event)
                continue
            if b"[DONE]" in event and _is_end(event):
                self.done = True
                # The client asked for usage and the backend sent none: the gateway's own count, before [DONE].
                if self.owes_usage:
                    out.append(self._usage_chunk())
                event = END  # as the SDKs expect it, whatever spelling the backend used (`data:[DONE]`, a bare `[DONE]`)
            else:
                self._pending.append(event)
                self._pending_bytes += len(event)
                self._last_event = event
                if self._pending_bytes > sse.PENDING_LIMIT_BYTES:
                    self._count_pending()
            out.append(event)
        self.events_forwarded += len(out)
        return b"".join(out)

    def would_count_usage(self, data: bytes) -> bool:
        """Feeding `data` may end the stream with a usage chunk of the gateway's own (which asks for the prompt)."""
        return self.owes_usage and self._framer.may_hold(data, b"[DONE]")

    @property
    def owes_usage(self) -> bool:
        """The client asked for the usage chunk and none has been sent yet."""
        return self._forward_usage and self.usage is None

    def missing_usage(self) -> bytes:
        """The usage chunk the client asked for, counted by the gateway, if the backend sent none (b"" otherwise):
        sent before the stream's end, whatever ends it (its `[DONE]`, the backend closing without one, a break)."""
        return self._usage_chunk() if self.owes_usage else b""

    def flush(self) -> bytes:
        """What is left to send when the backend closes the stream: a last event that lacks only its blank line (some
        servers end with a bare `[DONE]`), completed; a cut-off one is dropped (half a JSON object would break the
        client's parser, and the error event after it)."""
        rest = self._framer.flush().rstrip(b"\n")
        if not rest or not (_is_end(rest) or sse.event_object(rest) is not None):
            return b""
        return self.feed(rest + b"\n\n")

    def _take_usage(self, event: bytes) -> bool:
        """Record the usage of a usage-bearing chunk; True when the chunk carries nothing else (empty choices)."""
        obj = sse.event_object(event)
        if obj is None:
            return False
        usage = usage_from_object(obj)
        if usage is None:
            return False
        self.usage = usage
        model = obj.get("model")
        if isinstance(model, str) and model:
            self.model = model
        choices = obj.get("choices")
        if choices:
            self._count_event(obj)  # usage on every chunk (some servers): the chunk's own text is delivered too
        return not choices

    def delivered_completion_tokens(self, encoding: tiktoken.Encoding | None = None) -> int:
        """Completion tokens forwarded so far (content, refusals, reasoning, tool calls, audio), as the gateway counts."""
        if encoding is not None and self._encoding is None:
            self._encoding = encoding
        self._count_pending()
        return self._counted

    def counted_usage(self, prompt: int) -> TokenUsage:
        completion = self.delivered_completion_tokens()
        return TokenUsage(prompt, completion, prompt + completion, reported=False)

    def _count_pending(self) -> None:
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        for event in pending:
            obj = sse.event_object(event)
            if obj is not None:
                self._count_event(obj)

    def _count_event(self, obj: Mapping[str, Any]) -> None:
        if self.model is None and isinstance(obj.get("model"), str) and obj["model"]:
            self.model = obj["model"]
        encoding = self._encoding or get_encoding()
        self._encoding = encoding
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._counted += _delta_tokens(delta, encoding)
            elif isinstance(choice.get("text"), str):
                self._counted += count_text(choice["text"], encoding)

    def _usage_chunk(self) -> bytes:
        prompt = self._prompt_tokens() if self._prompt_tokens is not None else 0
        usage = self.counted_usage(prompt)
        self.usage = usage
        self.synthesized = True
        last = sse.event_object(self._last_event) or {}
        chunk = {
            "id": last.get("id", ""),
            "object": last.get("object", "chat.completion.chunk"),
            "created": last.get("created", 0),
            "model": last.get("model", self.model or ""),
            "choices": [],
            "usage": {"prompt_tokens": usage.prompt, "completion_tokens": usage.completion, "total_tokens": usage.total},
        }
        if "system_fingerprint" in last:
            chunk["system_fingerprint"] = last["system_fingerprint"]
        return b"data: " + orjson.dumps(chunk) + b"\n\n"


END = b"data: [DONE]\n\n"


def _is_end(event: bytes) -> bool:
    """`data: [DONE]`, `data:[DONE]`, or `[DONE]` alone (no field name, as Microsoft's aoai-api-simulator sends it)."""
    return sse.event_data(event) == b"[DONE]" or event.strip() == b"[DONE]"


def _delta_tokens(delta: Mapping[str, Any], encoding: tiktoken.Encoding) -> int:
    """Tokens of one streamed delta: everything the backend bills as completion, visible or not."""
    total = 0
    for key in ("content", "refusal", "reasoning_content", "reasoning"):
        value = delta.get(key)
        if isinstance(value, str) and value:
            total += count_text(value, encoding)
    calls = list(delta.get("tool_calls") or ())
    if isinstance(delta.get("function_call"), dict):
        calls.append({"function": delta["function_call"]})
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            for key in ("name", "arguments"):
                if isinstance(function.get(key), str) and function[key]:
                    total += count_text(function[key], encoding)
    audio = delta.get("audio")
    if isinstance(audio, dict):
        if isinstance(audio.get("transcript"), str) and audio["transcript"]:
            total += count_text(audio["transcript"], encoding)
        if isinstance(audio.get("data"), str):
            # Billed by duration: bounded as input audio of a compressed format is (shared/flow/tokens.py).
            total += -(-base64_bytes(audio["data"]) // COMPRESSED_AUDIO_BYTES_PER_TOKEN)
    return total
