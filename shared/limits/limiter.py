"""Per-consumer token limits that hold across every gateway instance, at almost no cost per request.

Each instance admits requests from a **lease**: a block of tokens claimed from the consumer's shared ledger (see
ledger.py) with one ETag-conditional write. Admission is then a subtraction in memory; the Table is touched when a
lease runs low, expires or goes idle, not per request. What was really admitted (reconciled to the backend's usage) is
reported with the next write, bucketed by admission time, so the shared window stays exact.

If the store is unreachable the instance falls back, by default, to a local window of the consumer's limit divided by
the configured instance count (fail-open), keeps what it admits as pending usage, and writes it back when the store
returns; with fail-closed it answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from shared.clock import Clock
from shared.edge.consumers import Consumer
from shared.edge.errors import GatewayError
from shared.limits.ledger import (
    BUCKET_MS,
    CONSUMER_SCOPE,
    WINDOW_MS,
    Grant,
    Ledger,
    Quota,
    Refusal,
    bucket_expiry,
    claim,
    deployment_scope,
    quota_period,
    report,
)
from shared.limits.contract import UnlimitedTicket
from shared.storage.tables import Conflict, StoreUnavailable
from shared.telemetry.events import Telemetry

log = logging.getLogger(__name__)

Usage = dict[str, dict[int, int]]

RENEW_AHEAD_S = 0.25  # renew a lease when it has less than this long of admissions left at the current rate
CLOSING_GRACE_S = 2.0  # release a trimmed lease by then even if no renewal has come
PENDING_GRACE_S = 1.0  # write pending usage by then even if no renewal has come
# When the shared window is full, capacity trickles back as admissions age out; claiming it in larger, less frequent
# pieces keeps Table round trips per admitted request low without leaving it unused (the window slides).
SATURATED_CLAIM_INTERVAL_S = 1.0
CONFLICT_BACKOFF_S = 0.005
MAX_CLAIMS_PER_REQUEST = 8  # a bound on the slow path; with claims sized for every waiter, one or two suffice


class LedgerStore(Protocol):
    async def read(self, consumer_id: str) -> tuple[Ledger, str | None]: ...

    async def write(self, consumer_id: str, ledger: Ledger, etag: str | None) -> str:
        """Store `ledger` if the stored copy still has `etag` (None: if there is none); return the new ETag.

        Raises Conflict when another writer got there first, StoreUnavailable when the store does not answer."""
        ...


class MemoryLedgerStore:
    """The in-memory twin of the Table ledger store, with the same ETag semantics."""

    def __init__(self) -> None:
        self.ledgers: dict[str, tuple[dict[str, object], str]] = {}
        self.reads = 0
        self.writes = 0
        self.conflicts = 0
        self.unavailable = False
        self._version = 0

    async def read(self, consumer_id: str) -> tuple[Ledger, str | None]:
        if self.unavailable:
            raise StoreUnavailable("memory store switched off")
        self.reads += 1
        stored = self.ledgers.get(consumer_id)
        if stored is None:
            return Ledger(), None
        return Ledger.from_entity(stored[0]), stored[1]

    async def write(self, consumer_id: str, ledger: Ledger, etag: str | None) -> str:
        if self.unavailable:
            raise StoreUnavailable("memory store switched off")
        self.writes += 1
        stored = self.ledgers.get(consumer_id)
        if (stored[1] if stored else None) != etag:
            self.conflicts += 1
            raise Conflict("etag mismatch")
        self._version += 1
        new_etag = f"v{self._version}"
        self.ledgers[consumer_id] = (ledger.to_entity(), new_etag)
        return new_etag


@dataclass(frozen=True)
class Scopes:
    """What limits one request of a consumer to a deployment: tokens per minute by scope, and the quota."""

    limits: dict[str, int]  # scope -> tokens per minute (0: unlimited, tracked only for the quota)
    quota: Quota | None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.limits)


def scopes_for(consumer: Consumer, deployment: str) -> Scopes:
    limits = consumer.limits
    scoped: dict[str, int] = {}
    quota = Quota(limits.quota, limits.quota_period) if limits.quota > 0 and limits.quota_period else None
    if limits.tokens_per_minute > 0 or quota is not None:
        scoped[CONSUMER_SCOPE] = max(0, limits.tokens_per_minute)
    per_deployment = limits.deployment_tokens_per_minute.get(deployment, 0)
    if per_deployment > 0:
        scoped[deployment_scope(deployment)] = per_deployment
    return Scopes(scoped, quota)


def _add(usage: Usage, scope: str, expiry: int, tokens: int) -> None:
    if tokens:
        bucket = usage.setdefault(scope, {})
        bucket[expiry] = bucket.get(expiry, 0) + tokens


def _merge(into: Usage, other: Usage) -> None:
    for scope, buckets in other.items():
        for expiry, tokens in buckets.items():
            _add(into, scope, expiry, tokens)


@dataclass(eq=False)
class LeaseState:
    """This instance's view of one lease: what it may still admit, and usage not yet reported."""

    id: str
    available: dict[str, int]
    expires_s: float  # wall clock; no admissions from this lease after it
    quota_key: str | None
    quota_held: bool  # the consumer scope's hold is also a quota hold
    written_quota_hold: int
    unreported: Usage = field(default_factory=dict)
    released: bool = False

    def quota_hold(self) -> int:
        return max(0, self.available.get(CONSUMER_SCOPE, 0)) if self.quota_held else 0


