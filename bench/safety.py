"""Safety policies: the gateway's own share of the latency a policy adds (issue 30).

    .venv/bin/python -m bench.safety [--requests 150]

The gateway in-process (tests/fakes/gateway.py: the real flow, an instant scripted backend, the openai SDK's HTTP
client over ASGI), the Content Safety and Language stand-in as its own process on loopback (tools/simulator/safety.py),
once answering at once and once after 50 ms a call. One client, sequential, a new prompt each request (no verdict
cached) unless said: p50/p99 of a chat for a consumer without a policy and with one that shields, analyses a category
and masks PII (three calls a request, made at once). At 50 ms a call, calls made one after another would add >= 150 ms;
made at once, the service's 50 ms once plus the gateway's share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from bench.load import percentiles
from tests.fakes.gateway import GatewayHarness
from tools import stack

POLICY = json.dumps({"bench": {"categories": {"Violence": 4}, "pii": {"mode": "redact", "categories": ["Email"]}}})
DEADLINE_S = 60.0


async def measure(gw: GatewayHarness, key: str, n: int, same: bool) -> list[float]:
    http = gw.http
    times: list[float] = []
    stop = time.monotonic() + DEADLINE_S
    for i in range(n):
        text = "Name three colours." if same else f"Name three colours, request {i} {time.monotonic_ns()}."
        started = time.perf_counter()
        response = await http.post("/v1/chat/completions", headers={"api-key": key},
                                   json={"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})
        times.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        if time.monotonic() > stop:
            break
    return times


async def run(n: int, latency_ms: float) -> dict[str, dict[str, float]]:
    port = stack.free_port()
    child = stack.start_safety(port, latency_ms=latency_ms)
    gw = GatewayHarness(env={**stack.safety_env(port, POLICY), "GATEWAY_SAFETY_VERDICT_TTL_S": "3600"})
    try:
        plain = gw.consumer("plain")
        policy = gw.consumer("checked", safety="bench")
        await measure(gw, plain, 20, False)  # warm up: connections, encodings
        await measure(gw, policy, 20, False)
        return {
            "no policy": percentiles(await measure(gw, plain, n, False)),
            "policy, new prompt": percentiles(await measure(gw, policy, n, False)),
            "policy, verdict cached": percentiles(await measure(gw, policy, n, True)),
        }
    finally:
        await gw.close()
        child.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=150)
    args = parser.parse_args()
    for latency in (0.0, 50.0):
        results = asyncio.run(run(args.requests, latency))
        base = results["no policy"]["p50"]
        print(f"stand-in latency {latency:g} ms a call")
        for name, figures in results.items():
            print(f"  {name:<24} p50 {figures['p50']:7.2f} ms  p99 {figures['p99']:7.2f} ms  "
                  f"added p50 {figures['p50'] - base:6.2f} ms")


if __name__ == "__main__":
    main()
