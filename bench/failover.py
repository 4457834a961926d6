"""PTU kept full, invisible failover and recovery, as a picture and as figures (issue 17: keep the PTU full).

    .venv/bin/python -m bench.failover [--gateways 4] [--write]

Runs the embedded default (three simulated regions: a small provisioned deployment `uksouth` at priority 1, admitting
by utilisation as Azure documents it, and `swedencentral`, `francecentral` pay-as-you-go at priority 2) behind four
gateway processes, and drives traffic in three phases: light (the PTU serves it all), heavy (five times what the PTU
takes, plus a high-priority consumer), light again. Writes `docs/failover.png` (requests per second served by each
region, the PTU's utilisation every 10 s, its 429s) and prints a summary against the targets:

- PTU utilisation while demand exceeds it, minute by minute from the first minute of overflow (target >= 95 %),
- backend 429s per 100 requests (target <= 2),
- client-visible 429s while any region had capacity (target 0),
- seconds from the end of the overflow until every request is served by the PTU again (target <= 1),
- the high-priority consumer's share of calls served by the PTU while it is full (its reserve),
- added p50 of pacing: a gateway whose PTU model is learnt and on the request path against the same gateway with the
  backend not marked PTU, interleaved at one client (target: within 0.2 ms),
- added latency of a failed-over request (one round trip to a throttling backend + <= 2 ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from bench.harness import ROOT, bench_stack, chat_body, finish_load, load, machine, save, stamp, start_load, update_doc
from tools import stack

PHASES = (("light", 30, 1.5), ("heavy", 180, 12.0), ("light", 45, 1.5))  # (name, seconds, requests per second)
HIGH_RATE = 1.0  # high-priority requests per second during the heavy phase (less than half the PTU)
PTU_BURST_S = 10  # the PTU's 100 %: 10 s of its rate, so the first minute of overflow is not mostly its initial burst
RESERVE_TOKENS = 2000  # kept for high priority when the PTU is full
REGIONS = (
    replace(stack.EMBEDDED_REGIONS[0], ptu_burst_s=PTU_BURST_S, reserve_tokens=RESERVE_TOKENS),
    *stack.EMBEDDED_REGIONS[1:],
)
PTU_TPM = REGIONS[0].chat_tpm


def recovery_delays(
    throttled: list[list[float]], ptu_served: list[float], arrivals: list[float], horizon: float
) -> tuple[list[float], list[float]]:
    """For each PTU 429: the time from when it said it would have room to the next request it served; and the part of
    that time during which requests arrived but went elsewhere (the gateway's share of the delay)."""
    delays, missed = [], []
    served = sorted(ptu_served)
    arrived = sorted(arrivals)
    for when, retry_after in throttled:
        ready = when + retry_after
        if ready > horizon:
            continue
        following = next((t for t in served if t >= ready), None)
        first_arrival = next((t for t in arrived if t >= ready), None)
        if following is not None and first_arrival is not None:
            delays.append(following - ready)
            missed.append(following - first_arrival)
    return delays, missed


def probe_429_round_trip(url: str) -> float:
    """One round trip to a backend that answers 429 at once (as the saturated PTU does), in ms: p50 of 20."""
    body = json.loads(chat_body())
    times = []
    with httpx.Client(timeout=10) as client:
        client.post(f"{url}/_sim/faults", json={"kind": "429", "count": 25})
        for _ in range(20):
            begin = time.perf_counter()
            response = client.post(f"{url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                                   json=body, headers={"api-key": stack.SIM_API_KEY})
            if response.status_code == 429:
                times.append((time.perf_counter() - begin) * 1000)
    return statistics.median(times) if times else float("nan")


def failover_latency(bench: Any, seconds: float = 8.0) -> dict[str, float]:
    """p50 of requests through a gateway whose first backend always answers 429 (so every request fails over), next
    to a gateway that has only the second backend, at one client: the difference is what failover adds."""
    throttling = stack.Region("throttling", "uksouth", stack.free_port(), priority=1)
    healthy = stack.Region("healthy", "swedencentral", stack.free_port(), priority=2, chat_tpm=10**9)
    bench.start_simulator(throttling, latency_ms=50, token_latency_ms=5)
    bench.start_simulator(healthy, latency_ms=50, token_latency_ms=5)
    # Every request to it is a 429 asking for 1 ms: the breaker is closed again by the next request.
    httpx.post(f"http://127.0.0.1:{throttling.port}/_sim/faults", json={"kind": "429", "count": -1, "delay_s": 0.001})
    failing_over = bench.start_gateway([throttling, healthy], name="gateway-failover")
    direct = bench.start_gateway([healthy], name="gateway-direct")
    key = bench.consumer("latency")
    body = chat_body(model="gpt-4o")
    results = {}
    for name, gateway in (("first_attempt", direct), ("failed_over", failing_over), ("first_attempt_again", direct)):
        result = load(f"{gateway.url}/v1/chat/completions", body, 1, seconds, headers={"api-key": key}, engine="python")
        results[name] = result["latency_ms"]["p50"]
    round_trip = probe_429_round_trip(f"http://127.0.0.1:{throttling.port}")
    base = (results["first_attempt"] + results["first_attempt_again"]) / 2
    return {
        "first_attempt_p50_ms": round(base, 3),
        "failed_over_p50_ms": results["failed_over"],
        "added_ms": round(results["failed_over"] - base, 3),
        "round_trip_429_ms": round(round_trip, 3),
        "added_beyond_round_trip_ms": round(results["failed_over"] - base - round_trip, 3),
    }


def pacing_overhead(bench: Any, seconds: float = 5.0, rounds: int = 5) -> dict[str, float]:
    """p50 at one client through a gateway whose PTU model is learnt (pacing on the request path) against a gateway
    where the same backend is not marked PTU, interleaved plain / paced / plain in each round; the difference from the
    mean of the two plain runs around it is what pacing adds, and the difference between those two is the noise."""
    region = stack.Region("paced", "uksouth", stack.free_port(), priority=1, ptu=True, chat_tpm=10**9)
    bench.start_simulator(region, latency_ms=50, token_latency_ms=5)
    paced = bench.start_gateway([region], name="gateway-paced")
    plain = bench.start_gateway([replace(region, id="plain", ptu=False)], name="gateway-plain")
    key = bench.consumer("overhead")
    body = chat_body(model="gpt-4o")
    sim = f"http://127.0.0.1:{region.port}"
    url = f"{paced.url}/v1/chat/completions"
    for _ in range(3):  # what a call costs
        httpx.post(url, content=body, headers={"api-key": key}, timeout=10)

    def teach() -> None:
        # Two 429s shaped as a PTU's, asking for 1 ms: the paced gateway learns a (large) rate, so its pacer runs on
        # every request; taught again before each paced run, as a rate no 429 confirms is forgotten after a minute.
        httpx.post(f"{sim}/_sim/faults", json={"kind": "429-ptu", "count": 2, "delay_s": 0.001})
        for _ in range(4):
            httpx.post(url, content=body, headers={"api-key": key}, timeout=10)
            time.sleep(0.05)
        health = httpx.get(f"{paced.url}/health/details", headers=stack.ADMIN_HEADERS).json()
        assert "capacity" in health["backends"][0]["deployments"]["gpt-4o"], "the paced gateway learnt nothing"

    added, noise = [], []
    runs: dict[str, list[float]] = {"plain": [], "paced": []}
    for _ in range(rounds):
        p50 = {}
        teach()
        for name, gateway in (("plain", plain), ("paced", paced), ("plain again", plain)):
            result = load(f"{gateway.url}/v1/chat/completions", body, 1, seconds, headers={"api-key": key}, engine="python")
            p50[name] = result["latency_ms"]["p50"]
        added.append(p50["paced"] - (p50["plain"] + p50["plain again"]) / 2)
        noise.append(abs(p50["plain again"] - p50["plain"]))
        runs["plain"] += [p50["plain"], p50["plain again"]]
        runs["paced"].append(p50["paced"])
    return {"plain_p50_ms": round(statistics.median(runs["plain"]), 3), "paced_p50_ms": round(statistics.median(runs["paced"]), 3),
            "added_p50_ms": round(statistics.median(added), 3), "plain_to_plain_ms": round(statistics.median(noise), 3),
            "rounds": rounds}


def utilisation(provisioned: list[list[Any]], start: float, end: float, width: float) -> list[float]:
    """Tokens the PTU processed (calls finished) per `width` seconds in [start, end), over its capacity then."""
    bins: Counter[int] = Counter()
    for when, _, tokens in provisioned:
        if start <= when < end:
            bins[int((when - start) // width)] += tokens
    count = int((end - start) // width)
    return [round(bins[i] / (PTU_TPM / 60 * width), 3) for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateways", type=int, default=4)
    parser.add_argument("--write", action="store_true", help="write docs/failover.png and the figures into docs/benchmarks.md")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "failover.png"))
    args = parser.parse_args(argv)

    results: dict[str, Any] = {"machine": machine(), "date": stamp(), "phases": PHASES, "gateways": args.gateways}
    with bench_stack() as bench, tempfile.TemporaryDirectory() as folder:
        bench.start_azurite()
        sims = {region.region: bench.start_simulator(region, latency_ms=50, token_latency_ms=5) for region in REGIONS}
        gateways = [bench.start_gateway(REGIONS, name=f"gateway{i}") for i in range(args.gateways)]
        key, vip = bench.consumer("app"), bench.consumer("vip", priority="high")
        urls = [f"{g.url}/v1/chat/completions" for g in gateways]
        body = chat_body(model="gpt-4o")
        records: list[list[Any]] = []
        high: list[list[Any]] = []
        bounds: list[tuple[float, float]] = []
        started = time.time()
        for index, (name, seconds, rate) in enumerate(PHASES):
            record = str(Path(folder) / f"phase{index}.jsonl")
            begin = time.time()
            process = start_load(urls, body, 16, seconds, headers={"api-key": key}, rate=rate, record=record, warmup=0)
            vip_process = None
            if name == "heavy":
                vip_process = start_load(urls, body, 4, seconds, headers={"api-key": vip}, rate=HIGH_RATE,
                                         record=record + ".high", warmup=0)
            finish_load(process, seconds + 120)
            if vip_process is not None:
                finish_load(vip_process, seconds + 120)
                high += [json.loads(line) for line in Path(record + ".high").read_text().splitlines()]
            phase = [json.loads(line) for line in Path(record).read_text().splitlines()]
            bounds.append((min((r[0] for r in phase), default=begin), time.time()))
            records += phase
        finished = time.time()
        stats = {name: httpx.get(f"{child.url}/_sim/stats").json() for name, child in sims.items()}
        round_trip_429 = probe_429_round_trip(sims["uksouth"].url)
        results["pacing_overhead"] = pacing_overhead(bench)
        results["failover_latency"] = failover_latency(bench)

    everything = records + high
    statuses = Counter(r[1] for r in everything)
    served = [r for r in records if r[1] == "200"]
    region_of = {region.id: region.region for region in REGIONS}
    backend_429s = sum(s["by_status"].get("429", 0) for s in stats.values())
    ptu_times = [r[0] for r in served if region_of.get(r[3]) == "uksouth"]
    delays, missed = recovery_delays(stats["uksouth"]["throttled"], ptu_times, [r[0] for r in records], finished - 1)
    first = [r[5] * 1000 for r in served if r[4] == 1]
    failed_over = [r[5] * 1000 for r in served if r[4] >= 2]
    heavy_start, heavy_end = bounds[1][0], bounds[1][0] + PHASES[1][1]
    provisioned = [p for p in stats["uksouth"]["provisioned"] if p[1] == "gpt-4o"]
    minutes = utilisation(provisioned, heavy_start, heavy_end, 60.0)
    after = sorted(r for r in records if r[0] >= bounds[2][0])
    elsewhere_after = [r[0] for r in after if region_of.get(r[3]) != "uksouth"]
    heavy_high = [r for r in high if heavy_start <= r[0] < heavy_end]
    heavy_normal = [r for r in records if heavy_start <= r[0] < heavy_end]
    summary = {
        "requests": len(everything),
        "statuses": dict(statuses),
        "served_by_region": dict(Counter(region_of.get(r[3], r[3]) for r in served)),
        "client_visible_429": statuses.get("429", 0),
        "backend_429s": backend_429s,
        "backend_429s_per_100_requests": round(100 * backend_429s / max(1, len(everything)), 2),
        "ptu_utilisation_per_minute_of_overflow": minutes,
        "ptu_utilisation_after_the_first_minute": utilisation(provisioned, heavy_start + 60, heavy_end, heavy_end - heavy_start - 60),
        "seconds_until_all_on_the_ptu_after_the_overflow": round(max(0.0, max(elsewhere_after, default=heavy_end) - heavy_end), 3),
        "requests_elsewhere_after_the_overflow": len(elsewhere_after),
        "high_priority_share_on_the_ptu": round(sum(1 for r in heavy_high if region_of.get(r[3]) == "uksouth") / max(1, len(heavy_high)), 3),
        "normal_priority_share_on_the_ptu": round(sum(1 for r in heavy_normal if region_of.get(r[3]) == "uksouth") / max(1, len(heavy_normal)), 3),
        "high_priority_requests": len(heavy_high),
        "overflow_failed_over_after_a_ptu_429": sum(1 for r in heavy_normal if r[4] >= 2),
        "ptu_trips_followed": len(delays),
        "recovery_delay_s": {"max": round(max(delays), 3), "p50": round(statistics.median(delays), 3)} if delays else {},
        "recovery_missed_s": {"max": round(max(missed), 3), "p50": round(statistics.median(missed), 3)} if missed else {},
        "first_attempt_p50_ms": round(statistics.median(first), 2) if first else None,
        "failed_over_p50_ms": round(statistics.median(failed_over), 2) if failed_over else None,
        "failed_over_requests": len(failed_over),
        "round_trip_to_a_throttling_backend_ms": round(round_trip_429, 2),
    }
    results["summary"] = summary
    print(json.dumps(summary, indent=2))
    print(json.dumps(results["pacing_overhead"], indent=2))
    print(json.dumps(results["failover_latency"], indent=2))
    save("failover", {**results, "records": records, "high": high, "throttled": stats["uksouth"]["throttled"],
                      "provisioned": provisioned, "bounds": bounds})
    if args.write:
        plot(records, high, stats["uksouth"]["throttled"], provisioned, started, bounds, Path(args.plot), region_of)
        update_doc("failover", markdown(results))
    return 0


def plot(records: list[list[Any]], high: list[list[Any]], throttled: list[list[float]], provisioned: list[list[Any]],
         started: float, bounds: list[tuple[float, float]], path: Path, region_of: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_second: dict[str, Counter[int]] = defaultdict(Counter)
    client_429: Counter[int] = Counter()
    for when, status, _, backend, *_ in records + high:
        second = int(when - started)
        if status == "200":
            per_second[region_of.get(backend, backend)][second] += 1
        elif status == "429":
            client_429[second] += 1
    end = int(max(r[0] for r in records) - started) + 1
    xs = list(range(end))
    fig, (top, middle, bottom) = plt.subplots(
        3, 1, figsize=(11, 8), sharex=True, gridspec_kw={"height_ratios": [3, 2, 1]})
    colours = {"uksouth": "#d6336c", "swedencentral": "#f2c94c", "francecentral": "#e67e22"}
    for region in ("uksouth", "swedencentral", "francecentral"):
        label = f"{region} (PTU, priority 1)" if region == "uksouth" else f"{region} (priority 2)"
        smoothed = _smooth([per_second[region][x] for x in xs])
        top.plot(xs, smoothed, label=label, color=colours[region], linewidth=2)
    top.plot(xs, [client_429[x] for x in xs], label="client-visible 429s", color="black", linestyle=":", linewidth=1.5)
    for (name, _, rate), (begin, finish) in zip(PHASES, bounds, strict=True):
        left = begin - started
        for axis in (top, middle, bottom):
            axis.axvspan(left, finish - started, color="#eeeeee" if name == "heavy" else "white", zorder=0)
        top.text(left + 1, top.get_ylim()[1] * 0.92 if top.get_ylim()[1] else 1,
                 f"{name}: {rate:g} req/s" + (f" + {HIGH_RATE:g} high priority" if name == "heavy" else ""), fontsize=8)
    top.set_ylabel("requests/s served\n(3 s mean)")
    top.set_title("PTU kept full, overflow to the secondaries, back to the PTU, as the callers see it")
    top.legend(loc="center right", fontsize=8)
    tens = utilisation(provisioned, started, started + end, 10.0)
    middle.step([10 * i for i in range(len(tens))], [100 * u for u in tens], where="post", color="#d6336c", linewidth=1.5,
                 label="PTU utilisation (tokens processed / capacity, 10 s)")
    middle.axhline(100, color="black", linewidth=0.8)
    middle.axhline(95, color="black", linewidth=0.8, linestyle="--")
    middle.set_ylabel("PTU utilisation %")
    middle.set_ylim(0, max(150, max((100 * u for u in tens), default=0) * 1.05))
    middle.legend(loc="upper right", fontsize=8)
    trips = Counter(int(t - started) for t, _ in throttled)
    bottom.bar(list(trips), list(trips.values()), color="#d6336c", width=1.0)
    bottom.set_ylabel("PTU 429s")
    bottom.set_xlabel("seconds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _smooth(values: list[int], width: int = 3) -> list[float]:
    return [sum(values[max(0, i - width + 1): i + 1]) / min(width, i + 1) for i in range(len(values))]


def markdown(results: dict[str, Any]) -> str:
    s = results["summary"]
    f = results["failover_latency"]
    o = results["pacing_overhead"]
    phases = ", ".join(f"{name} {seconds} s at {rate:g} req/s" for name, seconds, rate in results["phases"])
    minutes = ", ".join(f"{100 * u:.1f} %" for u in s["ptu_utilisation_per_minute_of_overflow"])
    return "\n".join([
        "## Multi-region failover: the PTU kept full",
        "",
        f"`.venv/bin/python -m bench.failover --write` — {results['date']}, {results['machine']}; other work shared the "
        "2 cores while it ran.",
        f"The embedded default behind {results['gateways']} gateway processes: PTU `uksouth` (a simulated provisioned "
        f"deployment admitting by utilisation as Azure documents it, docs/ptu.md: {PTU_TPM:,} tokens/minute, 100 % = "
        f"{PTU_BURST_S} s of that, `reserve_tokens` {RESERVE_TOKENS}) at priority 1; `swedencentral`, `francecentral` "
        f"(pay-as-you-go) at priority 2; 50 ms backends; ~230 tokens a call. Phases: {phases}; during the heavy phase a "
        f"high-priority consumer adds {HIGH_RATE:g} req/s. ![failover](failover.png)",
        "",
        "| | target | measured |",
        "|---|---|---|",
        f"| requests (served by region) | | {s['requests']} ({', '.join(f'{k} {v}' for k, v in s['served_by_region'].items())}) |",
        f"| PTU utilisation while demand exceeds it, minute by minute from the first minute of overflow | >= 95 % | {minutes} |",
        f"| (after the first minute, whose start the PTU's own 100 % absorbs) | | {100 * s['ptu_utilisation_after_the_first_minute'][0]:.1f} % |",
        f"| backend 429s per 100 requests | <= 2 | {s['backend_429s_per_100_requests']} ({s['backend_429s']} in all) |",
        f"| client-visible 429s while a region had capacity | 0 | {s['client_visible_429']} |",
        f"| overflow requests that asked the PTU first (failed over after its 429) | | {s['overflow_failed_over_after_a_ptu_429']} |",
        f"| after the overflow ends, all traffic back on the PTU within (s) | <= 1 | {s['seconds_until_all_on_the_ptu_after_the_overflow']} ({s['requests_elsewhere_after_the_overflow']} requests elsewhere) |",
        f"| high-priority requests served by the PTU while it is full | (its reserve) | {100 * s['high_priority_share_on_the_ptu']:.1f} % of {s['high_priority_requests']} (normal priority: {100 * s['normal_priority_share_on_the_ptu']:.1f} %) |",
        f"| added p50 of pacing (learnt model on the request path vs the same backend not marked PTU; one client, median of {o['rounds']} rounds of plain / paced / plain) | within 0.2 ms | {o['added_p50_ms']} ms ({o['paced_p50_ms']} vs {o['plain_p50_ms']}; plain vs plain in the same round: {o['plain_to_plain_ms']}) |",
        f"| p50 first-attempt / failed-over request (ms) | | {s['first_attempt_p50_ms']} / {s['failed_over_p50_ms']} ({s['failed_over_requests']} failed over) |",
        "",
        "Added latency of failover, measured apart at one client so that nothing else moves: a gateway whose first backend "
        "answers every request with a 429 (asking for 1 ms, so each request fails over) next to a gateway with only the "
        "second backend, interleaved (first, failed-over, first again):",
        "",
        "| first attempt p50 (ms) | failed over p50 (ms) | added (ms) | one 429 round trip (ms) | added beyond that round trip (ms), target <= 2 |",
        "|---|---|---|---|---|",
        "| {first_attempt_p50_ms} | {failed_over_p50_ms} | {added_ms} | {round_trip_429_ms} | {added_beyond_round_trip_ms} |".format(**f),
    ])


if __name__ == "__main__":
    raise SystemExit(main())