@dataclass(eq=False)
class Budget:
    """One consumer's limiting state on this instance."""

    consumer_id: str
    limits: dict[str, int] = field(default_factory=dict)  # every scope this instance limits for the consumer
    quota: Quota | None = None
    scope_used_mono: dict[str, float] = field(default_factory=dict)
    current: LeaseState | None = None
    closing: LeaseState | None = None
    pending: Usage = field(default_factory=dict)  # usage with no lease to report it under (fallback, late corrections)
    pending_quota_key: str | None = None
    ledger: Ledger | None = None  # last copy read or written, to write without reading first
    etag: str | None = None
    have_copy: bool = False
    copy_hits: float = 1.0  # how often a write on the cached copy succeeded (smoothed): below 1/2, read first
    occupancy: dict[str, int] = field(default_factory=dict)  # per scope, as of the last sync
    quota_used: int = 0
    blocked: dict[str, tuple[float, Refusal]] = field(default_factory=dict)  # scope -> (no claim before, why)
    degraded_until: float = 0.0  # the store failed; local fallback until this, then probe
    local: Usage = field(default_factory=dict)  # fallback window occupancy by scope
    sync_task: asyncio.Task[None] | None = None
    admitted_since_sync: int = 0
    last_sync_mono: float = 0.0
    rate_mark_mono: float = 0.0
    closing_since: float = 0.0
    pending_since: float = 0.0
    saturated_until: float = 0.0  # wall clock: the window was full at the last claim; next claim not before this
    saturated_scope: str = CONSUMER_SCOPE
    rate: float = 0.0  # tokens per second admitted here, smoothed
    typical: float = 0.0  # a typical reservation, smoothed: leases smaller than one request are useless
    waiting: int = 0  # requests of this consumer waiting here for a lease
    last_admit_mono: float = 0.0

    def note(self, scopes: Scopes, reserve: int, mono: float) -> None:
        for scope, limit in scopes.limits.items():
            if self.limits.get(scope) != limit:
                self.blocked.pop(scope, None)  # the admin changed the limit: what was full may not be any more
                self.saturated_until = 0.0
            self.limits[scope] = limit
            self.scope_used_mono[scope] = mono
        for scope in [s for s, t in self.scope_used_mono.items() if mono - t > WINDOW_MS / 1000]:
            del self.scope_used_mono[scope]
            self.limits.pop(scope, None)
        if self.quota != scopes.quota:
            self.blocked.pop(CONSUMER_SCOPE, None)
            self.saturated_until = 0.0
        self.quota = scopes.quota
        self.typical = reserve if self.typical == 0 else 0.9 * self.typical + 0.1 * reserve

    def blocked_refusal(self, scopes: Scopes, now: float) -> tuple[float, Refusal] | None:
        for scope in scopes.limits:
            entry = self.blocked.get(scope)
            if entry is not None and entry[0] > now:
                return entry
        return None


