"""Which requests the cache may answer, and what a request asks of it (the `x-gateway-cache` header).

Cacheable: embeddings; chat and completions that are deterministic by their own parameters (temperature 0, or, where
the gateway's setting GATEWAY_CACHE_SEED allows it, a `seed`); a Responses call only when it keeps no state
(`store: false`, no `previous_response_id`, `conversation` or `background`) and is not streamed. Never a request that
asks for several different answers (`n` or `best_of` above 1 with a temperature above 0), and never one whose answer
depends on the moment (built-in tools that search or run code, On Your Data) unless the consumer's policy says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.records.cache import CachePolicy

HEADER = "x-gateway-cache"
NO_STORE = "no-store"  # the request opts out: not served from the cache, its answer not stored
NO_CACHE = "no-cache"  # not served from the cache; its answer refreshes the entry
DIRECTIVES = frozenset({NO_STORE, NO_CACHE})

CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES = "chat/completions", "completions", "embeddings", "responses"
# Reasons a request bypasses the cache (the log's and the metric's values: a fixed set, never client input).
NOT_DETERMINISTIC = "not-deterministic"
SEVERAL_ANSWERS = "several-answers"
STATEFUL = "stateful"
MOMENT_TOOLS = "moment-tools"
UNSUPPORTED = "unsupported"
OPTED_OUT = "no-store"

# Tools the backend runs itself, whose results depend on when they run. Function (and custom) tools are run by the
# client: the model's answer to the same messages does not depend on the moment.
STATIC_TOOL_TYPES = frozenset({"function", "custom"})
MOMENT_FIELDS = ("data_sources", "dataSources", "web_search_options")


class BadDirective(ValueError):
    """The header holds something other than no-store or no-cache."""


def directive(value: str | None) -> str | None:
    if value is None:
        return None
    normalised = value.strip().lower()
    if normalised not in DIRECTIVES:
        raise BadDirective(value[:64])
    return normalised


@dataclass(frozen=True, slots=True)
class Verdict:
    serve: bool  # a stored answer may be served
    store: bool  # the backend's answer may be stored
    reason: str = ""  # why not, when neither

    @property
    def bypass(self) -> bool:
        return not self.serve and not self.store


def _bypass(reason: str) -> Verdict:
    return Verdict(False, False, reason)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def verdict(
    operation: str, body: Mapping[str, Any], policy: CachePolicy, asked: str | None, *, seed_deterministic: bool = False
) -> Verdict:
    """What the cache may do with this request (for a consumer whose policy has the cache on)."""
    if asked == NO_STORE:
        return _bypass(OPTED_OUT)
    reason = _why_not(operation, body, policy, seed_deterministic)
    if reason is not None:
        return _bypass(reason)
    return Verdict(serve=asked != NO_CACHE, store=True)


def _why_not(operation: str, body: Mapping[str, Any], policy: CachePolicy, seed_deterministic: bool) -> str | None:
    if operation == EMBEDDINGS:
        return None
    if operation not in (CHAT, COMPLETIONS, RESPONSES):
        return UNSUPPORTED
    if operation == RESPONSES:
        if body.get("store", True) is not False or body.get("background") is True:
            return STATEFUL
        if any(body.get(name) is not None for name in ("previous_response_id", "conversation")):
            return STATEFUL
        if body.get("stream") is True:
            return UNSUPPORTED  # a Responses stream is a sequence of typed events the cache does not replay
    if not policy.tools and _moment_tools(body):
        return MOMENT_TOOLS
    temperature = _number(body.get("temperature", 1))  # the service's default temperature is 1
    if temperature is None:
        return NOT_DETERMINISTIC
    if temperature > 0:
        if not (seed_deterministic and isinstance(body.get("seed"), int) and not isinstance(body.get("seed"), bool)):
            return NOT_DETERMINISTIC
        for name in ("n", "best_of"):
            choices = _number(body.get(name, 1))
            if choices is None or choices > 1:
                return SEVERAL_ANSWERS
    return None


def _moment_tools(body: Mapping[str, Any]) -> bool:
    if any(name in body for name in MOMENT_FIELDS):
        return True
    tools = body.get("tools")
    if not isinstance(tools, list):
        return tools is not None
    return any(not isinstance(tool, dict) or tool.get("type") not in STATIC_TOOL_TYPES for tool in tools)
