"""Builds the gateway once per worker from its settings; the request path never constructs anything."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import uuid
from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import Response

from shared.adminops.operations import AdminOperations
from shared.cache.layer import AnswerCache
from shared.clock import Clock, SystemClock
from shared.config import ConfigError, Settings, load_settings
from shared.console.api import ConsoleApi, ConsoleDeps
from shared.console.auth import ConsoleAuth
from shared.edge.consumers import ConsumerDirectory
from shared.edge.entra import build_validator
from shared.edge.http import read_body, to_gateway_request, to_response
from shared.edge.identity import Identifier
from shared.flow import tokens
from shared.flow.credentials import BackendAuth, CachedToken, default_credential_factory
from shared.flow.gateway import Gateway, Services
from shared.flow.safety import Screening
from shared.flow.upstream import AiohttpUpstream
from shared.lifecycle import on_sigterm
from shared.limits.budget import BudgetBook, BudgetedLimiter, SpendingTelemetry
from shared.limits.limiter import TokenLimiter
from shared.routing.provisioned import ProvisionedCapacity
from shared.routing.router import Router
from shared.safety.audit import AuditTrail
from shared.storage.blobs import BlobAnswerStore, BlobAuditStore
from shared.storage.protocols import ChangeLogStore, ConsumerStore, TrafficStore, UsageStore
from shared.storage.responses import TableResponseStore
from shared.storage.tables import (
    TableBreakerStore,
    TableBudgetStore,
    TableCapacityStore,
    TableChangeLogStore,
    TableConsumerStore,
    TableLedgerStore,
    Tables,
    TableTrafficStore,
    TableUsageStore,
)
from shared.telemetry import otel
from shared.telemetry.console import ConsoleTelemetry
from shared.telemetry.events import Telemetry
from shared.telemetry.traffic import TrafficCounter
from shared.telemetry.usage_rows import UsageRecorder

log = logging.getLogger(__name__)


def build_services(settings: Settings, clock: Clock | None = None) -> tuple[Services, Tables, ConsoleDeps]:
    clock = clock or SystemClock()
    tables = Tables.from_settings(settings)
    instance = f"{settings.gateway_id}-{uuid.uuid4().hex[:8]}"
    book = BudgetBook(
        TableBudgetStore(tables), clock, settings.prices, instance, refresh_s=settings.budget_refresh_s
    )
    counter = TrafficCounter(SpendingTelemetry(otel.configure(settings), book), TableTrafficStore(tables), clock, instance)
    telemetry: Telemetry = counter
    if settings.console_log:
        telemetry = ConsoleTelemetry(telemetry, settings.prices)
    limiter = TokenLimiter(
        TableLedgerStore(tables),
        clock,
        telemetry,
        lease_lifetime_s=settings.lease_lifetime_s,
        fail_closed=settings.limit_fail_mode == "closed",
        instance_count=settings.instance_count,
        instance_id=instance,
        end_users_max=settings.end_users_max,
    )
    consumers = ConsumerDirectory(
        TableConsumerStore(tables),
        clock,
        settings.consumer_refresh_s,
        check_s=settings.consumer_check_s,
        max_stale_s=settings.consumer_max_stale_s,
        fail_closed=settings.auth_fail_mode == "closed",
        lookups_per_s=settings.unknown_key_lookups_per_s,
        failures_per_minute=settings.auth_failures_per_minute,
    )
    services = Services(
        settings=settings,
        clock=clock,
        consumers=consumers,
        identity=Identifier(consumers, telemetry, build_validator(settings.entra, clock), settings.accept_keys),
        router=Router(
            settings.backends, clock, telemetry, TableBreakerStore(tables), settings.breaker_sync_s,
            ProvisionedCapacity(settings.backends, clock, TableCapacityStore(tables), instance, settings.breaker_sync_s),
        ),
        upstream=AiohttpUpstream(settings.backends),
        auth=BackendAuth(settings.backends, clock, default_credential_factory(settings.managed_identity_client_id)),
        limiter=BudgetedLimiter(limiter, book),
        telemetry=telemetry,
        usage=UsageRecorder(TableUsageStore(tables), clock, instance_id=instance, flush_s=settings.usage_flush_s),
        responses=TableResponseStore(tables),
        cache=AnswerCache(
            BlobAnswerStore.from_settings(settings), clock, memory_bytes=settings.cache_memory_bytes,
            max_entry_bytes=settings.cache_max_entry_bytes,
        ),
    )
    services.safety = _screening(settings, clock)
    services.audit = _audit_trail(settings, clock, instance, telemetry)
    return services, tables, console_deps(services, TableConsumerStore(tables), TableChangeLogStore(tables),
                                           TableUsageStore(tables), TableTrafficStore(tables), counter)


def console_deps(services: Services, store: ConsumerStore, changes: ChangeLogStore, usage: UsageStore, traffic: TrafficStore,
                 counter: TrafficCounter | None) -> ConsoleDeps:
    """What the admin API needs: the stores the admin command writes, this worker's router and traffic counts."""
    settings, clock = services.settings, services.clock
    return ConsoleDeps(
        settings=settings, ops=AdminOperations(store, changes, clock),
        auth=ConsoleAuth(settings.admin_key_sha256, build_validator(settings.entra, clock), services.consumers,
                         settings.console_easy_auth),
        router=services.router, usage=usage, traffic=traffic, counter=counter, now=clock.now,
    )


