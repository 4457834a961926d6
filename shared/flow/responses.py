"""The Responses API: body checks, the pre-flight estimate of its input shapes, the backend URL, and its event stream.

Pure: values in, values out. The request flow asks this module what a Responses body means; the state of stored
responses (which region holds which id) lives in shared/storage/response_table.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson
import tiktoken

from shared.config import Backend
from shared.edge.errors import bad_request
from shared.flow import sse
from shared.flow.backend_api import api_of
from shared.flow.tokens import (
    REPLY_PRIMING,
    TOKENS_PER_MESSAGE,
    Measure,
    audio_tokens,
    count_text,
    count_tools,
    counted_image_tokens,
    file_tokens,
    get_encoding,
    image_detail,
)
from shared.flow.usage import ToolCalls, usage_from_object
from shared.records.usage import TokenUsage

# Response ids travel in URL paths and become Table Storage keys: letters, digits, '_' and '-' only (Azure's look like
# resp_68af4030592c81938ec0a5fbab4a3e9f05438e46b5f69a3b).
RESPONSE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,199}")  # fullmatch: `$` would accept a trailing newline

TERMINAL_EVENTS = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})
# A built-in tool call is billed once it runs: seen when its item is added, so a stream cut before its end still
# reports it.
_ITEM_EVENTS = frozenset({b"response.output_item.added", b"response.output_item.done"})
_DELTA_EVENTS = frozenset({
    b"response.output_text.delta", b"response.refusal.delta", b"response.function_call_arguments.delta",
    b"response.reasoning_text.delta", b"response.reasoning_summary_text.delta",
    b"response.custom_tool_call_input.delta", b"response.code_interpreter_call_code.delta",
})


@dataclass(frozen=True, slots=True)
class CreateShape:
    """What the gateway relies on in a `POST /responses` body, checked once."""

    max_output_tokens: int | None
    stream: bool
    store: bool
    background: bool
    previous_response_id: str | None


def _optional_bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean.", param=name, code="invalid_type")
    return value


def _check_parts(parts: Any, where: str) -> None:
    if isinstance(parts, str):
        return
    if not isinstance(parts, list):
        raise bad_request(f"'{where}' must be a string or an array of content parts.", param=where, code="invalid_type")
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad_request(
                f"'{where}[{j}]' must be an object with a string 'type'.", param=f"{where}[{j}]", code="invalid_type"
            )


def _check_input(value: Any) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise bad_request("'input' must be a string or an array of input items.", param="input", code="invalid_type")
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"'{where}' must be an object.", param=where, code="invalid_type")
        kind = item.get("type")
        role = item.get("role")
        if kind is None and role is None:
            raise bad_request(f"'{where}' needs a 'type' or a 'role'.", param=where, code="invalid_type")
        if (kind is not None and not isinstance(kind, str)) or (role is not None and not isinstance(role, str)):
            raise bad_request(f"'{where}': 'type' and 'role' must be strings.", param=where, code="invalid_type")
        if kind in (None, "message"):
            if role is None:
                raise bad_request(f"'{where}' is a message without a 'role'.", param=f"{where}.role", code="invalid_type")
            _check_parts(item.get("content"), f"{where}.content")


def check_create(body: Mapping[str, Any]) -> CreateShape:
    """Validate the fields of a Responses create body that the gateway relies on; the rest is the backend's business."""
    previous = body.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not RESPONSE_ID_RE.fullmatch(previous)):
        raise bad_request(
            "'previous_response_id' must be a response id.", param="previous_response_id", code="invalid_value"
        )
    if body.get("conversation") is not None:
        # Conversations are stored state too, held by one region, and the gateway does not route the Conversations API:
        # sending one to whichever region is free would fail there with a confusing "not found".
        raise bad_request(
            "'conversation' is not supported through this gateway; continue a conversation with "
            "'previous_response_id'.",
            param="conversation",
            code="unsupported_parameter",
        )
    value = body.get("input")
    if value is None:
        if previous is None and body.get("prompt") is None:
            raise bad_request("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    else:
        _check_input(value)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request("'instructions' must be a string.", param="instructions", code="invalid_type")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad_request("'tools' must be an array.", param="tools", code="invalid_type")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
                raise bad_request(
                    f"'tools[{i}]' must be an object with a string 'type'.", param=f"tools[{i}]", code="invalid_type"
                )
    max_output = body.get("max_output_tokens")
    if max_output is not None and (not isinstance(max_output, int) or isinstance(max_output, bool) or max_output < 1):
        raise bad_request("'max_output_tokens' must be a positive integer.", param="max_output_tokens", code="invalid_type")
    stream = _optional_bool(body, "stream", False)
    store = _optional_bool(body, "store", True)
    background = _optional_bool(body, "background", False)
    if background and not store:
        raise bad_request(
            "A background response must be stored: 'background' needs 'store' true.", param="store", code="invalid_value"
        )
    return CreateShape(max_output, stream, store, background, previous)


# ---- the pre-flight estimate ----------------------------------------------------------------------------------------


def _part_tokens(part: Mapping[str, Any], enc: Measure) -> int:
    # Images, files and audio are estimated as in a chat body (shared/flow/tokens.py): inline file data is not text
    # the tokenizer should walk (a megabyte of base64 is not a million tokens of prose).
    kind = part.get("type")
    if kind == "input_image":
        return counted_image_tokens(image_detail(part) or "auto")
    if kind == "input_file":
        return file_tokens(part, enc)
    if kind == "input_audio":
        return audio_tokens(part.get("input_audio"))
    for key in ("text", "refusal"):
        if isinstance(part.get(key), str):
            return count_text(part[key], enc)
    return 0


def _content_tokens(content: Any, enc: Measure) -> int:
    if isinstance(content, str):
        return count_text(content, enc)
    if isinstance(content, list):
        return sum(_part_tokens(p, enc) for p in content if isinstance(p, Mapping))
    return 0


def _item_tokens(item: Mapping[str, Any], enc: Measure) -> int:
    kind = item.get("type")
    if kind in (None, "message"):
        return TOKENS_PER_MESSAGE + count_text(str(item.get("role", "")), enc) + _content_tokens(item.get("content"), enc)
    if kind == "function_call":
        return TOKENS_PER_MESSAGE + count_text(str(item.get("name", "")), enc) + count_text(str(item.get("arguments", "")), enc)
    if kind in ("function_call_output", "custom_tool_call_output"):
        return TOKENS_PER_MESSAGE + _content_tokens(item.get("output"), enc)
    if kind == "reasoning":
        summary = item.get("summary")
        return _content_tokens(summary, enc) if isinstance(summary, list) else 0
    if kind == "item_reference":
        return 0  # an item of a stored response: its tokens come with the context of that response
    # Other items (tool calls of built-in tools, computer-use output, ...): their JSON is what the model reads.
    return TOKENS_PER_MESSAGE + count_text(orjson.dumps(item).decode(), enc)


def _response_tools(tools: Any) -> list[Any]:
    """Responses function tools are flat ({type, name, parameters}); chat nests them under 'function'."""
    if not isinstance(tools, list):
        return []
    converted: list[Any] = []
    for tool in tools:
        if isinstance(tool, Mapping) and tool.get("type") == "function" and "function" not in tool:
            converted.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}})
        else:
            converted.append(tool)
    return converted


