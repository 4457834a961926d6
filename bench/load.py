"""A closed-loop HTTP load generator: N concurrent clients, bounded by a request count and a duration.

    python -m bench.load --url URL --concurrency 64 --seconds 10 [--stream] [--body JSON] [--header K:V]

Prints one JSON object: requests, errors by status, requests/s, latency percentiles (ms) end to end, and for streams
time to first byte and to last byte. Meant to run as its own process so it does not share a CPU with the process
being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    by_label: dict[str, list[float]] = field(default_factory=dict)  # latencies of 200s per key label (--keys)
    first_bytes: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    chunks: int = 0
    started: float = 0.0
    finished: float = 0.0
    # (wall-clock start, status, tokens consumed, backend, attempts, seconds, error code)
    records: list[tuple[float, str, int, str, int, float, str]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        elapsed = max(self.finished - self.started, 1e-9)
        ok = len(self.latencies)
        out: dict[str, Any] = {
            "requests": sum(self.statuses.values()),
            "ok": ok,
            "statuses": dict(self.statuses),
            "seconds": round(elapsed, 3),
            "rps": round(ok / elapsed, 1),
            "latency_ms": percentiles(self.latencies),
        }
        if self.by_label:
            out["latency_ms_by_label"] = {label: percentiles(values) for label, values in self.by_label.items()}
            out["ok_by_label"] = {label: len(values) for label, values in self.by_label.items()}
        if self.first_bytes:
            out["ttfb_ms"] = percentiles(self.first_bytes)
            out["chunks"] = self.chunks
        return out


def _error_code(payload: bytes) -> str:
    try:
        return str(json.loads(payload)["error"].get("code") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return ""


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 3)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "mean": round(statistics.fmean(ordered) * 1000, 3)}


async def run(
    url: str | list[str], body: bytes, headers: dict[str, str], concurrency: int, seconds: float, max_requests: int,
    stream: bool, warmup_s: float = 1.0, rate: float | None = None, record: bool = False,
    keys: list[str] | None = None, rotate: bool = False,
) -> Result:
    result = Result()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    stop_at = 0.0
    measuring = False
    sent = 0
    interval = concurrency / rate if rate else 0.0
    urls = [url] if isinstance(url, str) else url

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client(index: int) -> None:
            nonlocal sent
            target = urls[index % len(urls)]
            # Many consumers: client i is consumer i (its own key); with rotate its requests go round the gateways.
            # A line is KEY, LABEL<tab>KEY, or LABEL<tab>KEY<tab>END-USER (sent as x-gateway-user).
            parts = keys[index % len(keys)].split("\t") if keys else [""]
            label, key = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])
            own = {**headers, "api-key": key} if keys else headers
            if len(parts) > 2:
                own = {**own, "x-gateway-user": parts[2]}
            labelled = result.by_label.setdefault(label, []) if label else None
            turn = index
            if interval:
                await asyncio.sleep(interval * index / concurrency)  # staggered, so a paced load is not a train of bursts
            while True:
                now = time.perf_counter()
                if now >= stop_at or (measuring and sent >= max_requests):
                    return
                begin = now
                wall = time.time()
                sent += measuring
                consumed = 0
                code = ""
                backend = ""
                attempts = 0
                try:
                    if rotate:
                        target = urls[turn % len(urls)]
                        turn += 1
                    async with session.post(target, data=body, headers=own) as response:
                        consumed = int(response.headers.get("x-gateway-tokens-consumed", "0") or 0)
                        backend = response.headers.get("x-gateway-backend", "")
                        attempts = int(response.headers.get("x-gateway-attempts", "0") or 0)
                        if stream and response.status == 200:
                            first = None
                            async for _ in response.content.iter_any():
                                if first is None:
                                    first = time.perf_counter()
                                if measuring:
                                    result.chunks += 1
                            if measuring and first is not None:
                                result.first_bytes.append(first - begin)
                        else:
                            payload = await response.read()
                            if record and response.status >= 400:
                                code = _error_code(payload)
                        status = str(response.status)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    status = type(exc).__name__
                end = time.perf_counter()
                if measuring:
                    result.statuses[status] += 1
                    if status == "200":
                        result.latencies.append(end - begin)
                        if labelled is not None:
                            labelled.append(end - begin)
                    if record:
                        result.records.append((wall, status, consumed, backend, attempts, end - begin, code))
                if interval:
                    await asyncio.sleep(max(0.0, min(interval - (end - begin), stop_at - time.perf_counter())))

        # Warm up (connections, caches), then measure.
        if warmup_s > 0:
            stop_at = time.perf_counter() + warmup_s
            await asyncio.gather(*(client(i) for i in range(concurrency)))
        measuring = True
        result.started = time.perf_counter()
        stop_at = result.started + seconds
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        result.finished = time.perf_counter()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, action="append", help="repeat to spread clients over several URLs")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rate", type=float, help="requests per second in all (default: as fast as answered)")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--body", required=True)
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--record", help="one JSON line per request: [start, status, tokens, backend, attempts, seconds]")
    parser.add_argument("--keys", help="a file of API keys, one a line (LABEL<tab>KEY for latency per label): client i "
                        "sends key i (many consumers)")
    parser.add_argument("--rotate", action="store_true", help="each client's requests go round the URLs in turn")
    args = parser.parse_args(argv)
    if not all(u.startswith(("http://127.0.0.1", "http://localhost")) for u in args.url):
        parser.error("benchmarks talk to 127.0.0.1 only")
    headers = {"content-type": "application/json"}
    for header in args.header:
        name, _, value = header.partition(":")
        headers[name.strip()] = value.strip()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    keys = [k.strip() for k in open(args.keys).read().splitlines() if k.strip()] if args.keys else None  # noqa: SIM115
    result = asyncio.run(run(args.url, args.body.encode(), headers, args.concurrency, args.seconds, args.max_requests,
                             args.stream, args.warmup, args.rate, record=bool(args.record), keys=keys,
                             rotate=args.rotate))
    if args.record:
        with open(args.record, "w") as handle:
            for row in result.records:
                handle.write(json.dumps(row) + "\n")
    print(json.dumps(result.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
