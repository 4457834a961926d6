"""A consumer's cache settings, as the admin command writes them on its record."""

from __future__ import annotations

from dataclasses import dataclass

SCOPES = ("consumer", "team", "gateway")
DEFAULT_TTL_S = 3600
MAX_TTL_S = 86_400  # the Blob lifecycle rule deletes what is left a day later (bicep/main.bicep)


@dataclass(frozen=True, slots=True)
class CachePolicy:
    enabled: bool = False
    ttl_s: int = DEFAULT_TTL_S
    # Whose answers a request may be served: the consumer's own (default), its team's, or the whole gateway's. Only
    # an operator widens it (the admin command).
    scope: str = "consumer"
    # Requests whose answer depends on the moment (built-in tools that search or run code, On Your Data) are not
    # cached unless the consumer says so.
    tools: bool = False


OFF = CachePolicy()