def count_input(body: Mapping[str, Any], enc: Measure, context_tokens: int = 0) -> int:
    """Input tokens of a Responses create body, estimated for admission: instructions, the input (a string, or items
    with text, images and files), tool definitions, plus `context_tokens` that continuing a stored response adds
    (its own input and output, which the backend prepends). The backend's usage is what gets charged in the end."""
    total = REPLY_PRIMING + context_tokens
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        total += TOKENS_PER_MESSAGE + count_text(instructions, enc)
    value = body.get("input")
    if isinstance(value, str):
        total += TOKENS_PER_MESSAGE + count_text(value, enc)
    elif isinstance(value, list):
        total += sum(_item_tokens(item, enc) for item in value if isinstance(item, Mapping))
    total += count_tools(_response_tools(body.get("tools")), enc)
    return total


# ---- the backend request ----------------------------------------------------------------------------------------------


def backend_url(backend: Backend, preview_path: bool, api_version: str | None, tail: str = "") -> str:
    """Where a Responses call goes on `backend` (shared/flow/backend_api.py knows each kind of API)."""
    return api_of(backend).responses_url(backend, preview_path, api_version, tail)


# ---- what came back ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Created:
    """A response a backend has started (and, if stored, now holds)."""

    response_id: str
    model: str | None
    store: bool
    background: bool
    # Output items a later request may name and that live only where this response was made: every item of a stored
    # response (an `item_reference` reads it there), and the encrypted reasoning of an unstored one (only the resource
    # that encrypted it can read it).
    items: tuple[str, ...] = ()


