"""The text a model would see, as the safety services take it. Pure: values in, values out.

What is a *prompt* and what is a *document* follows Prompt Shields: the user's own words (user messages, a Responses
input string, a completion prompt, an embedding input) are prompts; what the application brings in from elsewhere
(tool and function results) are documents, checked for injected instructions. System and developer messages and
Responses `instructions` are the application's: analysed for harm categories and blocklists, never shielded as a
user's attack. Every text is cut to the services' documented limits (10,000 characters a Content Safety call; 5,120 a
Language document)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

ANALYZE_CHARS = 10_000  # text:analyze, one text
SHIELD_CHARS = 10_000  # text:shieldPrompt: the user prompt, and the documents of one call together
SHIELD_DOCUMENTS = 5  # documents in one text:shieldPrompt call
LANGUAGE_CHARS = 5_120  # one PiiEntityRecognition document (synchronous calls)
LANGUAGE_DOCUMENTS = 5  # documents in one synchronous call
MAX_CHARS = 200_000  # text checked per request at most: beyond it the request is refused, never forwarded unchecked

PROMPT = "prompt"
DOCUMENT = "document"
SYSTEM = "system"


@dataclass(frozen=True, slots=True)
class Piece:
    kind: str  # prompt | document | system
    text: str


def pieces(operation: str, body: dict[str, Any]) -> list[Piece]:
    """Every text of a request body with its kind, in order; empty strings left out."""
    found: list[Piece] = []
    if operation == "chat":
        for message in _list(body.get("messages")):
            if isinstance(message, dict):
                role = message.get("role")
                kind = DOCUMENT if role in ("tool", "function") else SYSTEM if role in ("system", "developer") else PROMPT
                if role == "assistant":
                    kind = SYSTEM  # the model's own earlier words: analysed, not shielded
                found += [Piece(kind, t) for t in _content_texts(message.get("content"))]
    elif operation == "responses":
        found += [Piece(SYSTEM, t) for t in _content_texts(body.get("instructions"))]
        found += _response_input(body.get("input"))
    elif operation == "completions":
        found += [Piece(PROMPT, t) for t in _strings(body.get("prompt"))]
    elif operation == "embeddings":
        found += [Piece(PROMPT, t) for t in _strings(body.get("input"))]
    return [p for p in found if p.text.strip()]


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in _list(value) if isinstance(v, str)]  # token-id lists carry no text to check


def _content_texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    texts: list[str] = []
    for part in _list(content):
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, str):
            texts.append(part)
    return texts


def _response_input(value: Any) -> list[Piece]:
    if isinstance(value, str):
        return [Piece(PROMPT, value)]
    found: list[Piece] = []
    for item in _list(value):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "function_call_output" or kind == "custom_tool_call_output":
            output = item.get("output")
            found += [Piece(DOCUMENT, t) for t in _content_texts(output)]
        elif kind in (None, "message"):
            role = item.get("role")
            piece = SYSTEM if role in ("system", "developer", "assistant") else PROMPT
            found += [Piece(piece, t) for t in _content_texts(item.get("content"))]
    return found


def cut(text: str, limit: int) -> Iterator[str]:
    """`text` in pieces of at most `limit` characters, cut at a space near the end where there is one."""
    while len(text) > limit:
        at = text.rfind(" ", limit - 200, limit)
        at = limit if at <= 0 else at
        yield text[:at]
        text = text[at:]
    if text:
        yield text


def shield_calls(found: list[Piece]) -> list[tuple[str, tuple[str, ...]]]:
    """text:shieldPrompt calls: one per piece of each prompt (no documents), then the documents in groups of at most
    five and 10,000 characters together (an empty user prompt)."""
    calls: list[tuple[str, tuple[str, ...]]] = []
    for piece in found:
        if piece.kind == PROMPT:
            calls += [(part, ()) for part in cut(piece.text, SHIELD_CHARS)]
    group: list[str] = []
    size = 0
    for piece in found:
        if piece.kind != DOCUMENT:
            continue
        for part in cut(piece.text, SHIELD_CHARS):
            if group and (len(group) == SHIELD_DOCUMENTS or size + len(part) > SHIELD_CHARS):
                calls.append(("", tuple(group)))
                group, size = [], 0
            group.append(part)
            size += len(part)
    if group:
        calls.append(("", tuple(group)))
    return calls


def analyze_texts(found: list[Piece]) -> list[str]:
    return [part for piece in found for part in cut(piece.text, ANALYZE_CHARS)]


def total_chars(found: list[Piece]) -> int:
    return sum(len(p.text) for p in found)
