"""The response cache: what a hit costs against a plain call through the gateway, memory under many distinct
entries, and Blob operations per request (issue 31).

    .venv/bin/python -m bench.cache [--requests 300] [--entries 10000] [--write]

One gateway process, one simulated region (5 ms, unlimited), Azurite (Table and Blob; Blob behind the counting TCP
proxy). One client, sequential: p50/p99 of an embedding and a temperature-0 chat (whole and streamed) for a consumer
without the cache (every call goes to the region) and one with it (every call after the first is a hit). Then
`--entries` distinct embeddings (8 clients): the gateway's RSS before and after, against GATEWAY_CACHE_MEMORY_MB.
Then Blob requests per request: misses, hits in memory, and hits a second instance reads from Blob.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httpx

from bench.harness import bench_stack, machine, save, stamp, update_doc
from bench.load import percentiles
from bench.procs import rss_mb
from shared.config import load_settings
from shared.edge.consumers import hash_key, key_prefix, new_key
from shared.records.cache import CachePolicy
from shared.records.consumers import Consumer
from shared.storage.consumer_table import TableConsumerStore
from shared.storage.tables import Tables
from tools import stack

EMBED = {"model": "text-embedding-3-small", "input": "a chunk re-embedded on every re-index"}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Name three colours."}], "temperature": 0,
        "max_tokens": 20}
DEADLINE_S = 240.0  # every loop stops here, whatever it had left


def consumer(env: dict[str, str], consumer_id: str, cache: bool) -> str:
    key = new_key()
    record = Consumer(consumer_id, consumer_id, hash_key(key), key_prefix(key), cache=CachePolicy(enabled=cache))

    async def put() -> None:
        tables = Tables.from_settings(load_settings(env, require_backends=False), timeout_s=10)
        try:
            await TableConsumerStore(tables).put(record)
        finally:
            await tables.close()

    asyncio.run(put())
    return key


def timed(client: httpx.Client, url: str, key: str, body: dict[str, Any], n: int, expect: str | None) -> list[float]:
    times: list[float] = []
    stop = time.monotonic() + DEADLINE_S / 8
    for _ in range(n):
        started = time.perf_counter()
        response = client.post(url, json=body, headers={"api-key": key})
        response.read()
        times.append(time.perf_counter() - started)  # seconds: percentiles() reports ms
        assert response.status_code == 200, response.text[:200]
        if expect is not None:
            assert response.headers.get("x-gateway-cache") == expect, response.headers
        if time.monotonic() > stop:
            break
    return times


async def distinct(url: str, key: str, entries: int, concurrency: int = 8) -> int:
    done = 0
    stop = time.monotonic() + DEADLINE_S
    async with httpx.AsyncClient(timeout=30) as client:
        async def worker(first: int) -> None:
            nonlocal done
            for i in range(first, entries, concurrency):
                if time.monotonic() > stop:
                    return
                body = {**EMBED, "input": f"chunk {i} of a corpus the indexer embeds again"}
                response = await client.post(url, json=body, headers={"api-key": key})
                assert response.status_code == 200 and response.headers["x-gateway-cache"] == "miss"
                done += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="per workload (bounded in time too)")
    parser.add_argument("--entries", type=int, default=10_000, help="distinct embeddings for the memory figure")
    parser.add_argument("--write", action="store_true", help="write the figures into docs/benchmarks.md")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"machine": machine(), "date": stamp(), "requests": args.requests, "rows": []}
    with bench_stack() as bench:
        azurite = bench.start_azurite()
        blob_port = stack._blob_ports[azurite.port]
        proxy, control = stack.start_tcpproxy(blob_port, bench.log_dir, name="blob-proxy")
        bench.children.append(proxy)
        region = stack.Region("sim", "uksouth", stack.free_port(), chat_tpm=10**9, embeddings_tpm=10**9)
        bench.start_simulator(region, latency_ms=5, token_latency_ms=0.5)
        connection = stack.table_connection_string(azurite.port, blob_port=proxy.port)
        extra = {"GATEWAY_TABLE_CONNECTION_STRING": connection, "GATEWAY_REQUEST_LOG": "false"}
        gateway = bench.start_gateway([region], extra)
        env = {**bench.env(), **extra}
        plain, cached = consumer(env, "plain", cache=False), consumer(env, "cached", cache=True)
        embeddings, chat = f"{gateway.url}/v1/embeddings", f"{gateway.url}/v1/chat/completions"

        with httpx.Client(timeout=30) as client:
            for name, url, body in (("embedding", embeddings, EMBED), ("chat", chat, CHAT),
                                    ("chat, streamed", chat, {**CHAT, "stream": True})):
                timed(client, url, plain, body, 20, None)  # warm: connections, encodings
                timed(client, url, cached, body, 1, None)  # the miss that stores it
                rounds: dict[str, list[float]] = {"plain": [], "hit": []}
                for _ in range(3):  # interleaved, so drift hits both alike
                    rounds["plain"] += timed(client, url, plain, body, args.requests // 3, None)
                    rounds["hit"] += timed(client, url, cached, body, args.requests // 3, "hit")
                row = {"workload": name, **{f"{k}_{p}": v for k, times in rounds.items()
                                            for p, v in percentiles(times).items() if p in ("p50", "p99")},
                       "n": len(rounds["hit"])}
                results["rows"].append(row)
                print(json.dumps(row))

            # Blob requests per request: misses (a read that finds nothing, then a write), hits from memory.
            stack.proxy_control(control, "reset")
            n = 100
            for i in range(n):
                client.post(embeddings, json={**EMBED, "input": f"blob-count {i}"}, headers={"api-key": cached})
            time.sleep(2)  # the writes go out in the background
            misses = sum(stack.proxy_control(control, "stats")["requests"].values())
            stack.proxy_control(control, "reset")
            for i in range(n):
                client.post(embeddings, json={**EMBED, "input": f"blob-count {i}"}, headers={"api-key": cached})
            hits = sum(stack.proxy_control(control, "stats")["requests"].values())
            second = bench.start_gateway([region], extra, name="gateway-2")
            stack.proxy_control(control, "reset")
            for _ in range(2):
                for i in range(n):
                    response = client.post(f"{second.url}/v1/embeddings", json={**EMBED, "input": f"blob-count {i}"},
                                           headers={"api-key": cached})
                    assert response.headers["x-gateway-cache"] == "hit"
            other = sum(stack.proxy_control(control, "stats")["requests"].values())
            results["blob"] = {"per_miss": misses / n, "per_memory_hit": hits / n,
                               "per_hit_on_another_instance_first_and_second_time": other / (2 * n)}
            print(json.dumps(results["blob"]))

        before = rss_mb(gateway.process.pid)
        started = time.monotonic()
        stored = asyncio.run(distinct(embeddings, cached, args.entries))
        results["memory"] = {"entries": stored, "rss_before_mb": round(before, 1),
                             "rss_after_mb": round(rss_mb(gateway.process.pid), 1),
                             "seconds": round(time.monotonic() - started, 1), "memory_cap_mb": 64}
        print(json.dumps(results["memory"]))
    save("cache", results)
    if args.write:
        update_doc("cache", render(results, args))
    return 0


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "## The response cache (issue 31)",
        "",
        f"`.venv/bin/python -m bench.cache --requests {args.requests} --entries {args.entries} --write` "
        f"({results['date']}; {results['machine']}; the machine was shared with other work, so the figures are of one "
        "run, read as ratios within it). One gateway process, a 5 ms simulated region, one sequential client; "
        "plain: a consumer without the cache (every call to the region); hit: a consumer with it, the same request.",
        "",
        "| workload | plain p50 ms | plain p99 ms | hit p50 ms | hit p99 ms | hits |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(f"| {row['workload']} | {row['plain_p50']:.2f} | {row['plain_p99']:.2f} | {row['hit_p50']:.2f} "
                     f"| {row['hit_p99']:.2f} | {row['n']} |")
    blob, memory = results["blob"], results["memory"]
    lines += [
        "",
        f"Blob requests per request (counted at a TCP proxy in front of Azurite's Blob service): a miss "
        f"{blob['per_miss']:.2f} (a read that finds nothing, then the write in the background; the container is "
        f"created once), a hit from memory {blob['per_memory_hit']:.2f}, a hit on a second instance "
        f"{blob['per_hit_on_another_instance_first_and_second_time']:.2f} over its first and second time (one read, "
        "then memory).",
        "",
        f"Memory: {memory['entries']:,} distinct embeddings (1,536 dimensions, about 33 KB of JSON each) stored in "
        f"{memory['seconds']} s; the gateway's RSS went from {memory['rss_before_mb']} MB to "
        f"{memory['rss_after_mb']} MB with the in-memory layer capped at {memory['memory_cap_mb']} MB "
        "(GATEWAY_CACHE_MEMORY_MB; about 2,000 of these entries): the rest is in Blob Storage only. The growth beyond "
        "the cap is the queue of writes waiting for Blob (at most 16 MiB) and the allocator's slack.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
