"""How far it carries (issue 32): N gateway instances' real limiters, breaker and PTU-capacity sharing and consumer-
marker reads, in one process, on a simulated clock, against a simulated Table Storage account (bench/simtable.py:
latency, real ETag conflicts, 2,000 entities/s a partition and 20,000 requests/s an account, 503 ServerBusy beyond).

    .venv/bin/python -m bench.scale [--quick] [--seconds 100] [--write] [--seed 7] [--oracle] [--max-claims N]

Shapes:
- `one`: one consumer asking `rps` requests a second (Poisson, each to a random instance, as the Functions front end
  spreads them), twice its tokens-per-minute limit, across N instances; each request reserves 300 tokens and uses
  150-300, settled 0.5-5 s later.
- `many`: 10,000 consumers at one request a second each (each at ~15% of its limit), across N instances.
- `change`: C consumers (rps = C) known to N warm instances, each instance authenticating a request every 0.2 s;
  an admin disables one consumer and lowers another's limit: how long until every instance refuses the first key and
  sees the new limit, and how many consumer-partition entities the instances read for it. `burst`: the same with 98
  more consumers disabled at once (100 changes, what the feed holds), the last of them checked too.
- `cold`: N instances starting at once with C consumers stored, each authenticating a valid key every 0.2 s from its
  start: when every instance answers valid keys, what the listing's snapshot (written by a warm instance before, then
  3 consumers changed) and the listing cost; `coldlist`: the same with the snapshot off (the listing, as before).
- `ptu`, `ptuskew`: N instances overflowing one PTU twice over (evenly, or a third of them three times the others):
  how far each instance's learnt rate and share are from the PTU's (bench/scale_ptu.py; warm-up: --trip-warm).
- `trip`: N idle instances sharing state; one sees a backend refuse its credential (a trip) and a PTU's 429: how long
  until every instance has the trip and the PTU's instant.

Per shape: the most admitted in any 60 s / limit (<= 1), tokens per full minute once the window is full, counted when
usage settles / limit (>= 0.95; runs shorter than 120 s have none), storage operations per request, peaks per second on the busiest partition and the account, ETag conflicts
(and the re-reads they cost), ServerBusy answers and what the limiter did about them (fallback admissions, 503s), and
the admission latency the store adds (simulated, p50/p99). Every instance's gateway code is the real code; only the
store and the clock are simulated. Real run time is bounded by the shapes chosen (--quick: the subset in QUICK).
A run replays exactly from its seed (every instance's jitter is drawn from it); `--oracle` checks every admission
against every ledger write (bench/oracle.py) and reports the first instance whose admissions the ledger does not keep.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import time
from dataclasses import replace
from typing import Any, cast

from bench import scale_ptu
from bench.figures import most_in_any_window, percentile
from bench.harness import machine, save, stamp, update_doc
from bench.oracle import LedgerOracle
from bench.simtable import (
    T0,
    SimAccount,
    SimBreakerStore,
    SimCapacityStore,
    SimClock,
    SimConsumerStore,
    SimLedgerStore,
    VirtualLoop,
)
from shared import wiring
from shared.adminops.operations import Actor, AdminOperations
from shared.config import Backend, Settings
from shared.edge.consumers import hash_key
from shared.outcomes import ConsumerDisabled, Refusal
from shared.records.consumers import Consumer, Limits
from shared.routing.breaker import OPEN
from shared.storage.ledger_shards import ShardedLedgerStore
from shared.storage.protocols import LedgerStore, StoreUnavailable
from shared.telemetry.protocol import NullTelemetry
from shared.wiring import Stores, memory_stores

D = "gpt-4o"
RESERVE = 300
SETTLE_S = (0.5, 5.0)  # a request's usage is known (settled) this long after admission, uniformly
BACKENDS = (
    Backend(id="ptu", endpoint="https://ptu.example", region="a", deployments={D: D}, ptu=True),
    Backend(id="paygo", endpoint="https://paygo.example", region="b", deployments={D: D}, priority=2),
)
FULL = [("one", 1000, 16), ("one", 1000, 64), ("one", 1000, 256), ("one", 5000, 16), ("one", 5000, 64),
        ("one", 5000, 256), ("one", 20000, 16), ("one", 20000, 64), ("one", 20000, 256), ("many", 10000, 64),
        ("trip", 0, 16), ("trip", 0, 64), ("trip", 0, 256)]
QUICK = [("trip", 0, 16), ("trip", 0, 64), ("trip", 0, 256), ("one", 1000, 16), ("one", 1000, 256),
         ("one", 5000, 64), ("one", 20000, 256), ("many", 10000, 64)]
# Simulated seconds at most per request rate, to bound the real run time (2 shared cores run ~2-15k simulated requests
# a real second, fewer with many instances): the heaviest shapes show their throttling, not a full minute's accuracy.
TRIP_WARM_S = 60.0  # simulated seconds before the trip
TRIP_WAIT_S = 150.0  # how long the trip shape waits for every instance to have it
SECONDS_CAP = {1000: 130.0, 5000: 70.0, 10000: 20.0, 20000: 15.0}
STARTUP_S = 10.0  # admission latency is also reported without the first seconds (every instance's first claims)
CHANGE_WARM_S = 20.0  # simulated seconds of checks before the change
CHANGE_WAIT_S = 1800.0  # how long the change shape waits for every instance to have it
CHANGE_STEP_S = 0.2  # each instance's requests (each runs the directory's checks, as a real request does)


class Instance:
    """One gateway instance, built as shared/app.py builds a worker (shared/wiring.py) over the simulated stores."""

    def __init__(self, i: int, n: int, clock: SimClock, stores: Stores, seed: int = 0, max_claims: int | None = None
                 ) -> None:
        self.name = f"i{i}"
        if isinstance(stores.breakers, SimBreakerStore):  # each instance's own store (its read schedule), one table
            stores = replace(stores, breakers=stores.breakers.another(i))
        built = wiring.build(Settings(backends=BACKENDS, instance_count=n), stores, clock, NullTelemetry(),
                             instance=self.name)
        self.limiter = built.limiter
        self.router = built.services.router
        self.directory = built.services.consumers
        # Every source of jitter in the instance from the run's seed: a run (a failing one above all) replays exactly.
        self.limiter.rng = random.Random(f"{seed}:{i}:limiter")
        self.directory._rng = random.Random(f"{seed}:{i}:directory")
        self.router.capacity._rng = random.Random(f"{seed}:{i}:capacity")
        if max_claims is not None:
            self.limiter.max_claims = max_claims

    async def close(self) -> None:
        await self.router.close()
        if self.limiter._ticker is not None:
            self.limiter._ticker.cancel()


def sim_stores(account: SimAccount, ledger_accounts: list[SimAccount] | None = None) -> Stores:
    """The shared state the scale is about on the simulated account (the ledgers on `ledger_accounts` if given, as
    GATEWAY_LEDGER_ACCOUNTS places them); the rest (usage rows, budgets, ...) in memory."""
    ledger: LedgerStore = ShardedLedgerStore([SimLedgerStore(a) for a in ledger_accounts]) if ledger_accounts \
        else SimLedgerStore(account)
    return replace(memory_stores(), ledger=ledger, breakers=SimBreakerStore(account),
                   capacity=SimCapacityStore(account), consumers=SimConsumerStore(account))


def start(loop: VirtualLoop, inst: Instance, rng: random.Random) -> None:
    """Start an instance's sync loops (as its first request does) at a random moment: instances start apart."""
    loop.call_later(rng.uniform(0, 1.0), inst.router.candidates, D, RESERVE, "normal")


