"""This instance's leases on one consumer's ledger: what it may still admit, and usage not yet reported.

A consumer has at most one *current* lease (admissions come from it), one *closing* lease (trimmed at the last write;
it still holds tokens in the ledger and is released with the next write), and *pending* usage with no lease to report
it under (admissions during a store outage, corrections that arrived after their lease was released). A write reports
all three at once (`Holdings.detach` -> `Outgoing.report` on a copy of the ledger); if the write fails they are put back
(`restore`), so no usage is ever dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.limits.ledger import CONSUMER_SCOPE, Ledger, report

Usage = dict[str, dict[int, int]]  # scope -> {window expiry ms: tokens}


def add(usage: Usage, scope: str, expiry: int, tokens: int) -> None:
    if tokens:
        bucket = usage.setdefault(scope, {})
        bucket[expiry] = bucket.get(expiry, 0) + tokens


def merge(into: Usage, other: Usage) -> None:
    for scope, buckets in other.items():
        for expiry, tokens in buckets.items():
            add(into, scope, expiry, tokens)


def spent(usage: Usage) -> int:
    return sum(usage.get(CONSUMER_SCOPE, {}).values())


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
    renew_ahead_s: float = 0.5  # renewed when less than this is left of its lifetime
    idle_after_s: float = 2.0  # returned when no request used it for this long
    allowance: bool = False  # a long lease of a quiet consumer (allowance.py): released, not trimmed, at renewal
    # A quiet claim (allowance.py, quiet_claim): held in the ledger long enough to cover its requests' settlement, so
    # that once they have settled within it the close need not be written (`covered`).
    quiet: bool = False
    held: dict[str, int] = field(default_factory=dict)  # tokens held in the ledger per limited scope
    held_until_ms: int = 0  # when that hold leaves the ledger's window
    open: int = 0  # requests admitted from it and not settled yet

    def quota_hold(self) -> int:
        return max(0, self.available.get(CONSUMER_SCOPE, 0)) if self.quota_held else 0

    def take(self, scopes: tuple[str, ...], tokens: int, expiry: int, now: float) -> bool:
        """Admit `tokens` in every scope if the lease is live and has them."""
        if now >= self.expires_s:
            return False
        available = self.available
        for scope in scopes:
            if available.get(scope, -1) < tokens:
                return False
        for scope in scopes:
            available[scope] -= tokens
            add(self.unreported, scope, expiry, tokens)
        self.open += 1
        return True

    def covered(self) -> bool:
        """Whether the hold this lease keeps in the ledger covers, at every instant, what it admitted: every bucket of
        its usage (settlements included) leaves the window no later than the hold, and its usage in each scope is no
        more than the hold. Then the ledger's occupancy is an upper bound without the close: it need not be written."""
        for scope, buckets in self.unreported.items():
            live = [(e, t) for e, t in buckets.items() if t > 0]
            if not live:
                continue
            if scope not in self.held or sum(t for _, t in live) > self.held[scope]:
                return False
            if max(e for e, _ in live) > self.held_until_ms:
                return False
        return True


@dataclass(eq=False)
class Outgoing:
    """What one write reports: the closing lease, the current one (kept trimmed or released) and pending usage."""

    closing: LeaseState | None
    closing_usage: Usage
    old: LeaseState | None
    old_usage: Usage
    old_keep: dict[str, int] | None  # what the current lease still holds, if it stays current (trimmed)
    pending: Usage
    pending_key: str | None

    @property
    def anything(self) -> bool:
        return bool(self.closing or self.old or self.pending)

    def report(self, ledger: Ledger, now: float) -> None:
        closing, old = self.closing, self.old
        if closing:
            report(ledger, closing.id, self.closing_usage, None, closing.quota_key, spent(self.closing_usage),
                   closing.written_quota_hold, 0, now)
        if old:
            keep = self.old_keep
            hold_after = max(0, keep.get(CONSUMER_SCOPE, 0)) if (keep and old.quota_held) else 0
            report(ledger, old.id, self.old_usage, keep, old.quota_key, spent(self.old_usage),
                   old.written_quota_hold, hold_after, now)
        if self.pending:
            report(ledger, None, self.pending, None, self.pending_key, spent(self.pending), 0, 0, now)


