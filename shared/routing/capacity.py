"""What a provisioned (PTU) deployment can take, learnt from what it says, and the pace one instance sends it at.

A PTU admits a call while its utilisation is not above 100 %, adds the call's tokens, corrects them to what the call
used when it ends, and drains continuously at its provisioned rate; above 100 % it answers 429 at once with
`retry-after-ms`, the time until utilisation is back at 100 % (Microsoft Learn, "What is provisioned throughput?").
So every such 429 names an instant, `ready` = its time + retry-after, at which utilisation is exactly 100 %. Between
two of them utilisation went from 100 % to 100 %, so the deployment drained exactly what was added in between:

    rate = tokens added in [ready_1, ready_2) / (ready_2 - ready_1)

however bursty the traffic was, as long as the deployment stayed busy in between (it drains only while it holds
something). Every instance shares what it added (a timed list of charges, refunds and corrections) and the instants it
was told; each computes the same rate from the union.

Each instance then paces what it sends to the PTU with a token bucket refilled at its share of that rate, a few per
cent above it (so that added capacity shows itself, and more when no 429 has come for a while), and sends what the
bucket refuses to the next priority without asking the PTU first. Consumers below `high` priority leave a reserve in
the bucket, so high-priority calls keep their share when the PTU is full. When the instance's own recent demand is
below its share (the overflow has ended), the bucket lets a call through from any non-negative balance, so traffic
is back on the PTU at once rather than after the deficit the overflow left has refilled.

What is learnt lives only as long as its evidence. Only a 429 shaped as a provisioned deployment's (see
`utilisation_wait`) names an instant; any other 429 (a quota, a policy, a fault) says nothing about utilisation and
teaches nothing. A pace that no new 429 confirms is probed upward once the silence is longer than the pace itself
explains, and a minute after the newest 429 anyone was told the model forgets the rate altogether: a PTU that has not
refused anything for that long is sent everything, whatever was learnt before, so an idle PTU is never starved.

A PTU may also state its capacity (`ptu_tokens_per_minute`, docs/ptu.md): then it is paced to that from its first call,
with no learning phase; 429s refine it while their evidence is fresh (and the probe raises it while it overflows
without them), and when the evidence is gone the pace is the stated capacity again, not nothing.

Instances share two things, at two speeds (shared/routing/provisioned.py): each instance's report (its charges, the
instants it was told, its demand) in a row of its own; and the news (the instants the PTU named, the newest rate
anyone learnt) in one summary row per deployment that everyone reads every second or less and writes only when it
knows something the row does not (`news`, `merge_summary`), so a 429 reaches every instance within about a second
however many there are. About once a second one instance reads every report and writes the fleet's figures into the
summary row (the rate learnt from everyone's charges, their demand added up): an instance that has not read every
report itself (`covered`) takes its rate and the others' demand from there, not from the part it has read.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from shared.records.capacity import CapacityReport, CapacitySummary

HORIZON_S = 60.0  # how far back charges and instants are kept (and shared)
RECENT_S = 30.0  # the span the rate is learnt over reaches back this far
MAX_GAP_S = 45.0  # two lone instants further apart may have an idle deployment between them: they say nothing
# Instants closer than this say too little: each is late by its answer's trip and the gateway's own delays (tens of
# milliseconds under load), and one call more or less at an end of a fraction of a second is a large error (rates
# learnt from 0.3 s spans in tests/test_e2e_ptu.py were 2 to 3 times the PTU's).
MIN_SPAN_S = 1.0
INSTANT_MARGIN_S = 0.05  # a named instant is late by the answer's trip and the rounding: charges sent this close count
FRESH_S = 60.0  # a rate no 429 has confirmed for this long is forgotten: the PTU is sent everything again
MAX_WAIT_S = 60.0  # a 429 asking for longer is a quota or a policy, not a leaky bucket draining one call's overshoot
PROBE = 0.02  # the pace is this much above the learnt rate, so that the PTU says now and then that it is full
PROBE_AFTER_S = (5.0, 30.0)  # overflowing, paced, and no 429 for twice the interval the probe margin explains (within
PROBE_EVERY_S = 2.0  # these bounds): the rate may be low, so raise it by a step this often, the step doubling from the
PROBE_STEP = (0.02, 0.08)  # first to the largest
BURST_S = 1.0  # what an idle instance may send at once, in seconds of its share
DEMAND_TAU_S = 2.0  # smoothing of the demand each instance reports (for shares)
QUIET_TAU_S = 0.4  # smoothing of the local demand that says whether this instance is overflowing right now
MAX_EVENTS = 4000  # charges kept per instance (a report stays well within a Table property)
# The summary row keeps instants at least this far apart (the newest first), at most SUMMARY_INSTANTS of them: closer
# instants say too little to learn from (MIN_SPAN_S), and an instant this close to one the row has is no news.
COALESCE_S = MIN_SPAN_S
SUMMARY_INSTANTS = 64  # with COALESCE_S apart: the whole horizon
FLEET_FRESH_S = HORIZON_S / 4  # the fleet's figures in the summary row count this long (a report's freshness too)


# What a pay-as-you-go deployment's 429 carries and a provisioned deployment's never does (it documents only the
# retry-after pair): a 429 with these is about a per-minute quota, not about utilisation.
QUOTA_HEADERS = (
    "x-ratelimit-remaining-tokens", "x-ratelimit-remaining-requests", "x-ratelimit-limit-tokens",
    "x-ratelimit-limit-requests", "x-ratelimit-reset-tokens", "x-ratelimit-reset-requests",
)


def utilisation_wait(headers: Mapping[str, str]) -> float | None:
    """The wait (seconds) a provisioned deployment's 429 names, or None when the 429 is no statement about its
    utilisation.

    Azure documents a PTU's 429 as immediate, with `retry-after-ms` (and `retry-after`): the time until utilisation is
    back at 100 %, which is at most one call's overshoot drained at the provisioned rate. A 429 without `retry-after-ms`,
    with a per-minute quota's `x-ratelimit-*` figures, or asking for more than `MAX_WAIT_S` is something else (a quota,
    a policy, a proxy, an injected fault); learning a capacity from it would pace traffic away from an idle PTU."""
    value = headers.get("retry-after-ms")
    if value is None or any(name in headers for name in QUOTA_HEADERS):
        return None
    try:
        ms = float(value)
    except ValueError:
        return None
    if not math.isfinite(ms) or ms <= 0 or ms > MAX_WAIT_S * 1000:
        return None
    return ms / 1000


def tokens_between(charges: Iterable[tuple[float, float]], start: float, end: float) -> float:
    return sum(tokens for at, tokens in charges if start <= at < end)


def learnt_rate(charges: Sequence[tuple[float, float]], ready: Iterable[float], known_until: float) -> float | None:
    """The drain rate (tokens/s) between the latest instants, or None when they say nothing yet.

    Only instants up to `known_until` count: every instance's charges must be known up to the instant used. The span
    reaches back `RECENT_S` (or to the instant before, if that is all there is), so a capacity that changed shows
    within seconds, but never across a gap long enough for the deployment to have idled."""
    instants = sorted(t for t in set(ready) if t <= known_until)
    if len(instants) < 2:
        return None
    last = instants[-1]
    start = len(instants) - 2
    while start > 0 and instants[start - 1] >= last - RECENT_S:
        start -= 1
    first = instants[start]
    if last - first < MIN_SPAN_S or last - first > MAX_GAP_S and start == len(instants) - 2:
        return None
    # The instants are when the answer arrived plus the wait, rounded up to the millisecond: a little later than the
    # PTU's own instant. A call sent just before one was admitted just after it: count what was sent from a little
    # before each instant (a call refused there is charged and refunded at once, so it adds nothing).
    added = tokens_between(charges, first - INSTANT_MARGIN_S, last - INSTANT_MARGIN_S)
    return added / (last - first) if added > 0 else None


def share_of(total: float, mine: float, others: Iterable[float]) -> float:
    """This instance's part of `total` tokens/s: what the others do not use, or, when all of them want more than
    there is, a part in proportion to what it wants (so uneven load balancing does not leave capacity unused)."""
    others_sum = sum(others)
    wanted = mine + others_sum
    if wanted <= 0:
        return total
    return max(total * mine / wanted, total - others_sum)


def merge_summary(
    current: CapacitySummary | None, backend_id: str, deployment: str, instants: Iterable[float],
    rate: float | None, rate_from: float, rate_learnt: bool, by: str, now: float, rate_complete: bool = False,
) -> CapacitySummary:
    """The summary row with one instance's news merged in: the instants of both within the horizon (the newest kept,
    others at least COALESCE_S apart), and the rate with the newer basis (learnt from a later instant; at the same
    instant, one learnt from two instants over a first estimate). What is stale expires here: instants past the
    horizon, and a rate whose instant is older than FRESH_S (its evidence is gone). At the same basis a rate learnt
    from every instance's charges (`rate_complete`) wins over one learnt from a part of them. The row's count of
    per-instance rows and the fleet's figures are kept (shared/routing/provisioned.py tells them)."""
    horizon = now - HORIZON_S
    kept: list[float] = []  # sorted
    # The row's instants first (so a row does not churn between near instants), then the news, newest first.
    for t in sorted(current.ready if current else (), reverse=True):
        if t >= horizon and not _near(kept, t):
            bisect.insort(kept, t)
    for t in sorted((round(t, 3) for t in instants), reverse=True):
        if t >= horizon and not _near(kept, t):
            bisect.insort(kept, t)
    kept = kept[-SUMMARY_INSTANTS:]
    candidates = [(rate_from, rate_learnt, rate_complete, rate)] \
        if rate is not None and rate > 0 and now - rate_from <= FRESH_S else []
    if current is not None and current.rate is not None and now - current.rate_from <= FRESH_S:
        candidates.append((current.rate_from, current.rate_learnt, current.rate_complete, current.rate))
    best = max(candidates, key=lambda c: (c[0], c[1], c[2]), default=None)
    merged = CapacitySummary(
        backend_id, deployment, now, tuple(kept), best[3] if best else None, best[0] if best else 0.0,
        best[1] if best else False, by, current.rows if current else 0, current.rows_at if current else 0.0,
        best[2] if best else False,
    )
    if current is None:
        return merged
    return replace(merged, fleet_at=current.fleet_at, fleet_by=current.fleet_by, members=current.members,
                   demand=current.demand, demanders=current.demanders)