async def traffic(shape: str, rps: int, n: int, seconds: float, loop: VirtualLoop, seed: int,
                  ledger_accounts: int = 1, oracle: bool = False, max_claims: int | None = None) -> dict[str, Any]:
    account = SimAccount(seed)
    shards = [SimAccount(seed + 1 + k) for k in range(ledger_accounts)] if ledger_accounts > 1 else []
    accounts = [account, *shards]
    clock = SimClock(loop)
    stores = sim_stores(account, shards)
    rng = random.Random(seed)
    if shape == "one":
        per_request = 225  # the mean of 150-300
        limit = int(rps * per_request * 60 / 2)  # demand is twice the limit
        consumers = [Consumer(id="busy", name="busy", key_hash=hash_key("k-busy"), key_prefix="gw-x",
                              limits=Limits(tokens_per_minute=limit))]
    else:
        limit = 100_000
        consumers = [Consumer(id=f"c{k}", name=f"c{k}", key_hash=hash_key(f"k-c{k}"), key_prefix="gw-x",
                              limits=Limits(tokens_per_minute=limit)) for k in range(rps)]
    for c in consumers:
        cast(SimConsumerStore, stores.consumers).twin._store(c)
    keys = [f"k-{c.id}" for c in consumers]
    checker = LedgerOracle(consumers[0].id, limit, T0) if oracle and shape == "one" and not shards else None
    if checker is not None:  # each instance its own view of the ledger store, so that the oracle knows who wrote
        twin = cast(SimLedgerStore, stores.ledger).twin
        instances = [Instance(i, n, clock, replace(stores, ledger=SimLedgerStore(account, twin, f"i{i}",
                                                                                 checker.written)), seed, max_claims)
                     for i in range(n)]
    else:
        instances = [Instance(i, n, clock, stores, seed, max_claims) for i in range(n)]
    # Warm instances: each loaded the listing before the measured period, unmetered (N instances starting at once
    # would read N x C consumer rows from one partition: N x C / 2,000 s, the arithmetic in docs/scale.md).
    account.metered = False
    for inst in instances:
        await inst.directory.reload()
    account.metered = True
    for inst in instances:
        start(loop, inst, rng)
    await asyncio.sleep(1)
    for a in accounts:
        a.counts.ops = 0
    base_kind = _kinds(accounts)
    admitted: dict[str, list[tuple[float, int]]] = {c.id: [] for c in consumers}
    settled: dict[str, list[tuple[float, int]]] = {c.id: [] for c in consumers}
    latencies: list[float] = []
    settled_latencies: list[float] = []  # admissions that started once the instances' first claims were behind them
    results = {"requests": 0, "admitted": 0, "refused_429": 0, "store_503": 0, "auth_refused": 0}
    auth_kinds: dict[str, int] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def one(inst: Instance, key: str, used: int, settle_s: float) -> None:
        started = loop.time()
        try:
            consumer = await inst.directory.authenticate(key)
        except Exception as exc:  # what the edge answers: 401 for a key not (yet) known, 503 with the store away
            name = type(exc).__name__
            results["auth_refused"] += 1
            auth_kinds[name] = auth_kinds.get(name, 0) + 1
            return
        try:
            ticket = await inst.limiter.admit(consumer, D, RESERVE)
        except Refusal:
            results["refused_429"] += 1
            return
        except StoreUnavailable:
            results["store_503"] += 1
            return
        latencies.append(loop.time() - started)
        if started - start_at >= STARTUP_S:
            settled_latencies.append(loop.time() - started)
        results["admitted"] += 1
        admitted[consumer.id].append((loop.time(), used))
        if checker is not None:
            lease = getattr(ticket, "_lease", None)
            checker.admitted(inst.name, loop.time(), used, lease.id if lease else "-", bool(lease and lease.quiet))

        def settle() -> None:
            ticket.settle(used)
            settled[consumer.id].append((loop.time(), used))

        loop.call_later(settle_s, settle)

    step = 0.01
    t = 0.0
    start_at = loop.time()
    while t < seconds:
        await asyncio.sleep(step)
        t += step
        if shape == "one":
            count = _poisson(rng, rps * step)
            picks = [keys[0]] * count
        else:  # every consumer once a second, out of step with one another
            lo, hi = int((t - step) * rps) % rps, int(t * rps) % rps
            picks = keys[lo:hi] if lo <= hi else keys[lo:] + keys[:hi]
        for key in picks:
            results["requests"] += 1
            # Every draw at arrival, none on admission: the demand (instance, tokens used, when it settles) is the
            # seed's alone, the same whatever the gateway admits, so two versions of it see the same requests.
            inst, used, settle_s = instances[rng.randrange(n)], rng.randint(150, 300), rng.uniform(*SETTLE_S)
            task = loop.create_task(one(inst, key, used, settle_s))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks, return_exceptions=True)
    for inst in instances:
        await inst.close()
    counts = account.counts
    kinds = {k: v - base_kind.get(k, 0) for k, v in _kinds(accounts).items()}
    ledger_ops = kinds.get("ledger.read", 0) + kinds.get("ledger.write", 0)
    figures: dict[str, Any] = {
        "shape": shape, "rps": rps, "instances": n, "seconds": seconds, "limit_tpm": limit, **results,
        "storage_ops_per_request": round(sum(kinds.values()) / max(1, results["requests"]), 4),
        "ledger_ops_per_request": round(ledger_ops / max(1, results["requests"]), 4),
        "ops_by_kind": kinds,
        "account_peak_per_s": max(a.counts.peak_account_per_s(2) for a in accounts),
        "ledger_accounts": ledger_accounts,
        "per_account_peak_per_s": [a.counts.peak_account_per_s(2) for a in accounts],
        "account_mean_per_s": round(sum(kinds.values()) / seconds),
        "busiest_partition": counts.peak_partition_per_s(2),
        "ledger_partition_peak_per_s": max(a.counts.partition_group_peak("ledger/", 2) for a in accounts),
        "etag_conflicts": sum(a.counts.conflicts for a in accounts),
        "server_busy_503": sum(a.counts.busy for a in accounts),
        "limiter_contended": sum(i.limiter.contended for i in instances),
        "ledger_by_purpose": _summed(i.limiter.ledger_counts for i in instances),
        "fallback_admissions": sum(i.limiter.fallback_admissions for i in instances),
        "auth_refusals_by_kind": auth_kinds,
        "consumer_reload_failures": sum(i.directory.reload_failures for i in instances),
        "admission_p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "admission_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "admission_p99_after_start_ms": round(percentile(settled_latencies, 0.99) * 1000, 2),
    }
    if checker is not None:
        figures["oracle"] = checker.report()
    if shape == "one":
        # Full minutes once the window is full (from 60 s on: before, nothing has aged out), counted when each
        # request's usage is known (settled), as bench.limits counts responses. (The minute right after the window
        # first filled is a filling minute: tokens admitted while it filled leave only during it.)
        minutes = []
        offset = 60.0
        while offset + 60 <= seconds:
            minutes.append(sum(tok for at, tok in settled["busy"] if start_at + offset <= at < start_at + offset + 60))
            offset += 60
        figures["per_full_minute_over_limit"] = [round(m / limit, 4) for m in minutes]
        series = admitted["busy"]
        most = most_in_any_window(series)
        figures["max_any_60s_over_limit"] = round(most / limit, 4)
        figures["tokens_over_limit_in_any_60s"] = max(0, most - limit)  # exact: the ratio above is rounded
        fill = _filled_at(series, limit)
        if fill is not None and fill + 60 <= seconds:
            minute = sum(tok for at, tok in series if fill <= at < fill + 60)
            figures["minute_after_fill_over_limit"] = round(minute / limit, 4)
            figures["filled_at_s"] = round(fill, 1)
    else:
        worst = max((most_in_any_window(s) for s in admitted.values() if s), default=0)
        figures["max_any_60s_over_limit"] = round(worst / limit, 4)
        figures["tokens_over_limit_in_any_60s"] = max(0, worst - limit)
    return figures


