"""Framework-free request and response shapes that cross the edge."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

# The tokens a request was charged (0 for a refusal before any backend ran, or a cache hit).
TOKENS_CONSUMED_HEADER = "x-gateway-tokens-consumed"


@dataclass(frozen=True, slots=True)
class GatewayRequest:
    method: str
    raw_path: str
    query: Mapping[str, str]
    # Lower-cased names; a name sent more than once is listed in `repeated` so auth can refuse ambiguity.
    headers: Mapping[str, str]
    body: bytes
    client_ip: str
    repeated: frozenset[str] = frozenset()
    # The edge hands over the body unread: the flow reads it only once the key (from the headers) has been accepted.
    read_body: Callable[[], Awaitable[bytes]] | None = None


@dataclass(slots=True)
class GatewayResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
