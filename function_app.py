"""The Function App: wiring only. Every handler hands its request to the gateway's edge."""

from __future__ import annotations

import azure.functions as func
from azurefunctions.extensions.http.fastapi import Request, Response

from shared.app import Edge

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
edge = Edge.from_environment()

# Every method is routed to the gateway so a wrong one gets an OpenAI-shaped 405, not the host's bare 404.
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@app.route(route="openai/deployments/{deployment}/{*operation}", methods=ALL_METHODS)
async def azure_openai(req: Request) -> Response:
    return await edge.handle(req)


@app.route(route="openai/v1/{*operation}", methods=ALL_METHODS)
async def azure_openai_v1(req: Request) -> Response:
    return await edge.handle(req)


@app.route(route="openai/{*operation}", methods=ALL_METHODS)
async def azure_openai_preview(req: Request) -> Response:
    # Azure's preview paths without a deployment (/openai/responses?api-version=...); the routes above are more
    # specific, so they keep their own requests.
    return await edge.handle(req)


@app.route(route="v1/{*operation}", methods=ALL_METHODS)
async def openai_v1(req: Request) -> Response:
    return await edge.handle(req)


@app.route(route="health", methods=["GET", "HEAD"])
async def health(req: Request) -> Response:
    return await edge.handle(req)


# Anonymous at the host like the rest: the gateway checks its own admin key here (SECURITY.md says why).
@app.route(route="health/details", methods=["GET", "HEAD"])
async def health_details(req: Request) -> Response:
    return await edge.handle(req)


# The operator console and its admin API (not /admin: the Functions host reserves that prefix for its own API). The
# gateway checks the caller itself (the admin key, an Entra ID token with a console role, or Easy Auth's principal).
@app.route(route="console", methods=ALL_METHODS)
async def console_page(req: Request) -> Response:
    return await edge.handle(req)


@app.route(route="console/{*path}", methods=ALL_METHODS)
async def console_paths(req: Request) -> Response:
    return await edge.handle(req)