def _summed(counts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in counts:
        for k, v in one.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def _kinds(accounts: list[SimAccount]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for a in accounts:
        for kind, count in a.counts.by_kind.items():
            kinds[kind] = kinds.get(kind, 0) + count
    return kinds


def _filled_at(series: list[tuple[float, int]], limit: int) -> float | None:
    total = 0
    for at, tokens in sorted(series):
        total += tokens
        if total >= 0.95 * limit:
            return at
    return None


def _poisson(rng: random.Random, mean: float) -> int:
    if mean > 30:
        return max(0, round(rng.gauss(mean, mean ** 0.5)))
    count, limit, p = 0, pow(2.718281828459045, -mean), rng.random()
    while p > limit:
        count += 1
        p *= rng.random()
    return count


async def trip(n: int, loop: VirtualLoop, seed: int, warm_s: float = TRIP_WARM_S) -> dict[str, Any]:
    account = SimAccount(seed)
    clock = SimClock(loop)
    stores = sim_stores(account)
    instances = [Instance(i, n, clock, stores, seed) for i in range(n)]
    rng = random.Random(seed)
    for inst in instances:
        start(loop, inst, rng)
    ptu, paygo = BACKENDS
    for inst in instances:  # every instance has sent to the PTU lately: each publishes its capacity report
        inst.router.acquire(ptu, D)
    # The sync loops out of step, as they are, and past the start (every instance starting in the same second is a
    # burst of its own, reported apart); the trip at any moment.
    await asyncio.sleep(warm_s + rng.random())
    base = account.counts.busy
    base_capacity = sum(v for p, v in account.counts.busy_by_partition.items() if p.startswith("capacity"))
    first = instances[0].router
    t0 = loop.time()
    first.record_auth_failure(paygo, D, 401)  # a trip
    first.acquire(ptu, D)
    first.record_failure(ptu, D, 429, {"retry-after-ms": "800", "retry-after": "1"})  # a PTU's utilisation 429
    trip_all = ptu_all = None
    steady_from = int(loop.time()) - 10
    while loop.time() - t0 < TRIP_WAIT_S and (trip_all is None or ptu_all is None):
        await asyncio.sleep(0.01)
        if trip_all is None and all(i.router._breakers[(paygo.id, D)].state == OPEN for i in instances):
            trip_all = loop.time() - t0
        if ptu_all is None and all(
            (m := i.router.capacity.model(ptu.id, D)) is not None and m.evidence_at >= clock.now() - 60
            for i in instances
        ):
            ptu_all = loop.time() - t0
    await asyncio.sleep(10)
    for inst in instances:
        await inst.close()
    c = account.counts
    return {
        "shape": "trip", "instances": n, "warm_s": warm_s,
        "trip_reaches_all_s": None if trip_all is None else round(trip_all, 2),
        "ptu_429_reaches_all_s": None if ptu_all is None else round(ptu_all, 2),
        "breakers_partition_peak_per_s": c.partition_group_peak("breakers", 0),
        "breakers_partition_steady_peak_per_s": c.partition_group_peak("breakers", steady_from),
        "breakers_busy_503": sum(v for p, v in c.busy_by_partition.items() if p.startswith("breakers")),
        # The per-instance rows (one partition), and the summary row of the PTU deployment (a partition of its own).
        "capacity_partition_peak_per_s": c.partition_peak("capacity", steady_from),
        "capacity_partition_start_peak_per_s": c.partition_peak("capacity", 0),
        "summary_partition_peak_per_s": c.partition_group_peak("capacity|", steady_from),
        "summary_partition_start_peak_per_s": c.partition_group_peak("capacity|", 0),
        "summary_writes": sum(i.router.capacity.summary_writes for i in instances),
        "summary_races": sum(i.router.capacity.summary_races for i in instances),
        "summary_failures": sum(i.router.capacity.summary_failures for i in instances),
        "marker_partition_peak_per_s": c.partition_group_peak("marker", 0),
        "account_mean_per_s": round(c.ops / loop.time()),  # over the whole run, warm-up included
        "server_busy_503_after_trip": c.busy - base,
        "capacity_busy_503_after_trip": sum(v for p, v in c.busy_by_partition.items() if p.startswith("capacity"))
        - base_capacity,
        "capacity_sync_failures": sum(i.router.capacity.sync_failures for i in instances),
    }


def _with_consumers(count: int, loop: VirtualLoop, seed: int) -> tuple[SimAccount, SimClock, Stores, SimConsumerStore]:
    """A simulated account and its stores with `count` consumers c0, c1, ... stored (keys k-c0, k-c1, ...)."""
    account = SimAccount(seed)
    clock = SimClock(loop)
    stores = sim_stores(account)
    store = cast(SimConsumerStore, stores.consumers)
    for k in range(count):
        store.twin._store(Consumer(id=f"c{k}", name=f"c{k}", key_hash=hash_key(f"k-c{k}"), key_prefix="gw-x",
                                   limits=Limits(tokens_per_minute=100_000)))
    return account, clock, stores, store


async def change(count: int, n: int, loop: VirtualLoop, seed: int, more: int = 0) -> dict[str, Any]:
    """A consumer disabled and another's limit lowered through the admin operations, with N instances warm: when each
    instance has both (it refuses the key, its copy has the new limit), and what the consumer partition served."""
    account, clock, stores, store = _with_consumers(count, loop, seed)
    instances = [Instance(i, n, clock, stores, seed) for i in range(n)]
    for i, inst in enumerate(instances):
        inst.directory._rng = random.Random(seed * 1_000 + i)  # its jitter, repeatable
    account.metered = False
    for inst in instances:
        await inst.directory.reload()
    account.metered = True
    rng = random.Random(seed)
    revoked, lowered, last = "c1", "c2", f"c{2 + more}"
    changed_at: float | None = None
    has: dict[int, float] = {}
    stop = False

    async def drive(i: int, inst: Instance) -> None:
        await asyncio.sleep(rng.uniform(0, CHANGE_STEP_S))
        while not stop:
            try:
                await inst.directory.authenticate(f"k-{revoked}")
                refused = False
            except ConsumerDisabled:
                refused = True
            except Exception:  # a cold or stale instance's 503: not the change
                refused = False
            try:
                seen = (await inst.directory.authenticate(f"k-{lowered}")).limits.tokens_per_minute
            except Exception:
                seen = 0
            if more:
                try:
                    await inst.directory.authenticate(f"k-{last}")
                    refused = False
                except ConsumerDisabled:
                    pass
                except Exception:
                    refused = False
            if changed_at is not None and i not in has and refused and seen == 1_000:
                has[i] = loop.time() - changed_at
            await asyncio.sleep(CHANGE_STEP_S)

    drivers = [loop.create_task(drive(i, inst)) for i, inst in enumerate(instances)]
    await asyncio.sleep(CHANGE_WARM_S)
    base = dict(account.counts.by_kind)
    base_busy = account.counts.busy
    t0 = int(loop.time())
    ops = AdminOperations(store, None, clock)
    actor = Actor("bench")
    await ops.set_enabled(revoked, False, actor)
    await ops.change(lowered, lambda c: replace(c, limits=replace(c.limits, tokens_per_minute=1_000),
                                                version=c.version + 1), actor)
    for k in range(3, 3 + more):
        await ops.set_enabled(f"c{k}", False, actor)
    changed_at = loop.time()
    for _ in range(int(CHANGE_WAIT_S / 0.5)):
        if len(has) == n:
            break
        await asyncio.sleep(0.5)
    reached = loop.time() - changed_at
    stop = True
    await asyncio.gather(*drivers, return_exceptions=True)
    for inst in instances:
        await inst.close()
    c = account.counts
    kinds = {k: v - base.get(k, 0) for k, v in c.by_kind.items() if v - base.get(k, 0)}
    listing = sum(e for (p, s), e in c.per_partition_second.items() if p == "consumer" and s >= t0)
    times = sorted(has.values())
    return {
        "shape": "burst" if more else "change", "rps": count, "instances": n, "rows_changed": 2 + more,
        "reaches_all_s": round(max(times), 2) if len(has) == n else None,
        "instances_with_it": len(has),
        "reaches_half_s": round(times[len(times) // 2], 2) if times else None,
        "listing_entities_read": listing,
        "listing_entities_per_instance": round(listing / n, 1),
        "consumer_partition_peak_per_s": c.partition_group_peak("consumer", t0),
        "marker_partition_peak_per_s": c.partition_group_peak("marker", t0),
        "ops_by_kind": kinds,
        "server_busy_503": c.busy - base_busy,
        "consumer_reload_failures": sum(i.directory.reload_failures for i in instances),
        "seconds": round(reached, 1),
    }


COLD_WAIT_S = 1800.0  # how long the cold shape waits for every instance to answer valid keys
COLD_CHANGED = 3  # consumers changed after the snapshot was written (a cold instance reads them through the feed)


async def cold(count: int, n: int, loop: VirtualLoop, seed: int, snapshot: bool = True) -> dict[str, Any]:
    """N instances starting at once (within a second, as Flex Consumption scales out or a deploy restarts them) with
    C consumers stored, each authenticating a valid key every 0.2 s from its start: when every instance answers valid
    keys, what the listing and the snapshot cost the partitions and the account, and what valid keys got meanwhile.
    With `snapshot`, a warm instance wrote the listing's snapshot before (then COLD_CHANGED consumers were changed);
    without, the directories read the listing as before the snapshot (`coldlist`)."""
    account, clock, stores, store = _with_consumers(count, loop, seed)
    account.metered = False
    if snapshot:
        earlier = Instance(n, n, clock, stores)  # the fleet before the deploy: one listing, which writes the snapshot
        await earlier.directory.reload()
        if earlier.directory._writing is not None:
            await earlier.directory._writing
        ops = AdminOperations(store, None, clock)
        for k in range(COLD_CHANGED):
            await ops.change(f"c{k}", lambda c: replace(c, limits=replace(c.limits, tokens_per_minute=50_000),
                                                        version=c.version + 1), Actor("bench"))
    account.metered = True
    instances = [Instance(i, n, clock, stores) for i in range(n)]
    for i, inst in enumerate(instances):
        inst.directory._rng = random.Random(seed * 1_000 + i)
        inst.directory._snapshots = snapshot
    rng = random.Random(seed)
    t0 = loop.time()
    ready: dict[int, float] = {}  # an instance's first answer to a valid key with no refusal of one after it
    refused: dict[str, int] = {}
    answered = 0
    stop = False

    async def drive(i: int, inst: Instance) -> None:
        nonlocal answered
        await asyncio.sleep(rng.uniform(0, 1.0))
        start(loop, inst, rng)
        while not stop:
            k = rng.randrange(count)
            try:
                consumer = await inst.directory.authenticate(f"k-c{k}")
                answered += 1
                if k < COLD_CHANGED and snapshot and consumer.limits.tokens_per_minute != 50_000:
                    refused["stale_limit"] = refused.get("stale_limit", 0) + 1  # a change lost: must stay 0
                ready.setdefault(i, loop.time() - t0)
            except Exception as exc:  # 401 (InvalidKey) or 503 (AuthStoreUnavailable) to a valid key
                name = type(exc).__name__
                refused[name] = refused.get(name, 0) + 1
                ready.pop(i, None)
            await asyncio.sleep(CHANGE_STEP_S)

    drivers = [loop.create_task(drive(i, inst)) for i, inst in enumerate(instances)]
    await asyncio.sleep(2.0)
    for _ in range(int(COLD_WAIT_S / 0.5)):
        if len(ready) == n:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(5.0)  # and a few seconds more: nothing refused once every instance answers
    stop = True
    await asyncio.gather(*drivers, return_exceptions=True)
    for inst in instances:
        await inst.close()
    c = account.counts
    kinds = {k: v for k, v in c.by_kind.items() if v}
    listing = sum(e for (p, _), e in c.per_partition_second.items() if p == "consumer")
    snap = sum(e for (p, _), e in c.per_partition_second.items() if p.startswith("snapshot"))
    times = sorted(ready.values())
    return {
        "shape": "cold" if snapshot else "coldlist", "rps": count, "instances": n,
        "all_answer_s": round(max(times), 2) if len(ready) == n else None,
        "instances_answering": len(ready),
        "half_answer_s": round(times[len(times) // 2], 2) if times else None,
        "valid_keys_answered": answered,
        "valid_keys_refused": refused,
        "listing_entities_read": listing,
        "snapshot_reads": kinds.get("consumers.snapshot_chunk", 0) + kinds.get("consumers.snapshot_head", 0),
        "snapshot_kib_read": snap,
        "consumer_partition_peak_per_s": c.partition_group_peak("consumer", 0),
        "snapshot_partition_peak_per_s": c.partition_group_peak("snapshot", 0),
        "account_peak_per_s": c.peak_account_per_s(0),
        "server_busy_503": c.busy,
        "busy_by_partition": {p: v for p, v in sorted(c.busy_by_partition.items()) if v},
        "snapshot_loads": sum(i.directory.snapshot_loads for i in instances),
        "snapshot_fallbacks": sum(i.directory.snapshot_fallbacks for i in instances),
        "snapshot_writes": sum(i.directory.snapshot_writes for i in instances),
        "consumer_reload_failures": sum(i.directory.reload_failures for i in instances),
        "ops_by_kind": kinds,
        "seconds": round(loop.time() - t0, 1),
    }


def run_shape(shape: str, rps: int, n: int, seconds: float, seed: int, trip_warm_s: float = TRIP_WARM_S,
              ledger_accounts: int = 1, oracle: bool = False, max_claims: int | None = None) -> dict[str, Any]:
    loop = VirtualLoop()
    started = time.monotonic()
    try:
        coro = (trip(n, loop, seed, trip_warm_s) if shape == "trip" else change(rps, n, loop, seed) if shape == "change"
                else cold(rps, n, loop, seed, snapshot=shape == "cold") if shape in ("cold", "coldlist")
                else scale_ptu.ptu(rps, n, loop, seed, trip_warm_s, skew=shape == "ptuskew")
                if shape in ("ptu", "ptuskew")
                else change(rps, n, loop, seed, more=98) if shape == "burst"
                else traffic(shape, rps, n, seconds, loop, seed, ledger_accounts, oracle, max_claims))
        figures = loop.run_until_complete(coro)
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
    figures["real_seconds"] = round(time.monotonic() - started, 1)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the subset of shapes in QUICK")
    parser.add_argument("--seconds", type=float, default=100.0, help="simulated seconds per traffic shape")
    parser.add_argument("--only", default="", help="shape:rps:instances,... to run just those")
    parser.add_argument("--trip-warm", type=float, default=TRIP_WARM_S,
                        help="simulated seconds the trip shape waits before the trip (N instances start at once)")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--seed", type=int, default=7, help="the run's seed (every instance's jitter is drawn from it)")
    parser.add_argument("--oracle", action="store_true",
                        help="check every admission against every ledger write (shape one, one ledger account)")
    parser.add_argument("--max-claims", type=int, default=None,
                        help="claims a request may wait for (the limiter's MAX_CLAIMS_PER_REQUEST unless given)")
    parser.add_argument("--ledger-accounts", type=int, default=1,
                        help="storage accounts the ledgers are spread over (GATEWAY_LEDGER_ACCOUNTS), each simulated")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # every instance logs every trip it adopts
    shapes = QUICK if args.quick else FULL
    if args.only:
        shapes = [(s, int(r), int(n)) for s, r, n in (x.split(":") for x in args.only.split(","))]
    results: dict[str, Any] = {"machine": machine(), "date": stamp(), "seconds": args.seconds,
                               "quick": args.quick, "runs": []}
    for shape, rps, n in shapes:
        figures = run_shape(shape, rps, n, min(args.seconds, SECONDS_CAP.get(rps, args.seconds)), seed=args.seed,
                            trip_warm_s=args.trip_warm, ledger_accounts=args.ledger_accounts, oracle=args.oracle,
                            max_claims=args.max_claims)
        results["runs"].append(figures)
        print(json.dumps(figures), flush=True)
    save("scale", results)
    if args.write:
        update_doc("scale", markdown(results, args))
    return 0


def _accounts(r: dict[str, Any]) -> str:
    k = r.get("ledger_accounts", 1)
    return f" (ledgers on {k} accounts)" if k > 1 else ""


def _minutes(r: dict[str, Any]) -> str:
    minutes = r.get("per_full_minute_over_limit")
    return ", ".join(str(m) for m in minutes) if minutes else "-"


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    command = "`.venv/bin/python -m bench.scale" + (" --quick" if args.quick else "") + \
        (f" --seconds {args.seconds:g}" if args.seconds != 100 else "") + " --write`"
    lines = [
        "## Scale: 16 to 256 instances against Table Storage's targets (simulated)",
        "",
        f"{command} — {results['date']}, {results['machine']} (shared with other work; real seconds per shape in the "
        "last column). Real gateway code (limiters, leases, allowances, ledger copies, breaker and PTU-capacity "
        "sharing, consumer-marker checks) of N instances in one process on a simulated clock, against a simulated "
        "account (bench/simtable.py: log-normal latency, median 6 ms; 2,000 entities/s a partition, 20,000 requests/s "
        "an account, 503 ServerBusy beyond). One consumer: demand twice its limit. See docs/scale.md for what the "
        "figures mean.",
        "",
        "| shape | req/s | inst | sim s | admitted / 429 / 503 | any 60 s / limit | full minutes / limit | ops/req "
        "(ledger) | ledger partition peak/s | account peak/s | ETag conflicts | ServerBusy | fallback admits "
        "| admit p50 / p99 ms | real s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        if r["shape"] in ("trip", "change", "burst", "cold", "coldlist"):  # cold: printed lines only (benchmarks.md)
            continue
        lines.append(
            f"| {r['shape']}{_accounts(r)} | {r['rps']:,} | {r['instances']} | {r['seconds']:g} | {r['admitted']:,} / {r['refused_429']:,} / "
            f"{r['store_503']:,}{' / 401: ' + format(r['auth_refused'], ',') if r.get('auth_refused') else ''} | {r['max_any_60s_over_limit']} | {_minutes(r)} | "
            f"{r['storage_ops_per_request']} ({r['ledger_ops_per_request']}) | {r['ledger_partition_peak_per_s']:,} | "
            f"{r['account_peak_per_s']:,} | {r['etag_conflicts']:,} | {r['server_busy_503']:,} | "
            f"{r['fallback_admissions']:,} | {r['admission_p50_ms']} / {r['admission_p99_ms']} | {r['real_seconds']} |"
        )
    changes = [r for r in results["runs"] if r["shape"] in ("change", "burst")]
    if changes:
        lines += ["", "| change shape: consumers | rows changed | instances | reaches all (s) | instances with it | listing entities read "
                  "(per instance) | consumer partition peak/s | ServerBusy | real s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in changes:
            lines.append(
                f"| {r['rps']:,} | {r['rows_changed']} | {r['instances']} | {r['reaches_all_s']} | {r['instances_with_it']} | "
                f"{r['listing_entities_read']:,} ({r['listing_entities_per_instance']:,}) | "
                f"{r['consumer_partition_peak_per_s']:,} | {r['server_busy_503']:,} | {r['real_seconds']} |"
            )
    trips = [r for r in results["runs"] if r["shape"] == "trip"]
    if trips:
        lines += ["", "| trip shape: instances | trip reaches all (s) | PTU 429 reaches all (s) | breakers partition "
                  "peak/s | capacity rows partition peak/s (at start) | PTU summary partition peak/s (at start) | "
                  "summary writes / lost races | marker partition peak/s | ServerBusy after | capacity sync failures "
                  "(rows / summary) | real s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in trips:
            lines.append(
                f"| {r['instances']} | {r['trip_reaches_all_s']} | {r['ptu_429_reaches_all_s']} | "
                f"{r['breakers_partition_peak_per_s']:,} | {r['capacity_partition_peak_per_s']:,} "
                f"({r.get('capacity_partition_start_peak_per_s', 0):,}) | {r.get('summary_partition_peak_per_s', 0):,} "
                f"({r.get('summary_partition_start_peak_per_s', 0):,}) | {r.get('summary_writes', 0):,} / "
                f"{r.get('summary_races', 0):,} | "
                f"{r['marker_partition_peak_per_s']:,} | {r['server_busy_503_after_trip']:,} | "
                f"{r['capacity_sync_failures']:,} / {r.get('summary_failures', 0):,} | {r['real_seconds']} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
