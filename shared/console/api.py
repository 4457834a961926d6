"""The HTTP admin API under /console/api/ (OpenAPI at /console/api/openapi.json), and the page at /console.

Each endpoint authenticates (shared/console/auth.py), checks its input strictly and calls one admin operation
(shared/adminops), the same the admin command calls. Answers are JSON, never cached; errors are OpenAI-shaped
({"error": {"message", "type", "code", "param"}}) with the field at fault named. A created or rotated key is in that
one answer only.

The console lives at /console, not /admin: the Functions host reserves every route that starts with "admin" (its own
admin API) and refuses such a function at start-up.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from shared.adminops.describe import describe_consumer, describe_team
from shared.adminops.documents import consumer_change, new_consumer, new_team, team_change
from shared.adminops.operations import Actor, AdminOperations, OperationError, unserved
from shared.adminops.usage import last_written, period_hours, summarize
from shared.config import Settings
from shared.console.auth import CONSOLE_HEADER, ConsoleAuth, describe_actor
from shared.console.openapi import openapi
from shared.console.page import PAGE_PREFIX, page
from shared.edge.consumers import hash_key, key_prefix, new_key
from shared.edge.errors import render
from shared.edge.messages import GatewayRequest, GatewayResponse
from shared.outcomes import Refusal
from shared.routing.router import Router
from shared.storage.protocols import TrafficStore, UsageStore
from shared.telemetry.traffic import BUCKET_S, TrafficCounter, merge

API_PREFIX = "/console/api"
MAX_BODY = 65_536
MAX_TRAFFIC_MINUTES = 60
MAX_AUDIT = 500
JSON = "application/json"
_COMMON = {"cache-control": "no-store", "x-content-type-options": "nosniff"}
_ID = r"([a-z0-9][a-z0-9-]{0,62})"


@dataclass(frozen=True)
class ConsoleDeps:
    settings: Settings
    ops: AdminOperations
    auth: ConsoleAuth
    router: Router
    usage: UsageStore
    traffic: TrafficStore
    counter: TrafficCounter | None  # this instance's counts not written yet
    now: Callable[[], float]


Handler = Callable[["Call"], Awaitable[GatewayResponse]]


@dataclass
class Call:
    request: GatewayRequest
    actor: Actor
    match: tuple[str, ...]


def _answer(status: int, document: Any, headers: dict[str, str] | None = None) -> GatewayResponse:
    return GatewayResponse(status, {"content-type": JSON, **_COMMON, **(headers or {})}, orjson.dumps(document))


def _error(error: OperationError) -> GatewayResponse:
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(error.status,
                                                                                              "invalid_request_error")
    return _answer(error.status, {"error": {"message": error.message, "type": kind, "param": error.param,
                                            "code": error.code}})


def _query(call: Call, known: tuple[str, ...]) -> dict[str, str]:
    unknown = sorted(set(call.request.query) - set(known))
    if unknown:
        raise OperationError(400, "unknown_parameter", f"{unknown[0]}: unknown query parameter"
                             + (f" (known: {', '.join(known)})" if known else ""), unknown[0])
    return dict(call.request.query)


def _body(request: GatewayRequest, optional: bool = False) -> Any:
    if optional and not request.body:
        return {}
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != JSON:
        raise OperationError(415, "unsupported_media_type", "Send the body as application/json.")
    try:
        return orjson.loads(request.body)
    except orjson.JSONDecodeError:
        raise OperationError(400, "invalid_json", "The body is not valid JSON.") from None


def _write(call: Call) -> None:
    if not call.actor.may_write:
        raise OperationError(403, "read_only", f"{call.actor.name} has the reader role: changes need Gateway.Admin.")


class ConsoleApi:
    def __init__(self, deps: ConsoleDeps) -> None:
        self.d = deps
        self._served = deps.settings.deployments() if deps.settings.backends else None
        self._policies = frozenset(deps.settings.safety.policies)
        r = re.compile
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = [
            ("GET", r(r"/whoami"), self.whoami),
            ("GET", r(r"/consumers"), self.list_consumers),
            ("POST", r(r"/consumers"), self.create_consumer),
            ("GET", r(rf"/consumers/{_ID}"), self.get_consumer),
            ("PATCH", r(rf"/consumers/{_ID}"), self.patch_consumer),
            ("DELETE", r(rf"/consumers/{_ID}"), self.delete_consumer),
            ("POST", r(rf"/consumers/{_ID}/rotate"), self.rotate),
            ("POST", r(rf"/consumers/{_ID}/(disable|enable)"), self.enable),
            ("GET", r(r"/teams"), self.list_teams),
            ("POST", r(r"/teams"), self.create_team),
            ("GET", r(rf"/teams/{_ID}"), self.get_team),
            ("PATCH", r(rf"/teams/{_ID}"), self.patch_team),
            ("DELETE", r(rf"/teams/{_ID}"), self.delete_team),
            ("GET", r(r"/usage"), self.usage),
            ("GET", r(r"/traffic"), self.traffic),
            ("GET", r(r"/backends"), self.backends),
            ("GET", r(r"/audit"), self.audit),
        ]

    async def handle(self, request: GatewayRequest) -> GatewayResponse:
        path = request.raw_path.split("?", 1)[0]
        if not path.startswith(API_PREFIX + "/") and path != API_PREFIX:
            return page(path[len(PAGE_PREFIX):], request.method)
        try:
            return await self._api(request, path[len(API_PREFIX):])
        except OperationError as error:
            return _error(error)
        except Refusal as refusal:
            rendered = render(refusal)
            return GatewayResponse(rendered.status, {"content-type": JSON, **_COMMON, **rendered.headers}, rendered.body())

    async def _api(self, request: GatewayRequest, path: str) -> GatewayResponse:
        if path == "/openapi.json" and request.method == "GET":
            return _answer(200, openapi())
        if path == "/signin" and request.method == "GET":  # how to sign in: no credential needed, nothing secret
            return _answer(200, {"easy_auth": self.d.settings.console_easy_auth})
        allowed = []
        for method, pattern, handler in self._routes:
            found = pattern.fullmatch(path)
            if found is None:
                continue
            allowed.append(method)
            if method == request.method:
                actor = await self.d.auth.actor(request.headers, request.client_ip)
                if method not in ("GET", "HEAD") and self.d.auth.ambient(request.headers) and (
                    request.headers.get(CONSOLE_HEADER[0]) != CONSOLE_HEADER[1]
                ):
                    raise OperationError(403, "cross_site", f"A change signed in through App Service Authentication "
                                         f"must carry '{CONSOLE_HEADER[0]}: {CONSOLE_HEADER[1]}' (the console page "
                                         f"sends it; a page on another site cannot).")
                if request.read_body is not None:
                    request = await _read(request)
                return await handler(Call(request, actor, found.groups()))
        if allowed:
            return _error(OperationError(405, "method_not_allowed", f"{request.method} is not allowed here; "
                                         f"allowed: {', '.join(allowed)}"))
        return _error(OperationError(404, "not_found", f"No admin API at {API_PREFIX}{path[:100]} (see "
                                     f"{API_PREFIX}/openapi.json)."))

    # ---- who -------------------------------------------------------------------------------------------------------

    async def whoami(self, call: Call) -> GatewayResponse:
        _query(call, ())
        return _answer(200, describe_actor(call.actor))

    # ---- consumers -------------------------------------------------------------------------------------------------

    async def list_consumers(self, call: Call) -> GatewayResponse:
        _query(call, ())
        return _answer(200, {"data": [describe_consumer(c) for c in await self.d.ops.consumers()]})

    async def get_consumer(self, call: Call) -> GatewayResponse:
        _query(call, ())
        return _answer(200, describe_consumer(await self.d.ops.consumer(call.match[0])))

    def _check_served(self, deployments: frozenset[str] | None, force: bool) -> None:
        missing = unserved(self._served, deployments)
        if missing and not force:
            raise OperationError(400, "deployment_not_served", f"deployments: no configured backend serves "
                                 f"{', '.join(missing)}; calls to it would get 404 (add ?force=true to save it anyway)",
                                 "deployments")

    async def create_consumer(self, call: Call) -> GatewayResponse:
        _write(call)
        force = _force(_query(call, ("force",)))
        key = new_key()
        consumer = new_consumer(_body(call.request), hash_key(key), key_prefix(key), self._policies)
        self._check_served(consumer.deployments, force)
        created = await self.d.ops.create(consumer, call.actor)
        return _answer(201, {**describe_consumer(created), "key": key},
                       {"location": f"{API_PREFIX}/consumers/{created.id}"})

    async def patch_consumer(self, call: Call) -> GatewayResponse:
        _write(call)
        force = _force(_query(call, ("force",)))
        body = _body(call.request)
        change = consumer_change(body, call.match[0], self._policies)
        if isinstance(body, dict) and "deployments" in body:
            self._check_served(None if body["deployments"] == "*" else frozenset(body["deployments"]), force)
        changed = await self.d.ops.change(call.match[0], change, call.actor)
        return _answer(200, describe_consumer(changed))

    async def delete_consumer(self, call: Call) -> GatewayResponse:
        _write(call)
        _query(call, ())
        await self.d.ops.delete(call.match[0], call.actor)
        return _answer(200, {"id": call.match[0], "deleted": True})

    async def rotate(self, call: Call) -> GatewayResponse:
        _write(call)
        _query(call, ())
        body = _body(call.request, optional=True)
        if not isinstance(body, dict) or set(body) - {"grace_seconds"}:
            extra = sorted(set(body) - {"grace_seconds"}) if isinstance(body, dict) else ["body"]
            raise OperationError(400, "unknown_field", f"{extra[0]}: unknown field (known: grace_seconds)", extra[0])
        grace = body.get("grace_seconds", 0)
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not math.isfinite(grace) or not (
            0 <= grace <= 30 * 86400
        ):
            raise OperationError(400, "invalid_value", "grace_seconds: expected 0 to 2592000 (30 days)", "grace_seconds")
        consumer, key = await self.d.ops.rotate(call.match[0], float(grace), call.actor)
        return _answer(200, {**describe_consumer(consumer), "key": key, "grace_seconds": grace})

    async def enable(self, call: Call) -> GatewayResponse:
        _write(call)
        _query(call, ())
        consumer = await self.d.ops.set_enabled(call.match[0], call.match[1] == "enable", call.actor)
        return _answer(200, describe_consumer(consumer))

    # ---- teams -----------------------------------------------------------------------------------------------------

    async def list_teams(self, call: Call) -> GatewayResponse:
        _query(call, ())
        return _answer(200, {"data": [describe_team(t, m) for t, m in await self.d.ops.teams()]})

    async def get_team(self, call: Call) -> GatewayResponse:
        _query(call, ())
        team, members = await self.d.ops.team(call.match[0])
        return _answer(200, describe_team(team, members))

    async def create_team(self, call: Call) -> GatewayResponse:
        _write(call)
        force = _force(_query(call, ("force",)))
        team = new_team(_body(call.request), self._policies)
        self._check_served(team.deployments, force)
        created = await self.d.ops.create_team(team, call.actor)
        return _answer(201, describe_team(created, []), {"location": f"{API_PREFIX}/teams/{created.id}"})

    async def patch_team(self, call: Call) -> GatewayResponse:
        _write(call)
        force = _force(_query(call, ("force",)))
        body = _body(call.request)
        change = team_change(body, call.match[0], self._policies)
        if isinstance(body, dict) and "deployments" in body:
            self._check_served(None if body["deployments"] == "*" else frozenset(body["deployments"]), force)
        changed = await self.d.ops.change_team(call.match[0], change, call.actor)
        return _answer(200, describe_team(changed, await self.d.ops.members(changed.id)))

    async def delete_team(self, call: Call) -> GatewayResponse:
        _write(call)
        _query(call, ())
        await self.d.ops.delete_team(call.match[0], call.actor)
        return _answer(200, {"id": call.match[0], "deleted": True})

    # ---- reading the books -----------------------------------------------------------------------------------------

    async def usage(self, call: Call) -> GatewayResponse:
        query = _query(call, ("period", "at", "consumer"))
        period = query.get("period", "daily")
        if period not in ("hourly", "daily", "weekly", "monthly", "yearly"):
            raise OperationError(400, "invalid_value", "period: expected hourly, daily, weekly, monthly or yearly", "period")
        at = self.d.now()
        if "at" in query:
            try:
                parsed = datetime.fromisoformat(query["at"].replace("Z", "+00:00"))
            except ValueError:
                raise OperationError(400, "invalid_value", "at: expected an ISO 8601 time (UTC)", "at") from None
            at = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
        consumer = query.get("consumer")
        if consumer is not None and not re.fullmatch(_ID, consumer):
            raise OperationError(400, "invalid_value", "consumer: not a consumer id", "consumer")
        label, first, after = period_hours(period, at)
        rows = await self.d.usage.query(consumer, first, after)
        written = last_written(rows)
        settings = self.d.settings
        return _answer(200, {
            "period": period, "label": label,
            "currency": settings.prices.currency if settings.prices.deployments else None,
            "usage": [{"consumer": t.consumer, "deployment": t.deployment, "requests": t.requests,
                       "prompt_tokens": t.prompt, "completion_tokens": t.completion, "total_tokens": t.total,
                       "cached_tokens": t.cached, "tool_calls": t.tool_calls, "cost": round(t.cost, 9)}
                      for t in summarize(rows)],
            "last_written": None if written is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(written)),
            "behind_at_most_s": settings.usage_flush_s,
        })

    def _backend_order(self) -> list[str]:
        """PTU first, then by priority, as the router tries them."""
        backends = sorted(self.d.settings.backends, key=lambda b: (not b.ptu, b.priority))
        return [b.id for b in backends]

    async def traffic(self, call: Call) -> GatewayResponse:
        query = _query(call, ("minutes",))
        raw = query.get("minutes", "15")
        if not re.fullmatch(r"[0-9]{1,3}", raw) or not 1 <= int(raw) <= MAX_TRAFFIC_MINUTES:
            raise OperationError(400, "invalid_value", f"minutes: expected 1 to {MAX_TRAFFIC_MINUTES}", "minutes")
        last = int(self.d.now() // BUCKET_S)
        first = last - int(raw) * 60 // BUCKET_S + 1
        rows = await self.d.traffic.read(first, last)
        if self.d.counter is not None:
            rows += self.d.counter.pending()  # this instance's buckets not written yet (another's: within 10 s)
        merged = merge(rows, self._backend_order(), first, last)
        ptu = {b.id: b.ptu for b in self.d.settings.backends}
        region = {b.id: b.region for b in self.d.settings.backends}
        for entry in merged["backends"]:
            entry["ptu"] = ptu.get(entry["id"], False)
            entry["region"] = region.get(entry["id"], "")
        return _answer(200, merged)

    async def backends(self, call: Call) -> GatewayResponse:
        _query(call, ())
        health = self.d.router.health()
        order = {name: i for i, name in enumerate(self._backend_order())}
        health["backends"].sort(key=lambda b: order.get(b["id"], len(order)))
        return _answer(200, health)

    async def audit(self, call: Call) -> GatewayResponse:
        query = _query(call, ("limit", "days"))
        limit, days = query.get("limit", "100"), query.get("days", "30")
        if not re.fullmatch(r"[0-9]{1,4}", limit) or not 1 <= int(limit) <= MAX_AUDIT:
            raise OperationError(400, "invalid_value", f"limit: expected 1 to {MAX_AUDIT}", "limit")
        if not re.fullmatch(r"[0-9]{1,3}", days) or not 1 <= int(days) <= 366:
            raise OperationError(400, "invalid_value", "days: expected 1 to 366", "days")
        entries = await self.d.ops.audit_entries(int(limit), self.d.now() - int(days) * 86400)
        return _answer(200, {"data": [{
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.at)), "actor": e.actor, "role": e.role,
            "action": e.action, "target": e.target,
            "before": orjson.loads(e.before) if e.before else None, "after": orjson.loads(e.after) if e.after else None,
        } for e in entries]})


def _force(query: dict[str, str]) -> bool:
    value = query.get("force", "false")
    if value not in ("true", "false"):
        raise OperationError(400, "invalid_value", "force: expected true or false", "force")
    return value == "true"


async def _read(request: GatewayRequest) -> GatewayRequest:
    from dataclasses import replace

    assert request.read_body is not None
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise OperationError(413, "request_too_large", f"The body exceeds {MAX_BODY} bytes.")
    try:
        body = await request.read_body()
    except Refusal:
        raise OperationError(413, "request_too_large", f"The body exceeds {MAX_BODY} bytes.") from None
    if len(body) > MAX_BODY:
        raise OperationError(413, "request_too_large", f"The body exceeds {MAX_BODY} bytes.")
    return replace(request, body=body, read_body=None)