@dataclass(eq=False)
class Holdings:
    current: LeaseState | None = None
    closing: LeaseState | None = None
    pending: Usage = field(default_factory=dict)  # usage with no lease to report it under (fallback, late corrections)
    pending_quota_key: str | None = None
    closing_since: float = 0.0
    pending_since: float = 0.0

    def unwritten(self, scope: str) -> int:
        """Tokens the next write adds to `scope`'s occupancy (negative: frees): pending corrections, less what the
        closing lease still holds."""
        closing = self.closing
        held = max(0, closing.available.get(scope, 0)) if closing is not None and not closing.released else 0
        return sum(self.pending.get(scope, {}).values()) - held

    def to_pending(self, usage: Usage, mono: float) -> None:
        if usage and not self.pending:
            self.pending_since = mono
        merge(self.pending, usage)

    def settle(self, lease: LeaseState | None, scopes: tuple[str, ...], expiry: int, delta: int,
               quota_key: str | None, mono: float) -> None:
        """Correct an admission by `delta` tokens: on its lease while that is unreported, else as pending usage."""
        live = lease is not None and not lease.released
        for scope in scopes:
            if live:
                assert lease is not None
                lease.available[scope] = lease.available.get(scope, 0) - delta
                add(lease.unreported, scope, expiry, delta)
            else:
                if not self.pending:
                    self.pending_since = mono
                add(self.pending, scope, expiry, delta)
        if not live:
            self.pending_quota_key = self.pending_quota_key or quota_key

    def detach(self, keep_current: bool, claim_new: bool, now: float, typical: float) -> Outgoing:
        """Take what the next write reports. The current lease stays current (trimmed to what it has) while the write
        runs, unless the write is not to claim a new one, or it is expired or too small for a request, or it is an
        allowance (a quiet consumer's requests rarely arrive during the write; a trimmed lease would cost a second
        write to release)."""
        old = self.current if keep_current else None
        closing = self.closing
        out = Outgoing(
            closing=closing,
            closing_usage=closing.unreported if closing else {},
            old=old,
            old_usage=old.unreported if old else {},
            old_keep=None,
            pending=self.pending,
            pending_key=self.pending_quota_key,
        )
        if closing:
            closing.unreported = {}
        if old:
            old.unreported = {}
        self.pending = {}
        if old is not None:
            if (not claim_new or old.allowance or old.expires_s <= now + 0.05
                    or min(old.available.values(), default=0) < max(1, typical)):
                self.current = None  # released by this write
            else:
                out.old_keep = dict(old.available)
        return out

    def restore(self, out: Outgoing, mono: float) -> None:
        """The write failed: everything it was to report is reported by a later one."""
        if out.closing:
            merge(out.closing.unreported, out.closing_usage)
        if out.old:
            merge(out.old.unreported, out.old_usage)
            if self.current is None:
                # Back as the current lease, even if expired (then it admits nothing): the next write releases it
                # with its usage, which must not be dropped.
                self.current = out.old
        self.to_pending(out.pending, mono)
        self.pending_quota_key = self.pending_quota_key or out.pending_key

    def committed(self, out: Outgoing, mono: float) -> bool:
        """The write is stored: mark what it released; return whether the current lease was trimmed (now closing)."""
        if out.pending_key == self.pending_quota_key:
            self.pending_quota_key = None
        closing, old = out.closing, out.old
        if closing:
            closing.released = True
            self.to_pending(closing.unreported, mono)  # corrections that arrived during the write
            closing.unreported = {}
        trimmed = old is not None and self.current is old
        if old is not None:
            if trimmed:
                keep = out.old_keep
                old.written_quota_hold = max(0, keep.get(CONSUMER_SCOPE, 0)) if (keep and old.quota_held) else 0
            else:
                old.released = True
                self.to_pending(old.unreported, mono)
                old.unreported = {}
        self.closing = old if trimmed else None
        self.closing_since = mono
        return trimmed
