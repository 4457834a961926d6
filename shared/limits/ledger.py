"""A consumer's shared token ledger: a sliding 60-second window per scope, budget leases, and the period quota.

This is pure logic on a value; the limiter reads it from Table Storage, applies one of these operations, and writes it
back with an ETag condition, so concurrent gateway instances never lose an update.

The window is kept as *occupancy*: tokens admitted at time t occupy the window until t + 60 s. An instance does not
write every admission; it claims a **lease** (a block of tokens it may admit during the next few seconds). A lease of X
tokens claimed at t0 with lifetime L occupies X until t0 + L + 60 s, the latest any of its tokens could leave the
window. When the instance closes the lease it replaces that hold with what it really admitted, bucketed by admission
time, and the unused rest becomes free again. So at every instant the occupancy is an upper bound of the tokens
admitted in the last 60 seconds: the limit holds in *every* 60-second span, across every instance.

A request can use more than it reserved (no output cap). That excess is **debt**, carried until it is paid: no 60 s of
the window may release more than the scope's limit, so what a bucket holds beyond that stays a minute longer, and so on
(`carry`). A scope over its limit therefore stays closed until its occupancy falls back under the limit, and it frees
at most its limit a minute: the excess is never forgiven 60 s later. The ledger keeps each limited scope's limit (as the
last `claim` applied it) to carry the window by.
"""

from __future__ import annotations

import calendar
import time
from bisect import insort
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

WINDOW_MS = 60_000
BUCKET_MS = 500
CONSUMER_SCOPE = "*"
# Debt is laid out a minute's limit per bucket up to this far ahead (the entity holds at most 240 buckets of it).
DEBT_HORIZON_MS = 4 * 3_600_000
MAX_CARRY_STEPS = 10_000


def deployment_scope(deployment: str) -> str:
    return f"d:{deployment}"


