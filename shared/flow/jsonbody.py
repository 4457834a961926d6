"""The request body as JSON: parsed once, refused when its shape could make the gateway and a backend disagree.

Two things a JSON parser accepts are refused here. Nesting deeper than any OpenAI request needs: recursive code in the
gateway (counting, re-serialising) and in backends has limits of its own, and a request the gateway fails on halfway
must never be forwarded with its accounting skipped. Duplicate keys in one object: the gateway reads the last one, a
backend may read the first, so the request a backend sees would not be the request that was admitted and limited.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from shared.edge.errors import bad_request

# Deeper than any chat, completion or embeddings request (structured-output schemas are limited to a few levels), far
# below Python's recursion limit and orjson's serialisation limit (254).
MAX_DEPTH = 64


def parse_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 (OpenAI-shaped) for empty, invalid, too deep or duplicate-key input."""
    if not raw:
        raise bad_request("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("The request body is not valid JSON (UTF-8).", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    members, string_colons = _walk(body)
    if not _colons_add_up(raw, members, string_colons):
        raise bad_request("The request body repeats a key within one JSON object; send each key once.",
                          code="duplicate_key")
    return body


def _walk(body: dict[str, Any]) -> tuple[int, int]:
    """(object members, colons inside strings) of a parsed body; 400 when it nests deeper than MAX_DEPTH.
    Iterative, so no input can exhaust the interpreter's stack."""
    members = 0
    colons = 0
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise bad_request(f"The request body nests deeper than {MAX_DEPTH} levels.", code="invalid_json")
        if type(node) is dict:
            members += len(node)
            for key, value in node.items():
                colons += key.count(":")
                kind = type(value)
                if kind is str:
                    colons += value.count(":")
                elif kind is dict or kind is list:
                    stack.append((value, depth + 1))
        else:
            for value in node:
                kind = type(value)
                if kind is str:
                    colons += value.count(":")
                elif kind is dict or kind is list:
                    stack.append((value, depth + 1))
    return members, colons


def _colons_add_up(raw: bytes, members: int, string_colons: int) -> bool:
    """Whether the raw text has no more object members than the parsed body (no key was repeated).

    In JSON text a colon is either an object member's separator or inside a string. The parser keeps one member per
    distinct key, so the raw colons equal the parsed members plus the colons in the parsed strings exactly when no key
    was repeated. Only an escaped colon (\\u003a) breaks that arithmetic (it could hide a repeated key); such text is
    checked by a full parse that sees every member."""
    if b"\\u003a" in raw or b"\\u003A" in raw:
        return not _has_duplicate_keys(raw)
    return raw.count(b":") == members + string_colons


class _Duplicate(Exception):
    pass


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Duplicate()
    return result


def _has_duplicate_keys(raw: bytes) -> bool:
    try:
        json.loads(raw, object_pairs_hook=_reject_duplicates)
    except _Duplicate:
        return True
    except (ValueError, RecursionError):
        return True  # orjson parsed it, so only the depth can differ; refuse rather than guess
    return False
