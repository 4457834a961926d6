"""The local host serves exactly what function_app.py registers, with the Functions host's conventions."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.testclient import TestClient

from tools import localhost

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def function_app(monkeypatch: pytest.MonkeyPatch) -> Any:
    example = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    for name, value in example.items():
        monkeypatch.setenv(name, value)
    sys.modules.pop("function_app", None)
    module = importlib.import_module("function_app")
    yield module
    sys.modules.pop("function_app", None)


def registrations(functions: Any) -> set[tuple[str, str, frozenset[str], str]]:
    """What the Functions host is told about each function: the bindings of its function.json."""
    result = set()
    for function in functions:
        binding = next(b for b in json.loads(function.get_function_json())["bindings"] if b["type"] == "httpTrigger")
        methods = frozenset(m.upper() for m in binding.get("methods", localhost.ALL_METHODS))
        result.add((function.get_function_name(), binding["route"], methods, binding["authLevel"]))
    return result


def test_host_json_makes_the_function_url_the_endpoint() -> None:
    assert localhost.route_prefix(ROOT / "host.json") == ""


def test_local_host_serves_exactly_the_registered_functions(function_app: Any) -> None:
    functions = function_app.app.get_functions()
    asgi = localhost.build_asgi(functions, localhost.route_prefix(ROOT / "host.json"))
    # Starlette answers HEAD wherever GET is allowed, as the Functions host does; compare without it.
    served = {(r.name, r.path, r.methods - {"HEAD"}) for r in asgi.routes}
    expected = {
        (name, localhost.starlette_path("", route), methods - {"HEAD"})
        for name, route, methods, _ in registrations(functions)
    }
    assert served == expected
    assert {name for name, *_ in registrations(functions)} == {
        "azure_openai", "azure_openai_v1", "azure_openai_preview", "openai_v1", "health", "health_details",
        "console_page", "console_paths",
    }
    # The Functions host refuses a route (or function name) that starts with "admin" or "runtime" (its own APIs):
    # no function here may take one, and the local host refuses them as Azure would.
    for name, route, *_ in registrations(functions):
        assert not route.lower().startswith(localhost.RESERVED) and not name.lower().startswith(localhost.RESERVED)
    # Every gateway function is anonymous at the host: consumers authenticate with their own keys in the gateway.
    assert {level for *_, level in registrations(functions)} == {"ANONYMOUS"}


def test_route_templates_and_precedence() -> None:
    assert localhost.starlette_path("api", "openai/deployments/{deployment}/{*operation}") == "/api/openai/deployments/{deployment}/{operation:path}"
    assert localhost.starlette_path("", "health") == "/health"
    ordered = sorted(["{*all}", "v1/{*rest}", "v1/models", "openai/{x}/y"], key=localhost.precedence)
    assert ordered.index("v1/models") < ordered.index("v1/{*rest}") < ordered.index("{*all}")


def test_route_patterns() -> None:
    pattern = localhost.route_regex("", "openai/deployments/{deployment}/{*operation}")
    match = pattern.match("/openai/deployments/gpt-4o/chat/completions")
    assert match is not None and match.groupdict() == {"deployment": "gpt-4o", "operation": "chat/completions"}
    assert pattern.match("/openai/deployments/gpt-4o") is None
    assert localhost.route_regex("api", "health").match("/api/health")
    assert localhost.route_regex("api", "health").match("/health") is None


def test_function_keys_and_catch_all_order() -> None:
    app = func.FunctionApp()

    @app.route(route="items/{*rest}", auth_level=func.AuthLevel.FUNCTION)
    async def rest(req: Request) -> Response:
        return PlainTextResponse("rest:" + req.path_params["rest"])

    @app.route(route="items/special", auth_level=func.AuthLevel.ANONYMOUS, methods=["GET"])
    async def special(req: Request) -> Response:
        return PlainTextResponse("special")

    client = TestClient(localhost.build_asgi(app.get_functions(), "api", {"default": "k1"}))
    assert client.get("/api/items/special").text == "special"
    assert client.get("/api/items/a/b").status_code == 401
    assert client.get("/api/items/a/b?code=k1").text == "rest:a/b"
    assert client.get("/api/items/a/b", headers={"x-functions-key": "k1"}).text == "rest:a/b"
    assert client.get("/api/items/a/b", headers={"x-functions-key": "wrong"}).status_code == 401


def test_the_local_host_refuses_the_routes_the_functions_host_reserves() -> None:
    import pytest

    for template in ("admin/api/{*rest}", "admin", "runtime/webhooks"):
        with pytest.raises(ValueError, match="reserves"):
            localhost.check_route("f", template)
    localhost.check_route("console_paths", "console/{*path}")
