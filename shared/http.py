"""The edge: the only module that knows the HTTP framework (Starlette/FastAPI request and response types).

Azure Functions' HTTP streams hand handlers a FastAPI `Request` and take a FastAPI `Response`; the local host passes
Starlette's, which are the same classes.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from shared.errors import GatewayError
from shared.messages import GatewayRequest, GatewayResponse


def client_ip(request: Request) -> str:
    # Azure's front end appends the address it saw to X-Forwarded-For; the last entry is the one a client cannot forge.
    forwarded = request.headers.get("x-forwarded-for")
    if forwarded:
        last = forwarded.split(",")[-1].strip()
        if last.startswith("["):
            return last[1:].split("]", 1)[0]
        if last.count(":") == 1:
            return last.split(":", 1)[0]
        return last
    return request.client.host if request.client else ""


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
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def to_gateway_request(request: Request, body: bytes) -> GatewayRequest:
    headers: dict[str, str] = {}
    repeated: set[str] = set()
    for raw_name, raw_value in request.headers.raw:
        name = raw_name.decode("latin-1").lower()
        if name in headers:
            repeated.add(name)
            continue
        headers[name] = raw_value.decode("latin-1")
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else request.url.path
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return GatewayRequest(
        method=request.method,
        raw_path=path,
        query=dict(request.query_params),
        headers=headers,
        body=body,
        client_ip=client_ip(request),
        repeated=frozenset(repeated),
    )


def to_response(response: GatewayResponse) -> Response:
    if response.stream is not None:
        return StreamingResponse(response.stream, status_code=response.status, headers=response.headers)
    return Response(response.body, status_code=response.status, headers=response.headers)


def error_response(error: GatewayError) -> Response:
    return Response(error.body(), status_code=error.status, headers={"content-type": "application/json", **error.headers})
