"""What the gateway adds over calling a simulated backend directly (issue: the gateway, end to end).

    .venv/bin/python -m bench.overhead [--seconds 8] [--write]

A 50 ms simulated backend; at 1, 16 and 64 concurrent clients, non-streaming and streaming, the load generator calls
the backend directly and through the gateway, interleaved. Reports requests/s, p50/p99, added p50/p99, time to first
byte for streams, CPU-ms per request of the gateway process.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from bench.harness import bench_stack, chat_body, load, machine, save, stamp, update_doc
from tools import stack
from tools.capture import Capture

CONCURRENCY = (1, 16, 64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement (bounded)")
    parser.add_argument("--write", action="store_true", help="write the figures into docs/benchmarks.md")
    parser.add_argument("--extra", default="{}", help="JSON of extra gateway settings")
    parser.add_argument("--everything", action="store_true",
                        help="consumer with a token limit, metrics and traces exported to a local capture endpoint")
    parser.add_argument("--only", choices=("chat", "stream"), help="one workload only")
    parser.add_argument("--concurrency", type=int, action="append", help="instead of 1, 16 and 64")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    args = parser.parse_args(argv)
    extra = json.loads(args.extra)
    capture = None
    if args.everything:
        capture = Capture()
        extra["APPLICATIONINSIGHTS_CONNECTION_STRING"] = capture.connection_string

    results: dict[str, Any] = {"machine": machine(), "date": stamp(), "seconds": args.seconds, "rows": []}
    with bench_stack() as bench:
        bench.start_azurite()
        region = stack.Region("sim", "uksouth", stack.free_port(), chat_tpm=10**9, embeddings_tpm=10**9)
        bench.start_simulator(region, latency_ms=50, token_latency_ms=5)
        gateway = bench.start_gateway([region], extra)
        key = bench.consumer("bench", tokens_per_minute=10**9 if args.everything else 0)
        direct_url = f"{region_url(region)}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        gateway_url = f"{gateway.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        for streaming in (False, True):
            if args.only and args.only != ("stream" if streaming else "chat"):
                continue
            body = chat_body(stream=streaming)
            for concurrency in args.concurrency or CONCURRENCY:
                rows = []
                for _ in range(args.rounds):  # direct and gateway interleaved, so drift hits both alike
                    direct = load(direct_url, body, concurrency, args.seconds, headers={"api-key": stack.SIM_API_KEY},
                                  stream=streaming)
                    through = load(gateway_url, body, concurrency, args.seconds, headers={"api-key": key},
                                   stream=streaming, measure_pid=gateway.process.pid)
                    rows.append(summarize("stream" if streaming else "chat", concurrency, direct, through))
                row = median_row(rows)
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
    save("overhead", results)
    if args.write:
        update_doc("overhead", markdown(results))
    return 0


def region_url(region: stack.Region) -> str:
    return f"http://127.0.0.1:{region.port}"


def summarize(kind: str, concurrency: int, direct: dict[str, Any], gateway: dict[str, Any]) -> dict[str, Any]:
    key = "ttfb_ms" if kind == "stream" else "latency_ms"
    return {
        "workload": kind,
        "concurrency": concurrency,
        "direct_rps": direct["rps"],
        "gateway_rps": gateway["rps"],
        "throughput_ratio": round(gateway["rps"] / max(direct["rps"], 1e-9), 3),
        "direct_p50_ms": direct[key]["p50"],
        "gateway_p50_ms": gateway[key]["p50"],
        "added_p50_ms": round(gateway[key]["p50"] - direct[key]["p50"], 3),
        "added_p99_ms": round(gateway[key]["p99"] - direct[key]["p99"], 3),
        "gateway_cpu_ms_per_request": gateway.get("proxy_cpu_ms_per_request"),
        "gateway_rss_mb": gateway.get("proxy_rss_mb"),
        "errors": {k: v for k, v in gateway["statuses"].items() if k != "200"},
    }


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    merged = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and key != "concurrency":
            merged[key] = round(statistics.median(r[key] for r in rows), 3)
    merged["rounds"] = len(rows)
    return merged


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "## Gateway overhead against a direct call (foundation)",
        "",
        f"`.venv/bin/python -m bench.overhead --seconds {results['seconds']:g} --write` — {results['date']}, {results['machine']}. "
        "Medians of three interleaved rounds.",
        "A 50 ms simulated backend (streams: 20 tokens 5 ms apart); one gateway worker (local host, uvloop) with consumer "
        "auth and Table Storage on Azurite; the load generator in its own process. For streams, latency is time to first byte.",
        "",
        "| workload | clients | direct req/s | gateway req/s | ratio | direct p50 ms | gateway p50 ms | added p50 ms | added p99 ms | gateway CPU ms/req | RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['workload']} | {r['concurrency']} | {r['direct_rps']} | {r['gateway_rps']} | {r['throughput_ratio']} | "
            f"{r['direct_p50_ms']} | {r['gateway_p50_ms']} | {r['added_p50_ms']} | {r['added_p99_ms']} | "
            f"{r['gateway_cpu_ms_per_request']} | {r['gateway_rss_mb']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
