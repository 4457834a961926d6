"""The one wiring: every service of a worker built from its settings, its stores, its clock and its telemetry sink.

The app passes Table Storage and Blob stores (`table_stores`); the in-process test harness and the benchmarks pass
the in-memory twins (`memory_stores`) or simulated ones, and the same function builds the same graph over them, so a
wiring mistake here is one the in-process tests see.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from shared.adminops.operations import AdminOperations
from shared.cache.layer import AnswerCache
from shared.clock import Clock
from shared.config import ConfigError, Settings
from shared.console.api import ConsoleDeps
from shared.console.auth import ConsoleAuth
from shared.edge.consumers import ConsumerDirectory
from shared.edge.entra import build_validator
from shared.edge.identity import Identifier
from shared.flow.credentials import BackendAuth, CachedToken, TokenCredential, default_credential_factory
from shared.flow.exchange import Services
from shared.flow.safety import Screening
from shared.flow.upstream import AiohttpUpstream, UpstreamClient
from shared.limits.budget import BudgetBook, BudgetedLimiter, SpendingTelemetry
from shared.limits.limiter import TokenLimiter
from shared.routing.provisioned import ProvisionedCapacity
from shared.routing.router import Router
from shared.safety.audit import AuditTrail
from shared.storage.blobs import BlobAnswerStore, BlobAuditStore
from shared.storage.breaker_table import TableBreakerStore
from shared.storage.budget_table import TableBudgetStore
from shared.storage.capacity_table import TableCapacityStore
from shared.storage.change_log_table import TableChangeLogStore
from shared.storage.consumer_table import TableConsumerStore
from shared.storage.ledger_shards import ShardedLedgerStore
from shared.storage.ledger_table import TableLedgerStore
from shared.storage.memory import (
    MemoryAnswerStore,
    MemoryAuditStore,
    MemoryBreakerStore,
    MemoryBudgetStore,
    MemoryCapacityStore,
    MemoryChangeLogStore,
    MemoryConsumerStore,
    MemoryLedgerStore,
    MemoryResponseStore,
    MemoryTrafficStore,
    MemoryUsageStore,
)
from shared.storage.protocols import (
    AnswerStore,
    AuditStore,
    BreakerStore,
    BudgetStore,
    CapacityStore,
    ChangeLogStore,
    ConsumerStore,
    LedgerStore,
    ResponseStore,
    TrafficStore,
    UsageStore,
)
from shared.storage.response_table import TableResponseStore
from shared.storage.tables import Tables
from shared.storage.traffic_table import TableTrafficStore
from shared.storage.usage_table import TableUsageStore
from shared.telemetry.console import ConsoleTelemetry
from shared.telemetry.protocol import Telemetry
from shared.telemetry.traffic import TrafficCounter
from shared.telemetry.usage_rows import UsageRecorder

CredentialFactory = Callable[[], TokenCredential]


@dataclass(frozen=True, slots=True)
class Stores:
    """Where a worker keeps what outlives it or is shared with the other instances."""

    consumers: ConsumerStore
    ledger: LedgerStore
    breakers: BreakerStore
    capacity: CapacityStore
    usage: UsageStore
    responses: ResponseStore
    budgets: BudgetStore
    changes: ChangeLogStore
    traffic: TrafficStore
    answers: AnswerStore | None = None  # None: cache entries stay in this worker's memory
    audit: AuditStore | None = None  # None: no audit trail can be written (refused at start-up if a policy audits)
    tables: Tables | None = None  # the Table Storage clients, closed with the worker
    ledger_tables: tuple[Tables, ...] = ()  # those of the ledgers' own accounts (GATEWAY_LEDGER_ACCOUNTS), likewise


def table_stores(settings: Settings) -> Stores:
    """Table Storage for the tables, Blob storage (where the settings reach one) for cache entries and audit trails."""
    tables = Tables.from_settings(settings)
    audited = any(p.audited for p in settings.safety.policies.values())
    ledger_tables = tuple(Tables.for_account(settings, account) for account in settings.ledger_accounts)
    ledger: LedgerStore = ShardedLedgerStore([TableLedgerStore(t) for t in ledger_tables]) if ledger_tables \
        else TableLedgerStore(tables)
    return Stores(
        consumers=TableConsumerStore(tables), ledger=ledger, breakers=TableBreakerStore(tables),
        capacity=TableCapacityStore(tables), usage=TableUsageStore(tables), responses=TableResponseStore(tables),
        budgets=TableBudgetStore(tables), changes=TableChangeLogStore(tables), traffic=TableTrafficStore(tables),
        answers=BlobAnswerStore.from_settings(settings), audit=BlobAuditStore.for_audit(settings) if audited else None,
        tables=tables, ledger_tables=ledger_tables,
    )


def memory_stores() -> Stores:
    """The in-memory twins (shared/storage/memory.py): one deployment's state, for tests and benchmarks."""
    return Stores(
        consumers=MemoryConsumerStore(), ledger=MemoryLedgerStore(), breakers=MemoryBreakerStore(),
        capacity=MemoryCapacityStore(), usage=MemoryUsageStore(), responses=MemoryResponseStore(),
        budgets=MemoryBudgetStore(), changes=MemoryChangeLogStore(), traffic=MemoryTrafficStore(),
        answers=MemoryAnswerStore(), audit=MemoryAuditStore(),
    )


