"""What token metrics cost, and whether they are exact (issue: token metrics in Application Insights).

    .venv/bin/python -m bench.metrics [--requests 10000] [--write]

1. Three gateway processes on the same backend: one exporting metrics, traces (at their default rate) and the
   per-request log to a local App Insights capture endpoint, one the same without the log, one exporting nothing;
   interleaved loads at 16 clients: the added p50 (target <= 0.3 ms) and what the log adds.
2. A mixed run of `--requests` requests through the metrics gateway: chat, streams and embeddings, with a 500 injected
   on the priority-1 region now and then so that requests fail over; the exported `Total Tokens` (and prompt and
   completion) are compared with what the simulated backends reported (target: equal, 100 %), and so are the
   per-request log's records (one per request) and their token totals.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

import httpx

from bench.harness import bench_stack, chat_body, load, machine, save, stamp, update_doc
from shared.telemetry import protocol as names
from tools import stack
from tools.capture import Capture


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    capture = Capture()
    results: dict[str, Any] = {"machine": machine(), "date": stamp()}
    with bench_stack() as bench:
        bench.start_azurite()
        regions = [stack.Region(f"r{i}", region, stack.free_port(), priority=1 if i == 0 else 2, chat_tpm=10**9,
                                embeddings_tpm=10**9, breaker={"trip_s": 0.5})
                   for i, region in enumerate(("uksouth", "swedencentral", "francecentral"))]
        sims = [bench.start_simulator(r, latency_ms=50, token_latency_ms=5) for r in regions]
        key = bench.consumer("metered", tokens_per_minute=10**9)
        on = bench.start_gateway(regions, {"APPLICATIONINSIGHTS_CONNECTION_STRING": capture.connection_string,
                                           "OTEL_METRIC_EXPORT_INTERVAL": "5000"}, name="gateway-metrics")
        nolog = bench.start_gateway(regions, {"APPLICATIONINSIGHTS_CONNECTION_STRING": capture.connection_string,
                                              "OTEL_METRIC_EXPORT_INTERVAL": "5000", "GATEWAY_REQUEST_LOG": "false"},
                                    name="gateway-metrics-nolog")
        off = bench.start_gateway(regions, name="gateway-plain")
        body = chat_body(model="gpt-4o")
        p50: dict[str, list[float]] = {"on": [], "nolog": [], "off": []}
        for _ in range(args.rounds):
            for name, gateway in (("off", off), ("nolog", nolog), ("on", on)):
                result = load(f"{gateway.url}/v1/chat/completions", body, 16, args.seconds, headers={"api-key": key})
                p50[name].append(result["latency_ms"]["p50"])
        results["overhead"] = {
            "p50_on_ms": round(statistics.median(p50["on"]), 3),
            "p50_off_ms": round(statistics.median(p50["off"]), 3),
            "p50_nolog_ms": round(statistics.median(p50["nolog"]), 3),
            "rounds": p50,
        }
        results["overhead"]["log_added_p50_ms"] = round(
            results["overhead"]["p50_on_ms"] - results["overhead"]["p50_nolog_ms"], 3)
        results["overhead"]["added_p50_ms"] = round(results["overhead"]["p50_on_ms"] - results["overhead"]["p50_off_ms"], 3)
        print(json.dumps(results["overhead"]), flush=True)

        consumer = bench.consumer("mixed", tokens_per_minute=10**9)
        time.sleep(2)  # requests still in flight when the load generator stopped finish before the books are opened
        for sim in sims:
            httpx.post(f"{sim.url}/_sim/reset", timeout=10)
        stop = threading.Event()

        def faults() -> None:
            while not stop.wait(1.0):
                httpx.post(f"{sims[0].url}/_sim/faults", json={"kind": "500", "count": 2, "deployment": "gpt-4o"}, timeout=10)

        injector = threading.Thread(target=faults, daemon=True)
        injector.start()
        counts = {"chat": int(args.requests * 0.6), "stream": int(args.requests * 0.25)}
        counts["embeddings"] = args.requests - counts["chat"] - counts["stream"]
        payloads = {
            "chat": (f"{on.url}/v1/chat/completions", chat_body(model="gpt-4o"), False),
            "stream": (f"{on.url}/v1/chat/completions", chat_body(model="gpt-4o-mini", stream=True), True),
            "embeddings": (f"{on.url}/v1/embeddings", json.dumps({"model": "text-embedding-3-small", "input": ["a b c", "d e"]}).encode(), False),
        }
        started = time.monotonic()
        runs = {}
        for kind, count in counts.items():
            target, payload, streaming = payloads[kind]
            runs[kind] = load(target, payload, 32, 600, headers={"api-key": consumer}, stream=streaming,
                              max_requests=count, warmup=0, engine="python")
        stop.set()
        injector.join()
        results["mixed_seconds"] = round(time.monotonic() - started, 1)
        stats = [httpx.get(f"{s.url}/_sim/stats", timeout=10).json() for s in sims]
        reported = {k: sum(s["usage"][k] for s in stats) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        backend_500s = sum(s["by_status"].get("500", 0) for s in stats)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and capture.total(names.TOTAL_TOKENS, **{names.SUBSCRIPTION_ID: "mixed"}) < reported["total_tokens"]:
            time.sleep(0.5)
        time.sleep(6)  # one more export: nothing more may arrive
    exported = {name: capture.total(name, **{names.SUBSCRIPTION_ID: "mixed"})
                for name in (names.PROMPT_TOKENS, names.COMPLETION_TOKENS, names.TOTAL_TOKENS)}
    by_deployment_reported: dict[str, int] = {}
    for s in stats:
        for deployment, usage in s["usage_by_deployment"].items():
            by_deployment_reported[deployment] = by_deployment_reported.get(deployment, 0) + usage["total_tokens"]
    by_deployment_exported = {
        d: capture.total(names.TOTAL_TOKENS, **{names.SUBSCRIPTION_ID: "mixed", names.DEPLOYMENT: d})
        for d in by_deployment_reported
    }
    failovers = capture.total(names.FAILOVERS)
    log = [e["data"]["baseData"] for e in capture.items("EventData")
           if e["data"]["baseData"]["name"] == "GatewayLlmLog"
           and e["data"]["baseData"]["properties"].get(names.SUBSCRIPTION_ID) == "mixed"]
    logged = {
        "records": len(log),
        "total_tokens": int(sum(e.get("measurements", {}).get(names.TOTAL_TOKENS, 0) for e in log)),
        "bytes_per_record": round(sum(len(json.dumps(e)) for e in log) / max(1, len(log))),
    }
    capture.stop()
    requests_sent = sum(r["requests"] for r in runs.values())
    results["mixed"] = {
        "requests": requests_sent,
        "by_kind": {k: {"requests": r["requests"], "statuses": r["statuses"]} for k, r in runs.items()},
        "backend_500s_failed_over": backend_500s,
        "failovers_emitted": failovers,
        "reported_by_backends": reported,
        "exported": exported,
        "exported_over_reported_percent": round(100 * exported[names.TOTAL_TOKENS] / max(1, reported["total_tokens"]), 4),
        "by_deployment": {"reported": by_deployment_reported, "exported": by_deployment_exported},
        "logged": logged,
    }
    print(json.dumps(results["mixed"], indent=2))
    save("metrics", results)
    if args.write:
        update_doc("metrics", markdown(results))
    return 0


def markdown(r: dict[str, Any]) -> str:
    o, m = r["overhead"], r["mixed"]
    return "\n".join([
        "## Token metrics: cost and exactness",
        "",
        f"`.venv/bin/python -m bench.metrics --write` — {r['date']}, {r['machine']}.",
        "",
        "Three gateways on the same 50 ms backend: one exporting metrics, traces (at the default rate) and the "
        "per-request log to a local App Insights capture endpoint, one the same without the log, one exporting "
        "nothing; 16 clients each, interleaved rounds, medians. The machine's 2 cores were shared with other work "
        "while this ran, so compare the columns of one run, not runs.",
        "",
        "| p50 telemetry off (ms) | p50 metrics + traces (ms) | p50 metrics + traces + log (ms) | added p50 (ms), target <= 0.3 | of which the log (ms) |",
        "|---|---|---|---|---|",
        f"| {o['p50_off_ms']} | {o['p50_nolog_ms']} | {o['p50_on_ms']} | {o['added_p50_ms']} | {o['log_added_p50_ms']} |",
        "",
        f"A mixed run of {m['requests']} requests (chat, streams, embeddings), with 500s injected on the priority-1 region "
        f"({m['backend_500s_failed_over']} backend 500s, each failed over; {int(m['failovers_emitted'])} failovers emitted):",
        "",
        "| | prompt | completion | total |",
        "|---|---|---|---|",
        f"| reported by the backends | {m['reported_by_backends']['prompt_tokens']} | {m['reported_by_backends']['completion_tokens']} | {m['reported_by_backends']['total_tokens']} |",
        f"| exported to App Insights | {int(m['exported']['Prompt Tokens'])} | {int(m['exported']['Completion Tokens'])} | {int(m['exported']['Total Tokens'])} |",
        f"| exported / reported | | | {m['exported_over_reported_percent']} % (target 100 %) |",
        f"| per-request log ({m['logged']['records']} records for {m['requests']} requests, "
        f"~{m['logged']['bytes_per_record']} bytes each as sent) | | | {m['logged']['total_tokens']} |",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