def _audit_trail(settings: Settings, clock: Clock, instance: str, telemetry: Telemetry) -> AuditTrail | None:
    """The audit trail, where a policy audits: append blobs in the tables' storage account (docs/safety.md)."""
    safety = settings.safety
    if not any(p.audited for p in safety.policies.values()):
        return None
    store = BlobAuditStore.for_audit(settings)
    if store is None:
        raise ConfigError("GATEWAY_SAFETY_POLICIES: a policy audits, but the storage settings reach no Blob service "
                          "(set GATEWAY_BLOB_ENDPOINT, or a connection string that names one)")
    return AuditTrail(store, clock, instance, memory_bytes=safety.audit_memory_bytes, flush_s=safety.audit_flush_s,
                      lost=telemetry.audit_lost)


def _screening(settings: Settings, clock: Clock) -> Screening | None:
    """The safety policies' services, where any policy is defined (docs/safety.md)."""
    from shared.safety import wiring

    safety = settings.safety
    if not safety.policies:
        return None
    token = None
    if safety.content_safety_key is None or safety.language_key is None:
        cached = CachedToken(default_credential_factory(settings.managed_identity_client_id)(), wiring.COGNITIVE_SCOPE,
                             clock)
        token = cached.get
    content_safety, language = wiring.build(safety, clock, token)
    return Screening(safety, content_safety, language)


def tune_runtime(enabled: bool) -> None:
    """Garbage collection for a long-lived server: what exists at start-up (modules, encodings) is never collected, so
    it is moved out of the collector's sight, and the young generation is collected less often (measured: at 64
    concurrent clients it lifts throughput from ~0.91 to ~0.97 of a direct call; docs/benchmarks.md)."""
    if not enabled:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 50)


class Edge:
    """What each Function handler delegates to: framework request in, framework response out."""

    def __init__(self, settings: Settings, services: Services | None = None, console: ConsoleDeps | None = None) -> None:
        self.settings = settings
        self._services = services
        self._console_deps = console
        self._console: ConsoleApi | None = None
        self._tables: Tables | None = None
        self._gateway: Gateway | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Edge:
        # Parsing here, at import of function_app, makes a bad setting fail the start-up, not the first request;
        # the token encodings load here too, from the installed package, so no request waits for them.
        edge = cls(load_settings(os.environ if env is None else env))
        tokens.preload(edge.settings.deployments())
        tune_runtime(edge.settings.gc_tuning)
        return edge

    async def gateway(self) -> Gateway:
        gateway = self._gateway
        if gateway is None:
            async with self._lock:
                if self._gateway is None:
                    if self._services is None:
                        self._services, self._tables, self._console_deps = build_services(self.settings)
                    self._gateway = Gateway(self._services)
                    # Built on the first request, inside the worker's loop: from now on something is buffered.
                    on_sigterm(self.close)
                gateway = self._gateway
        return gateway

    async def close(self) -> None:
        """Return limiter leases, save usage rows and budget spend, export telemetry, close clients (at shutdown)."""
        services = self._services
        if services is None or self._closed:
            return
        self._closed = True
        if self._gateway is not None:
            await self._gateway.holds.close()
        screening = services.safety
        console = self._console_deps
        for closer in (services.limiter, services.usage, services.router, services.upstream, services.responses, services.identity,
                       services.cache, services.audit, console.counter if console else None, *(screening.services() if screening is not None else ())):
            close = getattr(closer, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.exception("error while closing %s", type(closer).__name__)
        if self._tables is not None:
            await self._tables.close()
        otel.flush()

    async def console(self) -> ConsoleApi:
        await self.gateway()
        if self._console is None:
            if self._console_deps is None:
                raise RuntimeError("the console was not wired (Edge built without its stores)")
            self._console = ConsoleApi(self._console_deps)
        return self._console

    async def handle(self, request: Request) -> Response:
        gateway = await self.gateway()
        settings = self.settings

        async def body() -> bytes:
            return await read_body(request, settings.max_body_bytes)

        framed = to_gateway_request(request, read_body=body, hops=settings.forwarded_hops, proxies=settings.trusted_proxies)
        if framed.raw_path == "/console" or framed.raw_path.startswith("/console/"):
            return to_response(await (await self.console()).handle(framed))
        return to_response(await gateway.handle(framed))
