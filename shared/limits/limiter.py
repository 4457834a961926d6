"""Per-consumer token limits that hold across every gateway instance, at almost no cost per request.

Each instance admits requests from a **lease**: a block of tokens claimed from the consumer's shared ledger (see
ledger.py) with one ETag-conditional write. Admission is then a subtraction in memory; the Table is touched when a
lease runs low, expires or goes idle, not per request. What was really admitted (reconciled to the backend's usage) is
reported with the next write, bucketed by admission time, so the shared window stays exact.

The parts, one module each: leases.py (what this instance holds and has not reported), ledger_copy.py (the cached
copy and the conditional write), pacing.py (how much to claim, when to renew), refused_scopes.py (scopes the ledger refused),
fallback.py (the local window when the store is down), refusals.py (what the client is told). This module ties them
together per consumer and runs the writes, one at a time per consumer.

If the store is unreachable the instance falls back, by default, to a local window of the consumer's limit divided by
the configured instance count (fail-open), keeps what it admits as pending usage, and writes it back when the store
returns; with fail-closed it answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.background import keep_running
from shared.clock import Clock
from shared.limits import refusals
from shared.limits.allowance import QUIET_SETTLE_S, RENEW_AHEAD_S, Allowance, allowance, holders, quiet_claim
from shared.limits.backoff import BusyBackoff
from shared.limits.fallback import Fallback
from shared.limits.leases import Holdings, LeaseState, Outgoing
from shared.limits.ledger import (
    BUCKET_MS,
    CONSUMER_SCOPE,
    WINDOW_MS,
    Grant,
    Holding,
    Ledger,
    Quota,
    Refusal,
    begin_period,
    bucket_expiry,
    claim,
    quota_period,
)
from shared.limits.ledger_copy import Contended, LedgerCopy
from shared.limits.pacing import Pacing, lease_lifetime
from shared.limits.refused_scopes import Blocks
from shared.limits.scopes import CONSUMER, TEAM, USER, Level, Scopes, level_name, levels_for, scopes_for
from shared.limits.tickets import Held, Place, Ticket, UnlimitedTicket
from shared.limits.user_shares import MAX_SHARE_S, SHARE_RETRY_MS, UserWindows, declare, declaring, serving
from shared.outcomes import NeverAdmissible, QuotaExhausted, RateLimited
from shared.records.consumers import Consumer
from shared.storage.ledger_shards import ShardedLedgerStore
from shared.storage.protocols import LedgerStore, StoreBusy, StoreUnavailable
from shared.telemetry.protocol import Telemetry

log = logging.getLogger(__name__)

__all__ = ["LimitTicket", "Scopes", "Tickets", "TokenLimiter", "level_name", "scopes_for"]

CLOSING_GRACE_S = 2.0  # release a trimmed lease by then even if no renewal has come
PENDING_GRACE_S = 1.0  # write pending usage by then even if no renewal has come
MAX_CLAIMS_PER_REQUEST = 8  # a bound on the slow path; with claims sized for every waiter, one or two suffice
# Ledger writes in flight per instance. Thousands of consumers renewing at once (after a store outage, at start) would
# otherwise all wait on the store together and time out together.
MAX_CONCURRENT_SYNCS = 32
MAX_LEVELS_SEEN = 4096  # consumer records x deployments whose levels are kept (cleared when full)


@dataclass(eq=False)
class LedgerState:
    """One ledger's limiting state on this instance: a consumer's, a team's or an end user's."""

    consumer_id: str  # the ledger's key (partition): a consumer id, team|<id> or user|<consumer>|<user>
    kind: str = CONSUMER
    account: int = 0  # which storage account holds the ledger (GATEWAY_LEDGER_ACCOUNTS: ledger_shards.py)
    user_tpm: int = 0  # each end user's tokens per minute (a consumer's ledger), and this instance's share of it
    user_share: int = 0
    users: UserWindows = field(default_factory=UserWindows)
    limits: dict[str, int] = field(default_factory=dict)  # every scope this instance limits for the consumer
    quota: Quota | None = None
    scope_used_mono: dict[str, float] = field(default_factory=dict)
    held: Holdings = field(default_factory=Holdings)
    copy: LedgerCopy = field(default_factory=LedgerCopy)
    pace: Pacing = field(default_factory=Pacing)
    blocks: Blocks = field(default_factory=Blocks)
    fallback: Fallback = field(default_factory=Fallback)
    backoff: BusyBackoff = field(default_factory=BusyBackoff)  # after a ServerBusy on this ledger (backoff.py)
    spread: float = 1.0  # how much longer than usual leases last (many instances hold leases on it: pacing.py)
    sync_task: asyncio.Task[None] | None = None
    last_sync_mono: float = 0.0
    # A request ended below its reservation since the last write: the ledger (and any refusal learnt from it) still
    # counts tokens this instance is about to free, so a refusal is checked by a write, not repeated from memory.
    refunded: bool = False
    noted: Scopes | None = None  # the scopes last noted, and when: the same ones again within a second change nothing
    noted_mono: float = -1e18
    asked_mono: float = 0.0  # the last request for this ledger here (admitted or not)

    def note(self, scopes: Scopes, reserve: int, mono: float, user_tpm: int = 0) -> None:
        self.asked_mono = mono
        if scopes is self.noted and mono - self.noted_mono < 1.0 and (not user_tpm or user_tpm == self.user_tpm):
            # Same limits as a moment ago (the limiter hands out one Scopes per consumer object): only the pace moves.
            # A scope's last use is then at most a second old, against the minute after which it is forgotten.
            self.pace.note_request(reserve)
            return
        self.noted, self.noted_mono = scopes, mono
        changed = False
        for scope, limit in scopes.limits.items():
            before = self.limits.get(scope)
            if before != limit:
                self.blocks.lift(scope)  # the admin changed the limit: what was full may not be any more
                self.pace.saturated_until = 0.0
                changed = changed or before is not None
            self.limits[scope] = limit
            self.scope_used_mono[scope] = mono
        for scope in [s for s, t in self.scope_used_mono.items() if mono - t > WINDOW_MS / 1000]:
            del self.scope_used_mono[scope]
            self.limits.pop(scope, None)
        if self.quota != scopes.quota:
            self.blocks.lift(CONSUMER_SCOPE)
            self.pace.saturated_until = 0.0
            changed = True
        self.quota = scopes.quota
        if user_tpm and user_tpm != self.user_tpm:
            changed = changed or self.user_tpm > 0
            self.user_share = min(self.user_share, user_tpm)
            self.user_tpm = user_tpm
        lease = self.held.current
        if changed and lease is not None:
            # A lease (an allowance may last minutes) was claimed under the old limit: it admits nothing more, and the
            # next write releases it and claims under the new one, so a lowered limit holds from the next request.
            lease.expires_s = 0.0
        self.pace.note_request(reserve)

    def syncing(self) -> bool:
        return self.sync_task is not None and not self.sync_task.done()


class LimitTicket:
    __slots__ = ("_limiter", "_budget", "_lease", "_limits", "_scopes", "_holding", "_quota_key", "_settled", "_user")

    def __init__(
        self, limiter: TokenLimiter, budget: LedgerState, lease: LeaseState | None, limits: Scopes,
        expiry: int, reserved: int, quota_key: str | None, user: str | None = None,
    ) -> None:
        self._user = user
        self._limiter = limiter
        self._budget = budget
        self._lease = lease
        self._limits = limits
        self._scopes = limits.names
        self._holding = Holding(reserved, expiry)
        self._quota_key = quota_key
        self._settled = False

    @property
    def headers(self) -> dict[str, str]:
        """The consumer's own x-ratelimit-* values, as this instance sees them now."""
        return self._limiter._headers(self._budget, self._limits)

    def progress(self, tokens_so_far: int) -> None:
        if not self._settled:
            self._limiter._charge(self, tokens_so_far, final=False)

    def settle(self, actual_tokens: int) -> None:
        if self._settled:
            return
        self._settled = True
        if self._lease is not None:
            self._lease.open -= 1
        self._limiter._charge(self, actual_tokens, final=True)

    def hold(self, tokens: int, until_s: float, spent: int = 0) -> Held | None:
        if self._settled:
            return None
        streamed = self._holding.served  # what progress charged already: its final usage is charged less this
        self.settle(spent)
        expiry = hold_expiry(until_s)
        return Held(tokens, expiry, (self._limiter._hold(self, tokens, expiry),), streamed)


