"""Who the end user of a request is, for the end-user level of the limits: the Entra caller's object id when the
caller is a person, else the body's `user` field (chat, completions, embeddings, Responses), else the x-gateway-user
header; which of these count, in that order, is the consumer's setting (`users.sources`).

An end user is bounded: at most MAX_USER_ID_CHARS printable characters, else 400. Its ledger is keyed by a keyed
hash of the consumer and the id (HMAC-SHA-256 with GATEWAY_USER_ID_HASH_KEY when set), never the id itself: Table
Storage holds no end-user id. Metrics and the per-request log see the id through the User ID dimension's privacy
setting (GATEWAY_USER_ID), as any user id.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from shared.outcomes import MAX_USER_ID_CHARS, EndUserRefused
from shared.records.consumers import UserLimits

END_USER_HEADER = "x-gateway-user"


def end_user(users: UserLimits, person: str | None, body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    """The request's end user, or None when it names none (EndUserRefused when the consumer requires one, or when
    the one named is not a bounded, printable id)."""
    for source in users.sources:
        if source == "entra":
            value: Any = person
        elif source == "field":
            value = body.get("user")
        else:
            value = headers.get(END_USER_HEADER)
        if value is None or value == "":
            continue
        if not isinstance(value, str) or len(value) > MAX_USER_ID_CHARS or not value.isprintable():
            raise EndUserRefused(missing=False, sources=users.sources)
        return value
    if users.required:
        raise EndUserRefused(missing=True, sources=users.sources)
    return None


def caller_user_id(user_id: str | None, headers: Mapping[str, str], header: str) -> str:
    """The User ID a request is recorded under when no end user is named: the caller's from its token, else the
    User ID header's, capped."""
    return user_id if user_id is not None else headers.get(header, "")[:MAX_USER_ID_CHARS]


def ledger_id(consumer_id: str, user: str, key: bytes) -> str:
    """The end user's part of its ledger's key: 32 hex digits of a keyed hash of the consumer and the id."""
    digest = hmac.new(key, f"{consumer_id}\x00{user}".encode("utf-8", "surrogatepass"), hashlib.sha256)
    return digest.hexdigest()[:32]
