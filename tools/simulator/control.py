"""The /_sim/ control API: faults, capacity, latency, stats, recorded requests, reset. No auth: loopback test tool."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from tools.simulator.faults import fault_from_json
from tools.simulator.state import REGION, Region


class BadControl(ValueError):
    pass


def _reply(value: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(value), content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        raise BadControl("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadControl("the body must be a JSON object")
    return body


def _number(spec: dict[str, Any], key: str) -> float | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise BadControl(f"{key} must be a number >= 0")
    return float(value)


def _positive(spec: dict[str, Any], key: str) -> int | None:
    value = spec.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise BadControl(f"{key} must be a positive integer")
    return value


def _region(request: web.Request) -> Region:
    return request.app[REGION]


def _faults(region: Region) -> dict[str, Any]:
    return {"queued": len(region.faults), "faults": [f.as_json() for f in region.faults.pending()]}


async def add_fault(request: web.Request) -> web.Response:
    region = _region(request)
    region.faults.add(fault_from_json(await _body(request)))
    return _reply(_faults(region))


async def list_faults(request: web.Request) -> web.Response:
    return _reply(_faults(_region(request)))


async def clear_faults(request: web.Request) -> web.Response:
    region = _region(request)
    region.faults.clear()
    region.release_held()
    return _reply(_faults(region))


async def set_capacity(request: web.Request) -> web.Response:
    region = _region(request)
    spec = await _body(request)
    window = region.windows.get(str(spec.get("deployment")))
    if window is None:
        return _reply({"error": f"unknown deployment {spec.get('deployment')!r}"}, 404)
    tpm = _positive(spec, "tpm")
    if tpm is None:
        raise BadControl("tpm is required")
    window.resize(tpm, _positive(spec, "rpm"))  # rpm null or absent: no request limit (a PTU refuses one: ValueError)
    return _reply({"deployment": spec["deployment"], "tpm": window.tpm, "rpm": window.rpm})


async def set_latency(request: web.Request) -> web.Response:
    region = _region(request)
    spec = await _body(request)
    latency, token_latency = _number(spec, "latency_ms"), _number(spec, "token_latency_ms")
    pace = spec.get("pace_non_streaming")
    if pace is not None and not isinstance(pace, bool):
        raise BadControl("pace_non_streaming must be true or false")
    if latency is not None:
        region.latency_ms = latency
    if token_latency is not None:
        region.token_latency_ms = token_latency
    if pace is not None:
        region.pace_non_streaming = pace
    return _reply(_latency(region))


def _latency(region: Region) -> dict[str, Any]:
    return {
        "latency_ms": region.latency_ms, "token_latency_ms": region.token_latency_ms,
        "pace_non_streaming": region.pace_non_streaming,
    }


async def get_stats(request: web.Request) -> web.Response:
    region = _region(request)
    return _reply({**region.stats.as_json(), "held_streams": region.held_streams})


async def get_requests(request: web.Request) -> web.Response:
    """The most recent requests to the Azure surface, oldest first, as received (headers included)."""
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        raise BadControl("limit must be an integer") from None
    recent = list(_region(request).recent)
    return _reply(recent[-limit:] if limit > 0 else [])


async def get_config(request: web.Request) -> web.Response:
    region = _region(request)
    deployments = [
        {
            "name": d.name, "model": d.model_name, "tpm": region.windows[d.name].tpm, "rpm": region.windows[d.name].rpm,
            "completion_tokens": region.config.completion_for(d), "dimensions": d.dimensions, "ptu": d.ptu,
            **({"burst_s": d.burst_s, "utilization": round(region.windows[d.name].used_tokens / (d.tpm / 60 * d.burst_s), 4)}
               if d.ptu else {}),
        }
        for d in region.config.deployments
    ]
    return _reply({
        "region": region.config.region, "api_key_required": region.config.api_key is not None,
        "deployments": deployments, **_latency(region),
    })


async def reset(request: web.Request) -> web.Response:
    _region(request).reset()
    return _reply({"reset": True})


ControlHandler = Callable[[web.Request], Awaitable[web.Response]]


def _guarded(handler: ControlHandler) -> ControlHandler:
    async def guarded(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except ValueError as exc:  # BadControl, or a fault spec that fault_from_json refused
            return _reply({"error": str(exc)}, 400)

    return guarded


def add_routes(router: web.UrlDispatcher) -> None:
    for method, path, handler in (
        ("POST", "/_sim/faults", add_fault),
        ("GET", "/_sim/faults", list_faults),
        ("DELETE", "/_sim/faults", clear_faults),
        ("POST", "/_sim/capacity", set_capacity),
        ("POST", "/_sim/latency", set_latency),
        ("GET", "/_sim/stats", get_stats),
        ("GET", "/_sim/requests", get_requests),
        ("GET", "/_sim/config", get_config),
        ("POST", "/_sim/reset", reset),
    ):
        router.add_route(method, path, _guarded(handler))
