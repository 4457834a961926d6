"""A cold burst on a PTU: the backend 429s of its first 60 s, with and without a stated capacity (issue 28).

    .venv/bin/python -m bench.cold_ptu [--seconds 60] [--gateways 4] [--write]

The embedded default's shape (bench.failover): a simulated provisioned deployment (30,000 tokens/minute, 100 % = 10 s
of that) at priority 1 and two pay-as-you-go regions at priority 2, 50 ms backends, behind fresh gateway processes
that have never seen the PTU; then two shapes of cold burst: five times what the PTU takes (12 requests a second) from
the first second for 60 s, and 60 requests at once (16 in flight). Each shape runs twice, each time with new
simulators and gateways (new backend ids, so nothing is shared between the runs): once learning the PTU's capacity
from its 429s (today's behaviour), once with `ptu_tokens_per_minute` stated.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import httpx

from bench.harness import bench_stack, chat_body, finish_load, machine, save, stamp, start_load, update_doc
from tools import stack

RATE = 12.0
PTU_TPM = 30_000


def cold_burst(state_capacity: bool, seconds: float, gateways: int, burst: int | None = None) -> dict[str, Any]:
    tag = ("stated" if state_capacity else "learnt") + (f"-b{burst}" if burst else "")
    regions = [
        stack.Region(f"{tag}-uksouth-ptu", "uksouth", stack.free_port(), priority=1, ptu=True, chat_tpm=PTU_TPM,
                     ptu_burst_s=10, state_capacity=state_capacity),
        stack.Region(f"{tag}-sweden", "swedencentral", stack.free_port(), priority=2),
        stack.Region(f"{tag}-france", "francecentral", stack.free_port(), priority=2),
    ]
    with bench_stack() as bench:
        bench.start_azurite()
        sims = [bench.start_simulator(r, latency_ms=50, token_latency_ms=5) for r in regions]
        started = [bench.start_gateway(regions, name=f"gateway-{tag}{i}") for i in range(gateways)]
        key = bench.consumer("burst")
        urls = [f"{g.url}/v1/chat/completions" for g in started]
        if burst:
            process = start_load(urls, chat_body(model="gpt-4o"), 16, seconds, headers={"api-key": key},
                                 max_requests=burst, warmup=0)
        else:
            process = start_load(urls, chat_body(model="gpt-4o"), 16, seconds, headers={"api-key": key}, rate=RATE,
                                 warmup=0)
        result = finish_load(process, seconds + 120)
        stats = [httpx.get(f"{sim.url}/_sim/stats", timeout=10).json() for sim in sims]
    ptu = stats[0]
    throttled = ptu["by_status"].get("429", 0)
    served_ptu = ptu["by_status"].get("200", 0)
    return {
        "stated": state_capacity,
        "burst": burst,
        "requests": result["requests"],
        "client_non_200": result["requests"] - result["statuses"].get("200", 0),
        "ptu_429": throttled,
        "ptu_429_per_100": round(100 * throttled / max(1, result["requests"]), 2),
        "served_by_ptu": served_ptu,
        "ptu_tokens": ptu["usage"]["total_tokens"],
        "ptu_utilisation": round(ptu["usage"]["total_tokens"] / (PTU_TPM / 60 * seconds), 3),
    }


def _row(r: dict[str, Any]) -> str:
    shape = f"{r['burst']} at once" if r.get("burst") else f"{RATE:g}/s for 60 s"
    gateway = "stated (`ptu_tokens_per_minute`: 30000)" if r["stated"] else "learnt from 429s"
    return (f"| {shape} | {gateway} | {r['requests']} | {r['ptu_429']} | {r['ptu_429_per_100']} | "
            f"{r['served_by_ptu']} | {r['ptu_utilisation']:.1%} | {r['client_non_200']} |")


def markdown(results: dict[str, Any]) -> str:
    rows = "\n".join(_row(r) for r in results["runs"])
    return f"""## A cold burst on a PTU: stated capacity against learning

`.venv/bin/python -m bench.cold_ptu --write` — {results['date']}, {results['machine']}; the 2 cores are shared with
other helpers' work. A simulated provisioned deployment (30,000 tokens/minute, 100 % = 10 s of that) at priority 1,
two pay-as-you-go regions at priority 2, 50 ms backends, {results['gateways']} fresh gateway processes; from the
first second, {RATE:g} requests a second (five times what the PTU takes) for {results['seconds']:g} s, or 60 requests at
once (16 in flight). Each run has new simulators, gateways and backend ids.

| burst | the gateway | requests | PTU 429s | per 100 requests | served by the PTU | PTU tokens / its capacity in the run | client non-200 |
|---|---|---|---|---|---|---|---|
{rows}

Utilisation above 100 % is the idle PTU's own 100 % (10 s of its rate) absorbing the start of the burst.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--gateways", type=int, default=4)
    parser.add_argument("--write", action="store_true", help="write the figures into docs/benchmarks.md")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"machine": machine(), "date": stamp(), "seconds": args.seconds,
                               "gateways": args.gateways, "runs": []}
    for burst in (None, 60):
        for state_capacity in (False, True):
            results["runs"].append(cold_burst(state_capacity, args.seconds, args.gateways, burst))
            print(json.dumps(results["runs"][-1]), flush=True)
    save("cold_ptu", results)
    if args.write:
        update_doc("cold_ptu", markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
