"""Allowances: long leases for consumers far from their limit, so a quiet consumer costs a Table write every few
minutes instead of one per request.

A lease normally lasts `GATEWAY_LEASE_LIFETIME_S` (2 s): a consumer that sends a request every few seconds finds its
lease gone every time and pays a claim (a ledger write) per request. An *allowance* is the same lease, claimed the same
way, with a lifetime sized to last about `ALLOWANCE_REQUESTS` of the consumer's requests on this instance (at most
`MAX_ALLOWANCE_S`), and as many tokens as the consumer's recent rate needs over it, plus headroom.

Why the limit still holds: an allowance is held in the shared ledger like any lease, from its claim until its last
possible admission has left the window (claim + lifetime + 60 s), and a claim is granted only while the window's
occupancy (admitted tokens plus every instance's holds) plus the claim fits under the limit. The occupancy is an upper
bound of what was admitted in any 60 s, whatever the lifetimes, so *any 60 s <= limit* across every instance; nothing
here depends on the instance count being right.

What an allowance may cost: tokens held but not used, which no other instance can admit until the allowance is
renewed or expires. So allowances are granted only while they are small against the limit and the consumer is far
from it: all instances' allowances together are at most `SHARE` of the limit (each instance's at most SHARE / the
number of instances holding leases on the consumer, or the configured count if larger), and one is granted only while
the window (what was admitted plus every hold, the other allowances included) with it stays below `FAR` of the limit;
together they hold at most 1 - FAR of the quota left. When a consumer nears its limit, its next
renewal (at the latest one allowance lifetime later; at once on an instance where it uses its allowance up) gets a
normal 2-second lease: the allowance is withdrawn, and what it did not use is released in the same write.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.limits.ledger import Ledger, Quota, quota_period

ALLOWANCE_REQUESTS = 32  # an allowance lasts about this many of the consumer's requests on this instance ...
MAX_ALLOWANCE_S = 300.0  # ... but at most this long
MIN_ALLOWANCE_LEASES = 4  # not worth it below this many normal lease lifetimes
SHARE = 0.3  # all instances' allowances together hold at most this share of the limit
FAR = 0.6  # granted only while the window with it stays below this share of the limit
HEADROOM = 1.25  # tokens for this much more than the recent rate
IDLE_GAPS = 4.0  # an allowance not used for this many of its usual gaps between requests is returned
RENEW_AHEAD_S = 2.0  # renewed this long before it expires, so requests do not wait for the write


@dataclass(frozen=True)
class Allowance:
    lifetime_s: float
    tokens: dict[str, int]  # per scope
    idle_after_s: float


def holders(ledger: Ledger, now_ms: int, own: str) -> int:
    """Instances holding a live lease on this ledger, counting this one."""
    return len({lease_id.split(":", 1)[0] for lease_id, lease in ledger.leases.items() if lease.expires_ms > now_ms} | {own})


def allowance(
    ledger: Ledger,
    now: float,
    limits: Mapping[str, int],
    quota: Quota | None,
    rate: float,
    request_rate: float,
    typical: float,
    instances: int,
    base_lifetime_s: float,
) -> Allowance | None:
    """The allowance this instance may claim now, or None: a normal lease then.

    `rate` (tokens/s) and `request_rate` (requests/s) are the consumer's recent rates on this instance; `instances` the
    number of instances that may hold one at the same time."""
    if rate <= 0 or request_rate <= 0 or typical <= 0:
        return None  # no history yet
    lifetime = min(MAX_ALLOWANCE_S, ALLOWANCE_REQUESTS / request_rate)
    spare = 2 * typical  # room for two requests beyond the expected ones
    want = rate * lifetime * HEADROOM + spare
    caps = [SHARE * limit / instances for limit in limits.values() if limit > 0]
    if quota is not None:
        caps.append(SHARE * quota.limit / instances)
    if not caps:
        return None
    want = min(want, *caps)
    lifetime = min(lifetime, (want - spare) / (rate * HEADROOM))
    if lifetime < MIN_ALLOWANCE_LEASES * base_lifetime_s:
        return None  # too busy (or too small a limit) for an allowance: it would be no better than a lease
    now_ms = int(now * 1000)
    for scope, limit in limits.items():
        if limit > 0 and ledger.occupancy(scope, now_ms) + want > FAR * limit:
            return None  # near the limit: withdrawn
    if quota is not None:
        used = ledger.quota_used if ledger.quota_key == quota_period(quota.period, now)[0] else 0
        if instances * want > (1 - FAR) * (quota.limit - used):
            return None  # the quota is running out: what is left is not held for minutes
    tokens = int(want)
    idle_after = max(base_lifetime_s, IDLE_GAPS / request_rate)
    return Allowance(lifetime, {scope: tokens for scope in limits}, idle_after)


# Quiet claims (issue 32, "consumers per storage account"). With many instances each sees a quiet consumer rarely (10,000
# consumers at 1 request/s over 64 instances: each instance every 64 s), so every request claims a lease. A claim is a
# read and a write; what made it 3.4 operations a request was around it: the lease renewed ahead of need right after
# its one request (a second claim), and its close written when it went idle (a third write, on a copy other instances
# had made stale: a lost race and a re-read). A quiet claim is held in the ledger for QUIET_SETTLE_S longer than it
# admits, is not renewed ahead, and once its requests have settled within that hold (leases.py, `covered`) its close is
# not written at all: the hold, which leaves the window after every bucket of its usage and holds at least as much,
# already bounds the window. Cost: a claim's unused rest (and the difference between reservation and use) stays held
# until the hold ends (about a minute) instead of being freed at the close, so quiet claims are made only far from the
# limit, not for a quota (counted per period, not released by time) or end users' shares, and only where other
# instances may serve the consumer (other instances hold leases on the ledger, or GATEWAY_INSTANCE_COUNT is above 1): a
# gateway alone writes its close on its own fresh copy (one write, no read), and its window then holds exactly what was
# used, not the reservation, from the close on.
QUIET_SETTLE_S = 10.0  # a quiet claim's hold covers settlements this long after it stops admitting
# Quiet: fewer requests than this expected here during a lease's lifetime. Not 1: the rate an instance measures from a
# consumer it sees once a minute jumps when two requests happen to arrive close together, and at 0.5 one such pair
# made the next three or four claims normal leases (renewed ahead, closes written): bench.scale many:10000:64 with 2
# ledger accounts, 2.38 -> 2.19 ledger operations a request, renewals 9,398 -> 2,432, releases 8,816 -> 2,957.
QUIET_REQUESTS = 2.0


def quiet_claim(
    ledger: Ledger,
    now: float,
    limits: Mapping[str, int],
    quota: Quota | None,
    user_limited: bool,
    holders: int,
    request_rate: float,
    lifetime_s: float,
    wants: Mapping[str, int],
) -> bool:
    """Whether this claim is a quiet one: other instances may serve the consumer (`holders`: the instances holding
    leases on the ledger, this one included, or the configured instance count if larger), no
    other request is expected here during its lifetime, no quota or end users' shares to settle exactly, and the window
    is far from the limit even with its longer hold."""
    if quota is not None or user_limited or holders < 2 or request_rate * lifetime_s >= QUIET_REQUESTS:
        return False
    now_ms = int(now * 1000)
    return all(ledger.occupancy(scope, now_ms) + wants.get(scope, 0) <= FAR * limit
               for scope, limit in limits.items() if limit > 0)