# At most this many output items of one response are recorded (each is a row): a longer output's later items cannot be
# referenced through the gateway.
MAX_RECORDED_ITEMS = 32


def _pinned_items(output: Any, store: bool) -> tuple[str, ...]:
    if not isinstance(output, list):
        return ()
    found: list[str] = []
    for item in output:
        if not isinstance(item, Mapping):
            continue
        item_id = item.get("id")
        if not isinstance(item_id, str) or not RESPONSE_ID_RE.fullmatch(item_id):
            continue
        if store or (item.get("type") == "reasoning" and item.get("encrypted_content")):
            found.append(item_id)
            if len(found) == MAX_RECORDED_ITEMS:
                break
    return tuple(found)


def created_from_object(obj: Any) -> Created | None:
    """The id and flags of a Response object (a create's body, or the `response` of a stream's first event)."""
    if not isinstance(obj, Mapping) or obj.get("object", "response") != "response":
        return None
    response_id = obj.get("id")
    if not isinstance(response_id, str) or not RESPONSE_ID_RE.fullmatch(response_id):
        return None
    model = obj.get("model")
    store = obj.get("store") is not False
    return Created(
        response_id,
        model if isinstance(model, str) and model else None,
        store,
        obj.get("background") is True,
        _pinned_items(obj.get("output"), store),
    )


# A request may name at most this many stored items (each is a read of the responses table).
MAX_REFERENCES = 32


@dataclass(frozen=True, slots=True)
class References:
    """The items of earlier responses a create body names: `stored` must be this consumer's (an `item_reference`, or a
    reasoning item the service would look up by id), `encrypted` is the id of the last encrypted reasoning item (it
    can only be read where it was made)."""

    stored: tuple[str, ...] = ()
    encrypted: str | None = None


def _lenient(obj: Mapping[str, Any], name: str) -> Any:
    """A member as a lenient deserializer reads it (case, '_' and '-' ignored): the gates read names that way too."""
    for key, value in obj.items():
        if isinstance(key, str) and key.lower().replace("_", "").replace("-", "") == name:
            return value
    return None


def references(body: Mapping[str, Any]) -> References:
    """The earlier items a Responses create body names, in its `input` (400 past MAX_REFERENCES)."""
    items = body.get("input")
    if not isinstance(items, list):
        return References()
    stored: list[str] = []
    encrypted: str | None = None
    for item in items:
        if not isinstance(item, Mapping):
            continue
        kind = _lenient(item, "type")
        kind = kind.lower().replace("_", "").replace("-", "") if isinstance(kind, str) else ""
        item_id = _lenient(item, "id")
        if kind == "itemreference":
            stored.append(item_id if isinstance(item_id, str) else "")
        elif kind == "reasoning" and isinstance(item_id, str):
            if _lenient(item, "encryptedcontent"):
                encrypted = item_id
            else:
                stored.append(item_id)  # no content of its own: the service reads it from storage by its id
    distinct = tuple(dict.fromkeys(stored))
    if len(distinct) > MAX_REFERENCES:
        raise bad_request(
            f"At most {MAX_REFERENCES} stored items may be referenced in one request through this gateway.",
            param="input", code="too_many_item_references",
        )
    return References(distinct, encrypted)


def context_tokens(usage: TokenUsage | None) -> int:
    """What continuing a response adds to the next request's input: its input and its output."""
    return 0 if usage is None else usage.prompt + usage.completion


def _event_type(event: bytes) -> bytes | None:
    """The event's type from its `event:` line (Azure and OpenAI send one), else from the data's `type`."""
    for line in event.split(b"\n"):
        if line.startswith(b"event:"):
            return line[6:].strip()
    obj = sse.event_object(event)
    kind = obj.get("type") if obj is not None else None
    return kind.encode() if isinstance(kind, str) else None


