"""Which backends may serve a request, in which order, and what every instance knows about their health.

Priority groups first (lowest number first); inside a group, smooth weighted round robin (an exact split over any run
of requests); backends whose breaker is open are left out; a backend whose last reported remaining capacity is below
what this request needs, or (for consumers below high priority) below the reserve it keeps for high-priority ones, is
moved behind the others rather than tried first; so is a PTU backend whose learnt capacity this instance's share of is
used up (shared/routing/capacity.py): the overflow goes to the next priority without asking the PTU. Breaker trips
are shared through a store: every instance writes its transitions and reads everyone's every `sync_s` seconds, so a
trip seen by one is honoured by all within a second.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from shared.background import keep_running, repeat
from shared.clock import Clock
from shared.config import Backend
from shared.outcomes import AttemptFailure, BackendAuthFailed, BackendsBusy, BackendsFailed, FailureKind, NoBackend
from shared.records.breaker import BreakerRecord
from shared.routing.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, Transition, refusal_kind
from shared.routing.capacity import utilisation_wait
from shared.routing.provisioned import ProvisionedCapacity
from shared.storage.protocols import BreakerStore
from shared.telemetry.protocol import Telemetry
from shared.waits import retry_after_s

log = logging.getLogger(__name__)

# How long a backend's reported remaining capacity is trusted for skipping it.
CAPACITY_FRESH_S = 2.0
# A backend that refuses the gateway's credential stays out at least this long (a key or role is not fixed in seconds).
AUTH_TRIP_S = 60.0


class _Group:
    """One priority level of one deployment, spread by smooth weighted round robin."""

    def __init__(self, backends: list[Backend]) -> None:
        self.backends = backends
        self.current = {b.id: 0 for b in backends}

    def order(self, usable: list[Backend]) -> list[Backend]:
        if len(usable) == 1:
            return usable  # alone: its counter would gain its weight and lose it again
        weighted = [b for b in usable if b.weight > 0]
        if not weighted:
            return usable
        total = sum(b.weight for b in weighted)
        for b in weighted:
            self.current[b.id] += b.weight
        first = max(weighted, key=lambda b: self.current[b.id])
        self.current[first.id] -= total
        rest = sorted((b for b in usable if b is not first), key=lambda b: (-self.current[b.id], b.id))
        return [first, *rest]


class Router:
    def __init__(
        self,
        backends: tuple[Backend, ...],
        clock: Clock,
        telemetry: Telemetry,
        store: BreakerStore | None = None,
        sync_s: float = 0.5,
        capacity: ProvisionedCapacity | None = None,
    ) -> None:
        self._backends = backends
        # PTU backends pace to a learnt capacity (in memory only when no shared store is given).
        self.capacity = capacity if capacity is not None else ProvisionedCapacity(backends, clock)
        self._clock = clock
        self._telemetry = telemetry
        self._store = store
        self._sync_s = sync_s
        # One breaker per backend and deployment: Azure OpenAI's capacity (and its 429s) is per deployment, so a full
        # gpt-4o deployment must not send the same account's embeddings elsewhere.
        self._breakers = {(b.id, d): Breaker(b.breaker) for b in backends for d in b.deployments}
        self._groups: dict[str, list[_Group]] = {}
        for deployment in sorted({d for b in backends for d in b.deployments}):
            serving = [b for b in backends if b.serves(deployment)]
            levels = sorted({b.priority for b in serving})
            self._groups[deployment] = [_Group([b for b in serving if b.priority == p]) for p in levels]
        self._remaining: dict[tuple[str, str], tuple[int, float]] = {}
        self._largest: dict[tuple[str, str], int] = {}  # the largest request (tokens) each backend has admitted
        self._sync_task: asyncio.Task[None] | None = None
        self._pending_writes: set[asyncio.Task[None]] = set()

    # ---- order -----------------------------------------------------------------------------------------------------

    def candidates(self, deployment: str, need_tokens: int, priority: str) -> list[Backend]:
        """The backends to try for one request, best first; empty when every breaker is open."""
        self._start_sync()
        now = self._clock.now()
        mono = self._clock.monotonic()
        first: list[Backend] = []
        later: list[Backend] = []
        for group in self._groups.get(deployment, ()):
            usable = [b for b in group.backends if self._breakers[(b.id, deployment)].usable(now)]
            for backend in group.order(usable):
                if backend.ptu:
                    # A PTU sends no remaining-capacity figures: its learnt model (with the reserve) decides.
                    model = self.capacity.model(backend.id, deployment)
                    paced = model is not None and not model.admits(need_tokens, priority == "high", now, mono)
                    (later if paced else first).append(backend)
                    continue
                remaining = self._fresh_remaining(backend, deployment, mono)
                short = remaining is not None and need_tokens > 0 and remaining < need_tokens
                reserved = (
                    remaining is not None
                    and backend.reserve_tokens > 0
                    and priority != "high"
                    and remaining < backend.reserve_tokens + need_tokens
                )
                (later if short or reserved else first).append(backend)
        return first + later

    def last_resort(self, deployment: str) -> list[Backend]:
        """When `candidates` is empty: the backends out of rotation on the gateway's own judgement only (see
        Breaker.last_resort), soonest back first. A trip is a guess that a backend would fail; with every region out,
        sending to one of these may serve the request, where refusing it (503) certainly does not."""
        now = self._clock.now()
        found = [
            (b.priority, self._breakers[(b.id, deployment)].open_until, b.id, b)
            for group in self._groups.get(deployment, ()) for b in group.backends
            if self._breakers[(b.id, deployment)].last_resort(now)
        ]
        return [b for *_, b in sorted(found, key=lambda f: f[:3])]

    def _fresh_remaining(self, backend: Backend, deployment: str, mono: float) -> int | None:
        seen = self._remaining.get((backend.id, deployment))
        if seen is None or mono - seen[1] > CAPACITY_FRESH_S:
            return None
        return seen[0]

    def acquire(self, backend: Backend, deployment: str, generates: bool = True, last_resort: bool = False) -> bool:
        """Claim the right to send to `backend` now (a half-open breaker lets one probe through; a `last_resort`
        backend, see `last_resort`, is sent to as it is, its breaker left as it was until the outcome is recorded).
        A call that `generates` is charged to a PTU's model; one that reads a stored response uses no throughput."""
        breaker = self._breakers[(backend.id, deployment)]
        if last_resort:
            allowed = breaker.last_resort(self._clock.now())
        else:
            allowed, transition = breaker.acquire(self._clock.now())
            if transition is not None:
                self._transitioned(backend, deployment, transition)
        if allowed and generates and backend.ptu:
            model = self.capacity.model(backend.id, deployment)
            if model is not None:
                model.sent(0, self._clock.now(), self._clock.monotonic())
        return allowed

    # ---- outcomes --------------------------------------------------------------------------------------------------

    def is_failure(self, backend: Backend, status: int) -> bool:
        return status in backend.breaker.statuses

    def record_success(self, backend: Backend, deployment: str, headers: Mapping[str, str], tokens: int = 0) -> None:
        """A whole answer or a stream's headers: the backend is healthy, and admitted a request of `tokens`."""
        remaining = headers.get("x-ratelimit-remaining-tokens")
        if remaining is not None and remaining.isdigit():
            self._remaining[(backend.id, deployment)] = (int(remaining), self._clock.monotonic())
        if tokens > self._largest.get((backend.id, deployment), 0):
            self._largest[(backend.id, deployment)] = tokens
        transition = self._breakers[(backend.id, deployment)].on_success(self._clock.now())
        if transition is not None:
            self._transitioned(backend, deployment, transition)

    def refusal_kind(self, backend: Backend, deployment: str, tokens: int, headers: Mapping[str, str]) -> str | None:
        """What a 429 for a request of `tokens` says (breaker.refusal_kind). ROOM and SIZE are not recorded as failures:
        the breaker and the capacity figures stay as they were (the remaining tokens the 429 shows are kept)."""
        largest = self._largest.get((backend.id, deployment), 0)
        kind = refusal_kind(tokens, largest, headers, self._clock.now(), backend.ptu)
        if kind is not None:
            remaining = headers.get("x-ratelimit-remaining-tokens")
            if remaining is not None and remaining.isdigit():
                self._remaining[(backend.id, deployment)] = (int(remaining), self._clock.monotonic())
        return kind

    def has_admitted(self, backend: Backend, deployment: str, tokens: int) -> bool:
        """This backend has served a request of at least `tokens` (since this instance started)."""
        return self._largest.get((backend.id, deployment), 0) >= tokens

    def record_failure(
        self, backend: Backend, deployment: str, status: int, headers: Mapping[str, str], generates: bool = True
    ) -> None:
        now = self._clock.now()
        breaker = self._breakers[(backend.id, deployment)]
        if status == 429:
            self._remaining[(backend.id, deployment)] = (0, self._clock.monotonic())
        model = self.capacity.model(backend.id, deployment) if backend.ptu and generates else None
        if model is not None:
            # Only a 429 shaped as a provisioned deployment's is a statement about utilisation (utilisation_wait);
            # any other (a quota's, a bare one, an injected fault) only gives the charge back.
            wait = utilisation_wait(headers) if status == 429 else None
            model.refused(model.call_cost(0), wait, now, self._clock.monotonic())
            if wait is not None:
                self.capacity.told(backend.id, deployment)  # an instant: news for every instance, told now
        trip_s = breaker.trip_length(status, headers, now)
        if breaker.rule.accept_retry_after and retry_after_s(headers, now):
            breaker.asked(now, now + trip_s)  # the backend's own word, capped as the trip is
        transition = breaker.on_failure(now, str(status), trip_s)
        if transition is not None:
            self._transitioned(backend, deployment, transition)

    def record_auth_failure(self, backend: Backend, deployment: str, status: int) -> None:
        """The backend refused the gateway's own credential (401) or role (403): it fails every request until someone
        fixes it, so it is taken out at once, for at least a minute, and named in the log (never the credential)."""
        now = self._clock.now()
        breaker = self._breakers[(backend.id, deployment)]
        trip_s = min(max(breaker.rule.trip_s, AUTH_TRIP_S), breaker.rule.max_trip_s)
        log.error(
            "backend %s (%s, %s) refused the gateway's credential with HTTP %d: check its key or role assignment; "
            "failing over to the others", backend.id, backend.region, deployment, status,
        )
        transition = breaker.trip(now, str(status), trip_s)
        if transition is not None:
            self._transitioned(backend, deployment, transition)

    def record_timeout(self, backend: Backend, deployment: str, caller: str) -> None:
        """A request outran the backend's read timeout; see Breaker.on_timeout."""
        now = self._clock.now()
        breaker = self._breakers[(backend.id, deployment)]
        transition = breaker.on_timeout(now, caller, min(breaker.rule.trip_s, breaker.rule.max_trip_s))
        if transition is not None:
            self._transitioned(backend, deployment, transition)

    def record_error(self, backend: Backend, deployment: str, kind: FailureKind, generates: bool = True) -> None:
        """An attempt that got no whole answer (timeout, connection error, broken body): trip for the rule's time."""
        now = self._clock.now()
        model = self.capacity.model(backend.id, deployment) if backend.ptu and generates else None
        if model is not None and kind is FailureKind.CONNECTION:  # never reached the PTU; a timeout or broken body may
            model.returned(model.call_cost(0), now, self._clock.monotonic())
        breaker = self._breakers[(backend.id, deployment)]
        transition = breaker.on_failure(now, kind.value, min(breaker.rule.trip_s, breaker.rule.max_trip_s))
        if transition is not None:
            self._transitioned(backend, deployment, transition)

    def settled(self, backend: Backend, deployment: str, tokens: int) -> None:
        """A call this backend answered has ended and used `tokens` (for a PTU: corrects what it was charged)."""
        model = self.capacity.model(backend.id, deployment) if backend.ptu else None
        if model is not None:
            model.settled(model.call_cost(0), tokens, self._clock.now(), self._clock.monotonic())

    def _transitioned(self, backend: Backend, deployment: str, transition: Transition, shared: bool = True) -> None:
        self._telemetry.breaker_transition(backend.id, backend.region, transition.state)
        if transition.state == OPEN:
            log.warning("backend %s (%s) taken out until %s (%s)", backend.id, deployment, _iso(transition.until), transition.reason)
        elif transition.state == CLOSED:
            log.info("backend %s (%s) is back", backend.id, deployment)
        if shared and self._store is not None and transition.state in (OPEN, CLOSED):
            record = BreakerRecord(
                backend.id, deployment, transition.state, transition.until, self._clock.now(), transition.reason
            )
            try:
                task = asyncio.get_running_loop().create_task(self._save(record))
            except RuntimeError:
                return
            self._pending_writes.add(task)
            task.add_done_callback(self._pending_writes.discard)

    async def _save(self, record: BreakerRecord) -> None:
        assert self._store is not None
        try:
            await self._store.save(record)
        except Exception as exc:
            log.warning("could not share the breaker state of %s (%s)", record.backend_id, type(exc).__name__)

    # ---- shared state ----------------------------------------------------------------------------------------------

    def _start_sync(self) -> None:
        self.capacity.start()
        if self._store is not None:
            self._sync_task = keep_running(self._sync_task, lambda: repeat(self.sync, self._sync_s))

    async def sync(self) -> None:
        """Adopt the trips (and recoveries) other instances recorded."""
        if self._store is None:
            return
        try:
            records = await self._store.load()
        except Exception as exc:
            log.warning("could not read shared breaker state (%s)", type(exc).__name__)
            return
        now = self._clock.now()
        by_id = {b.id: b for b in self._backends}
        for record in records:
            backend = by_id.get(record.backend_id)
            breaker = self._breakers.get((record.backend_id, record.deployment))
            if backend is None or breaker is None:
                continue
            transition = breaker.adopt(record.state, record.until, record.since, record.reason, now)
            if transition is not None:
                self._transitioned(backend, record.deployment, transition, shared=False)

    async def close(self) -> None:
        await self.capacity.close()
        if self._sync_task is not None:
            self._sync_task.cancel()
        if self._pending_writes:
            await asyncio.gather(*self._pending_writes, return_exceptions=True)

    # ---- when nothing answered ------------------------------------------------------------------------------------

    def exhausted(
        self, deployment: str, failures: list[AttemptFailure], asked: Mapping[str, float] | None = None
    ) -> BackendsBusy | BackendAuthFailed | BackendsFailed | NoBackend:
        """Why no candidate served the request: all throttled (busy), all refusing the gateway's credential, all failed
        alike (timeouts, broken bodies, connection errors), or else no backend; with the wait until the soonest
        recovery. `asked` holds, per backend tried, when it said it would serve again (its Retry-After): a client that
        waits what it is told must find a backend ready, so no backend counts as ready before it said so."""
        now = self._clock.now()
        asked = asked or {}
        serving = [b for b in self._backends if b.serves(deployment)]
        breakers = [self._breakers[(b.id, deployment)] for b in serving]
        open_breakers = [br for br in breakers if br.state == OPEN]
        ready: list[float] = []
        for backend, breaker in zip(serving, breakers, strict=True):
            at = max(breaker.open_until if breaker.state == OPEN else 0.0, asked.get(backend.id, 0.0))
            if at > now:
                ready.append(at)
        soonest = min(ready, default=now + 1.0)
        # Rounded up, never down, after removing float noise (which must not add a millisecond).
        wait_ms = max(1, math.ceil(round((soonest - now) * 1000, 3)))
        kinds = {f.kind for f in failures}
        throttled = kinds == {FailureKind.THROTTLED}
        if not failures:
            throttled = bool(open_breakers) and all(br.reason == "429" for br in open_breakers)
        if throttled:
            return BackendsBusy(wait_ms)
        if kinds == {FailureKind.AUTH}:
            return BackendAuthFailed()
        if kinds == {FailureKind.TIMEOUT}:
            return BackendsFailed(FailureKind.TIMEOUT)
        if kinds == {FailureKind.BROKEN}:
            return BackendsFailed(FailureKind.BROKEN)
        if kinds and kinds <= {FailureKind.CONNECTION, FailureKind.BROKEN}:
            return BackendsFailed(FailureKind.CONNECTION)
        return NoBackend(wait_ms)

    def health(self) -> dict[str, Any]:
        # A newcomer polled only by health probes still takes in what the others learnt of the PTUs. The breaker
        # sync starts with the first request, as it always has: started here, a probe answered "closed" before the
        # first read, and the trips adopted right after sent the next requests elsewhere (a client that waited for
        # "recovered" was routed as if it had not).
        self.capacity.start()
        now = self._clock.now()
        backends = []
        for backend in self._backends:
            deployments = {}
            for deployment in sorted(backend.deployments):
                breaker = self._breakers[(backend.id, deployment)]
                state = breaker.state
                if state == OPEN and now >= breaker.open_until:
                    state = HALF_OPEN  # the next request will probe it
                entry: dict[str, Any] = {"state": state}
                learnt = self.capacity.health(backend.id, deployment)
                if learnt is not None:
                    entry["capacity"] = learnt
                if breaker.state == OPEN and breaker.open_until > now:
                    entry["reason"] = breaker.reason
                    entry["recovers_at"] = _iso(breaker.open_until)
                    entry["recovers_in_s"] = round(breaker.open_until - now, 3)
                deployments[deployment] = entry
            states = {d["state"] for d in deployments.values()}
            backends.append({
                "id": backend.id,
                "region": backend.region,
                "priority": backend.priority,
                "weight": backend.weight,
                "ptu": backend.ptu,
                "state": OPEN if states == {OPEN} else (CLOSED if states == {CLOSED} else "degraded"),
                "deployments": deployments,
            })
        healthy = any(b["state"] != OPEN for b in backends)
        return {"status": "ok" if healthy else "degraded", "backends": backends}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"
