"""The real gateway, built in-process: the real edge, Gateway, limiter, router, consumer directory and usage recorder,
over the in-memory stores, a fake clock, a recording telemetry sink and a scripted upstream. Requests go through the
edge as an ASGI app (httpx's ASGITransport), so the official `openai` SDK can be the client, with no socket anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, cast

import httpx
import openai
from starlette.requests import Request

from shared.app import Edge
from shared.clock import FakeClock
from shared.config import Settings, load_settings
from shared.edge.consumers import hash_key, key_prefix, new_key
from shared.edge.messages import GatewayRequest
from shared.flow.gateway import Gateway
from shared.limits.ledger import Ledger
from shared.records.cache import OFF, CachePolicy
from shared.records.consumers import Consumer, Limits, Team, UserLimits
from shared.records.usage import UsageRow
from shared.storage.memory import (
    MemoryAnswerStore,
    MemoryAuditStore,
    MemoryBreakerStore,
    MemoryBudgetStore,
    MemoryChangeLogStore,
    MemoryConsumerStore,
    MemoryLedgerStore,
    MemoryResponseStore,
    MemoryTrafficStore,
    MemoryUsageStore,
)
from shared.wiring import Stores, build, memory_stores
from tests.fakes.telemetry import RecordingTelemetry
from tests.fakes.upstream import ScriptedUpstream

BASE_URL = "http://gateway.test"
ADMIN_KEY = "gw-admin-harness-only"  # reads /health/details; the harness's gateway gets its SHA-256
ADMIN_HEADERS = {"api-key": ADMIN_KEY}
API_VERSION = "2024-10-21"
DEPLOYMENTS = {"gpt-4o": "gpt-4o", "gpt-4o-mini": "gpt-4o-mini", "text-embedding-3-small": "text-embedding-3-small"}


def backend(backend_id: str, region: str, priority: int = 1, **options: Any) -> dict[str, Any]:
    return {
        "id": backend_id, "endpoint": f"https://{backend_id}.openai.azure.example", "region": region,
        "priority": priority, "api_key": f"backend-key-{backend_id}", "deployments": DEPLOYMENTS, **options,
    }


def three_regions(**ptu_options: Any) -> list[dict[str, Any]]:
    """A PTU region first, two pay-as-you-go regions behind it, as the end-to-end stack has."""
    return [
        backend("uksouth-ptu", "uksouth", 1, ptu=True, **ptu_options),
        backend("swedencentral", "swedencentral", 2),
        backend("francecentral", "francecentral", 2),
    ]


class GatewayHarness:
    def __init__(self, backends: Sequence[Mapping[str, Any]] | None = None, env: Mapping[str, str] | None = None,
                 *, beside: GatewayHarness | None = None, instance_id: str = "harness") -> None:
        """`beside`: a second instance of the same deployment: it shares that harness's clock, backends and stores
        (ledgers, consumers, breakers, usage rows, responses, cache), with its own limiter, router and caches."""
        self.settings: Settings = load_settings({
            "GATEWAY_TABLE_CONNECTION_STRING": "UseDevelopmentStorage=true",  # never contacted: the stores are in memory
            "GATEWAY_BACKENDS": json.dumps(list(backends or three_regions())),
            "GATEWAY_MAX_BODY_BYTES": "262144",
            "GATEWAY_GC_TUNING": "false",
            "GATEWAY_ADMIN_KEY_SHA256": hash_key(ADMIN_KEY),
            **(env or {}),
        })
        self.clock: FakeClock = FakeClock() if beside is None else beside.clock
        self.upstream: ScriptedUpstream = ScriptedUpstream() if beside is None else beside.upstream
        self.telemetry = RecordingTelemetry()
        # A second instance shares the deployment's stores; its console's change log and traffic rows are its own.
        stores = memory_stores() if beside is None else replace(
            beside.stores, changes=MemoryChangeLogStore(), traffic=MemoryTrafficStore())
        # Built as shared/app.py builds a worker (shared/wiring.py), over the in-memory stores; the periodic flushes
        # and syncs are driven by the tests (settle, flush) instead of background tasks.
        built = build(self.settings, stores, self.clock, self.telemetry, upstream=self.upstream,
                      credentials=_NoIdentity, instance=instance_id, background=False)
        self.built = built
        self.stores: Stores = stores
        self.budget_store = cast(MemoryBudgetStore, stores.budgets)
        self.consumer_store = cast(MemoryConsumerStore, stores.consumers)
        self.ledgers = cast(MemoryLedgerStore, stores.ledger)
        self.breakers = cast(MemoryBreakerStore, stores.breakers)
        self.usage_store = cast(MemoryUsageStore, stores.usage)
        self.response_store = cast(MemoryResponseStore, stores.responses)
        self.answer_store = cast(MemoryAnswerStore, stores.answers)
        self.audit_store = cast(MemoryAuditStore, stores.audit)
        self.change_log = cast(MemoryChangeLogStore, stores.changes)
        self.traffic_store = cast(MemoryTrafficStore, stores.traffic)
        self.services = built.services
        self.limiter = built.limiter
        self.router = built.services.router
        self.usage = built.services.usage
        self.budgets = built.budgets
        self.traffic = built.counter
        self.edge = Edge(self.settings, built)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.asgi), base_url=BASE_URL, timeout=10)

    async def asgi(self, scope: Any, receive: Any, send: Any) -> None:
        """What every Function handler does: hand the framework request to the edge."""
        response = await self.edge.handle(Request(scope, receive))
        await response(scope, receive, send)

    async def gateway(self) -> Gateway:
        return await self.edge.gateway()

    # ---- consumers -------------------------------------------------------------------------------------------------

    def consumer(
        self, consumer_id: str = "app", *, tpm: int = 0, deployment_tpm: Mapping[str, int] | None = None,
        quota: int = 0, quota_period: str | None = None, deployments: Sequence[str] | None = None,
        priority: str = "normal", enabled: bool = True, budget: float = 0.0, budget_period: str | None = None, capabilities: Sequence[str] = (),
        fallback: bool = True, team: str | None = None, users: UserLimits | None = None,
        cache: CachePolicy = OFF, safety: str | None = None,
    ) -> str:
        """Create a consumer and return its key."""
        key = new_key()
        self.consumer_store.consumers[consumer_id] = Consumer(
            id=consumer_id, name=consumer_id, key_hash=hash_key(key), key_prefix=key_prefix(key), enabled=enabled,
            deployments=frozenset(deployments) if deployments is not None else None,
            limits=Limits(tpm, dict(deployment_tpm or {}), quota, quota_period, budget, budget_period),
            priority=priority,
            capabilities=frozenset(capabilities),
            fallback=fallback,
            team=team,
            users=users or UserLimits(),
            cache=cache,
            safety=safety,
        )
        return key

    def team(self, team_id: str, *, tpm: int = 0, quota: int = 0, quota_period: str | None = None, budget: float = 0.0,
             deployments: Sequence[str] | None = None, priority: str = "normal", safety: str | None = None) -> None:
        self.consumer_store.teams[team_id] = Team(
            team_id, team_id, Limits(tpm, {}, quota, quota_period, budget, None),
            frozenset(deployments) if deployments is not None else None, priority, safety=safety,
        )

    # ---- clients ---------------------------------------------------------------------------------------------------

    def openai(self, key: str, path: str = "/v1") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=BASE_URL + path, api_key=key, max_retries=0, http_client=self.http)  # type: ignore[arg-type]

    def azure(self, key: str) -> openai.AsyncAzureOpenAI:  # type: ignore[name-defined]
        return openai.AsyncAzureOpenAI(  # type: ignore[call-overload]
            azure_endpoint=BASE_URL, api_key=key, api_version=API_VERSION, max_retries=0, http_client=self.http,
        )

    async def post(self, path: str, key: str | None, body: Any = None, **options: Any) -> httpx.Response:
        headers = {"api-key": key} if key is not None else {}
        headers.update(options.pop("headers", {}))
        if body is not None and "content" not in options:
            options["json"] = body
        return await self.http.post(path, headers=headers, **options)

    # ---- the books -------------------------------------------------------------------------------------------------

    async def settle(self) -> None:
        """Return the limiter's leases and save the usage rows, as a worker does at shutdown."""
        await self.limiter.close()
        await self.usage.flush()

    async def charged(self, consumer_id: str, scope: str = "*") -> int:
        """Tokens in the consumer's shared window (or one of its scopes) once every lease is returned: what it was
        charged."""
        await self.settle()
        stored = self.ledgers.ledgers.get(consumer_id)
        if stored is None:
            return 0
        return int(sum(Ledger.from_entity(stored[0]).windows.get(scope, {}).values()))

    async def usage_rows(self, consumer_id: str) -> list[UsageRow]:
        await self.usage.flush()
        return [row for row in self.usage_store.rows.values() if row.consumer == consumer_id]

    async def close(self) -> None:
        await self.http.aclose()
        await self.edge.close()


class _NoIdentity:
    """The managed identity of a harness: its backends and safety services use keys, so no token may be asked for."""

    async def get_token(self, *scopes: str) -> Any:
        raise AssertionError("the harness's backends use keys; nothing may ask for a managed identity")


def gateway_request(
    method: str, path: str, key: str | None, body: Any = None, headers: Mapping[str, str] | None = None
) -> GatewayRequest:
    """A GatewayRequest as the edge would hand it over (for tests that drive `Gateway.handle` itself)."""
    raw_path, _, query = path.partition("?")
    sent = {"content-type": "application/json", **({"api-key": key} if key else {}), **(headers or {})}
    return GatewayRequest(
        method=method, raw_path=raw_path,
        query=dict(p.split("=", 1) for p in query.split("&") if "=" in p),
        headers={k.lower(): v for k, v in sent.items()},
        body=body if isinstance(body, bytes) else json.dumps(body).encode(), client_ip="127.0.0.1",
    )