@dataclass(frozen=True, slots=True)
class Built:
    """A worker's services, and the parts of them its owner (the edge, a test, a benchmark) reaches directly."""

    services: Services
    console: ConsoleDeps
    stores: Stores
    limiter: TokenLimiter  # the token limiter under the budgets (services.limiter wraps it)
    budgets: BudgetBook
    counter: TrafficCounter  # the telemetry the services emit to, counting traffic for the console
    instance: str


def build(
    settings: Settings, stores: Stores, clock: Clock, sink: Telemetry, *, upstream: UpstreamClient | None = None,
    credentials: CredentialFactory | None = None, instance: str | None = None, background: bool = True,
) -> Built:
    """Build every service once. `sink`: where metrics and traces go (OpenTelemetry in the app); `upstream`: the
    client to the backends (aiohttp unless given); `credentials`: the managed identity (DefaultAzureCredential unless
    given); `background`: the periodic flushes and syncs run as tasks (off: a test or benchmark drives them)."""
    instance = instance or f"{settings.gateway_id}-{uuid.uuid4().hex[:8]}"
    credentials = credentials or default_credential_factory(settings.managed_identity_client_id)
    book = BudgetBook(stores.budgets, clock, settings.prices, instance, refresh_s=settings.budget_refresh_s,
                      background=background)
    counter = TrafficCounter(SpendingTelemetry(sink, book), stores.traffic, clock, instance, background=background)
    telemetry: Telemetry = ConsoleTelemetry(counter, settings.prices) if settings.console_log else counter
    limiter = TokenLimiter(
        stores.ledger, clock, telemetry, lease_lifetime_s=settings.lease_lifetime_s,
        fail_closed=settings.limit_fail_mode == "closed", instance_count=settings.instance_count,
        instance_id=instance, end_users_max=settings.end_users_max, background=background,
    )
    consumers = ConsumerDirectory(
        stores.consumers, clock, settings.consumer_refresh_s, check_s=settings.consumer_check_s,
        max_stale_s=settings.consumer_max_stale_s, fail_closed=settings.auth_fail_mode == "closed",
        lookups_per_s=settings.unknown_key_lookups_per_s, failures_per_minute=settings.auth_failures_per_minute,
    )
    capacity = ProvisionedCapacity(settings.backends, clock, stores.capacity, instance, settings.breaker_sync_s)
    services = Services(
        settings=settings,
        clock=clock,
        consumers=consumers,
        identity=Identifier(consumers, telemetry, build_validator(settings.entra, clock), settings.accept_keys),
        router=Router(settings.backends, clock, telemetry, stores.breakers, settings.breaker_sync_s, capacity),
        upstream=upstream if upstream is not None else AiohttpUpstream(settings.backends),
        auth=BackendAuth(settings.backends, clock, credentials),
        limiter=BudgetedLimiter(limiter, book),
        telemetry=telemetry,
        usage=UsageRecorder(stores.usage, clock, instance_id=instance, flush_s=settings.usage_flush_s,
                            background=background),
        responses=stores.responses,
        cache=AnswerCache(stores.answers, clock, memory_bytes=settings.cache_memory_bytes,
                          max_entry_bytes=settings.cache_max_entry_bytes, background=background),
    )
    services.safety = _screening(settings, clock, credentials)
    services.audit = _audit_trail(settings, stores, clock, instance, telemetry, background)
    console = console_deps(services, stores.consumers, stores.changes, stores.usage, stores.traffic, counter)
    return Built(services, console, stores, limiter, book, counter, instance)


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


def _audit_trail(settings: Settings, stores: Stores, clock: Clock, instance: str, telemetry: Telemetry,
                 background: bool) -> AuditTrail | None:
    """The audit trail, where a policy audits: append blobs in the tables' storage account (docs/safety.md)."""
    safety = settings.safety
    if not any(p.audited for p in safety.policies.values()):
        return None
    if stores.audit is None:
        raise ConfigError("GATEWAY_SAFETY_POLICIES: a policy audits, but the storage settings reach no Blob service "
                          "(set GATEWAY_BLOB_ENDPOINT, or a connection string that names one)")
    return AuditTrail(stores.audit, clock, instance, memory_bytes=safety.audit_memory_bytes,
                      flush_s=safety.audit_flush_s, lost=telemetry.audit_lost, background=background)


def _screening(settings: Settings, clock: Clock, credentials: CredentialFactory) -> Screening | None:
    """The safety policies' services, where any policy is defined (docs/safety.md)."""
    from shared.safety import wiring

    safety = settings.safety
    if not safety.policies:
        return None
    token = None
    if safety.content_safety_key is None or safety.language_key is None:
        token = CachedToken(credentials(), wiring.COGNITIVE_SCOPE, clock).get
    content_safety, language = wiring.build(safety, clock, token)
    return Screening(safety, content_safety, language)
