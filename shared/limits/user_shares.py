"""End users' tokens per minute without a round trip of their own: each instance declares, in its consumer's ledger,
a *share*: the most it admits any one end user of that consumer in any 60 s. The declarations of all instances
together never exceed the end users' limit, and each instance keeps a local sliding window per end user under its
share. So in any 60 s an end user is admitted at most the sum of the shares, the limit, across every instance; and a
declaration rides on the consumer's lease claims, so 10,000 end users cost no Table work beyond the consumer's.

Why it holds. A declaration (share, until) is written with a lease claim; `until` is the lease's last possible
admission + 60 s, and the same instance's next claim replaces it. The local check admits an end user only while its
local window plus the request fits under the share of the current lease. When a declaration is replaced, it is never
below what any end user already holds in that instance's local window (`floor`): so in any 60 s ending at t, what an
instance admitted one end user is within the declaration it has at t, which is live at t (its admissions are at most
60 s old). At every write the sum of the live declarations is checked against the limit, so the end user's total, summed
over the instances that admitted it in those 60 s, is within the limit.

What it costs: the limit is split. An instance declares the limit divided by the instances serving the consumer (those
declaring or holding a lease on it, at least GATEWAY_INSTANCE_COUNT), at least two typical requests while room
remains; an end user served by one instance only gets that instance's share, and an instance that starts serving the
consumer gets room as the others' next renewals shrink theirs (a busy consumer's leases are renewed every ~2 s; a
consumer with end-user limits renews an allowance at least every MAX_SHARE_S). Until then it refuses end users with
scope `user` and Retry-After 1 s. With GATEWAY_INSTANCE_COUNT set to the scale-out limit (Bicep does), the shares are
right from the first claim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.limits.ledger import WINDOW_MS, Ledger

# A consumer with end-user limits renews its lease (an allowance included) at least this often, so an instance that
# starts serving it gets a share within about this long.
MAX_SHARE_S = 30.0
# An end user refused because this instance's share is below one request is told to come back after this: the share
# may grow at the next claim (the others' renewals shrink theirs).
SHARE_RETRY_MS = 1000


def declare(ledger: Ledger, instance: str, want: int, floor: int, limit: int, until_ms: int, now_ms: int) -> int:
    """Write this instance's declaration; return the share its end users may be admitted under from now on (<= the
    declaration, which also covers `floor`, what one end user already holds here)."""
    ledger.user_shares = {i: v for i, v in ledger.user_shares.items() if v[1] > now_ms}
    others = sum(v[0] for i, v in ledger.user_shares.items() if i != instance)
    share = max(0, min(want, limit - others))
    declared = max(share, floor)
    if declared > 0:
        ledger.user_shares[instance] = [declared, until_ms]
    else:
        ledger.user_shares.pop(instance, None)
    return share


def declaring(ledger: Ledger, now_ms: int) -> set[str]:
    return {i for i, v in ledger.user_shares.items() if v[1] > now_ms}


def serving(ledger: Ledger, now_ms: int) -> set[str]:
    """Instances holding a lease on the consumer: each may need a share of its end users' limit."""
    return {lease_id.split(":", 1)[0] for lease_id, lease in ledger.leases.items() if lease.expires_ms > now_ms}


@dataclass(eq=False)
class UserWindows:
    """This instance's admissions per end user of one consumer, in 60 s windows of 0.5 s buckets."""

    windows: dict[str, dict[int, int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.windows)

    def __contains__(self, user: str) -> bool:
        return user in self.windows

    def _live(self, user: str, now_ms: int) -> dict[int, int]:
        window = self.windows.get(user)
        if window is None:
            return {}
        for expiry in [e for e in window if e <= now_ms]:
            del window[expiry]
        return window

    def wait_ms(self, user: str, need: int, share: int, now_ms: int) -> int | None:
        """0 when `need` fits under `share` now, else how long until it does (None: not under this share)."""
        if need > share:
            return None
        window = self._live(user, now_ms)
        held = sum(window.values())
        if held + need <= share:
            return 0
        for expiry in sorted(window):
            held -= window[expiry]
            if held + need <= share:
                return expiry - now_ms
        return WINDOW_MS

    def refuses(self, user: str, need: int, share: int, now_ms: int) -> int | None:
        """How long until `need` more fits under `share` for an end user this instance has admitted within the window
        and cannot admit now (a share below one request: SHARE_RETRY_MS, until a claim may raise it); None when it
        fits, or when the end user holds nothing here (then a small share says nothing of the end user)."""
        if not self._live(user, now_ms):
            return None
        wait = self.wait_ms(user, need, share, now_ms)
        if wait == 0:
            return None
        return wait if wait is not None else SHARE_RETRY_MS

    def charge(self, user: str, expiry: int, tokens: int) -> None:
        window = self.windows.setdefault(user, {})
        value = window.get(expiry, 0) + tokens
        if value > 0:
            window[expiry] = value
        else:
            window.pop(expiry, None)

    def peak(self, now_ms: int) -> int:
        """The most any one end user holds here now; end users with nothing left are forgotten."""
        peak = 0
        for user in list(self.windows):
            window = self._live(user, now_ms)
            if window:
                peak = max(peak, sum(window.values()))
            else:
                del self.windows[user]
        return peak