def bucket_expiry(now_ms: int) -> int:
    """When tokens admitted at `now_ms` leave the window, rounded up to the bucket (never early)."""
    return -(-now_ms // BUCKET_MS) * BUCKET_MS + WINDOW_MS


@dataclass
class Lease:
    tokens: dict[str, int]  # scope -> tokens held
    expires_ms: int
    quota_tokens: int = 0


def carry(window: Mapping[int, int], limit: int, now_ms: int) -> dict[int, int]:
    """The window's buckets still in it at `now_ms`, with debt carried: tokens in the window from `e - 60 s` to `e`
    never exceed `limit`, what a bucket holds beyond that moves to a bucket 60 s later (and so on), so a scope in debt
    frees at most `limit` tokens a minute. A window that already keeps this is returned unchanged. Debt more than
    DEBT_HORIZON_MS ahead stays in one bucket there (the entity's size is bounded); it is spread again by later writes.
    Without a limit (0) nothing is carried."""
    live = {e: t for e, t in window.items() if e > now_ms and t > 0}
    if limit <= 0 or sum(live.values()) <= limit:
        return live
    horizon = now_ms + DEBT_HORIZON_MS
    due = sorted(live)
    kept: dict[int, int] = {}
    recent: list[int] = []  # expiries kept, oldest first, to sum the window ending at each bucket
    in_window = 0
    seen = 0
    for _ in range(MAX_CARRY_STEPS):
        if seen == len(due):
            break
        expiry = due[seen]
        seen += 1
        tokens = live.pop(expiry)
        while recent and recent[0] <= expiry - WINDOW_MS:
            in_window -= kept[recent.pop(0)]
        keep = tokens if expiry + WINDOW_MS > horizon else max(0, min(tokens, limit - in_window))
        if keep:
            kept[expiry] = keep
            recent.append(expiry)
            in_window += keep
        if tokens > keep:
            later = expiry + WINDOW_MS
            if later not in live:
                # Kept in order: `later` is after every expiry taken so far.
                insort(due, later, lo=seen)
            live[later] = live.get(later, 0) + tokens - keep
    for expiry in due[seen:]:  # steps exhausted (a bound never met in practice): the rest stays where it is
        kept[expiry] = kept.get(expiry, 0) + live.pop(expiry)
    return kept


@dataclass
class Ledger:
    windows: dict[str, dict[int, int]] = field(default_factory=dict)  # scope -> {expiry ms: tokens}
    leases: dict[str, Lease] = field(default_factory=dict)
    quota_key: str = ""
    quota_used: int = 0
    limits: dict[str, int] = field(default_factory=dict)  # scope -> tokens per minute, as the last claim applied
    # End users' shares (user_shares.py): instance -> [tokens any one end user may be admitted there in 60 s, until ms]
    user_shares: dict[str, list[int]] = field(default_factory=dict)

    def prune(self, now_ms: int) -> None:
        for scope in list(self.windows):
            entries = carry(self.windows[scope], self.limits.get(scope, 0), now_ms)
            if entries:
                self.windows[scope] = entries
            else:
                del self.windows[scope]
        self.leases = {k: v for k, v in self.leases.items() if v.expires_ms > now_ms}

    def occupancy(self, scope: str, now_ms: int) -> int:
        held = sum(t for e, t in self.windows.get(scope, {}).items() if e > now_ms)
        return held + sum(lease.tokens.get(scope, 0) for lease in self.leases.values() if lease.expires_ms > now_ms)

    def wait_ms(self, scope: str, need: int, limit: int, now_ms: int) -> int | None:
        """How long until `need` more tokens fit under `limit` in `scope`; None if they never can. Debt is paid first
        (see `carry`): a bucket frees only what it holds once the window is back under the limit."""
        if need > limit:
            return None
        occupancy = self.occupancy(scope, now_ms)
        if occupancy + need <= limit:
            return 0
        releases: dict[int, int] = {}
        for e, t in carry(self.windows.get(scope, {}), self.limits.get(scope, 0), now_ms).items():
            releases[e] = releases.get(e, 0) + t
        for lease in self.leases.values():
            held = lease.tokens.get(scope, 0)
            if held and lease.expires_ms > now_ms:
                releases[lease.expires_ms] = releases.get(lease.expires_ms, 0) + held
        for expiry in sorted(releases):
            occupancy -= releases[expiry]
            if occupancy + need <= limit:
                return expiry - now_ms
        return 0

    def add_usage(self, usage: Mapping[str, Mapping[int, int]], now_ms: int) -> None:
        """Record admitted tokens (or corrections, which may be negative) by scope and expiry."""
        for scope, buckets in usage.items():
            window = self.windows.setdefault(scope, {})
            for expiry, tokens in buckets.items():
                if expiry <= now_ms or tokens == 0:
                    continue
                value = window.get(expiry, 0) + tokens
                if value > 0:
                    window[expiry] = value
                else:
                    window.pop(expiry, None)
            if window:
                self.windows[scope] = carry(window, self.limits.get(scope, 0), now_ms)
            if not self.windows[scope]:
                del self.windows[scope]

    def to_entity(self) -> dict[str, object]:
        return {
            "windows": orjson.dumps({s: {str(e): t for e, t in w.items()} for s, w in self.windows.items()}).decode(),
            **lease_properties(self.leases),
            "quota_key": self.quota_key,
            "quota_used": self.quota_used,
            "limits": orjson.dumps(self.limits).decode(),
            "user_shares": orjson.dumps(self.user_shares).decode(),
        }

    @classmethod
    def from_entity(cls, entity: Mapping[str, object]) -> Ledger:
        windows_raw = orjson.loads(str(entity.get("windows") or "{}"))
        leases_raw = read_lease_properties(entity)
        return cls(
            windows={s: {int(e): int(t) for e, t in w.items()} for s, w in windows_raw.items()},
            leases={k: Lease(dict(v[0]), int(v[1]), int(v[2])) for k, v in leases_raw.items()},
            quota_key=str(entity.get("quota_key") or ""),
            quota_used=int(entity.get("quota_used") or 0),  # type: ignore[call-overload]
            limits={s: int(t) for s, t in orjson.loads(str(entity.get("limits") or "{}")).items()},
            user_shares={i: [int(v[0]), int(v[1])] for i, v in orjson.loads(str(entity.get("user_shares") or "{}")).items()},
        )

    def copy(self) -> Ledger:
        return Ledger(
            windows={s: dict(w) for s, w in self.windows.items()},
            leases={k: Lease(dict(v.tokens), v.expires_ms, v.quota_tokens) for k, v in self.leases.items()},
            quota_key=self.quota_key,
            quota_used=self.quota_used,
            limits=dict(self.limits),
            user_shares={i: list(v) for i, v in self.user_shares.items()},
        )


# A Table string property holds 64 KiB of UTF-16 (32K characters). Each instance holding a lease adds about 40
# characters to the ledger's leases (bench.scale: 375 leases, 14,148 characters, at 256 instances), so one property
# would refuse the write (400) past about 800 holders, and a refused ledger write is the store failing for this
# instance. The leases are spread over `leases`, `leases_1`, ... of at most LEASE_PROPERTY_CHARS each, whole entries
# per property (each a JSON object of its own); an entity's 1 MiB then carries about 10,000 holders.
LEASE_PROPERTY_CHARS = 30_000
LEASE_PROPERTY = "leases"


def lease_properties(leases: Mapping[str, Lease]) -> dict[str, str]:
    """The leases as one or more string properties, each under LEASE_PROPERTY_CHARS: `leases`, then `leases_1`...
    (the first always present, so a ledger without leases still says so)."""
    whole = orjson.dumps({k: [lease.tokens, lease.expires_ms, lease.quota_tokens] for k, lease in leases.items()}).decode()
    if len(whole) <= LEASE_PROPERTY_CHARS:
        return {LEASE_PROPERTY: whole}  # the usual case, one property: one encoding, as before
    parts: list[str] = []
    entries: list[str] = []
    size = 2
    for key, lease in leases.items():
        entry = orjson.dumps(key).decode() + ":" + orjson.dumps([lease.tokens, lease.expires_ms, lease.quota_tokens]).decode()
        if entries and size + len(entry) + 1 > LEASE_PROPERTY_CHARS:
            parts.append("{" + ",".join(entries) + "}")
            entries, size = [], 2
        entries.append(entry)
        size += len(entry) + 1
    parts.append("{" + ",".join(entries) + "}")
    return {LEASE_PROPERTY if i == 0 else f"{LEASE_PROPERTY}_{i}": part for i, part in enumerate(parts)}


def read_lease_properties(entity: Mapping[str, object]) -> dict[str, Any]:
    """Every lease of `leases`, `leases_1`, ... (read until the first missing one)."""
    leases: dict[str, Any] = dict(orjson.loads(str(entity.get(LEASE_PROPERTY) or "{}")))
    index = 1
    while (part := entity.get(f"{LEASE_PROPERTY}_{index}")) is not None:
        leases.update(orjson.loads(str(part)))
        index += 1
    return leases


@dataclass
class Holding:
    """What one admitted request occupies in its consumer's window, moved along as its usage becomes known.

    Admission holds the reservation in the admission bucket. When usage is learnt (every few seconds of a stream, or
    once at the end), the tokens served since the last step are charged to the bucket of *now*, so they occupy the
    window for the next 60 s, and what is left of the reservation moves to now too: a stream that runs for minutes is
    inside the window while it runs, and an overrun learnt after a minute is still paid for by the next one."""

    hold: int  # reservation not yet used by served tokens
    hold_expiry: int  # bucket (expiry ms) the hold sits in
    served: int = 0  # tokens charged as served so far

    def step(self, total: int, now_ms: int, final: bool) -> dict[int, int]:
        """Window changes (bucket expiry -> tokens, possibly negative) once `total` tokens are known to be used by now.
        `final`: the request is over, nothing more is held. Changes to buckets already out of the window are left
        out: they no longer occupy anything."""
        now_bucket = bucket_expiry(now_ms)
        changes: dict[int, int] = {}

        def add(expiry: int, tokens: int) -> None:
            if tokens and expiry > now_ms:
                changes[expiry] = changes.get(expiry, 0) + tokens

        new = max(0, total - self.served)
        if final:
            remaining = 0
        else:
            remaining = max(0, self.hold - new)
        if not new and remaining == self.hold and self.hold_expiry == now_bucket:
            return changes
        add(self.hold_expiry, -self.hold)
        add(now_bucket, new + remaining)
        self.served += new
        self.hold = remaining
        self.hold_expiry = now_bucket
        return {e: t for e, t in changes.items() if t}


@dataclass(frozen=True)
class Quota:
    limit: int
    period: str  # hourly, daily, weekly, monthly, yearly


def period_bounds(period: str, now_s: float) -> tuple[str, float, float]:
    """(key, start, end) of the fixed UTC period (hourly ... yearly) containing `now_s`."""
    t = time.gmtime(now_s)
    if period == "hourly":
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, 0, 0))
        return time.strftime("%Y-%m-%dT%H", t), start, start + 3600
    day_start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
    if period == "daily":
        return time.strftime("%Y-%m-%d", t), day_start, day_start + 86400
    if period == "weekly":
        start = day_start - t.tm_wday * 86400  # weeks start on Monday (ISO 8601)
        return time.strftime("%G-W%V", time.gmtime(start)), start, start + 7 * 86400
    if period == "monthly":
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
        return f"{t.tm_year:04d}-{t.tm_mon:02d}", start, calendar.timegm((year, month, 1, 0, 0, 0))
    if period == "yearly":
        start = calendar.timegm((t.tm_year, 1, 1, 0, 0, 0))
        return f"{t.tm_year:04d}", start, calendar.timegm((t.tm_year + 1, 1, 1, 0, 0, 0))
    raise ValueError(f"unknown quota period {period!r}")


