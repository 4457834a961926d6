"""What the cache said about one request, carried with it through the flow (shared/flow/cache.py)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.cache.entry import CachedAnswer

HIT, MISS, BYPASS = "hit", "miss", "bypass"


@dataclass(frozen=True, slots=True)
class Lookup:
    state: str  # hit | miss | bypass: the x-gateway-cache header, the log's and the metric's value
    key: str = ""
    scope: str = ""
    store: bool = False  # the backend's answer may be kept
    reason: str = ""  # why a bypass
    answer: CachedAnswer | None = None  # the stored answer of a hit
