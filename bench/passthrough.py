"""The floor for any Python proxy: a minimal streaming passthrough on one shared HTTP client (kept in bench/, not in
the product). It forwards the request body and headers to one backend and streams the answer back, nothing else.

    python -m bench.passthrough --port 8090 --backend http://127.0.0.1:18101 [--client httpx|aiohttp]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


def app(backend: str, client_kind: str) -> Starlette:
    state: dict[str, Any] = {}

    async def startup() -> None:
        if client_kind == "httpx":
            import httpx

            state["client"] = httpx.AsyncClient(base_url=backend, timeout=60)
        else:
            import aiohttp

            state["client"] = aiohttp.ClientSession(base_url=backend, connector=aiohttp.TCPConnector(limit=0))

    async def proxy(request: Request) -> Response:
        body = await request.body()
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = {k: v for k, v in request.headers.items() if k not in HOP_BY_HOP}
        client = state["client"]
        if client_kind == "httpx":
            upstream = await client.send(client.build_request("POST", path, content=body, headers=headers), stream=True)

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    async for chunk in upstream.aiter_raw():
                        yield chunk
                finally:
                    await upstream.aclose()

            out_headers = {k: v for k, v in upstream.headers.items() if k not in HOP_BY_HOP}
            return StreamingResponse(chunks(), status_code=upstream.status_code, headers=out_headers)
        upstream = await client.post(path, data=body, headers=headers)

        async def aio_chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.content.iter_any():
                    yield chunk
            finally:
                upstream.release()

        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(aio_chunks(), status_code=upstream.status, headers=out_headers)

    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await startup()
        yield

    return Starlette(routes=[Route("/{path:path}", proxy, methods=["POST"])], lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--client", choices=("httpx", "aiohttp"), default="httpx")
    args = parser.parse_args(argv)
    uvicorn.run(app(args.backend, args.client), host="127.0.0.1", port=args.port, loop="uvloop", log_level="warning",
                access_log=False, proxy_headers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
