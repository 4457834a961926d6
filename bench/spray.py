"""A key spray against one gateway instance: what it costs Table Storage, and what it costs a valid consumer.

    .venv/bin/python -m bench.spray [--rate 1000] [--seconds 30] [--write]

Azurite behind the counting TCP proxy (tools/tcpproxy.py), one simulated region, one gateway with the default
defences (GATEWAY_UNKNOWN_KEY_LOOKUPS_PER_S=2, GATEWAY_AUTH_FAILURES_PER_MINUTE=20, GATEWAY_CONSUMER_REFRESH_S=60, GATEWAY_CONSUMER_CHECK_S=1) and
GATEWAY_FORWARDED_HOPS=1, so that each bogus key can come from its own X-Forwarded-For address: the spray of many
machines, which the per-address throttle cannot stop and only the lookup budget bounds. A valid consumer runs a steady
load (bench/load.py) first alone, then beside the spray. Reports the spray's achieved rate, the requests the proxy counted
on the consumers table during the spray against the bound (budget x seconds + burst + change-marker checks + reloads),
the valid consumer's p50 without and with the spray, and how long a key created by the admin command takes to work,
once on the quiet gateway and once half-way through the spray (when the spray spends every lookup the budget allows,
the change marker is what makes the new key known).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import httpx

from bench.harness import bench_stack, chat_body, finish_load, machine, save, stamp, start_load
from tools import stack

LOOKUPS_PER_S = 2.0
REFRESH_S = 60.0  # the defaults: a full reload a minute, the change marker read every second
CHECK_S = 1.0
VALID_RATE = 20.0  # requests/s of the valid consumer


async def _spray(port: int, rate: float, seconds: float, connections: int) -> dict[str, Any]:
    """Bogus keys at `rate` per second over keep-alive connections, each key distinct and from its own address."""
    statuses: Counter[str] = Counter()
    sent = 0
    started = time.monotonic()
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":1}'

    async def connection(index: int) -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = index
        try:
            while True:
                due = started + i / rate  # this connection's next slot in the global schedule
                now = time.monotonic()
                if due - started >= seconds:
                    return
                if due > now:
                    await asyncio.sleep(due - now)
                address = f"{10 + i // 62500 % 200}.{i // 250 % 250}.{i % 250}.7"
                writer.write(
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
                    + f"api-key: gw-spray-{i:010d}-{index}\r\nx-forwarded-for: {address}\r\n".encode()
                    + f"content-length: {len(body)}\r\n\r\n".encode() + body
                )
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                statuses[head.split(b" ", 2)[1].decode()] += 1
                sent += 1
                i += connections
        finally:
            writer.close()

    await asyncio.gather(*(connection(k) for k in range(connections)))
    elapsed = time.monotonic() - started
    return {"sent": sent, "seconds": round(elapsed, 2), "rate": round(sent / elapsed, 1), "statuses": dict(statuses)}


def time_to_work(url: str, key: str, limit_s: float = 15.0) -> float | None:
    """Seconds from now until `key` is accepted (polled every 50 ms, each poll from its own forwarded address so that
    the per-address throttle of failed authentications does not decide it); None if not within `limit_s`."""
    started = time.monotonic()
    n = 0
    while (elapsed := time.monotonic() - started) < limit_s:
        n += 1
        headers = {"api-key": key, "x-forwarded-for": f"198.51.{n // 250 % 250}.{n % 250}"}
        if httpx.get(url + "/v1/models", headers=headers, timeout=5).status_code == 200:
            return round(elapsed, 3)
        time.sleep(0.05)
    return None


def spray_process(port: int, rate: float, seconds: float) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "bench.spray", "--generate", str(port), "--rate", str(rate), "--seconds", str(seconds)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def run(rate: float, seconds: float) -> dict[str, Any]:
    with bench_stack() as bench:
        azurite = bench.start_azurite()
        proxy, control = stack.start_tcpproxy(azurite.port, bench.log_dir)
        bench.children.append(proxy)
        bench.table_port = proxy.port
        region = stack.Region("sim", "swedencentral", stack.free_port(), chat_tpm=10**9)
        bench.start_simulator(region, latency_ms=20, token_latency_ms=1)
        gateway = bench.start_gateway([region], {
            "GATEWAY_UNKNOWN_KEY_LOOKUPS_PER_S": str(LOOKUPS_PER_S), "GATEWAY_AUTH_FAILURES_PER_MINUTE": "20",
            "GATEWAY_CONSUMER_REFRESH_S": str(REFRESH_S), "GATEWAY_CONSUMER_CHECK_S": str(CHECK_S),
            "GATEWAY_FORWARDED_HOPS": "1",
        })
        key = bench.consumer("steady")
        body = chat_body("gpt-4o-mini")
        headers = {"api-key": key, "content-type": "application/json"}
        url = gateway.url + "/v1/chat/completions"
        alone = finish_load(start_load(url, body, 4, seconds, headers=headers, rate=VALID_RATE), seconds + 120)
        # Created straight on Azurite, not through the proxy: the proxy counts the gateway's requests only.
        fresh_quiet = time_to_work(gateway.url, bench.consumer("fresh-quiet", table_port=azurite.port))
        valid = start_load(url, body, 4, seconds, headers=headers, rate=VALID_RATE, warmup=0)
        stack.proxy_control(control, "reset")
        spray = spray_process(gateway.port, rate, seconds)
        time.sleep(seconds / 2)
        fresh_spray = time_to_work(gateway.url, bench.consumer("fresh-spray", table_port=azurite.port))
        out, _ = spray.communicate(timeout=seconds + 120)
        counted = stack.proxy_control(control, "stats")["requests"]
        beside = finish_load(valid, seconds + 120)
    sprayed: dict[str, Any] = json.loads(out)
    elapsed = sprayed["seconds"]
    table = counted.get("gatewayconsumers", 0)
    # Lookups within the budget (+ its burst), a marker read per check, a reload (marker + listing) per full reload and
    # for the one change made during the spray.
    bound = (LOOKUPS_PER_S * elapsed + max(1.0, LOOKUPS_PER_S) + (elapsed / CHECK_S + 1)
             + 2 * (elapsed / REFRESH_S + 1) + 2)
    return {
        "machine": machine(), "date": stamp(), "target_rate": rate, "spray": sprayed,
        "consumers_table_requests": table, "bound": round(bound, 1), "all_table_requests": counted,
        "fresh_key_works_after_s": {"quiet": fresh_quiet, "during_spray": fresh_spray},
        "valid_alone": alone, "valid_beside_spray": beside,
    }


def markdown(r: dict[str, Any]) -> str:
    spray = r["spray"]
    return "\n".join([
        "## Key spray against one instance",
        "",
        f"`.venv/bin/python -m bench.spray --rate {r['target_rate']:g} --seconds {spray['seconds']:.0f} --write` — {r['date']}, "
        f"{r['machine']}; other work shared the 2 cores. Azurite behind the counting TCP proxy, one gateway with the default "
        "defences, every bogus key distinct and from its own forwarded address (so the per-address throttle never "
        "applies: only the lookup budget bounds the store's load); a valid consumer at 20 requests/s beside it.",
        "",
        "| | target | measured |",
        "|---|---|---|",
        f"| bogus keys sent (achieved rate) | 1,000/s for 30 s | {spray['sent']} in {spray['seconds']} s ({spray['rate']}/s); "
        f"answers {spray['statuses']} |",
        f"| requests on the consumers table during the spray | <= {r['bound']} (2/s budget + burst + a change-marker read "
        f"a second + the reloads) | {r['consumers_table_requests']} |",
        f"| a key created by the admin command works after (s): quiet / half-way through the spray | about 1 | "
        f"{r['fresh_key_works_after_s']['quiet']} / {r['fresh_key_works_after_s']['during_spray']} |",
        f"| before this change | | one query (a partition scan) per distinct key: {spray['sent']} |",
        f"| valid consumer p50 alone / beside the spray (ms) | unchanged | {r['valid_alone']['latency_ms']['p50']} / "
        f"{r['valid_beside_spray']['latency_ms']['p50']} |",
        f"| valid consumer statuses beside the spray | all 200 | {r['valid_beside_spray']['statuses']} |",
    ])


def update_reliability(section: str) -> None:
    from bench.harness import ROOT

    doc = ROOT / "docs" / "reliability.md"
    text = doc.read_text()
    begin, end = "<!-- spray:begin -->", "<!-- spray:end -->"
    block = f"{begin}\n{section.strip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--generate", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate:
        print(json.dumps(asyncio.run(_spray(args.generate, args.rate, args.seconds, args.connections))))
        return 0
    result = run(args.rate, args.seconds)
    save("spray", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("valid_alone", "valid_beside_spray")}, indent=2))
    print("valid p50 alone / beside:", result["valid_alone"]["latency_ms"]["p50"], result["valid_beside_spray"]["latency_ms"]["p50"])
    if args.write:
        update_reliability(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
