"""The console page: static files from shared/console/static, served by the Function App itself (no CDN, so it
works with no internet), read once per worker, under a Content-Security-Policy that allows no inline script or style
and no other origin."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from shared.edge.messages import GatewayResponse

PAGE_PREFIX = "/console"
STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".svg": "image/svg+xml"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
           "x-frame-options": "DENY", "cache-control": "no-cache"}


@cache
def _files() -> dict[str, tuple[bytes, str]]:
    if not STATIC.is_dir():
        return {}
    return {f"/{p.name}": (p.read_bytes(), TYPES[p.suffix]) for p in STATIC.iterdir() if p.suffix in TYPES}


def page(path: str, method: str) -> GatewayResponse:
    """`path` below /console: "" or "/" is the page; "/static/NAME" one of its files; anything else 404."""
    if method not in ("GET", "HEAD"):
        return GatewayResponse(405, {"allow": "GET, HEAD", **HEADERS})
    name = "/index.html" if path in ("", "/") else path.removeprefix("/static") if path.startswith("/static/") else None
    found = _files().get(name) if name else None
    if found is None:
        return GatewayResponse(404, {"content-type": "text/plain; charset=utf-8", **HEADERS}, b"not found")
    body, media = found
    return GatewayResponse(200, {"content-type": media, **HEADERS}, b"" if method == "HEAD" else body)
