"""How much to claim and when: lease sizes from the consumer's recent rate on this instance, renewal ahead of need,
and claims spaced out while the shared window is full."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.limits.leases import LeaseState
from shared.limits.ledger import CONSUMER_SCOPE, Grant, Quota
from shared.limits.refused_scopes import Blocks

RENEW_AHEAD_S = 0.25  # renew a lease when it has less than this long of admissions left at the current rate
# When the shared window is full, capacity trickles back as admissions age out; claiming it in larger, less frequent
# pieces keeps Table round trips per admitted request low without leaving it unused (the window slides).
SATURATED_CLAIM_INTERVAL_S = 1.0
RATE_MIN_SPAN_S = 0.25  # a rate measured over less than this is noise
# Every instance serving a consumer renews its lease on the consumer's one ledger entity about every 3/4 of a lease
# lifetime, so the entity's writes (and the ETag races between them) grow with the instances serving it (issue 32:
# 256 instances lost most of their writes to one another). Past HOLDERS_PER_LEASE instances holding leases, the lifetime
# grows with their number, up to MAX_LEASE_SCALE times, and so does the spacing of claims while the window is full:
# fewer writes, at the price of tokens held a little longer.
HOLDERS_PER_LEASE = 32
MAX_LEASE_SCALE = 4.0
# With that many holders, no claim asks more than this many even shares: the holds of all of them together then stay
# within SHARES_AT_MOST x lifetime / 60 s of the limit, the rest left for what was admitted. (Issue 32: at 20,000
# requests/s over 256 instances the rate an instance measured right after admitting its waiting requests at once was a
# spike, and 8 s of it per lease held 0.78-0.86 of the limit 8-12 s in, while 0.09-0.17 was admitted: 429s. Two shares
# did as well there but lengthened the admitted requests' tail at 5,000 requests/s: p99 4.9 -> 6.4 s; four, 5.8 s.)
SHARES_AT_MOST = 4


def lease_lifetime(base_s: float, holders: int) -> float:
    """A normal lease's lifetime when `holders` instances (this one included) hold leases on the ledger."""
    return base_s * min(MAX_LEASE_SCALE, max(1.0, holders / HOLDERS_PER_LEASE))


@dataclass(eq=False)
class Pacing:
    rate: float = 0.0  # tokens per second admitted here, smoothed
    request_rate: float = 0.0  # requests per second admitted here, smoothed
    typical: float = 0.0  # a typical reservation, smoothed: leases smaller than one request are useless
    waiting: int = 0  # requests of this consumer waiting here for a lease
    admitted_since_mark: int = 0
    requests_since_mark: int = 0
    rate_mark_mono: float = 0.0
    last_admit_mono: float = 0.0
    saturated_until: float = 0.0  # wall clock: the window was full at the last claim; next claim not before this
    saturated_scope: str = CONSUMER_SCOPE

    def note_request(self, reserve: int) -> None:
        self.typical = reserve if self.typical == 0 else 0.9 * self.typical + 0.1 * reserve

    def admitted(self, tokens: int, mono: float) -> None:
        self.admitted_since_mark += tokens
        self.requests_since_mark += 1
        self.last_admit_mono = mono

    def corrected(self, delta: int) -> None:
        self.admitted_since_mark += delta

    def observe(self, mono: float) -> None:
        """Fold what was admitted since the last observation into the smoothed rate."""
        elapsed = mono - self.rate_mark_mono if self.rate_mark_mono else 0.0
        if elapsed >= RATE_MIN_SPAN_S:
            observed = max(0, self.admitted_since_mark) / elapsed
            self.rate = observed if self.rate == 0 else 0.5 * self.rate + 0.5 * observed
            requests = self.requests_since_mark / elapsed
            self.request_rate = requests if self.request_rate == 0 else 0.5 * self.request_rate + 0.5 * requests
            self.admitted_since_mark = 0
            self.requests_since_mark = 0
            self.rate_mark_mono = mono
        elif not self.rate_mark_mono:
            self.rate_mark_mono = mono

    def wants(
        self, limits: Mapping[str, int], quota: Quota | None, blocks: Blocks, need: int, need_scopes: tuple[str, ...],
        now: float, lifetime_s: float, max_fraction: float, holders: int = 1,
    ) -> tuple[dict[str, int], dict[str, int]]:
        """At least the request's need; ideally what this instance admits over a lease lifetime, within a share. With
        many instances holding leases (`holders`), at least this instance's even share of the limit over the lifetime:
        the rate measured here starts at nothing and grows only as claims succeed, so without it each of hundreds of
        instances starting together would claim a request or two at a time, and the claims (one entity's writes)
        would be as many as the requests. And at most SHARES_AT_MOST even shares: a rate measured right after a
        burst of waiting requests was admitted at once is a spike, and a lifetime of it would hold the window empty."""
        needs: dict[str, int] = {}
        wants: dict[str, int] = {}
        usual = max(need, int(self.typical), 1)
        # Enough for a lease lifetime at the recent rate, and at least for everyone waiting right now.
        expected = max(int(self.rate * lifetime_s), usual * (self.waiting + 1))
        for scope, limit in limits.items():
            if scope not in need_scopes and blocks.blocked(scope, now):
                continue  # known to be full: asking again now would only waste the write
            cap = limit if limit > 0 else (quota.limit if quota else 0)
            scope_need = need if scope in need_scopes else 0
            upper = max(scope_need, int(cap * max_fraction)) if cap > 0 else max(usual, expected)
            share = int(limit * lifetime_s / 60 / holders) if limit > 0 and holders > HOLDERS_PER_LEASE else 0
            needs[scope] = scope_need
            wanted = min(max(expected, 2 * usual, share), upper)
            if share:
                wanted = min(wanted, max(SHARES_AT_MOST * share, 2 * usual))
            wants[scope] = max(scope_need, wanted)
        return needs, wants

    def needs_renewal(self, lease: LeaseState, now: float) -> bool:
        """Renew ahead of need, so requests rarely wait for a write: near expiry, or when a request or two are left."""
        if self.saturated_until > now:
            return False
        if lease.expires_s - now < lease.renew_ahead_s:
            return True
        low = max(self.typical, self.rate * RENEW_AHEAD_S, 1.0)
        return any(v < low for v in lease.available.values())

    def claimed(self, wants: Mapping[str, int], grant: Grant, limits: Mapping[str, int], now: float,
                spacing: float = 1.0) -> None:
        """`spacing`: how much longer than usual claims are spaced while the window is full (as leases last longer with
        many instances: each of them claiming every second would be hundreds of writes a second on one entity)."""
        # Only a full *window* slows claims down; a quota running out must be asked again, to answer 403.
        partial = [
            sc for sc, w in wants.items()
            if limits.get(sc, 0) > 0 and (sc in grant.refused or grant.tokens.get(sc, 0) < w)
            and not (sc == CONSUMER_SCOPE and grant.quota_bound and sc not in grant.refused)
        ]
        self.saturated_until = now + SATURATED_CLAIM_INTERVAL_S * spacing if partial else 0.0
        self.saturated_scope = partial[0] if partial else CONSUMER_SCOPE