class _Contended(Exception):
    """Every conditional write lost to another instance's."""


class LimitTicket:
    __slots__ = ("_limiter", "_budget", "_lease", "_limits", "_scopes", "_expiry", "_reserved", "_quota_key", "_settled")

    def __init__(
        self, limiter: TokenLimiter, budget: Budget, lease: LeaseState | None, limits: Scopes,
        expiry: int, reserved: int, quota_key: str | None,
    ) -> None:
        self._limiter = limiter
        self._budget = budget
        self._lease = lease
        self._limits = limits
        self._scopes = limits.names
        self._expiry = expiry
        self._reserved = reserved
        self._quota_key = quota_key
        self._settled = False

    @property
    def headers(self) -> dict[str, str]:
        """The consumer's own x-ratelimit-* values, as this instance sees them now."""
        return self._limiter._headers(self._budget, self._limits)

    def settle(self, actual_tokens: int) -> None:
        if self._settled:
            return
        self._settled = True
        self._limiter._settle(self, actual_tokens)


UNLIMITED = UnlimitedTicket()


class TokenLimiter:
    """The Limiter the request flow uses; see the module docstring."""

    def __init__(
        self,
        store: LedgerStore,
        clock: Clock,
        telemetry: Telemetry,
        *,
        lease_lifetime_s: float = 2.0,
        fail_closed: bool = False,
        instance_count: int = 1,
        instance_id: str | None = None,
        max_lease_fraction: float = 0.1,
        store_retry_s: float = 1.0,
        background: bool = True,
    ) -> None:
        self._store = store
        self._clock = clock
        self._telemetry = telemetry
        self._lifetime_s = lease_lifetime_s
        self._fail_closed = fail_closed
        self._instances = max(1, instance_count)
        self._instance = instance_id or uuid.uuid4().hex[:12]
        self._max_fraction = max_lease_fraction
        self._store_retry_s = store_retry_s
        self._budgets: dict[str, Budget] = {}
        self._lease_seq = 0
        self._ticker: asyncio.Task[None] | None = None
        self._background = background
        self.syncs = 0
        self.contended = 0
        self.fallback_admissions = 0

    # ---- the request path ----------------------------------------------------------------------------------------

    def needs_estimate(self, consumer: Consumer, deployment: str) -> bool:
        limits = consumer.limits
        return bool(
            limits.tokens_per_minute > 0
            or (limits.quota > 0 and limits.quota_period)
            or limits.deployment_tokens_per_minute.get(deployment, 0) > 0
        )

    async def admit(self, consumer: Consumer, deployment: str, reserve: int) -> LimitTicket | UnlimitedTicket:
        """Reserve `reserve` tokens for the consumer, or raise: 429 over its rate, 403 over its quota."""
        scopes = scopes_for(consumer, deployment)
        if not scopes.limits:
            return UNLIMITED
        for limit in scopes.limits.values():
            if 0 < limit < reserve:
                raise GatewayError(
                    429,
                    f"This request needs up to {reserve} tokens, more than the {limit} tokens per minute this key may "
                    "use; it can never be admitted. Lower max_tokens or shorten the prompt.",
                    type="rate_limit_error",
                    code="tokens_exceed_limit",
                    headers={"x-should-retry": "false", "x-ratelimit-limit-tokens": str(limit)},
                )
        budget = self._budgets.get(consumer.id)
        if budget is None:
            budget = self._budgets[consumer.id] = Budget(consumer.id)
            self._start_ticker()
        budget.note(scopes, reserve, self._clock.monotonic())
        ticket = self._admit_from_lease(budget, scopes, reserve)
        if ticket is not None:
            return ticket
        # Slow path: this instance needs (more of) a lease. Requests that arrive together wait for the same write, and
        # the claim is sized for all of them; a request is refused only when the ledger says there is no room (or the
        # store keeps failing), never because other waiters took the tokens first.
        budget.waiting += 1
        try:
            for _ in range(MAX_CLAIMS_PER_REQUEST):
                now = self._clock.now()
                if budget.degraded_until > now:
                    return self._admit_degraded(budget, scopes, reserve)
                blocked = budget.blocked_refusal(scopes, now)
                if blocked is not None:
                    raise self._refusal_error(scopes, blocked[1], blocked[0], now)
                if budget.saturated_until > now and budget.saturated_scope in scopes.limits:
                    # Claims are spaced out while the window is full, but the answer is the true time until this
                    # request fits, from the last copy of the ledger.
                    scope = budget.saturated_scope
                    until = budget.saturated_until
                    if budget.ledger is not None:
                        wait_ms = budget.ledger.wait_ms(scope, reserve, scopes.limits[scope], int(now * 1000))
                        if wait_ms is not None:
                            until = max(until, now + wait_ms / 1000)
                    raise self._refusal_error(scopes, Refusal(scope, None), until, now)
                await self._sync(budget, reserve, scopes.names)
                ticket = self._admit_from_lease(budget, scopes, reserve)
                if ticket is not None:
                    return ticket
        finally:
            budget.waiting -= 1
        now = self._clock.now()
        if budget.degraded_until > now:
            return self._admit_degraded(budget, scopes, reserve)
        blocked = budget.blocked_refusal(scopes, now)
        refusal = blocked[1] if blocked else Refusal(CONSUMER_SCOPE, 1000)
        return_at = blocked[0] if blocked else now + 1
        raise self._refusal_error(scopes, refusal, return_at, now)

    def _admit_from_lease(self, budget: Budget, scopes: Scopes, reserve: int) -> LimitTicket | None:
        lease = budget.current
        if lease is None:
            return None
        now = self._clock.now()
        if now >= lease.expires_s:
            return None
        available = lease.available
        for scope in scopes.limits:
            if available.get(scope, -1) < reserve:
                return None
        expiry = bucket_expiry(int(now * 1000))
        for scope in scopes.limits:
            available[scope] -= reserve
            _add(lease.unreported, scope, expiry, reserve)
        budget.admitted_since_sync += reserve
        budget.last_admit_mono = self._clock.monotonic()
        if self._needs_renewal(budget, lease, now):
            self._sync_in_background(budget)
        return LimitTicket(self, budget, lease, scopes, expiry, reserve, lease.quota_key)

    def _admit_degraded(self, budget: Budget, scopes: Scopes, reserve: int) -> LimitTicket:
        """The store is unreachable: fail closed (503), or admit against this instance's share of the limit."""
        if self._fail_closed:
            raise GatewayError(
                503, "The rate limiter's store is unavailable; try again shortly.", type="server_error",
                code="limiter_unavailable", headers={"retry-after": "1"},
            )
        now = self._clock.now()
        now_ms = int(now * 1000)
        for scope, limit in scopes.limits.items():
            if limit <= 0:
                continue
            share = max(1, limit // self._instances)
            window = budget.local.setdefault(scope, {})
            for expiry in [e for e in window if e <= now_ms]:
                del window[expiry]
            used = sum(window.values())
            if used + reserve > share:
                wait_ms = _local_wait_ms(window, used + reserve - share, now_ms)
                raise _rate_error(limit, wait_ms, {"x-ratelimit-remaining-tokens": str(max(0, share - used))})
        expiry = bucket_expiry(now_ms)
        if not budget.pending:
            budget.pending_since = self._clock.monotonic()
        for scope in scopes.limits:
            _add(budget.local, scope, expiry, reserve)
            _add(budget.pending, scope, expiry, reserve)
        if scopes.quota is not None:
            budget.pending_quota_key = quota_period(scopes.quota.period, now)[0]
        budget.last_admit_mono = self._clock.monotonic()
        self.fallback_admissions += 1
        return LimitTicket(self, budget, None, scopes, expiry, reserve, budget.pending_quota_key)

    def _settle(self, ticket: LimitTicket, actual: int) -> None:
        delta = actual - ticket._reserved
        if delta == 0:
            return
        budget = ticket._budget
        lease = ticket._lease
        for scope in ticket._scopes:
            if lease is not None and not lease.released:
                lease.available[scope] = lease.available.get(scope, 0) - delta
                _add(lease.unreported, scope, ticket._expiry, delta)
            else:
                if not budget.pending:
                    budget.pending_since = self._clock.monotonic()
                _add(budget.pending, scope, ticket._expiry, delta)
                if lease is None:
                    _add(budget.local, scope, ticket._expiry, delta)
        if lease is None or lease.released:
            budget.pending_quota_key = budget.pending_quota_key or ticket._quota_key
        budget.admitted_since_sync += delta

    def _to_pending(self, budget: Budget, usage: Usage) -> None:
        if usage and not budget.pending:
            budget.pending_since = self._clock.monotonic()
        _merge(budget.pending, usage)

    def _headers(self, budget: Budget, scopes: Scopes) -> dict[str, str]:
        headers: dict[str, str] = {}
        lease = budget.current
        tightest: tuple[int, int] | None = None
        for scope, limit in scopes.limits.items():
            if limit <= 0:
                continue
            own = lease.available.get(scope, 0) if lease is not None else 0
            remaining = max(0, limit - budget.occupancy.get(scope, 0) + max(0, own))
            if tightest is None or remaining < tightest[1]:
                tightest = (limit, remaining)
        if tightest is not None:
            headers["x-ratelimit-limit-tokens"] = str(tightest[0])
            headers["x-ratelimit-remaining-tokens"] = str(min(tightest[0], tightest[1]))
        if scopes.quota is not None:
            own = lease.quota_hold() if lease is not None else 0
            remaining = max(0, scopes.quota.limit - budget.quota_used + own)
            headers["x-ratelimit-limit-quota-tokens"] = str(scopes.quota.limit)
            headers["x-ratelimit-remaining-quota-tokens"] = str(min(scopes.quota.limit, remaining))
        return headers

    def _refusal_error(self, scopes: Scopes, refusal: Refusal, until: float, now: float) -> GatewayError:
        if refusal.quota_exhausted and scopes.quota is not None:
            reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(refusal.quota_reset_s))
            seconds = max(1, math.ceil(refusal.quota_reset_s - now))
            return GatewayError(
                403,
                f"The token quota of {scopes.quota.limit} per {scopes.quota.period} period is used up; it resets at {reset}.",
                type="insufficient_quota",
                code="quota_exceeded",
                headers={
                    "x-ratelimit-limit-quota-tokens": str(scopes.quota.limit),
                    "x-ratelimit-remaining-quota-tokens": "0",
                    "x-ratelimit-reset-quota-tokens": f"{seconds}s",
                    "x-gateway-quota-resets-at": reset,
                },
            )
        limit = scopes.limits.get(refusal.scope, 0) or max(scopes.limits.values(), default=0)
        return _rate_error(limit, max(0.0, (until - now) * 1000), {"x-ratelimit-remaining-tokens": "0"})

    # ---- talking to the shared ledger ----------------------------------------------------------------------------

    def _needs_renewal(self, budget: Budget, lease: LeaseState, now: float) -> bool:
        """Renew ahead of need, so requests rarely wait for a write: near expiry, or when a request or two are left."""
        if budget.sync_task is not None and not budget.sync_task.done():
            return False
        if budget.saturated_until > now:
            return False
        if lease.expires_s - now < self._lifetime_s / 4:
            return True
        low = max(budget.typical, budget.rate * RENEW_AHEAD_S, 1.0)
        return any(v < low for v in lease.available.values())

    def _sync_in_background(
        self, budget: Budget, need: int = 0, need_scopes: tuple[str, ...] = (), claim_new: bool = True,
        flush_only: bool = False,
    ) -> asyncio.Task[None]:
        """Start a sync unless one is running (one at a time per consumer); return the running one."""
        task = budget.sync_task
        if task is None or task.done():
            task = budget.sync_task = asyncio.get_running_loop().create_task(
                self._sync_once(budget, need, need_scopes, claim_new, flush_only)
            )
        return task

    async def _sync(self, budget: Budget, need: int, need_scopes: tuple[str, ...] = (), claim_new: bool = True) -> None:
        """Close the finished lease, trim or release the current one and claim a new one, in one conditional write."""
        # Shielded: a client that disconnects must not abort a write half-way through the bookkeeping.
        await asyncio.shield(self._sync_in_background(budget, need, need_scopes, claim_new))

    def _wants(self, budget: Budget, need: int, need_scopes: tuple[str, ...], now: float) -> tuple[dict[str, int], dict[str, int]]:
        """At least the request's need; ideally what this instance admits over a lease lifetime, within a share."""
        needs: dict[str, int] = {}
        wants: dict[str, int] = {}
        usual = max(need, int(budget.typical), 1)
        # Enough for a lease lifetime at the recent rate, and at least for everyone waiting right now.
        expected = max(int(budget.rate * self._lifetime_s), usual * (budget.waiting + 1))
        for scope, limit in budget.limits.items():
            entry = budget.blocked.get(scope)
            if scope not in need_scopes and entry is not None and entry[0] > now:
                continue  # known to be full: asking again now would only waste the write
            cap = limit if limit > 0 else (budget.quota.limit if budget.quota else 0)
            scope_need = need if scope in need_scopes else 0
            upper = max(scope_need, int(cap * self._max_fraction)) if cap > 0 else max(usual, expected)
            needs[scope] = scope_need
            wants[scope] = max(scope_need, min(max(expected, 2 * usual), upper))
        return needs, wants

    async def _sync_once(
        self, budget: Budget, need: int, need_scopes: tuple[str, ...], claim_new: bool, flush_only: bool = False
    ) -> None:
        now = self._clock.now()
        mono = self._clock.monotonic()
        elapsed = mono - budget.rate_mark_mono if budget.rate_mark_mono else 0.0
        if elapsed >= 0.25:
            observed = max(0, budget.admitted_since_sync) / elapsed
            budget.rate = observed if budget.rate == 0 else 0.5 * budget.rate + 0.5 * observed
            budget.admitted_since_sync = 0
            budget.rate_mark_mono = mono
        elif not budget.rate_mark_mono:
            budget.rate_mark_mono = mono
        claim_new = claim_new and bool(budget.limits) and not flush_only
        old = None if flush_only else budget.current  # a flush leaves the current lease alone
        closing = budget.closing
        # Detach what this write reports; if the write fails it is merged back.
        closing_usage = closing.unreported if closing else {}
        old_usage = old.unreported if old else {}
        pending = budget.pending
        if closing:
            closing.unreported = {}
        if old:
            old.unreported = {}
        budget.pending = {}
        pending_key = budget.pending_quota_key
        old_keep = dict(old.available) if old else None
        if old is not None and (
            not claim_new or old.expires_s <= now + 0.05 or min(old.available.values(), default=0) < max(1, budget.typical)
        ):
            # Idle, expired, or too little left for a request: stop admitting from it and release it in this write.
            # Otherwise it keeps serving during the write, trimmed to what it still has, and is released by the next.
            budget.current = None

        lease_id = f"{self._instance}:{self._lease_seq + 1}"
        needs, wants = self._wants(budget, need, need_scopes, now) if claim_new else ({}, {})
        quota = budget.quota
        lifetime_ms = int(self._lifetime_s * 1000)
        result: Grant | None = None
        ledger: Ledger | None = None
        try:
            for _attempt in range(6):
                fresh = not budget.have_copy or budget.copy_hits < 0.5
                if fresh:
                    budget.ledger, budget.etag = await self._store.read(budget.consumer_id)
                    budget.have_copy = True
                assert budget.ledger is not None
                ledger = budget.ledger.copy()
                now = self._clock.now()
                if closing:
                    report(ledger, closing.id, closing_usage, None, closing.quota_key, _spent(closing_usage),
                           closing.written_quota_hold, 0, now)
                if old:
                    keep = old_keep if budget.current is old else None
                    hold_after = max(0, keep.get(CONSUMER_SCOPE, 0)) if (keep and old.quota_held) else 0
                    report(ledger, old.id, old_usage, keep, old.quota_key, _spent(old_usage),
                           old.written_quota_hold, hold_after, now)
                if pending:
                    report(ledger, None, pending, None, pending_key, _spent(pending), 0, 0, now)
                result = None
                if wants:
                    result = claim(ledger, lease_id, needs, wants, budget.limits, quota, now, lifetime_ms)
                if result is not None and not result.tokens and not (closing or old or pending):
                    # Refused and nothing to report: no write. A refusal computed on a cached copy is confirmed
                    # on a fresh read first, since other instances may have released tokens since.
                    if fresh:
                        break
                    budget.have_copy = False
                    continue
                try:
                    budget.etag = await self._store.write(budget.consumer_id, ledger, budget.etag)
                except Conflict:
                    budget.have_copy = False
                    if not fresh:
                        budget.copy_hits *= 0.7
                    # Other instances wrote first; a short random pause keeps them from colliding again in step.
                    await asyncio.sleep(random.uniform(0, CONFLICT_BACKOFF_S * (_attempt + 1)))
                    continue
                if not fresh:
                    budget.copy_hits = 0.7 * budget.copy_hits + 0.3
                else:
                    budget.copy_hits = min(1.0, budget.copy_hits + 0.05)  # try the cached copy again now and then
                budget.ledger = ledger
                break
            else:
                raise _Contended()
        except (StoreUnavailable, _Contended) as exc:
            budget.have_copy = False
            if closing:
                _merge(closing.unreported, closing_usage)
            if old:
                _merge(old.unreported, old_usage)
                if budget.current is None:
                    # Back as the current lease, even if expired (then it admits nothing): the next write releases it
                    # with its usage, which must not be dropped.
                    budget.current = old
            self._to_pending(budget, pending)
            budget.pending_quota_key = budget.pending_quota_key or pending_key
            if isinstance(exc, _Contended):
                # The store answers; others simply wrote first every time. Not a reason to fall back to local limits
                # (which would admit beyond the shared limit): the waiting requests try again or are told to retry.
                self.contended += 1
                return
            if budget.degraded_until <= now:
                log.warning("limiter store unavailable for consumer %s (%s); %s", budget.consumer_id, exc,
                            "failing closed" if self._fail_closed else "using the local fallback window")
                self._telemetry.store_fallback("closed" if self._fail_closed else "open")
            budget.degraded_until = self._clock.now() + self._store_retry_s
            return

        self.syncs += 1
        budget.degraded_until = 0.0
        budget.local.clear()
        budget.last_sync_mono = mono
        if pending_key == budget.pending_quota_key:
            budget.pending_quota_key = None
        assert ledger is not None
        now_ms = int(now * 1000)
        if closing:
            closing.released = True
            self._to_pending(budget, closing.unreported)  # corrections that arrived during the write
            closing.unreported = {}
        trimmed = old is not None and budget.current is old
        if old is not None:
            if trimmed:
                old.written_quota_hold = max(0, old_keep.get(CONSUMER_SCOPE, 0)) if (old_keep and old.quota_held) else 0
            else:
                old.released = True
                self._to_pending(budget, old.unreported)
                old.unreported = {}
        budget.closing = old if trimmed else None
        budget.closing_since = mono
        if result is not None:
            for scope, refusal in result.refused.items():
                if refusal.quota_exhausted:
                    until = min(refusal.quota_reset_s, now + 5.0)
                else:
                    until = now + max((refusal.wait_ms if refusal.wait_ms is not None else 1000) / 1000, BUCKET_MS / 1000)
                budget.blocked[scope] = (until, refusal)
            for scope in result.tokens:
                budget.blocked.pop(scope, None)
            # Only a full *window* slows claims down; a quota running out must be asked again, to answer 403.
            partial = [
                sc for sc, w in wants.items()
                if budget.limits.get(sc, 0) > 0 and (sc in result.refused or result.tokens.get(sc, 0) < w)
            ]
            budget.saturated_until = now + SATURATED_CLAIM_INTERVAL_S if partial else 0.0
            budget.saturated_scope = partial[0] if partial else CONSUMER_SCOPE
            if trimmed:
                budget.current = None  # the new lease (if any) replaces it; it is released by the next write
            if result.tokens:
                self._lease_seq += 1
                budget.current = LeaseState(
                    id=lease_id,
                    available=dict(result.tokens),
                    expires_s=now + self._lifetime_s,
                    quota_key=quota_period(quota.period, now)[0] if quota else None,
                    quota_held=result.quota_tokens > 0,
                    written_quota_hold=result.quota_tokens,
                )
        budget.occupancy = {s: ledger.occupancy(s, now_ms) for s in budget.limits}
        budget.quota_used = ledger.quota_used

    # ---- background upkeep ---------------------------------------------------------------------------------------

    def _start_ticker(self) -> None:
        if self._background and (self._ticker is None or self._ticker.done()):
            try:
                self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())
            except RuntimeError:
                self._ticker = None

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            try:
                await self.tick()
            except Exception:
                log.exception("limiter upkeep failed")

    async def tick(self) -> None:
        """Renew leases about to expire, release idle ones, write pending usage; forget idle consumers."""
        running = [b.sync_task for b in self._budgets.values() if b.sync_task is not None and not b.sync_task.done()]
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        now = self._clock.now()
        mono = self._clock.monotonic()
        syncs: list[asyncio.Task[None]] = []
        for consumer_id, budget in list(self._budgets.items()):
            if budget.sync_task is not None and not budget.sync_task.done():
                continue
            lease = budget.current
            idle = mono - budget.last_admit_mono > self._lifetime_s
            # A trimmed lease still holds tokens nobody else can use, and pending usage should reach the ledger; both
            # usually ride along with the next renewal, and get a write of their own only if none comes soon.
            renew = lease is not None and (idle or lease.expires_s - now < self._lifetime_s / 4)
            flush = (budget.closing is not None and mono - budget.closing_since > CLOSING_GRACE_S) or (
                bool(budget.pending) and mono - budget.pending_since > PENDING_GRACE_S
            )
            if not (renew or flush):
                if lease is None and idle and mono - budget.last_admit_mono > WINDOW_MS / 1000:
                    del self._budgets[consumer_id]
                continue
            if budget.degraded_until > now:
                continue
            syncs.append(self._sync_in_background(budget, 0, (), claim_new=not idle, flush_only=not renew))
        if syncs:
            await asyncio.gather(*syncs, return_exceptions=True)

    async def close(self) -> None:
        """Return every lease and write pending usage (at shutdown)."""
        if self._ticker is not None:
            self._ticker.cancel()
        for budget in list(self._budgets.values()):
            for _ in range(2):
                if budget.current is None and budget.closing is None and not budget.pending:
                    break
                try:
                    await self._sync(budget, 0, (), claim_new=False)
                except Exception:
                    break

    def stats(self) -> Mapping[str, int]:
        return {"syncs": self.syncs, "fallback_admissions": self.fallback_admissions, "consumers": len(self._budgets)}


def _spent(usage: Usage) -> int:
    return sum(usage.get(CONSUMER_SCOPE, {}).values())


def _local_wait_ms(window: Mapping[int, int], excess: int, now_ms: int) -> float:
    freed = 0
    for expiry in sorted(window):
        freed += window[expiry]
        if freed >= excess:
            return float(expiry - now_ms)
    return float(WINDOW_MS)


def _rate_error(limit: int, wait_ms: float, extra: Mapping[str, str]) -> GatewayError:
    wait_ms = max(1.0, wait_ms)
    seconds = max(1, math.ceil(wait_ms / 1000))
    return GatewayError(
        429,
        f"This key has used its {limit} tokens per minute; retry after {seconds} seconds.",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={
            "retry-after": str(seconds),
            "retry-after-ms": str(int(math.ceil(wait_ms))),
            "x-ratelimit-limit-tokens": str(limit),
            "x-ratelimit-reset-tokens": f"{seconds}s",
            **extra,
        },
    )
