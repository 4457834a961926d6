"""PTU saturation, invisible failover and recovery, as a picture and as figures (issue: multi-region routing).

    .venv/bin/python -m bench.failover [--gateways 4] [--write]

Runs the embedded default (three simulated regions: a small-capacity PTU `uksouth` at priority 1, `swedencentral` and
`francecentral` at priority 2) behind four gateway processes, and drives traffic in three phases: light (the PTU serves
it all), heavy (the PTU saturates and the overflow moves to the secondaries), light again (traffic returns to the PTU).
Writes `docs/failover.png` (requests per second served by each region over time, client-visible 429s, the PTU's
throttling) and prints a summary:

- client-visible 429s while any region had capacity (target 0),
- backend 429s received per 100 requests (wasted round trips),
- seconds from the time the PTU said it would have room again to the next request it served (target <= 1 s beyond
  its Retry-After),
- added latency of a failed-over request versus a first-attempt one, next to one round trip to a throttling backend
  (target: one round trip + <= 2 ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx

from bench.harness import ROOT, bench_stack, chat_body, finish_load, load, machine, save, stamp, start_load, update_doc
from tools import stack

PHASES = (("light", 30, 1.5), ("heavy", 60, 12.0), ("light", 45, 1.5))  # (name, seconds, requests per second)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateways", type=int, default=4)
    parser.add_argument("--write", action="store_true", help="write docs/failover.png and the figures into docs/benchmarks.md")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "failover.png"))
    args = parser.parse_args(argv)

    results: dict[str, Any] = {"machine": machine(), "date": stamp(), "phases": PHASES}
    with bench_stack() as bench, tempfile.TemporaryDirectory() as folder:
        bench.start_azurite()
        sims = {region.region: bench.start_simulator(region, latency_ms=50, token_latency_ms=5) for region in stack.EMBEDDED_REGIONS}
        gateways = [bench.start_gateway(stack.EMBEDDED_REGIONS, name=f"gateway{i}") for i in range(args.gateways)]
        key = bench.consumer("app")
        urls = [f"{g.url}/v1/chat/completions" for g in gateways]
        body = chat_body(model="gpt-4o")
        records: list[list[Any]] = []
        started = time.time()
        for index, (_, seconds, rate) in enumerate(PHASES):
            record = str(Path(folder) / f"phase{index}.jsonl")
            process = start_load(urls, body, 16, seconds, headers={"api-key": key}, rate=rate, record=record, warmup=0)
            finish_load(process, seconds + 120)
            records += [json.loads(line) for line in Path(record).read_text().splitlines()]
        finished = time.time()
        stats = {name: httpx.get(f"{child.url}/_sim/stats").json() for name, child in sims.items()}
        round_trip_429 = probe_429_round_trip(sims["uksouth"].url)
        results["failover_latency"] = failover_latency(bench)

    statuses = Counter(r[1] for r in records)
    served = [r for r in records if r[1] == "200"]
    region_of = {region.id: region.region for region in stack.EMBEDDED_REGIONS}
    backend_429s = sum(s["by_status"].get("429", 0) for s in stats.values())
    ptu_times = [r[0] for r in served if region_of.get(r[3]) == "uksouth"]
    delays, missed = recovery_delays(stats["uksouth"]["throttled"], ptu_times, [r[0] for r in records], finished - 1)
    first = [r[5] * 1000 for r in served if r[4] == 1]
    failed_over = [r[5] * 1000 for r in served if r[4] >= 2]
    summary = {
        "requests": len(records),
        "statuses": dict(statuses),
        "served_by_region": dict(Counter(region_of.get(r[3], r[3]) for r in served)),
        "client_visible_429": statuses.get("429", 0),
        "backend_429s": backend_429s,
        "backend_429s_per_100_requests": round(100 * backend_429s / max(1, len(records)), 2),
        "ptu_trips_followed": len(delays),
        "recovery_delay_s": {"max": round(max(delays), 3), "p50": round(statistics.median(delays), 3)} if delays else {},
        "recovery_missed_s": {"max": round(max(missed), 3), "p50": round(statistics.median(missed), 3)} if missed else {},
        "first_attempt_p50_ms": round(statistics.median(first), 2) if first else None,
        "failed_over_p50_ms": round(statistics.median(failed_over), 2) if failed_over else None,
        "failed_over_requests": len(failed_over),
        "round_trip_to_a_throttling_backend_ms": round(round_trip_429, 2),
    }
    if first and failed_over:
        summary["failover_added_p50_ms"] = round(statistics.median(failed_over) - statistics.median(first), 2)
        summary["failover_added_beyond_round_trip_ms"] = round(summary["failover_added_p50_ms"] - round_trip_429, 2)
    results["summary"] = summary
    print(json.dumps(summary, indent=2))
    print(json.dumps(results["failover_latency"], indent=2))
    save("failover", {**results, "records": records, "throttled": stats["uksouth"]["throttled"]})
    if args.write:
        plot(records, stats["uksouth"]["throttled"], started, Path(args.plot), region_of)
        update_doc("failover", markdown(results))
    return 0


def plot(records: list[list[Any]], throttled: list[list[float]], started: float, path: Path, region_of: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_second: dict[str, Counter[int]] = defaultdict(Counter)
    client_429: Counter[int] = Counter()
    for when, status, _, backend, *_ in records:
        second = int(when - started)
        if status == "200":
            per_second[region_of.get(backend, backend)][second] += 1
        elif status == "429":
            client_429[second] += 1
    end = int(max(r[0] for r in records) - started) + 1
    xs = list(range(end))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    colours = {"uksouth": "#d6336c", "swedencentral": "#f2c94c", "francecentral": "#e67e22"}
    for region in ("uksouth", "swedencentral", "francecentral"):
        label = f"{region} (PTU, priority 1)" if region == "uksouth" else f"{region} (priority 2)"
        smoothed = _smooth([per_second[region][x] for x in xs])
        top.plot(xs, smoothed, label=label, color=colours[region], linewidth=2)
    top.plot(xs, [client_429[x] for x in xs], label="client-visible 429s", color="black", linestyle=":", linewidth=1.5)
    offset = 0
    for name, seconds, rate in PHASES:
        top.axvspan(offset, offset + seconds, color="#eeeeee" if name == "heavy" else "white", zorder=0)
        top.text(offset + 1, top.get_ylim()[1] * 0.92 if top.get_ylim()[1] else 1, f"{name}: {rate:g} req/s", fontsize=8)
        offset += seconds
    top.set_ylabel("requests/s served (3 s mean)")
    top.set_title("PTU first, overflow to the secondaries, back to the PTU — as the caller sees it")
    top.legend(loc="upper right", fontsize=8)
    trips = Counter(int(t - started) for t, _ in throttled)
    bottom.bar(list(trips), list(trips.values()), color="#d6336c", width=1.0)
    bottom.set_ylabel("PTU 429s\n(trips)")
    bottom.set_xlabel("seconds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _smooth(values: list[int], width: int = 3) -> list[float]:
    return [sum(values[max(0, i - width + 1): i + 1]) / min(width, i + 1) for i in range(len(values))]


def markdown(results: dict[str, Any]) -> str:
    s = results["summary"]
    f = results["failover_latency"]
    phases = ", ".join(f"{name} {seconds} s at {rate:g} req/s" for name, seconds, rate in results["phases"])
    return "\n".join([
        "## Multi-region failover",
        "",
        f"`.venv/bin/python -m bench.failover --write` — {results['date']}, {results['machine']}.",
        f"The embedded default (PTU `uksouth` 30,000 tokens/minute at priority 1; `swedencentral`, `francecentral` at priority 2; "
        f"50 ms backends) behind 4 gateway processes; phases: {phases}. ![failover](failover.png)",
        "",
        "| | target | measured |",
        "|---|---|---|",
        f"| requests (served by region) | | {s['requests']} ({', '.join(f'{k} {v}' for k, v in s['served_by_region'].items())}) |",
        f"| client-visible 429s while a region had capacity | 0 | {s['client_visible_429']} |",
        f"| backend 429s received per 100 requests | | {s['backend_429s_per_100_requests']} ({s['backend_429s']} in all) |",
        f"| from the PTU's Retry-After to the next request it served (s) | <= 1 | max {s['recovery_delay_s'].get('max')}, p50 {s['recovery_delay_s'].get('p50')} over {s['ptu_trips_followed']} trips |",
        f"| of which requests arrived but went elsewhere (s) | | max {s['recovery_missed_s'].get('max')}, p50 {s['recovery_missed_s'].get('p50')} |",
        f"| p50 first-attempt / failed-over request (ms) | | {s['first_attempt_p50_ms']} / {s['failed_over_p50_ms']} ({s['failed_over_requests']} failed over) |",
        f"| (in that run) p50 of failed-over minus first-attempt requests (ms) | | {s.get('failover_added_p50_ms')} |",
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