def quota_period(period: str, now_s: float) -> tuple[str, float]:
    """(key, reset time) of the fixed UTC period containing `now_s`."""
    key, _, end = period_bounds(period, now_s)
    return key, end


@dataclass(frozen=True)
class Refusal:
    """Why a claim failed: over a rate (retry after `wait_ms`, or never if None) or out of quota."""

    scope: str
    wait_ms: int | None
    quota_exhausted: bool = False
    quota_reset_s: float = 0.0


@dataclass(frozen=True)
class Grant:
    """What a claim got: tokens per scope (possibly not every scope asked for), and why the others were refused."""

    tokens: dict[str, int]
    quota_tokens: int
    refused: dict[str, Refusal] = field(default_factory=dict)
    quota_bound: bool = False  # the consumer scope got less than the window had free: the quota's rest, not the window


def claim(
    ledger: Ledger,
    lease_id: str,
    need: Mapping[str, int],
    want: Mapping[str, int],
    limits: Mapping[str, int],
    quota: Quota | None,
    now_s: float,
    lifetime_ms: int,
) -> Grant:
    """Grant a lease of up to `want` (at least `need`) tokens per scope; scopes that cannot get their need are refused.
    Mutates `ledger`.

    A scope whose limit is 0 is unlimited: its lease is not held in the window. The consumer scope's grant is also
    bounded by the quota left in the current period.
    """
    now_ms = int(now_s * 1000)
    for scope, limit in limits.items():
        if limit > 0:
            ledger.limits[scope] = limit
        else:
            ledger.limits.pop(scope, None)
    ledger.prune(now_ms)
    granted: dict[str, int] = {}
    refused: dict[str, Refusal] = {}
    for scope, wanted in want.items():
        limit = limits.get(scope, 0)
        needed = need.get(scope, 0)
        if limit <= 0:
            granted[scope] = wanted
            continue
        free = limit - ledger.occupancy(scope, now_ms)
        if free < needed or free <= 0:
            refused[scope] = Refusal(scope, ledger.wait_ms(scope, max(needed, 1), limit, now_ms))
            continue
        granted[scope] = min(wanted, free)
    quota_tokens = 0
    quota_bound = False
    if quota is not None and quota.limit > 0 and CONSUMER_SCOPE in granted:
        key, reset_s = quota_period(quota.period, now_s)
        if ledger.quota_key != key:
            ledger.quota_key, ledger.quota_used = key, 0
        free_quota = quota.limit - ledger.quota_used
        needed = need.get(CONSUMER_SCOPE, 0)
        if free_quota < needed or free_quota <= 0:
            del granted[CONSUMER_SCOPE]
            refused[CONSUMER_SCOPE] = Refusal(CONSUMER_SCOPE, None, quota_exhausted=True, quota_reset_s=reset_s)
        else:
            quota_bound = free_quota < granted[CONSUMER_SCOPE]
            quota_tokens = min(granted[CONSUMER_SCOPE], free_quota)
            granted[CONSUMER_SCOPE] = quota_tokens
            ledger.quota_used += quota_tokens
    held = {s: t for s, t in granted.items() if limits.get(s, 0) > 0}
    if held or quota_tokens:
        ledger.leases[lease_id] = Lease(held, now_ms + lifetime_ms + WINDOW_MS, quota_tokens)
    return Grant(granted, quota_tokens, refused, quota_bound)


