"""The edge: the only module that knows the HTTP framework (Starlette/FastAPI request and response types).

Azure Functions' HTTP streams hand handlers a FastAPI `Request` and take a FastAPI `Response`; the local host passes
Starlette's, which are the same classes.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from shared.edge.errors import GatewayError
from shared.edge.messages import GatewayRequest, GatewayResponse

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(entry: str) -> str | None:
    """An X-Forwarded-For entry as a bare address ("1.2.3.4:5678" and "[::1]:80" carry ports), or None if it is not one."""
    entry = entry.strip()
    if entry.startswith("["):
        entry = entry[1:].split("]", 1)[0]
    elif entry.count(":") == 1:
        entry = entry.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(entry))
    except ValueError:
        return None


def _trusted(address: str, proxies: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in proxies)


def client_address(peer: str, forwarded: str | None, hops: int, proxies: tuple[Network, ...]) -> str:
    """The caller's address, believing X-Forwarded-For only as far as trusted hops wrote it.

    Each proxy appends the address it saw, so entries are trustworthy only from the right: the `hops` rightmost ones were
    written by the platform's own front ends (Azure Functions/App Service: one, the caller's address with its port),
    and past those, entries written by configured proxies (`proxies`, e.g. an Application Gateway subnet) are skipped.
    Anything further left was written by the client and is never believed.
    """
    entries = [e for e in forwarded.split(",")] if forwarded else []
    if hops > 0:
        if len(entries) < hops:
            return peer
        index = len(entries) - hops
    else:
        if not entries or not _trusted(peer, proxies):
            return peer
        index = len(entries) - 1
    address = _address(entries[index])
    while address is not None and index > 0 and _trusted(address, proxies):
        index -= 1
        address = _address(entries[index])
    return address if address is not None else peer


def client_ip(request: Request, hops: int = 0, proxies: tuple[Network, ...] = ()) -> str:
    peer = request.client.host if request.client else ""
    return client_address(peer, request.headers.get("x-forwarded-for"), hops, proxies)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing with 413 as soon as it exceeds `limit` (without reading the rest)."""
    too_large = GatewayError(
        413, f"The request body exceeds the gateway's limit of {limit} bytes.", code="request_too_large"
    )
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large
        except ValueError:
            raise GatewayError(400, "The Content-Length header is not a number.", code="invalid_request") from None
    # The ASGI messages read directly: Request.stream() is an async generator, and every one the loop sees is
    # registered with it (a weak set) on its first step, once per request.
    receive = request.receive
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.disconnect":
            raise ClientDisconnect()
        if kind != "http.request":
            continue
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def to_gateway_request(
    request: Request,
    body: bytes = b"",
    *,
    read_body: Callable[[], Awaitable[bytes]] | None = None,
    hops: int = 0,
    proxies: tuple[Network, ...] = (),
) -> GatewayRequest:
    # Straight from the ASGI scope: Starlette's Headers and QueryParams would each be built (and parsed) on the way.
    scope = request.scope
    headers: dict[str, str] = {}
    repeated: set[str] = set()
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        if name in headers:
            repeated.add(name)
            continue
        headers[name] = raw_value.decode("latin-1")
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else request.url.path
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    query_string = scope.get("query_string", b"")
    # As Starlette's QueryParams reads it (blank values kept; a repeated name: its last value).
    query = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)) if query_string else {}
    client = scope.get("client")
    peer = client[0] if client else ""
    return GatewayRequest(
        method=scope["method"],
        raw_path=path,
        query=query,
        headers=headers,
        body=body,
        client_ip=client_address(peer, headers.get("x-forwarded-for"), hops, proxies),
        repeated=frozenset(repeated) if repeated else _NONE_REPEATED,
        read_body=read_body,
    )


_NONE_REPEATED: frozenset[str] = frozenset()


class EventStreamResponse(Response):
    """Streams the gateway's chunks to the client, each as soon as it is produced.

    Starlette's StreamingResponse runs the stream in an anyio task group on ASGI servers older than spec 2.4 (uvicorn
    among them), which costs on every chunk. Here the stream runs in the request's own task, and one plain task waits
    for the client to disconnect and cancels it; the stream's own clean-up (closing the backend, charging what was
    delivered) then runs as it would on any cancellation.
    """

    def __init__(self, chunks: AsyncIterator[bytes], status_code: int, headers: Mapping[str, str]) -> None:
        # Not Response.__init__: it would render an empty body and announce Content-Length: 0.
        self.chunks = chunks
        self.status_code = status_code
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        streaming = asyncio.current_task()
        assert streaming is not None
        disconnected = False

        async def watch() -> None:
            nonlocal disconnected
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected = True
                    streaming.cancel()
                    return

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not disconnected:
                raise
            streaming.uncancel()  # the client left: not an error of ours, and the task goes on to finish cleanly
            await _close(self.chunks)
        finally:
            watcher.cancel()


async def _close(chunks: AsyncIterator[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


def to_response(response: GatewayResponse) -> Response:
    if response.stream is not None:
        return EventStreamResponse(response.stream, response.status, response.headers)
    return Response(response.body, status_code=response.status, headers=response.headers)


def error_response(error: GatewayError) -> Response:
    return Response(error.body(), status_code=error.status, headers={"content-type": "application/json", **error.headers})