UNLIMITED = UnlimitedTicket()


def hold_expiry(until_s: float) -> int:
    """The bucket a hold until `until_s` sits in (rounded up: never released early)."""
    return -(-int(until_s * 1000) // BUCKET_MS) * BUCKET_MS


class Tickets:
    """A request admitted at several levels: one ticket per level, settled together; the headers are the tightest
    level's."""

    __slots__ = ("_tickets",)

    def __init__(self, tickets: list[LimitTicket]) -> None:
        self._tickets = tickets

    @property
    def headers(self) -> dict[str, str]:
        tightest: dict[str, str] = {}
        for ticket in self._tickets:
            headers = ticket.headers
            for field_, limit_field in (("x-ratelimit-remaining-tokens", "x-ratelimit-limit-tokens"),
                                        ("x-ratelimit-remaining-quota-tokens", "x-ratelimit-limit-quota-tokens")):
                if field_ in headers and (field_ not in tightest or int(headers[field_]) < int(tightest[field_])):
                    tightest[field_], tightest[limit_field] = headers[field_], headers[limit_field]
        return tightest

    def progress(self, tokens_so_far: int) -> None:
        for ticket in self._tickets:
            ticket.progress(tokens_so_far)

    def settle(self, actual_tokens: int) -> None:
        for ticket in self._tickets:
            ticket.settle(actual_tokens)

    def hold(self, tokens: int, until_s: float, spent: int = 0) -> Held | None:
        held = [h for h in (t.hold(tokens, until_s, spent) for t in self._tickets) if h is not None]
        if not held:
            return None
        return Held(tokens, held[0].expiry_ms, tuple(p for h in held for p in h.places), held[0].credit)


_: type[Ticket] = Tickets  # the contract the request flow relies on


class _Write:
    """What one write of a consumer's ledger changes, worked out on the ledger as read (`change` may run again on a
    fresher copy when another instance wrote first): the usage this instance reports, and the lease it claims."""

    def __init__(self, limiter: TokenLimiter, budget: LedgerState, out: Outgoing, need: int, need_scopes: tuple[str, ...],
                 claim_new: bool, releasing: bool) -> None:
        self._limiter = limiter
        self._budget = budget
        self.out = out
        self._need = need
        self._need_scopes = need_scopes
        self._claim_new = claim_new
        self._releasing = releasing
        # Numbered when the write is made, not when it is stored: a lease id is never claimed twice by this instance,
        # whatever writes are in flight together (a claim under an id already in the ledger replaces that lease's hold).
        limiter._lease_seq += 1
        self.lease_id = f"{limiter._instance}:{limiter._lease_seq}"
        self.quota = budget.quota
        self.wants: dict[str, int] = {}
        self.grant: Grant | None = None
        self.plan: Allowance | None = None
        self.lifetime_s = limiter._lifetime_s  # a normal lease's, longer with many instances holding leases (pacing.py)
        self.share = budget.user_share  # this instance's share of each end user's limit, as the write declares it
        self.quiet = False  # a quiet claim (allowance.py): held longer in the ledger than it admits, close not written
        self.held_until_ms = 0  # when the claimed lease's hold leaves the ledger's window

    def change(self, ledger: Ledger, at: float) -> bool:
        """Apply the write to `ledger`; False when there is nothing to write (refused, and nothing to report)."""
        budget = self._budget
        begin_period(ledger, self.quota, at)
        self.out.report(ledger, at)
        if not self._claim_new:
            self.wants, self.grant, self.plan = {}, None, None
            if self._releasing and budget.user_tpm > 0:
                # No lease, no admissions: the declaration need only cover what its end users still hold here.
                at_ms = int(at * 1000)
                declare(ledger, self._limiter._instance, 0, budget.users.peak(at_ms), budget.user_tpm,
                        at_ms + WINDOW_MS, at_ms)
                self.share = budget.user_share = 0
            return True
        self._claim(ledger, at)
        # Refused and nothing to report: no write.
        return not (self.grant is not None and not self.grant.tokens and not self.out.anything)

    def _claim(self, ledger: Ledger, at: float) -> None:
        """The lease to claim: what the waiting requests need, what the pace wants, or an allowance that lasts minutes
        for a consumer far from its limit (allowance.py)."""
        limiter, budget, pace = self._limiter, self._budget, self._budget.pace
        serving = holders(ledger, int(at * 1000), limiter._instance)
        lifetime_s = self.lifetime_s = lease_lifetime(limiter._lifetime_s, serving)
        needs, wants = pace.wants(budget.limits, self.quota, budget.blocks, self._need, self._need_scopes, at,
                                  lifetime_s, limiter._max_fraction, serving)
        instances = max(limiter._instances, serving)
        plan = allowance(ledger, at, budget.limits, self.quota, pace.rate, pace.request_rate, pace.typical, instances,
                         limiter._lifetime_s) if wants else None
        if plan is not None:
            wants = {s: max(w, plan.tokens.get(s, 0)) for s, w in wants.items()}
            lifetime_s = plan.lifetime_s
            if budget.user_tpm > 0:
                # The end users' share is renewed with the lease: a newcomer instance waits at most this long.
                lifetime_s = min(lifetime_s, MAX_SHARE_S)
        hold_s = lifetime_s
        self.quiet = plan is None and bool(wants) and quiet_claim(
            ledger, at, budget.limits, self.quota, budget.user_tpm > 0, max(serving, limiter._instances), pace.request_rate,
            lifetime_s, wants)
        if self.quiet:
            # One request expected here: no headroom for a next one (it would only be held, unused, for a minute).
            usual = max(int(pace.typical), 1) * max(1, pace.waiting)
            wants = {s: max(needs.get(s, 0), min(w, usual)) for s, w in wants.items()}
            hold_s = lifetime_s + QUIET_SETTLE_S
        grant = claim(ledger, self.lease_id, needs, wants, budget.limits, self.quota, at, int(hold_s * 1000)) \
            if wants else None
        self.held_until_ms = int(at * 1000) + int(hold_s * 1000) + WINDOW_MS
        self.wants, self.grant, self.plan = wants, grant, plan
        if budget.user_tpm > 0 and grant is not None and grant.tokens:
            self._declare_share(ledger, at, lifetime_s)

    def _declare_share(self, ledger: Ledger, at: float, lifetime_s: float) -> None:
        """The end users' share rides on the claim (user_shares.py): the limit split among the instances declaring, at
        least two typical requests while room remains, never below what one holds here."""
        limiter, budget = self._limiter, self._budget
        at_ms = int(at * 1000)
        count = max(limiter._instances,
                    len(declaring(ledger, at_ms) | serving(ledger, at_ms) | {limiter._instance}))
        want = max(budget.user_tpm // count, int(2 * budget.pace.typical))
        self.share = declare(ledger, limiter._instance, want, budget.users.peak(at_ms), budget.user_tpm,
                             int((at + lifetime_s) * 1000) + WINDOW_MS, at_ms)
        # Until the write is stored, admissions here keep under the smaller of the old share and the new.
        budget.user_share = min(budget.user_share, self.share)


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
        end_users_max: int = 20_000,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        # The lost-race and ServerBusy pauses' jitter (ledger_copy.py, backoff.py): one source per instance, so that a
        # simulation seeded from its run's seed (bench.scale) replays a run exactly.
        self.rng = rng if rng is not None else random.Random()
        self.max_claims = MAX_CLAIMS_PER_REQUEST  # claims one request may wait for (a bench may try fewer)
        self._clock = clock
        self._telemetry = telemetry
        self._lifetime_s = lease_lifetime_s
        self._fail_closed = fail_closed
        self._instances = max(1, instance_count)
        self._instance = instance_id or uuid.uuid4().hex[:12]
        self._max_fraction = max_lease_fraction
        self._store_retry_s = store_retry_s
        self._budgets: dict[str, LedgerState] = {}
        self._end_users_max = end_users_max
        self._end_users = 0  # budgets of end users held here: bounded, an end user is a client's word
        self._lease_seq = 0
        self._ticker: asyncio.Task[None] | None = None
        self._background = background
        self.syncs = 0
        self.contended = 0
        self.busy = 0  # 503 ServerBusy on a ledger: throttled, not down (no fallback window)
        self.fallback_admissions = 0
        self.allowances = 0
        self.closes_unwritten = 0  # quiet leases closed without a write (their hold covered what they admitted)
        # Ledger operations by what they were for (claim: a request waiting; renew; release; flush) and what became of
        # them (reads, writes, lost races, found unneeded): where a busy ledger's write capacity goes (bench.scale).
        self.ledger_counts: dict[str, int] = {}
        # The store failed for one consumer: it is down for all of them (all on its storage account, when the ledgers
        # are spread over several). Until this time no consumer of this instance tries it (each would wait for its own
        # timeout, and retry, together), and admissions use the fallback.
        self._down_until: dict[int, float] = {}
        self._sharded = store if isinstance(store, ShardedLedgerStore) else None
        self._writes: asyncio.Semaphore | None = None
        self._levels_seen: dict[tuple[int, str], tuple[Consumer, list[Level]]] = {}

    # ---- the request path ----------------------------------------------------------------------------------------

    def _levels(self, consumer: Consumer, deployment: str, user: str | None = None) -> list[Level]:
        """levels_for, worked out once per consumer record and deployment (the directory replaces a consumer's record
        when it changes, so a changed limit is a new record); end users' levels are not kept."""
        if user is not None:
            return levels_for(consumer, deployment, user)
        key = (id(consumer), deployment)
        known = self._levels_seen.get(key)
        if known is not None and known[0] is consumer:  # the record itself is kept: its id cannot be reused meanwhile
            return known[1]
        levels = levels_for(consumer, deployment)
        if len(self._levels_seen) >= MAX_LEVELS_SEEN:
            self._levels_seen.clear()
        self._levels_seen[key] = (consumer, levels)
        return levels

    def needs_estimate(self, consumer: Consumer, deployment: str, user: str | None = None) -> bool:
        return bool(self._levels(consumer, deployment, user))

    def precheck(self, consumer: Consumer, deployment: str, at_least: int = 0, user: str | None = None) -> None:
        now = self._clock.now()
        for level in self._levels(consumer, deployment, user):
            for scope, limit in level.scopes.limits.items():
                if 0 < limit < at_least:
                    raise refusals.too_large(at_least, limit, level.kind, scope)
            budget = self._budgets.get(level.key)
            if budget is None:
                continue
            blocked = budget.blocks.refusal(level.scopes, now)
            if (blocked is not None and not budget.fallback.active(now)
                    and not self._may_fit(budget, level.scopes, at_least)):
                raise self._refused(budget, level.scopes, blocked[1], blocked[0], now, at_least, level.user)

    def room(self, consumer: Consumer, deployment: str, user: str | None = None) -> int | None:
        left: list[int] = []
        for level in self._levels(consumer, deployment, user):
            tokens, quota = self._remaining(self._budgets.get(level.key), level.scopes)
            left += [pair[1] for pair in (tokens, quota) if pair is not None]
        return min(left) if left else None

    async def admit(
        self, consumer: Consumer, deployment: str, reserve: int, user: str | None = None
    ) -> LimitTicket | Tickets | UnlimitedTicket:
        """Reserve `reserve` tokens at every level the request belongs to (its end user, the consumer, its team), or
        raise the refusal of the first level without room (429 over a rate, 403 over a quota), naming the level.
        Admission is all or nothing: what the levels before the refusing one had taken is released at once."""
        levels = self._levels(consumer, deployment, user)
        if not levels:
            return UNLIMITED
        for level in levels:
            for scope, limit in level.scopes.limits.items():
                if 0 < limit < reserve:
                    raise refusals.too_large(reserve, limit, level.kind, scope)
        taken: list[LimitTicket] = []
        try:
            for level in levels:
                taken.append(await self._admit_level(level, reserve))
        except BaseException as refusal:
            for ticket in taken:
                ticket.settle(0)  # released: its hold goes back to this instance's lease, nothing leaks
            if isinstance(refusal, (RateLimited, QuotaExhausted, NeverAdmissible)) and not refusal.level:
                refusal.level = levels[len(taken)].kind  # refused by the local fallback window
            raise
        return taken[0] if len(taken) == 1 else Tickets(taken)

    async def _admit_level(self, level: Level, reserve: int) -> LimitTicket:
        scopes = level.scopes
        budget = self._budgets.get(level.key)
        if budget is None:
            if level.kind == USER:
                if self._end_users >= self._end_users_max:
                    # End users are named by clients: their number on an instance is bounded. A new one waits until
                    # idle ones are forgotten (a minute without requests).
                    raise refusals.rate_limited(max(level.scopes.limits.values(), default=0), WINDOW_MS)
                self._end_users += 1
            budget = self._budgets[level.key] = self._new_state(level.key, level.kind)
            self._start_ticker()
        budget.note(scopes, reserve, self._clock.monotonic(), level.user_tpm)
        user = level.user
        if user is not None and user not in budget.users and len(budget.users) >= self._end_users_max:
            raise self._user_refused(budget, WINDOW_MS)  # end users are a client's word: bounded per instance
        ticket = self._admit_from_lease(budget, scopes, reserve, user)
        if ticket is not None:
            return ticket
        # Slow path: this instance needs (more of) a lease. Requests that arrive together wait for the same write, and
        # the claim is sized for all of them; a request is refused only when the ledger says there is no room (or the
        # store keeps failing), never because other waiters took the tokens first.
        budget.pace.waiting += 1
        try:
            for _ in range(self.max_claims):
                now = self._clock.now()
                if budget.fallback.active(now) or self._store_down(budget) > now:
                    return self._admit_degraded(budget, scopes, reserve, user)
                # What this instance knows is full is refused without a write, unless requests ended below their
                # reservations since and the tokens they free would let this one in: then the write decides.
                may_fit = self._may_fit(budget, scopes, reserve)
                blocked = budget.blocks.refusal(scopes, now)
                if blocked is not None and not may_fit:
                    raise self._refused(budget, scopes, blocked[1], blocked[0], now, reserve, user)
                if budget.backoff.active(now):  # the store throttled this ledger: no write before the pause ends
                    raise self._refused(budget, scopes, Refusal(CONSUMER_SCOPE, None), budget.backoff.until, now,
                                        reserve, user)
                saturated = self._saturated_until(budget, scopes, reserve, now)
                if saturated is not None and not may_fit:
                    raise self._refused(budget, scopes, Refusal(budget.pace.saturated_scope, None), saturated, now,
                                        reserve, user)
                await self._sync(budget, reserve, scopes.names)
                ticket = self._admit_from_lease(budget, scopes, reserve, user, after_sync=True)
                if ticket is not None:
                    return ticket
        finally:
            budget.pace.waiting -= 1
        now = self._clock.now()
        if budget.fallback.active(now):
            return self._admit_degraded(budget, scopes, reserve, user)
        blocked = budget.blocks.refusal(scopes, now)
        refusal = blocked[1] if blocked else Refusal(CONSUMER_SCOPE, 1000)
        return_at = blocked[0] if blocked else now + 1
        raise self._refused(budget, scopes, refusal, return_at, now, reserve, user)

    def _new_state(self, key: str, kind: str) -> LedgerState:
        return LedgerState(key, kind, self._account(key), copy=LedgerCopy(rng=self.rng), backoff=BusyBackoff(rng=self.rng))

    def _account(self, key: str) -> int:
        return self._sharded.account(key) if self._sharded is not None else 0

    def _store_down(self, budget: LedgerState) -> float:
        """Until when the store of this ledger's account is left alone (0: it is not)."""
        return self._down_until.get(budget.account, 0.0)

    def _may_fit(self, budget: LedgerState, scopes: Scopes, need: int) -> bool:
        """Whether tokens this instance frees at its next write (its lease's rest, with what requests that ended below
        their reservations gave back) would make room for `need`: a refusal known from the last write is then checked
        by the next one (never twice for the same refunds). Room others free is learnt at the usual pace."""
        if not budget.refunded:
            return False
        held = budget.held
        lease = held.current
        for scope, limit in scopes.limits.items():
            if limit > 0:
                own = max(0, lease.available.get(scope, 0)) if lease is not None else 0
                if own - held.unwritten(scope) < need:
                    return False
        return True

    def _refused(
        self, budget: LedgerState, scopes: Scopes, refusal: Refusal, until: float, now: float, need: int,
        user: str | None = None,
    ) -> Exception:
        tokens, _ = self._remaining(budget, scopes)
        refused = refusals.refused(scopes, refusal, until, now, need, tokens[1] if tokens is not None else 0,
                                   budget.kind)
        if user is not None and isinstance(refused, RateLimited):
            # The narrowest level that refuses is the one named (levels_for): an end user already over its share here
            # would be refused by it whatever the consumer's window holds (the others' leases may hold the rest of a
            # window it cannot use), so it is told its own limit, and the longer of the two waits.
            own = budget.users.refuses(user, need, budget.user_share, int(now * 1000))
            if own is not None:
                return self._user_refused(budget, max(own, refused.wait_ms))
        return refused

    def _saturated_until(self, budget: LedgerState, scopes: Scopes, reserve: int, now: float) -> float | None:
        """While the window is full claims are spaced out, but the answer is the true time until this request fits,
        from the last copy of the ledger."""
        pace = budget.pace
        if not (pace.saturated_until > now and pace.saturated_scope in scopes.limits):
            return None
        scope = pace.saturated_scope
        until = pace.saturated_until
        ledger = budget.copy.ledger
        if ledger is not None:
            wait_ms = ledger.wait_ms(scope, reserve, scopes.limits[scope], int(now * 1000))
            if wait_ms is not None:
                until = max(until, now + wait_ms / 1000)
        return until

    def _admit_from_lease(
        self, budget: LedgerState, scopes: Scopes, reserve: int, user: str | None = None, after_sync: bool = False
    ) -> LimitTicket | None:
        lease = budget.held.current
        if lease is None:
            return None
        now = self._clock.now()
        now_ms = int(now * 1000)
        if user is not None and now < lease.expires_s:
            wait_ms = budget.users.wait_ms(user, reserve, budget.user_share, now_ms)
            if wait_ms is None:
                if not after_sync:
                    return None  # this instance's share is too small for it: the next write asks for more
                raise self._user_refused(budget, SHARE_RETRY_MS)  # other instances hold the end users' limit for now
            if wait_ms > 0:
                raise self._user_refused(budget, wait_ms)
        expiry = bucket_expiry(now_ms)
        if not lease.take(scopes.names, reserve, expiry, now):
            return None
        if user is not None:
            budget.users.charge(user, expiry, reserve)
        budget.pace.admitted(reserve, self._clock.monotonic())
        if not lease.quiet and not budget.syncing() and budget.pace.needs_renewal(lease, now):
            self._sync_in_background(budget)
        return LimitTicket(self, budget, lease, scopes, expiry, reserve, lease.quota_key, user)

    @staticmethod
    def _user_refused(budget: LedgerState, wait_ms: float) -> RateLimited:
        refused = refusals.rate_limited(budget.user_tpm, wait_ms)
        refused.level = USER
        return refused

    def _admit_degraded(self, budget: LedgerState, scopes: Scopes, reserve: int, user: str | None = None) -> LimitTicket:
        """The store is unreachable: fail closed (503), or admit against this instance's share of the limit."""
        if self._fail_closed:
            raise refusals.store_unavailable()
        now = self._clock.now()
        if user is not None:
            wait_ms = budget.users.wait_ms(user, reserve, max(1, budget.user_tpm // self._instances), int(now * 1000))
            if wait_ms != 0:
                raise self._user_refused(budget, wait_ms if wait_ms is not None else WINDOW_MS)
        expiry = budget.fallback.admit(scopes, reserve, now, self._instances)
        if user is not None:
            budget.users.charge(user, expiry, reserve)
        mono = self._clock.monotonic()
        held = budget.held
        held.to_pending({scope: {expiry: reserve} for scope in scopes.limits}, mono)
        if scopes.quota is not None:
            held.pending_quota_key = quota_period(scopes.quota.period, now)[0]
        budget.pace.last_admit_mono = mono
        self.fallback_admissions += 1
        return LimitTicket(self, budget, None, scopes, expiry, reserve, held.pending_quota_key, user)

    def _charge(self, ticket: LimitTicket, total: int, final: bool) -> None:
        """What a request is known to have used by now goes into the window *now* (see Holding): an overrun learnt
        late is paid for by the next 60 s, not lost in a bucket that has already left the window."""
        changes = ticket._holding.step(total, int(self._clock.now() * 1000), final)
        if not changes:
            return
        # A request can outlive its consumer's state here (forgotten after a minute without admissions): its usage
        # goes to the consumer's current state, registered again if need be, so it is written, never dropped.
        budget = self._budgets.get(ticket._budget.consumer_id)
        if budget is None:
            budget = self._budgets[ticket._budget.consumer_id] = ticket._budget
            self._end_users += budget.kind == USER
        if budget is not ticket._budget:
            ticket._budget, ticket._lease = budget, None
        mono = self._clock.monotonic()
        for expiry, delta in changes.items():
            if ticket._user is not None:
                budget.users.charge(ticket._user, expiry, delta)
            budget.held.settle(ticket._lease, ticket._scopes, expiry, delta, ticket._quota_key, mono)
            if ticket._lease is None:
                budget.fallback.settle(ticket._scopes, expiry, delta)
        budget.pace.corrected(sum(changes.values()))
        if sum(changes.values()) < 0:
            budget.refunded = True

    def _hold(self, ticket: LimitTicket, tokens: int, expiry: int) -> Place:
        """Book `tokens` into the ticket's scopes at bucket `expiry`: they occupy the window until then."""
        budget = self._budgets.setdefault(ticket._budget.consumer_id, ticket._budget)
        lease = ticket._lease if budget is ticket._budget else None
        budget.held.settle(lease, ticket._scopes, expiry, tokens, ticket._quota_key, self._clock.monotonic())
        return Place(budget.consumer_id, ticket._scopes, ticket._quota_key)

    def _book(self, place: Place, changes: Mapping[int, int]) -> None:
        """Corrections outside any ticket, as pending usage: written with the next write (within PENDING_GRACE_S)."""
        budget = self._budgets.get(place.ledger)
        if budget is None:
            kind = TEAM if place.ledger.startswith("team|") else USER if place.ledger.startswith("user|") else CONSUMER
            budget = self._budgets[place.ledger] = self._new_state(place.ledger, kind)
            if kind == USER:
                self._end_users += 1
            self._start_ticker()
        mono = self._clock.monotonic()
        for expiry, delta in changes.items():
            if delta:
                budget.held.settle(None, place.scopes, expiry, delta, place.quota_key, mono)
        if sum(changes.values()) < 0:
            budget.refunded = True

    def release(self, held: Held, used: int) -> None:
        now_bucket = bucket_expiry(int(self._clock.now() * 1000))
        if held.expiry_ms <= 0:
            # Held before holds were kept apart (its estimate was charged then, and has left the window): the rest.
            changes = {now_bucket: used - held.tokens}
        else:
            changes = {held.expiry_ms: -held.tokens}
            changes[now_bucket] = changes.get(now_bucket, 0) + used - held.credit
        for place in held.places:
            self._book(place, changes)

    def extend(self, held: Held, until_s: float) -> Held:
        expiry = hold_expiry(until_s)
        if expiry <= held.expiry_ms:
            return held
        for place in held.places:
            self._book(place, {held.expiry_ms: -held.tokens, expiry: held.tokens})
        return Held(held.tokens, expiry, held.places, held.credit)

    def _headers(self, budget: LedgerState, scopes: Scopes) -> dict[str, str]:
        headers: dict[str, str] = {}
        tokens, quota = self._remaining(budget, scopes)
        if tokens is not None:
            headers["x-ratelimit-limit-tokens"] = str(tokens[0])
            headers["x-ratelimit-remaining-tokens"] = str(tokens[1])
        if quota is not None:
            headers["x-ratelimit-limit-quota-tokens"] = str(quota[0])
            headers["x-ratelimit-remaining-quota-tokens"] = str(quota[1])
        return headers

    @staticmethod
    def _remaining(budget: LedgerState | None, scopes: Scopes) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """(limit, remaining) of the tightest per-minute scope and of the quota, as this instance sees them now: the
        ledger's last copy and its own lease (a consumer it has not seen lately: all of it, for the ledger to judge)."""
        lease = budget.held.current if budget is not None else None
        occupancy = budget.copy.occupancy if budget is not None else {}
        tightest: tuple[int, int] | None = None
        for scope, limit in scopes.limits.items():
            if limit <= 0:
                continue
            own = lease.available.get(scope, 0) if lease is not None else 0
            # What this instance frees or adds at its next write: a trimmed lease's rest (finished requests' unused
            # reservations included) and corrections not written yet.
            unwritten = budget.held.unwritten(scope) if budget is not None else 0
            remaining = max(0, limit - occupancy.get(scope, 0) + max(0, own) - unwritten)
            if tightest is None or remaining < tightest[1]:
                tightest = (limit, remaining)
        if tightest is not None:
            tightest = (tightest[0], min(tightest))
        quota: tuple[int, int] | None = None
        if scopes.quota is not None:
            own = lease.quota_hold() if lease is not None else 0
            used = budget.copy.quota_used if budget is not None else 0
            remaining = max(0, scopes.quota.limit - used + own)
            quota = (scopes.quota.limit, min(scopes.quota.limit, remaining))
        return tightest, quota

    # ---- talking to the shared ledger ----------------------------------------------------------------------------

    def _sync_in_background(
        self, budget: LedgerState, need: int = 0, need_scopes: tuple[str, ...] = (), claim_new: bool = True,
        flush_only: bool = False,
    ) -> asyncio.Task[None]:
        """Start a sync unless one is running (one at a time per consumer); return the running one."""
        task = budget.sync_task
        if task is None or task.done():
            task = budget.sync_task = asyncio.get_running_loop().create_task(
                self._sync_once(budget, need, need_scopes, claim_new, flush_only)
            )
        return task

    async def _sync(self, budget: LedgerState, need: int, need_scopes: tuple[str, ...] = (), claim_new: bool = True) -> None:
        """Close the finished lease, trim or release the current one and claim a new one, in one conditional write."""
        # Shielded: a client that disconnects must not abort a write half-way through the bookkeeping.
        await asyncio.shield(self._sync_in_background(budget, need, need_scopes, claim_new))

    async def _sync_once(
        self, budget: LedgerState, need: int, need_scopes: tuple[str, ...], claim_new: bool, flush_only: bool = False
    ) -> None:
        """One conditional write of the consumer's ledger: report what this instance admitted, and claim (or renew,
        trim, release) its lease; see _Write for what the write changes, _failed and _written for what follows."""
        now = self._clock.now()
        down_until = self._store_down(budget)
        if down_until > now:
            budget.fallback.degraded_until = max(budget.fallback.degraded_until, down_until)
            return
        if budget.backoff.active(now):
            return
        mono = self._clock.monotonic()
        budget.pace.observe(mono)
        claim_new = claim_new and bool(budget.limits) and not flush_only
        # Detach what this write reports (a flush leaves the current lease alone); if the write fails it is put back.
        out = budget.held.detach(not flush_only, claim_new, now, budget.pace.typical)
        refunded, budget.refunded = budget.refunded, False
        releasing = not claim_new and not flush_only and budget.held.current is None and out.old is not None
        write = _Write(self, budget, out, need, need_scopes, claim_new, releasing)
        if self._writes is None:
            self._writes = asyncio.Semaphore(MAX_CONCURRENT_SYNCS)
        try:
            purpose = ("flush" if flush_only else "claim" if need else "renew" if claim_new else "release")
            counts = self.ledger_counts
            counts[purpose] = counts.get(purpose, 0) + 1
            async with self._writes:
                ledger, now = await budget.copy.commit(self._store, budget.consumer_id, self._clock, write.change,
                                                       counts)
        except (StoreUnavailable, Contended) as exc:
            budget.held.restore(out, mono)
            budget.refunded = budget.refunded or refunded
            self._failed(budget, exc)
            return
        self._written(budget, write, ledger, now, mono)

    def _failed(self, budget: LedgerState, exc: StoreUnavailable | Contended) -> None:
        """A write that did not happen: contention and throttling are retried; a store that is down is left alone for
        a while by every consumer of this instance (the fallback window admits meanwhile, or nothing if fail-closed)."""
        if isinstance(exc, Contended):
            # The store answers; others simply wrote first every time. Not a reason to fall back to local limits
            # (which would admit beyond the shared limit): the waiting requests try again or are told to retry.
            self.contended += 1
            return
        if isinstance(exc, StoreBusy):
            # The store answers but throttles the ledger's partition (503 ServerBusy). Like contention: the leases
            # already admitted their share, so a fallback window on top would admit beyond the shared limit.
            # The waiting requests are refused (429 with Retry-After) and, so that the throttled partition is asked
            # less, this instance leaves the ledger alone for a pause (backoff.py).
            self.busy += 1
            budget.backoff.busy(self._clock.now(), exc.retry_after_s)
            return
        failed_at = self._clock.now()
        if self._store_down(budget) <= failed_at:
            log.warning("limiter store unavailable (%s, consumer %s, ledger account %d); %s for %.1f s", exc,
                        budget.consumer_id, budget.account,
                        "failing closed" if self._fail_closed else "using the local fallback window",
                        self._store_retry_s)
        self._down_until[budget.account] = failed_at + self._store_retry_s
        if budget.fallback.failed(failed_at, self._store_retry_s):
            self._telemetry.store_fallback("closed" if self._fail_closed else "open")

    def _written(self, budget: LedgerState, write: _Write, ledger: Ledger, now: float, mono: float) -> None:
        """The write was stored: what it granted becomes this instance's lease, what it learnt its copy."""
        self.syncs += 1
        budget.backoff.cleared()
        budget.fallback.recovered()
        budget.last_sync_mono = mono
        trimmed = budget.held.committed(write.out, mono)
        if trimmed:
            # The trimmed lease is closing now (released by the next write): it admits nothing more, whether or not
            # this write claimed a new one. (A renewal that claimed nothing, every scope known full, used to leave it
            # current *and* closing: the next write released its hold while it still admitted, over the limit.)
            budget.held.current = None
        grant, plan = write.grant, write.plan
        if grant is not None:
            budget.blocks.record(grant, now)
            budget.spread = write.lifetime_s / self._lifetime_s
            budget.pace.claimed(write.wants, grant, budget.limits, now, budget.spread)
            if grant.tokens:
                lifetime_s = plan.lifetime_s if plan is not None else write.lifetime_s
                quota = write.quota
                budget.held.current = LeaseState(
                    id=write.lease_id,
                    available=dict(grant.tokens),
                    expires_s=now + lifetime_s,
                    quota_key=quota_period(quota.period, now)[0] if quota else None,
                    quota_held=grant.quota_tokens > 0,
                    written_quota_hold=grant.quota_tokens,
                    renew_ahead_s=min(lifetime_s / 4, RENEW_AHEAD_S) if plan is not None else lifetime_s / 4,
                    idle_after_s=plan.idle_after_s if plan is not None else self._lifetime_s,
                    allowance=plan is not None,
                    quiet=write.quiet,
                    held={s: t for s, t in grant.tokens.items() if budget.limits.get(s, 0) > 0},
                    held_until_ms=write.held_until_ms,
                )
                if plan is not None:
                    self.allowances += 1
                budget.user_share = write.share
        budget.copy.observe(ledger, lambda: list(budget.limits), now, holders(ledger, int(now * 1000), self._instance))

    # ---- background upkeep ---------------------------------------------------------------------------------------

    def _start_ticker(self) -> None:
        if self._background:
            self._ticker = keep_running(self._ticker, self._tick_forever)

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
            if budget.syncing():
                continue
            held = budget.held
            lease = held.current
            idle = mono - budget.pace.last_admit_mono > (lease.idle_after_s if lease is not None else self._lifetime_s)
            # A trimmed lease still holds tokens nobody else can use, and pending usage should reach the ledger; both
            # usually ride along with the next renewal, and get a write of their own only if none comes soon.
            renew = lease is not None and (idle or lease.expires_s - now < lease.renew_ahead_s)
            quiet = lease is not None and lease.quiet
            if quiet:
                assert lease is not None
                # Not renewed ahead (no other request is expected here): closed once it is over and its requests have
                # settled, and only written if its hold does not cover what they used (allowance.py, quiet_claim).
                renew = idle or lease.expires_s <= now
                if renew and lease.open > 0 and now < lease.held_until_ms / 1000 - WINDOW_MS / 1000 - 1:
                    renew = False
                if renew and self._close_unwritten(budget):
                    continue
            # Writes of their own are as much rarer as leases are longer (many instances serving the consumer).
            flush = (held.closing is not None and mono - held.closing_since > CLOSING_GRACE_S * budget.spread) or (
                bool(held.pending) and mono - held.pending_since > PENDING_GRACE_S * budget.spread
            )
            if not (renew or flush):
                if self._forgettable(budget, mono):
                    del self._budgets[consumer_id]
                    self._end_users -= budget.kind == USER
                continue
            if budget.fallback.active(now) or self._store_down(budget) > now:
                continue
            syncs.append(self._sync_in_background(budget, 0, (), claim_new=not idle and not quiet,
                                                  flush_only=not renew))
        if syncs:
            await asyncio.gather(*syncs, return_exceptions=True)

    @staticmethod
    def _forgettable(budget: LedgerState, mono: float) -> bool:
        """Whether this instance may forget the ledger's state: nothing held or unwritten, no request waiting for it
        and none for a minute. A request on the slow path holds the state between its claims; forgotten then, its
        claim would make a lease the next request's new state knows nothing of (issue 32: two states of one ledger
        on an instance, their claims under one lease id, the second replacing the first's hold while it admitted).
        A consumer never admitted here has no admission time: its last request counts."""
        held = budget.held
        last = max(budget.pace.last_admit_mono, budget.asked_mono, budget.last_sync_mono)
        return (held.current is None and held.closing is None and not held.pending and budget.pace.waiting == 0
                and not budget.syncing() and mono - last > WINDOW_MS / 1000)

    def _close_unwritten(self, budget: LedgerState) -> bool:
        """Close a quiet lease without a write when its hold in the ledger covers what it admitted (leases.py,
        `covered`) and nothing else waits to be written; False: it is closed by a write, as any lease."""
        held = budget.held
        lease = held.current
        if (lease is None or lease.open > 0 or held.closing is not None or held.pending or budget.quota is not None
                or budget.user_tpm > 0 or not lease.covered()):
            return False
        held.current = None
        lease.released = True
        lease.unreported = {}
        self.closes_unwritten += 1
        return True

    async def close(self) -> None:
        """Return every lease and write pending usage (at shutdown)."""
        if self._ticker is not None:
            self._ticker.cancel()
        for budget in list(self._budgets.values()):
            held = budget.held
            for _ in range(2):
                if held.current is None and held.closing is None and not held.pending:
                    break
                try:
                    await self._sync(budget, 0, (), claim_new=False)
                except Exception:
                    break

    def stats(self) -> Mapping[str, int]:
        return {"syncs": self.syncs, "fallback_admissions": self.fallback_admissions, "consumers": len(self._budgets),
                "allowances": self.allowances, "closes_unwritten": self.closes_unwritten}
