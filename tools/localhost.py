"""A small stand-in for the Azure Functions host, for machines without Core Tools (and for the tests).

It serves exactly the registrations of `function_app.py` — `app.get_functions()` gives each function's route, methods
and auth level, and the handler itself — following the host's conventions: the `routePrefix` from host.json,
`{name}` parameters, `{*rest}` catch-alls, literal segments before parameters before catch-alls, and function keys for
`AuthLevel.FUNCTION`. Settings come from the environment, with local.settings.json's `Values` filled in underneath,
as `func start` does.

    python -m tools.localhost [--port 7071] [--settings local.settings.json]
"""

from __future__ import annotations

import argparse
import hmac
import importlib
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shared.config import local_environment

ROOT = Path(__file__).resolve().parent.parent
ALL_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


@dataclass(frozen=True)
class HostRoute:
    function: str
    template: str  # the Functions route template, without prefix
    methods: tuple[str, ...]
    auth_level: str
    arg_name: str
    handler: Callable[..., Awaitable[Response]]


def route_prefix(host_json: Path) -> str:
    try:
        config = json.loads(host_json.read_text())
    except FileNotFoundError:
        return "api"
    prefix = config.get("extensions", {}).get("http", {}).get("routePrefix", "api")
    return str(prefix).strip("/")


RESERVED = ("admin", "runtime")  # the Functions host's own APIs; it refuses functions whose routes start so


def check_route(function: str, template: str) -> None:
    """The Functions host's start-up check: "The specified route conflicts with one or more built in routes"."""
    if template.lower().startswith(RESERVED) or function.lower().startswith(RESERVED):
        raise ValueError(f"{function}: the Functions host reserves routes starting with {' or '.join(RESERVED)} "
                         f"({template!r}); it would not serve this function in Azure")


def host_routes(functions: Any) -> list[HostRoute]:
    """The HTTP functions of `app.get_functions()` (which may be called only once per app)."""
    routes = []
    for function in functions:
        trigger = function.get_trigger()
        if type(trigger).__name__ != "HttpTrigger":
            continue
        methods = tuple(str(getattr(m, "value", m)).upper() for m in trigger.methods) if trigger.methods else ALL_METHODS
        level = getattr(trigger.auth_level, "name", None) or str(trigger.auth_level or "FUNCTION")
        check_route(function.get_function_name(), trigger.route or function.get_function_name())
        routes.append(
            HostRoute(
                function=function.get_function_name(),
                template=trigger.route or function.get_function_name(),
                methods=methods,
                auth_level=level.upper(),
                arg_name=trigger.name,
                handler=function.get_user_function(),
            )
        )
    return routes


def _segment_rank(segment: str) -> int:
    if segment.startswith("{*"):
        return 2
    if segment.startswith("{"):
        return 1
    return 0


def precedence(template: str) -> tuple[int, ...]:
    """ASP.NET-style route precedence: compared segment by segment, literal < parameter < catch-all."""
    return tuple(_segment_rank(s) for s in template.strip("/").split("/"))


def starlette_path(prefix: str, template: str) -> str:
    def convert(match: re.Match[str]) -> str:
        name = match.group(2).split(":", 1)[0].rstrip("?")
        return "{" + name + (":path}" if match.group(1) else "}")

    path = re.sub(r"\{(\*?)([^}]+)\}", convert, template.strip("/"))
    return "/" + "/".join(p for p in (prefix, path) if p)


def _authorized(request: Request, level: str, keys: Mapping[str, str]) -> bool:
    if level == "ANONYMOUS":
        return True
    sent = request.headers.get("x-functions-key") or request.query_params.get("code")
    if not sent:
        return False
    allowed = [keys.get("master", "")] if level == "ADMIN" else list(keys.values())
    return any(key and hmac.compare_digest(sent, key) for key in allowed)


def route_regex(prefix: str, template: str) -> re.Pattern[str]:
    """`{name}` matches one segment, `{*rest}` the rest of the path; as the Functions host does."""
    parts = []
    for segment in [p for p in (prefix, template.strip("/")) if p]:
        for piece in segment.split("/"):
            match = re.fullmatch(r"\{(\*?)([^}:?]+)[^}]*\}", piece)
            if match is None:
                parts.append(re.escape(piece))
            elif match.group(1):
                parts.append(f"(?P<{match.group(2)}>.*)")
            else:
                parts.append(f"(?P<{match.group(2)}>[^/]+)")
    return re.compile("^/" + "/".join(parts) + "/?$")


@dataclass(frozen=True)
class Served:
    name: str
    path: str  # the Starlette-style path, for display and tests
    methods: frozenset[str]
    pattern: re.Pattern[str]
    route: HostRoute


class LocalHost:
    """A lean ASGI app: match the path against the registrations in precedence order and call the handler.

    No middleware stack: every await between the server and the handler is paid again for each chunk of a stream.
    """

    def __init__(self, functions: Any, prefix: str, keys: Mapping[str, str] | None = None) -> None:
        self.keys = dict(keys or {})
        ordered = sorted(host_routes(functions), key=lambda r: precedence(r.template))
        self.routes = [
            Served(r.function, starlette_path(prefix, r.template), frozenset(r.methods), route_regex(prefix, r.template), r)
            for r in ordered
        ]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        for served in self.routes:
            match = served.pattern.match(path)
            if match is None:
                continue
            if scope["method"] not in served.methods and not (scope["method"] == "HEAD" and "GET" in served.methods):
                continue
            scope["path_params"] = match.groupdict()
            request = Request(scope, receive)
            route = served.route
            if not _authorized(request, route.auth_level, self.keys):
                response: Response = Response(status_code=401)
            else:
                response = await route.handler(**{route.arg_name: request})
            await response(scope, receive, send)
            return
        body = {"error": {"message": "Not found", "type": "invalid_request_error", "code": "not_found"}}
        await JSONResponse(body, 404)(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


def build_asgi(functions: Any, prefix: str, keys: Mapping[str, str] | None = None) -> LocalHost:
    return LocalHost(functions, prefix, keys)


def load(settings_path: Path | None = None) -> tuple[Any, LocalHost]:
    """Import function_app with settings in place, and build the ASGI app serving its registrations."""
    os.environ.update(local_environment(str(settings_path or ROOT / "local.settings.json")))
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    module = importlib.import_module("function_app")
    keys = {"default": os.environ.get("LOCALHOST_FUNCTION_KEY", ""), "master": os.environ.get("LOCALHOST_MASTER_KEY", "")}
    # No shutdown hook: the Functions host has none either. The app flushes on SIGTERM by itself (shared/lifecycle.py),
    # and that is what stopping this host exercises.
    return module, build_asgi(module.app.get_functions(), route_prefix(ROOT / "host.json"), keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7071)
    parser.add_argument("--settings", type=Path, default=None, help="local.settings.json to read Values from")
    args = parser.parse_args(argv)

    import uvicorn

    _, asgi = load(args.settings)
    loop = os.environ.get("LOCALHOST_LOOP", "uvloop")
    if loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            loop = "asyncio"
    print(f"gateway listening on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(asgi, host=args.host, port=args.port, loop=loop, log_level="warning", access_log=False, lifespan="on",
                proxy_headers=False, server_header=False, date_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
