"""The cache key: a SHA-256 digest of the scope, the deployment (as the client names it) and the canonical request.

The request is canonical once parsed: field order, whitespace and escapes (`\\u0041` is `A`) are gone, so two bodies
that differ only in spelling share a key, and two bodies that differ in anything the backend reads never do. Fields
that change how the answer is delivered or who is asking, not what it says, are left out: `stream`, `stream_options`,
`user` (and its successor `safety_identifier`), `prompt_cache_key` (a routing hint of the backend's own prompt cache)
and `model` (the deployment stands for it). Duplicate keys never reach here: the body parser refuses them
(shared/flow/jsonbody.py), so the gateway and a backend always read the same request.

The material is one JSON array, [version, scope, operation, deployment, api-version, body]: a JSON encoding is
injective, so no choice of names or values can make two different requests produce the same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from shared.records.cache import CachePolicy

KEY_VERSION = "v1"
EXCLUDED_FIELDS = frozenset({"stream", "stream_options", "user", "safety_identifier", "prompt_cache_key", "model"})


def scope_of(policy: CachePolicy, consumer_id: str, team: str | None = None) -> str:
    """Whose answers a request may share: a consumer's alone unless its policy widens it (a team scope without a team
    stays the consumer's)."""
    if policy.scope == "gateway":
        return "gateway"
    if policy.scope == "team" and team:
        return f"team:{team}"
    return f"consumer:{consumer_id}"


def canonical_body(body: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in body.items() if name not in EXCLUDED_FIELDS}


def cache_key(scope: str, operation: str, deployment: str, api_version: str | None, body: Mapping[str, Any]) -> str:
    """64 hex digits, the blob's name and the memory layer's key."""
    material = [KEY_VERSION, scope, operation, deployment, api_version or "", canonical_body(body)]
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()
