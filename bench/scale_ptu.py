"""bench.scale's `ptu` shapes (issue 32): what N instances learn of one PTU's capacity, and the shares they pace to.

`ptu:<rps>:<N>`: requests (Poisson, 150-450 tokens each, each to a random instance) asking twice what a simulated
PTU takes (tools/simulator/capacity.LeakyBucket: 100 % is 10 s of its rate; a 429 names when it is back at 100 %),
its overflow served by a pay-as-you-go backend. `ptuskew:<rps>:<N>`: the same with a third of the instances getting
three times the others' requests (the front end spreading unevenly). After a warm-up, each simulated second, every
instance's learnt rate and share are read: how far each instance's rate is from the PTU's, how far the shares add up
from it, and how far each instance's share is from its part of it (the PTU in proportion to demand, as `share_of`
splits it when everyone wants more than there is). The real routers, capacity models and stores of every instance;
the store and the clock simulated (bench/simtable.py).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from typing import Any

from bench.figures import percentile
from bench.simtable import SimAccount, SimClock, VirtualLoop
from shared.routing.capacity import PROBE
from tools.simulator.capacity import LeakyBucket

PTU_TOKENS_PER_S = 150_000.0  # 9 million tokens a minute: a PTU a thousand requests a second overflow twice over
TOKENS = (150, 450)
LATENCY_S = (0.5, 3.0)
MEASURE_S = 60.0


def _q(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"p5": round(percentile(values, 0.05), 3), "p50": round(percentile(values, 0.5), 3),
            "p95": round(percentile(values, 0.95), 3), "mean": round(sum(values) / len(values), 3)}


async def ptu(rps: int, n: int, loop: VirtualLoop, seed: int, warm_s: float, skew: bool = False) -> dict[str, Any]:
    from bench.scale import BACKENDS, D, Instance, sim_stores, start

    account = SimAccount(seed)
    clock = SimClock(loop)
    stores = sim_stores(account)
    instances = [Instance(i, n, clock, stores) for i in range(n)]
    rng = random.Random(seed)
    for inst in instances:
        start(loop, inst, rng)
    ptu_backend, paygo = BACKENDS
    bucket = LeakyBucket(int(PTU_TOKENS_PER_S * 60), loop.time, burst_s=10.0)
    weights = [3.0 if skew and i % 3 == 0 else 1.0 for i in range(n)]
    cumulative = []
    total = 0.0
    for w in weights:
        total += w
        cumulative.append(total)
    counts: Counter[str] = Counter()
    admitted_by_second: Counter[int] = Counter()

    def pick() -> int:
        x = rng.uniform(0, total)
        lo, hi = 0, n - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if cumulative[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def call(inst: Any, tokens: int) -> None:
        router = inst.router
        counts["requests"] += 1
        for backend in router.candidates(D, tokens, "normal"):
            if not router.acquire(backend, D):
                continue
            if backend.ptu:
                verdict = bucket.admit(tokens)
                if not verdict.admitted:
                    counts["ptu_429"] += 1
                    router.record_failure(backend, D, 429,
                                          {"retry-after-ms": str(math.ceil(verdict.retry_after_s * 1000))})
                    continue
                counts["ptu"] += 1
                admitted_by_second[int(loop.time())] += tokens
                router.record_success(backend, D, {})

                def done(router: Any = router, tokens: int = tokens, backend: Any = backend) -> None:
                    bucket.settle(tokens, tokens)
                    router.settled(backend, D, tokens)

                loop.call_later(rng.uniform(*LATENCY_S), done)
                return
            counts["paygo"] += 1
            router.record_success(backend, D, {})
            router.settled(backend, D, tokens)
            return
        counts["unserved"] += 1

    rates: list[float] = []
    missing = 0
    share_sums: list[float] = []
    fair: list[float] = []
    learnt_from_all = 0
    complete = 0
    high: Counter[str] = Counter()
    ages: list[float] = []
    row_ages: list[float] = []
    learnt_rates: list[float] = []
    end = warm_s + MEASURE_S
    t = 0.0
    step = 0.01
    next_sample = warm_s
    measured_from = None
    before: Counter[str] = Counter()
    while t < end:
        await asyncio.sleep(step)
        t += step
        count = _poisson(rng, rps * step)
        for _ in range(count):
            call(instances[pick()], rng.randint(*TOKENS))
        if t >= next_sample:
            next_sample += 1.0
            if measured_from is None:
                measured_from = int(loop.time())
                before = Counter(counts)
            mono = clock.monotonic()
            shares = []
            demands = []
            for inst in instances:
                model = inst.router.capacity.model(ptu_backend.id, D)
                if model is None or model.rate is None:
                    missing += 1
                    continue
                rates.append(model.rate / PTU_TOKENS_PER_S)
                ages.append(clock.now() - model.evidence_at)
                learnt = getattr(model, "basis_rate", None)
                if learnt is not None:
                    learnt_rates.append(learnt / PTU_TOKENS_PER_S)
                if model.rate > 1.05 * PTU_TOKENS_PER_S:  # why a rate is high: a probe's steps, or learnt so
                    high["probed"] += clock.now() - getattr(model, "_stepped_at", -math.inf) < 10
                    learnt = getattr(model, "basis_rate", None)
                    high["learnt_high"] += learnt is not None and learnt > 1.05 * PTU_TOKENS_PER_S
                learnt_from_all += len(model._others) + 1 >= n
                complete += bool(getattr(model, "rate_complete", False))
                shares.append(model.share or 0.0)
                demands.append(model._decayed_demand(mono))
            row, _ = await stores.capacity.twin.read_summary(ptu_backend.id, D)  # type: ignore[attr-defined]
            if row is not None and row.ready:
                row_ages.append(clock.now() - max(row.ready))
            share_sums.append(sum(shares) / (PTU_TOKENS_PER_S * (1 + PROBE)))
            if shares and sum(demands) > 0:
                for s, d in zip(shares, demands, strict=True):
                    part = PTU_TOKENS_PER_S * (1 + PROBE) * d / sum(demands)
                    if part > 0:
                        fair.append(s / part)
    for inst in instances:
        await inst.close()
    after = counts - before
    seconds = max(1, int(loop.time()) - (measured_from or 0))
    ptu_tokens = sum(v for s, v in admitted_by_second.items() if measured_from is not None and s >= measured_from)
    samples = len(rates)
    c = account.counts
    return {
        "shape": "ptuskew" if skew else "ptu", "rps": rps, "instances": n, "warm_s": warm_s, "seconds": MEASURE_S,
        "ptu_tokens_per_s": PTU_TOKENS_PER_S,
        # Every instance's learnt rate / the PTU's, each simulated second of the measured minute.
        "rate_over_ptu": _q(rates),
        # The same, the rate as learnt at its basis (without the probe's steps since; this version's models only).
        "learnt_over_ptu": _q(learnt_rates),
        "samples_without_rate": missing,
        # Samples whose rate the instance learnt itself from every instance's report, or heard as learnt so.
        "samples_learnt_from_every_instance": round(learnt_from_all / max(1, samples), 3),
        "samples_rate_complete": round(complete / max(1, samples), 3),
        # Samples with a rate more than 5 % above the PTU's: how many had probed within 10 s, how many learnt it so.
        "samples_rate_high": sum(r > 1.05 for r in rates), "high_probed": high["probed"],
        "high_learnt": high["learnt_high"],
        "evidence_age_s": _q(ages),  # how old the newest 429's instant each instance knows is
        "summary_evidence_age_s": _q(row_ages),  # and the summary row's newest, each second
        # The instances' shares added up / the PTU's rate x (1 + PROBE) (what the pacing aims at), each second.
        "shares_sum_over_ptu": _q(share_sums),
        # Each instance's share / its part (the PTU in proportion to its demand), each second.
        "share_over_part": _q(fair),
        "ptu_utilisation": round(ptu_tokens / (PTU_TOKENS_PER_S * seconds), 3),
        "ptu_429_per_s": round(after["ptu_429"] / seconds, 1),
        "requests": after["requests"], "to_paygo": after["paygo"], "unserved": after["unserved"],
        "capacity_partition_peak_per_s": c.partition_peak("capacity", measured_from or 0),
        "summary_partition_peak_per_s": c.partition_group_peak("capacity|", measured_from or 0),
        "server_busy_503": c.busy,
    }


def _poisson(rng: random.Random, mean: float) -> int:
    if mean > 30:
        return max(0, round(rng.gauss(mean, mean ** 0.5)))
    count, limit, p = 0, math.exp(-mean), rng.random()
    while p > limit:
        count += 1
        p *= rng.random()
    return count