class ResponsesRelay:
    """Passes a Responses event stream through event by event, reading only what the gateway needs.

    Only `response.created` (the id, to record where the response is stored) and the terminal event (usage) are parsed;
    delta events are kept as bytes so that, if the stream breaks before its end, the output that did reach the client
    can be counted; past sse.PENDING_LIMIT_BYTES they are counted and let go, so a stream's memory stays bounded by that
    plus the current event however long it runs. The stream has no `[DONE]`: it ends with `response.completed`, `response.incomplete` or
    `response.failed`.
    """

    def __init__(self, encoding: tiktoken.Encoding | None = None) -> None:
        self._encoding = encoding
        self._framer = sse.Framer()
        self._deltas: list[bytes] = []
        self._deltas_bytes = 0
        self._counted = 0
        self.usage: TokenUsage | None = None
        self.model: str | None = None
        self.created: Created | None = None
        self.created_pending = False  # set when response.created passed; the flow records it before forwarding
        self.context_recorded = False  # the finished response (usage, items) recorded before its end is forwarded
        self.done = False
        self.final: Mapping[str, Any] | None = None  # the Response object of the terminal event
        self.status: str | None = None
        self.events_forwarded = 0
        self.tools = ToolCalls()

    def feed(self, data: bytes) -> bytes:
        """Bytes to send on to the client for this piece of the backend's stream (whole events only)."""
        events = self._framer.feed(data)
        for event in events:
            kind = _event_type(event)
            if kind in _DELTA_EVENTS:
                self._deltas.append(event)
                self._deltas_bytes += len(event)
                if self._deltas_bytes > sse.PENDING_LIMIT_BYTES:
                    self._count_deltas()
            elif kind == b"response.created":
                self._take_created(event)
            elif kind in TERMINAL_EVENTS:
                self._take_terminal(event)
            elif kind in _ITEM_EVENTS and b"_call" in event:
                obj = sse.event_object(event)
                if obj is not None:
                    self.tools.add(obj.get("item"))
        self.events_forwarded += len(events)
        return b"".join(events)

    def flush(self) -> bytes:
        """Whatever incomplete event is left when the backend closes the stream."""
        return self._framer.flush()

    def _take_created(self, event: bytes) -> None:
        obj = sse.event_object(event)
        created = created_from_object(obj.get("response")) if obj is not None else None
        if created is not None:
            self.created = created
            self.created_pending = True
            self.model = self.model or created.model

    def _take_terminal(self, event: bytes) -> None:
        obj = sse.event_object(event)
        response = obj.get("response") if obj is not None else None
        if not isinstance(response, Mapping):
            return
        self.done = True
        self.final = response
        status = response.get("status")
        self.status = status if isinstance(status, str) else None
        finished = created_from_object(response)
        if finished is not None and finished.items and self.created is not None:
            self.created = replace(self.created, items=finished.items)
        elif finished is not None and self.created is None:
            self.created, self.created_pending = finished, True
        usage = usage_from_object(response)
        output = response.get("output")
        for item in output if isinstance(output, list) else ():
            self.tools.add(item)
        self.usage = None if usage is None else replace(usage, tools=self.tools.counts())
        model = response.get("model")
        if isinstance(model, str) and model:
            self.model = model

    def delivered_completion_tokens(self, encoding: tiktoken.Encoding | None = None) -> int:
        """Count the output (text, refusals, tool-call arguments, reasoning text) forwarded so far."""
        if encoding is not None and self._encoding is None:
            self._encoding = encoding
        self._count_deltas()
        return self._counted

    def _count_deltas(self) -> None:
        # The deltas of one batch are counted as one text: a word split across two deltas is one token, as the backend
        # counted it (batches end only every PENDING_LIMIT_BYTES, so a boundary costs at most a token per 64 KiB).
        deltas, self._deltas, self._deltas_bytes = self._deltas, [], 0
        pieces: list[str] = []
        for event in deltas:
            obj = sse.event_object(event)
            if obj is not None and isinstance(obj.get("delta"), str):
                pieces.append(obj["delta"])
        if pieces:
            self._encoding = self._encoding or get_encoding()
            self._counted += count_text("".join(pieces), self._encoding)

    def interrupted(self, message: str) -> bytes:
        """The event that tells the client the stream ended early. Typed as a Responses `error` event, and with an
        `error` object too, so that the official SDKs raise it as an APIError instead of passing it on as an event."""
        body = {
            "type": "error",
            "sequence_number": self.events_forwarded,
            "code": "stream_interrupted",
            "message": message,
            "param": None,
            "error": {"message": message, "type": "server_error", "param": None, "code": "stream_interrupted"},
        }
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"
