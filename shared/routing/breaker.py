"""The circuit breaker of one backend: a pure state machine driven by an injected clock, plus Retry-After parsing."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from shared.config import BreakerRule
from shared.waits import retry_after_s

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"

# A probe that has not reported back after this long is presumed lost (its request was cancelled), so another may go.
PROBE_TIMEOUT_S = 30.0

# A pay-as-you-go deployment's token window is one minute: a 429 because the window is full says to retry within it.
WINDOW_S = 60.0


# What a 429 says (refusal_kind): the backend's load (None), nothing about it (ROOM), or that the request is too large.
ROOM = "room"
SIZE = "size"


def refusal_kind(
    tokens: int, largest_admitted: int, headers: Mapping[str, str], now_s: float, provisioned: bool = False,
) -> str | None:
    """What a 429 for a request of `tokens` says. Azure answers a request larger than the deployment's whole
    tokens-per-minute with 429 and a Retry-After of up to a day, while its remaining-tokens figure still shows room.

    SIZE: it refuses the request for its size, not the backend for its load: it asks for longer than the one-minute
    window (a full window frees within it) and either shows some room or the request is larger than any this backend
    has admitted (`largest_admitted`, 0 when none is known; never for a `provisioned` deployment, which admits by
    utilisation, not size). ROOM: it shows room for a request this large (`x-ratelimit-remaining-tokens` >= `tokens`),
    so it says nothing of the backend's health, though the backend may count the request larger than the gateway does
    (a default output length). None: an ordinary 429, and always when it shows no requests left (a requests-per-minute
    limit is a statement about load)."""
    if tokens <= 0 or headers.get("x-ratelimit-remaining-requests", "").strip() == "0":
        return None
    value = headers.get("x-ratelimit-remaining-tokens")
    remaining = int(value) if value is not None and value.isdigit() else None
    wait = retry_after_s(headers, now_s)
    if wait is not None and wait > WINDOW_S and (
        (remaining is not None and remaining > 0) or (not provisioned and 0 < largest_admitted < tokens)
    ):
        return SIZE
    if remaining is not None and remaining >= tokens:
        return ROOM
    return None


@dataclass(frozen=True)
class Transition:
    state: str
    until: float  # wall clock; for OPEN, when the trip ends
    reason: str


class Breaker:
    """closed -> (failures within the interval reach the count) -> open for the trip duration (or the backend's own
    Retry-After, capped) -> half-open: one probe -> success: closed; failure: open again."""

    def __init__(self, rule: BreakerRule) -> None:
        self.rule = rule
        self.state = CLOSED
        self.open_until = 0.0
        self.reason = ""
        self.changed_at = 0.0
        self._failures: deque[float] = deque()
        self._timeouts: deque[tuple[float, str]] = deque()  # (when, caller) of recent timed-out requests
        self._probe_since: float | None = None
        # Until when the backend itself asked to be left alone (its Retry-After, capped): a trip of the gateway's own
        # judgement (a 5xx, a connection error, timeouts, a 429 that named no wait) has none.
        self.asked_until = 0.0
        # A backend that failed again while out (a probe, a last resort) is no last resort until its trip is over.
        self._failed_again_until = 0.0

    def asked(self, now: float, until: float) -> None:
        """The backend said (Retry-After) it will not serve before `until`."""
        self.asked_until = max(self.asked_until, until)

    def last_resort(self, now: float) -> bool:
        """Out of rotation, but only on the gateway's judgement (a trip it chose, or a half-open probe still out): when
        no other backend may be sent to, one request more is better spent here than refused. A backend that asked
        for a wait, or refused the gateway's credential (it fails every request), is no last resort."""
        if self.usable(now) or self.asked_until > now or self._failed_again_until > now:
            return False
        return self.reason not in ("401", "403")

    def trip_length(self, status: int | None, headers: Mapping[str, str], now: float) -> float:
        asked = retry_after_s(headers, now) if self.rule.accept_retry_after else None
        length = asked if asked is not None and asked > 0 else self.rule.trip_s
        return min(length, self.rule.max_trip_s)

    def usable(self, now: float) -> bool:
        """Whether a request may be sent now (without claiming the half-open probe)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return now >= self.open_until
        return self._probe_since is None or now - self._probe_since > PROBE_TIMEOUT_S

    def begin(self, now: float) -> Transition | None:
        """Claim the right to send one request. Returns a transition to half-open when the trip just ended.
        Raises nothing; callers check `usable` first and treat a False from `acquire` as 'skip this backend'."""
        if self.state == OPEN and now >= self.open_until:
            self.state = HALF_OPEN
            self._probe_since = now
            self.changed_at = now
            return Transition(HALF_OPEN, now, self.reason)
        if self.state == HALF_OPEN:
            self._probe_since = now
        return None

    def acquire(self, now: float) -> tuple[bool, Transition | None]:
        if not self.usable(now):
            return False, None
        return True, self.begin(now)

    def on_success(self, now: float) -> Transition | None:
        self._failures.clear()
        self._timeouts.clear()
        self.asked_until = 0.0
        self._failed_again_until = 0.0
        if self.state != CLOSED:
            self.state = CLOSED
            self.open_until = 0.0
            self._probe_since = None
            self.changed_at = now
            return Transition(CLOSED, now, "")
        return None

    def on_failure(self, now: float, reason: str, trip_s: float) -> Transition | None:
        """Record a failure; trips (or re-trips a failed probe) when the rule says so."""
        if self.state == HALF_OPEN:
            return self._again(self._trip(now, reason, trip_s))
        if self.state == OPEN:
            # A request sent before the trip (or as a last resort) came back failing: extend if it asks for longer.
            if now + trip_s > self.open_until:
                self.open_until = now + trip_s
            self._failed_again_until = self.open_until
            return None
        self._failures.append(now)
        horizon = now - self.rule.interval_s
        while self._failures and self._failures[0] < horizon:
            self._failures.popleft()
        if len(self._failures) >= self.rule.failures:
            return self._trip(now, reason, trip_s)
        return None

    def on_timeout(self, now: float, caller: str, trip_s: float) -> Transition | None:
        """A request ran past the read timeout. One caller's long generations must not take a backend out, so
        timeouts trip it only as a rate: `timeout_failures` within the interval, from `timeout_callers` callers.
        A half-open probe that times out still re-trips: the backend has not shown it is back."""
        if self.state == HALF_OPEN:
            return self._again(self._trip(now, "timeout", trip_s))
        if self.state == OPEN:
            self._failed_again_until = max(self._failed_again_until, now + trip_s)
            return None
        self._timeouts.append((now, caller))
        horizon = now - self.rule.interval_s
        while self._timeouts and self._timeouts[0][0] < horizon:
            self._timeouts.popleft()
        callers = {c for _, c in self._timeouts}
        if len(self._timeouts) >= self.rule.timeout_failures and len(callers) >= self.rule.timeout_callers:
            return self._trip(now, "timeout", trip_s)
        return None

    def trip(self, now: float, reason: str, trip_s: float) -> Transition | None:
        """Take the backend out at once, whatever the failure count (a refused credential fails every request)."""
        if self.state == OPEN and self.open_until >= now + trip_s:
            return None
        return self._trip(now, reason, trip_s)

    def _again(self, transition: Transition) -> Transition:
        self._failed_again_until = transition.until
        return transition

    def _trip(self, now: float, reason: str, trip_s: float) -> Transition:
        self.state = OPEN
        self.open_until = now + trip_s
        self.reason = reason
        self.changed_at = now
        self._failures.clear()
        self._timeouts.clear()
        self._probe_since = None
        return Transition(OPEN, self.open_until, reason)

    def adopt(self, state: str, until: float, since: float, reason: str, now: float) -> Transition | None:
        """Take in a transition another instance recorded at `since` (shared state), if it is newer than ours."""
        if since <= self.changed_at:
            return None
        if state == OPEN and until > now and self.state != OPEN:
            self.state = OPEN
            self.open_until = until
            self.reason = reason
            self.changed_at = since
            self._failures.clear()
            self._probe_since = None
            return Transition(OPEN, until, reason)
        if state == OPEN and until > self.open_until:
            self.open_until = until
            self.changed_at = since
            return None
        if state == CLOSED and self.state == OPEN:
            # Another instance's probe succeeded: the backend is back, no need to wait out our copy of the trip.
            self.state = CLOSED
            self.open_until = 0.0
            self.changed_at = since
            return Transition(CLOSED, now, "")
        return None
