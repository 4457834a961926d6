"""What a fallback across models adds to a request (issue 28).

    .venv/bin/python -m bench.fallback [--seconds 5] [--rounds 3] [--write]

Two simulated regions serving gpt-4o-mini and gpt-4o (50 ms backends) behind one gateway with
GATEWAY_DEPLOYMENTS = {"gpt-4o-mini": {"fallback": ["gpt-4o"]}}. Every region answers gpt-4o-mini with a 429 asking
for 1 ms (so its breaker is closed again by the next request, and every request to it walks the whole failed region
set and then falls back): one client, rounds of plain gpt-4o / gpt-4o-mini falling back / plain gpt-4o again. The
difference from the mean of the two plain runs around it is what a fallback costs: two 429 round trips (one per region)
plus the gateway's work (moving the reservation, translating the body).
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import httpx

from bench.failover import probe_429_round_trip
from bench.harness import bench_stack, chat_body, load, machine, save, stamp, update_doc
from tools import stack

CATALOG = {"gpt-4o-mini": {"fallback": ["gpt-4o"]}}


def fallback_latency(bench: Any, seconds: float, rounds: int) -> dict[str, Any]:
    regions = [stack.Region("fb-uksouth", "uksouth", stack.free_port(), priority=1, chat_tpm=10**9),
               stack.Region("fb-sweden", "swedencentral", stack.free_port(), priority=2, chat_tpm=10**9)]
    for region in regions:
        bench.start_simulator(region, latency_ms=50, token_latency_ms=5)
        httpx.post(f"http://127.0.0.1:{region.port}/_sim/faults",
                   json={"kind": "429", "count": -1, "delay_s": 0.001, "deployment": "gpt-4o-mini"})
    gateway = bench.start_gateway(regions, extra={"GATEWAY_DEPLOYMENTS": json.dumps(CATALOG)}, name="gateway-fallback")
    key = bench.consumer("fallback", tokens_per_minute=10**8)
    url = f"{gateway.url}/v1/chat/completions"
    plain, fallen = chat_body(model="gpt-4o"), chat_body(model="gpt-4o-mini")
    check = httpx.post(url, content=fallen, headers={"api-key": key}, timeout=10)
    assert check.headers.get("x-gateway-deployment") == "gpt-4o", "the request did not fall back"
    added, noise, p50s = [], [], {"plain": [], "fallback": []}
    for _ in range(rounds):
        p50 = {}
        for name, body in (("plain", plain), ("fallback", fallen), ("plain again", plain)):
            result = load(url, body, 1, seconds, headers={"api-key": key}, engine="python")
            assert result["statuses"].get("200", 0) == result["requests"], result["statuses"]
            p50[name] = result["latency_ms"]["p50"]
        added.append(p50["fallback"] - (p50["plain"] + p50["plain again"]) / 2)
        noise.append(abs(p50["plain again"] - p50["plain"]))
        p50s["plain"] += [p50["plain"], p50["plain again"]]
        p50s["fallback"].append(p50["fallback"])
    # Measured after the runs: the probe's 429s (any deployment) would otherwise be taken by the plain runs.
    round_trip = probe_429_round_trip(f"http://127.0.0.1:{regions[0].port}")
    added_p50 = statistics.median(added)
    return {
        "plain_p50_ms": round(statistics.median(p50s["plain"]), 3),
        "fallback_p50_ms": round(statistics.median(p50s["fallback"]), 3),
        "added_p50_ms": round(added_p50, 3),
        "plain_to_plain_ms": round(statistics.median(noise), 3),
        "round_trip_429_ms": round(round_trip, 3),
        "added_beyond_two_429_round_trips_ms": round(added_p50 - 2 * round_trip, 3),
        "rounds": rounds,
        "seconds": seconds,
    }


def markdown(results: dict[str, Any]) -> str:
    r = results["latency"]
    return f"""## Fallback across models: added latency

`.venv/bin/python -m bench.fallback --write` — {results['date']}, {results['machine']}; the 2 cores are shared with
other helpers' tests and benchmarks, so figures are compared only within this run (median of {r['rounds']} rounds of
plain / fallback / plain, {r['seconds']} s each, one client).
Two simulated regions (50 ms backends) serving gpt-4o-mini and gpt-4o; `GATEWAY_DEPLOYMENTS` gives gpt-4o-mini the
fallback gpt-4o; both regions answer every gpt-4o-mini request with a 429 asking for 1 ms, so each such request is
sent to both regions, then falls back and is served by gpt-4o. A plain call asks gpt-4o directly.

| plain p50 (ms) | fallback p50 (ms) | added (ms) | plain vs plain (ms) | one 429 round trip (ms) | added beyond the two 429 round trips (ms) |
|---|---|---|---|---|---|
| {r['plain_p50_ms']} | {r['fallback_p50_ms']} | {r['added_p50_ms']} | {r['plain_to_plain_ms']} | {r['round_trip_429_ms']} | {r['added_beyond_two_429_round_trips_ms']} |
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="write the figures into docs/benchmarks.md")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"machine": machine(), "date": stamp()}
    with bench_stack() as bench:
        bench.start_azurite()
        results["latency"] = fallback_latency(bench, args.seconds, args.rounds)
    print(json.dumps(results, indent=2))
    save("fallback", results)
    if args.write:
        update_doc("fallback", markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