def _near(instants: Sequence[float], t: float) -> bool:
    """Whether a sorted list of instants has one less than COALESCE_S from `t`."""
    i = bisect.bisect_left(instants, t)
    return any(0 <= j < len(instants) and abs(instants[j] - t) < COALESCE_S for j in (i - 1, i))


@dataclass
class Pacer:
    """A token bucket refilled at `rate` tokens/s; monotonic time."""

    rate: float
    cap: float
    tokens: float
    at: float

    def refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.cap, self.tokens + (now - self.at) * self.rate)
            self.at = now

    def allows(self, cost: float, reserve: float, quiet: bool, now: float) -> bool:
        """Whether a call of `cost` may go now, leaving `reserve` for others; `quiet`: the instance is not overflowing,
        so one call may go from any balance at or above the reserve (its cost is owed and refills later)."""
        self.refill(now)
        return self.tokens >= reserve + (0.0 if quiet else cost) - 1e-9

    def take(self, tokens: float, now: float) -> None:
        self.refill(now)
        self.tokens -= tokens

    def resize(self, rate: float, cap: float, now: float) -> None:
        self.refill(now)
        self.rate, self.cap = rate, cap
        self.tokens = min(self.tokens, cap)


@dataclass
class PtuModel:
    """One instance's view of one PTU backend and deployment."""

    backend_id: str
    deployment: str
    instance: str
    reserve_tokens: int = 0  # kept, across all instances, for high-priority consumers
    stated: float | None = None  # the capacity the operator stated, tokens/s: the pace before (and after) evidence
    charges: deque[tuple[float, float]] = field(default_factory=deque)
    ready: deque[float] = field(default_factory=deque)
    rate: float | None = None  # learnt drain rate, tokens/s (None: never throttled, nothing to pace)
    cost: float = 0.0  # tokens a call uses, smoothed
    pacer: Pacer | None = None
    share: float | None = None
    diverted: int = 0  # calls sent elsewhere without asking the PTU
    _demand: float = 0.0
    _demand_at: float = 0.0
    _quiet: float = 0.0
    _quiet_at: float = 0.0
    _others: dict[str, CapacityReport] = field(default_factory=dict)
    _probe_step: float = PROBE_STEP[0]
    _probed_at: float = -math.inf
    _stepped_at: float = -math.inf  # the last step up of the probe
    _learnt_from: float | None = None  # the instant the rate was last learnt up to
    _first_wait: float = 0.0
    _need: float = 0.0  # what the latest call may take (prompt + max tokens), an upper bound on a 429's overshoot
    _evidence: float = -math.inf  # the newest instant any instance was told (wall time): what keeps the rate alive
    _run_from: float = -math.inf  # when the rate was last forgotten: instants before then are not paired with later ones
    _learnt: bool = False  # the rate comes from 429s (else from the stated capacity)
    _heard: set[float] = field(default_factory=set)  # instants read in the summary row
    _heard_rate: tuple[float, float, bool] | None = None  # the summary's fresh rate: (rate, its instant, learnt)
    _basis: tuple[float, bool] | None = None  # the instant the rate was learnt up to (learnt from two: True)
    _fleet: CapacitySummary | None = None  # the newest fleet figures heard in the summary row (fleet_at)
    _complete: bool = False  # the rate was learnt from the charges of every instance sending to the PTU
    _basis_rate: float | None = None  # the rate as learnt (or heard) at its basis, before any probe's steps
    _merged_at: float = -math.inf  # when the others' reports were last taken in (merge)
    _published: float = 0.0  # the demand this instance last reported

    # ---- per call (monotonic `mono`, wall `now`) ------------------------------------------------------------------

    @property
    def learnt(self) -> bool:
        """The rate comes from 429s (else from the stated capacity)."""
        return self._learnt

    @property
    def evidence_at(self) -> float:
        """The newest instant (wall time) any instance was told the PTU would be back at 100 %."""
        return self._evidence

    def call_cost(self, need_tokens: int) -> float:
        return self.cost if self.cost > 0 else float(max(need_tokens, 1))

    def admits(self, need_tokens: int, high: bool, now: float, mono: float) -> bool:
        """Whether this call should go to the PTU first; counts it as demand either way. Never False unless a 429
        with the PTU's utilisation semantics came within `FRESH_S`."""
        cost = self.call_cost(need_tokens)
        self._need = float(need_tokens)
        quiet = self._decayed_quiet(mono) <= (self.share if self.share is not None else math.inf)
        self._offer(cost, mono)
        stale = now - self._evidence > FRESH_S
        if self.pacer is None or (stale and self._learnt):
            if self.stated is None:
                if self.pacer is not None:
                    self._forget(now)  # at once, not at the next sync: the evidence is gone
                return True
            self._learn(now, mono)  # paced to the stated capacity (again)
            if self.pacer is None:
                return True
        reserve = 0.0 if high else self._my_reserve(now)
        if self.pacer.allows(cost, reserve, quiet, mono):
            return True
        self.diverted += 1
        return False

    def sent(self, need_tokens: int, now: float, mono: float) -> float:
        """The call goes to the PTU: charge it; returns the charge (refunded on a 429)."""
        cost = self.call_cost(need_tokens)
        self._charge(now, cost)
        if self.pacer is not None:
            self.pacer.take(cost, mono)
        return cost

    def refused(self, charged: float, retry_after_s: float | None, now: float, mono: float) -> None:
        """The PTU answered 429: nothing was added. With `retry_after_s` (see `utilisation_wait`) it named the
        instant it is back at 100 %; without, the 429 says nothing about utilisation and only the charge goes back."""
        self._charge(now, -charged)
        if self.pacer is not None:
            self.pacer.take(-charged, mono)
        if retry_after_s is not None:
            if self.pacer is not None:
                # Over 100 %: whatever this instance had saved is not headroom the PTU has; start again from nothing.
                self.pacer.tokens = min(self.pacer.tokens, 0.0)
            self.ready.append(now + retry_after_s)
            if self.rate is None and retry_after_s > 0:
                self._first_wait = retry_after_s
            self._probe_step = PROBE_STEP[0]
            if not self._learnt and self.stated is not None and self.rate is not None:
                # The probe took a stated pace past what the PTU takes: back to the statement until two instants
                # say what it is (one alone says nothing, and the probed pace would meet a 429 at every trip's end).
                self.rate = min(self.rate, self.stated)
            self._learn(now, mono)  # at once: a lone instance must not wait for the next sync to start pacing

    def returned(self, charged: float, now: float, mono: float) -> None:
        """The call failed without an answer the PTU charged (a connection error): give the charge back."""
        self._charge(now, -charged)
        if self.pacer is not None:
            self.pacer.take(-charged, mono)

    def settled(self, charged: float, used: int, now: float, mono: float) -> None:
        """The call ended and used `used` tokens: correct the charge, as the PTU corrects its utilisation."""
        delta = used - charged
        if delta:
            self._charge(now, delta)
            if self.pacer is not None:
                self.pacer.take(delta, mono)
        self.cost = used if self.cost <= 0 else 0.9 * self.cost + 0.1 * used

    # ---- shared state ---------------------------------------------------------------------------------------------

    def report(self, now: float, mono: float) -> CapacityReport:
        self._trim(now)
        self._published = self._decayed_demand(mono)
        return CapacityReport(
            self.backend_id, self.deployment, self.instance, now, tuple(self.charges), tuple(self.ready),
            self._published, self.rate,
        )

    @property
    def basis(self) -> tuple[float, bool] | None:
        """The instant the rate was learnt up to, and whether from two instants (else a first estimate)."""
        return self._basis

    @property
    def basis_rate(self) -> float | None:
        """The rate as it was learnt (or heard) at its basis: without the steps the probe has added since."""
        return self._basis_rate if self._basis is not None else None

    @property
    def rate_complete(self) -> bool:
        """The rate was learnt from the charges of every instance sending to the PTU (or heard as such)."""
        return self._complete and self.rate is not None

    def demand(self, mono: float) -> float:
        """Tokens/s this instance offers the PTU lately (smoothed)."""
        return self._decayed_demand(mono)

    def own_instant_is_news(self) -> bool:
        """Whether this instance's newest instant is at least COALESCE_S newer than any it has heard of."""
        if not self.ready:
            return False
        return max(self.ready) >= max(self._heard, default=-math.inf) + COALESCE_S

    def fleet_fresh(self, now: float) -> CapacitySummary | None:
        """The fleet's figures from the summary row, if fresh (FLEET_FRESH_S)."""
        fleet = self._fleet
        return fleet if fleet is not None and now - fleet.fleet_at <= FLEET_FRESH_S else None

    def covered(self, now: float) -> bool:
        """Whether the reports this instance took in cover the fleet that sends to the PTU (so a rate it learns from
        their charges is the PTU's, not a part's): always, unless the fleet's figures say there are more instances."""
        fleet = self.fleet_fresh(now)
        return fleet is None or len(self._others) + 1 >= fleet.members

    def merge(self, reports: Iterable[CapacityReport], now: float, mono: float) -> None:
        """Take in the other instances' reports (fresh ones only) and recompute the rate, the share and the pace."""
        self._others = {
            r.instance: r for r in reports
            if r.instance != self.instance and r.backend_id == self.backend_id and r.deployment == self.deployment
            and now - r.at <= FLEET_FRESH_S
        }
        self._merged_at = now
        self._learn(now, mono)

    def hear(self, summary: CapacitySummary | None, now: float, mono: float) -> None:
        """Take in the summary row: its instants (evidence, and instants to learn from once everyone's charges are
        known up to them) and its rate (a start for a model that has none). Stale parts are ignored."""
        if summary is None or summary.backend_id != self.backend_id or summary.deployment != self.deployment:
            return
        horizon = now - HORIZON_S
        new = {t for t in summary.ready if t >= horizon} - self._heard
        fresh = summary.rate is not None and summary.rate > 0 and now - summary.rate_from <= FRESH_S
        heard_rate = (summary.rate, summary.rate_from, summary.rate_learnt) if fresh and summary.rate else None
        fleet = summary.members > 0 and (self._fleet is None or summary.fleet_at > self._fleet.fleet_at)
        if fleet:
            self._fleet = summary
        # A rate learnt from every instance's charges, up to an instant newer than this one's rate: the PTU's rate,
        # whatever this instance could learn from the reports it has read (a part of the fleet past ~100 instances).
        complete = (summary.rate is not None and fresh and summary.rate_complete and summary.rate_from > self._run_from
                    and (self._learnt_from is None or summary.rate_from > self._learnt_from))
        if complete and summary.rate is not None:
            self.rate = summary.rate
            self._learnt = True
            self._learnt_from = summary.rate_from
            self._basis = (summary.rate_from, summary.rate_learnt)
            self._basis_rate = self.rate
            self._complete = True
            self._probe_step = PROBE_STEP[0]
        if not new and heard_rate == self._heard_rate and not fleet and not complete:
            return
        self._heard |= new
        self._heard_rate = heard_rate
        self._learn(now, mono)

    def news(self, summary: CapacitySummary | None, now: float) -> CapacitySummary | None:
        """The summary row to write over `summary` when this instance knows something it does not, else None: an
        instant (its own, or one another instance's row told it) at least COALESCE_S from every instant the row has,
        or a rate with a newer basis. So a flood of 429s from many instances is about a write a second of instants
        (the row's instants are COALESCE_S apart), not one write per instance."""
        self._trim(now)
        horizon = now - HORIZON_S
        mine = [t for t in (*self.ready, *(t for o in self._others.values() for t in o.ready))
                if t >= horizon and t > self._run_from]
        theirs = sorted(t for t in summary.ready if t >= horizon) if summary else []
        newest = theirs[-1] if theirs else -math.inf
        news = bool(mine) and (
            max(mine) >= newest + COALESCE_S  # a newer instant: always kept
            or len(theirs) < SUMMARY_INSTANTS and any(not _near(theirs, t) for t in mine)  # kept while there is room
        )
        rate, basis = self.rate, self._basis
        rate_news = False
        partial = not self.covered(now)  # learnt from a part of the fleet: news only where the row has no rate
        if partial and summary is not None and summary.rate is not None and now - summary.rate_from <= FRESH_S:
            rate = None
        if rate is not None and basis is not None and now - basis[0] <= FRESH_S:
            if summary is None or summary.rate is None or now - summary.rate_from > FRESH_S:
                rate_news = True
            else:
                rate_news = basis[0] >= summary.rate_from + COALESCE_S or (
                    basis[1] and not summary.rate_learnt and basis[0] >= summary.rate_from)
        if not news and not rate_news:
            return None
        return merge_summary(
            summary, self.backend_id, self.deployment, mine, rate if rate_news else None,
            basis[0] if rate_news and basis else 0.0, bool(rate_news and basis and basis[1]), self.instance, now,
        )

    def _learn(self, now: float, mono: float) -> None:
        self._trim(now)
        charges = list(self.charges)
        ready = [*self.ready, *self._heard]
        known_until = now
        for other in self._others.values():
            charges.extend(other.charges)
            ready.extend(other.ready)
            known_until = min(known_until, other.at)
        self._evidence = max(ready, default=-math.inf)
        stale = now - self._evidence > FRESH_S
        if stale and (self._learnt or self.stated is None):
            self._forget(now)  # nobody has been told anything lately: whatever was learnt has no evidence left
        if stale and self.stated is None:
            return
        # Instants from before the rate was forgotten are not paired with newer ones: in the silence between them the
        # PTU may have idled (drained less than its rate), and a rate learnt across it would be too low.
        ready = [t for t in ready if t > self._run_from]
        latest_known = max((t for t in ready if t <= known_until), default=None)
        # Only a newer instant is news: when old ones leave the horizon, what is left says less than what was learnt.
        covered = self.covered(now)
        if covered and latest_known is not None and (self._learnt_from is None or latest_known > self._learnt_from):
            learnt = learnt_rate(charges, ready, known_until)
            if learnt is not None:  # what the PTU said since the last time: the rate is what it is
                self.rate = learnt
                self._learnt = True
                self._learnt_from = latest_known
                self._basis = (latest_known, True)
                self._basis_rate = self.rate
                self._complete = covered
                self._probe_step = PROBE_STEP[0]
        if self.rate is None:
            # Until everyone has reported past this instance's 429s, its own charges give a first rate; it can only
            # be low (others' admissions are missing), and the next round with everyone's corrects it.
            own = [t for t in self.ready if t > self._run_from]
            local = learnt_rate(self.charges, own, now)
            adopted = [o.rate for o in self._others.values() if o.rate] if not stale else []
            heard = self._heard_rate
            if heard is not None and (stale or heard[1] <= self._run_from or now - heard[1] > FRESH_S):
                heard = None
            self._learnt = local is not None or bool(adopted) or heard is not None
            self._complete = False
            if local is not None:
                self.rate = local
                self._basis = (max(t for t in own if t <= now), True)
                self._basis_rate = self.rate
            elif adopted or heard:
                # A newcomer starts from what the others learnt (its basis, when the summary says it: not news).
                self.rate = max([*adopted, *([heard[0]] if heard else [])])
                self._basis = (heard[1], heard[2]) if heard and self.rate == heard[0] else None
                self._basis_rate = self.rate
            elif self.stated is not None:
                self.rate = self.stated  # better than one 429's bound, which errs high
                self._basis = None
                # The silence the probe looks for starts now: before this pace, the PTU was not paced at all.
                self._probed_at = max(self._probed_at, now)
            elif self._first_wait and self.cost > 0:
                # One 429 and nothing else: the call that took the PTU over 100 % took it over by at most its own
                # charge, so the PTU drains at least a call's cost per wait; the call's prompt and max tokens (what the
                # PTU charges on admission) bound the overshoot from above, so this first pace errs high, and the
                # 429s it brings are the instants that say better.
                self.rate = max(self.call_cost(0), self._need) / self._first_wait
                self._learnt = True
                self._basis = (max(self.ready), False) if self.ready else None
                self._basis_rate = self.rate
            else:
                return
        demand = self._decayed_demand(mono)
        others = self._others_demand(now)
        quiet_since = max(self._evidence, self._probed_at)
        # Paced PROBE above the rate, a full PTU refuses a call about every cost / (PROBE * rate) seconds; twice that
        # without a 429 (within bounds) is a silence the pace does not explain.
        explained = 2 * self.call_cost(0) / (PROBE * self.rate)
        probe_after = min(PROBE_AFTER_S[1], max(PROBE_AFTER_S[0], explained))
        # (At most one step every PROBE_EVERY_S, however often this runs: a step shortens probe_after, so the same
        # moment's next call, a summary heard right after a sync, would otherwise step again.)
        if (now - quiet_since >= probe_after and now - self._stepped_at >= PROBE_EVERY_S
                and demand + sum(others) > self.rate * (1 + PROBE)):
            # Overflowing and paced, and the PTU has not refused anything for a while: it may take more than we think.
            self.rate *= 1 + self._probe_step
            self._probe_step = min(PROBE_STEP[1], self._probe_step * 2)
            self._probed_at = now - probe_after + PROBE_EVERY_S
            self._stepped_at = now
        total = self.rate * (1 + PROBE)
        share = share_of(total, demand, others)
        self.share = share
        reserve = self._my_reserve(now)
        # Room for the reserve, one call, and a second of share or two calls, whichever is more: refill is never
        # clipped while a call waits for it. (With many instances a second of share is less than a call: at 1,000
        # instances half of one, and a bucket holding one call and a second of share lost part of every second's
        # refill between calls; the fleet sent less than its pace, and each instance's probe took the pace up to
        # 1.57 of the learnt rate to make up for it: bench.scale ptu:1000:1000.)
        cap = reserve + self.call_cost(0) + max(share * BURST_S, 2 * self.call_cost(0))
        if self.pacer is None:
            # After a 429 the PTU is full: nothing saved yet. Paced to a stated capacity before any, it is presumed
            # idle: a second of its share may go at once.
            self.pacer = Pacer(share, cap, 0.0 if not stale else cap, mono)
        else:
            self.pacer.resize(share, cap, mono)

    def _forget(self, now: float) -> None:
        if self.rate is not None:
            self._run_from = now
        self.rate = self.share = self.pacer = None
        self._learnt = False
        self._basis = self._heard_rate = None
        self._complete = False
        self._first_wait = 0.0
        self._probe_step = PROBE_STEP[0]
        self._probed_at = -math.inf

    # ---- bookkeeping ----------------------------------------------------------------------------------------------

    def _fleet_figures(self, now: float) -> CapacitySummary | None:
        """The fleet's figures when they are newer than the reports this instance took in itself."""
        fleet = self.fleet_fresh(now)
        return fleet if fleet is not None and fleet.fleet_at > self._merged_at else None

    def _others_demand(self, now: float) -> list[float]:
        """What the other instances want (tokens/s): the fleet's total less this instance's part of it, or the
        reports this instance read."""
        fleet = self._fleet_figures(now)
        if fleet is not None:
            return [max(0.0, fleet.demand - self._published)]
        return [o.demand for o in self._others.values()]

    def _my_reserve(self, now: float) -> float:
        if not self.reserve_tokens:
            return 0.0
        fleet = self._fleet_figures(now)
        if fleet is not None:
            others = max(0, fleet.demanders - (1 if self._published > 0 else 0))
        else:
            others = sum(1 for o in self._others.values() if o.demand > 0)
        return self.reserve_tokens / (1 + others)

    def _charge(self, now: float, tokens: float) -> None:
        self.charges.append((now, tokens))
        if len(self.charges) > MAX_EVENTS:
            self.charges.popleft()

    def _trim(self, now: float) -> None:
        horizon = now - HORIZON_S
        while self.charges and self.charges[0][0] < horizon:
            self.charges.popleft()
        if self.ready and min(self.ready) < horizon:
            self.ready = deque(t for t in self.ready if t >= horizon)
        if self._heard and min(self._heard) < horizon:
            self._heard = {t for t in self._heard if t >= horizon}

    def _offer(self, cost: float, mono: float) -> None:
        self._demand = self._decayed_demand(mono) + cost / DEMAND_TAU_S
        self._demand_at = mono
        self._quiet = self._decayed_quiet(mono) + cost / QUIET_TAU_S
        self._quiet_at = mono

    def _decayed_demand(self, mono: float) -> float:
        return self._demand * math.exp(-max(0.0, mono - self._demand_at) / DEMAND_TAU_S)

    def _decayed_quiet(self, mono: float) -> float:
        return self._quiet * math.exp(-max(0.0, mono - self._quiet_at) / QUIET_TAU_S)