def begin_period(ledger: Ledger, quota: Quota | None, now_s: float) -> None:
    """Move the ledger's quota to the period containing `now_s` before anything is reported in it, so usage of the
    period that just ended is carried over by `report` instead of being added to a period about to be reset."""
    if quota is None or quota.limit <= 0:
        return
    key, _ = quota_period(quota.period, now_s)
    if key > ledger.quota_key:
        ledger.quota_key, ledger.quota_used = key, 0


def report(
    ledger: Ledger,
    lease_id: str | None,
    usage: Mapping[str, Mapping[int, int]],
    keep: Mapping[str, int] | None,
    quota_key: str | None,
    quota_spent: int,
    quota_hold_before: int,
    quota_hold_after: int,
    now_s: float,
) -> None:
    """Commit admitted tokens (and late corrections) and set what a lease still holds. Mutates `ledger`.

    `usage` is new usage by scope and expiry (corrections may be negative). `keep` is the lease's remaining hold per
    scope, None to release the lease. For the quota, which counts committed usage plus every lease's hold,
    `quota_spent` is the committed part of `usage` and the hold changes from `quota_hold_before` (what the instance
    last wrote, used when the lease already expired from the ledger) to `quota_hold_after`. Without a lease
    (`lease_id` None) only usage is committed.
    """
    now_ms = int(now_s * 1000)
    lease = ledger.leases.get(lease_id) if lease_id else None
    ledger.prune(now_ms)
    ledger.add_usage(usage, now_ms)
    if quota_key and quota_key > ledger.quota_key:
        # Usage from a newer period than the ledger has seen (keys of one period sort by time): start that period.
        ledger.quota_key, ledger.quota_used = quota_key, 0
    if quota_key and quota_key == ledger.quota_key:
        before = lease.quota_tokens if lease is not None else (quota_hold_before if lease_id else 0)
        after = quota_hold_after if (lease_id and keep is not None) else 0
        ledger.quota_used = max(0, ledger.quota_used + quota_spent - before + after)
    elif quota_key and quota_key < ledger.quota_key:
        # Usage of a period that has ended, learnt after the reset (a long generation settled, a late correction). That
        # period counted the lease's hold; what goes beyond it was never charged anywhere: it is charged to this one.
        before = lease.quota_tokens if lease is not None else (quota_hold_before if lease_id else 0)
        ledger.quota_used += max(0, quota_spent - before)
    if lease_id:
        if keep is None:
            ledger.leases.pop(lease_id, None)
        elif lease is not None:
            lease.tokens = {s: max(0, t) for s, t in keep.items() if t > 0}
            lease.quota_tokens = max(0, quota_hold_after)
