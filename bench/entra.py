"""What an Entra ID caller costs the gateway per request (issue: Entra ID callers).

    .venv/bin/python -m bench.entra [--requests 20000] [--write]

In process, with keys generated here and the tenant's metadata answered in memory (no network): the first check of a
token (signature verified with the cached signing key), then the same token again (cached by its digest), through
the validator alone and through the whole identification a request goes through (header, token, consumer). Target:
<= 0.05 ms per request after the first. A gateway key's identification is measured beside it for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from bench.harness import machine, stamp, update_doc
from shared.clock import SystemClock
from shared.config import EntraSettings
from shared.edge.consumers import ConsumerDirectory, hash_key
from shared.edge.entra import SigningKeys, TokenValidator
from shared.edge.identity import Identifier
from shared.records.consumers import Consumer
from shared.storage.memory import MemoryConsumerStore
from shared.telemetry.protocol import NullTelemetry
from tools.entra import AUDIENCE, CALLER_APP, TENANT, Authority, MemoryFetcher


async def measure(requests: int) -> dict[str, float]:
    authority = Authority()
    settings = EntraSettings(tenants=(TENANT,), audiences=(AUDIENCE,))
    clock = SystemClock()
    validator = TokenValidator(settings, SigningKeys(settings, MemoryFetcher(authority), clock), clock)
    store = MemoryConsumerStore()
    await store.put(Consumer(id="app", name="app", key_hash=hash_key("gw-bench-key"), key_prefix="gw-bench",
                             entra=frozenset({f"app:{CALLER_APP}"})))
    identifier = Identifier(ConsumerDirectory(store, clock, 5.0), NullTelemetry(), validator, True)
    await validator.validate(authority.token())  # signing keys fetched once

    tokens = [authority.token(uti=str(i)) for i in range(min(requests, 2000))]
    started = time.perf_counter()
    for token in tokens:
        await validator.validate(token)
    first_ms = (time.perf_counter() - started) * 1000 / len(tokens)

    async def per_call(call: object, rounds: int = 5) -> float:
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(requests):
                await call()  # type: ignore[operator]
            samples.append((time.perf_counter() - started) * 1000 / requests)
        return statistics.median(samples)

    token = tokens[0]
    token_headers = {"authorization": f"Bearer {token}"}
    key_headers = {"api-key": "gw-bench-key"}
    none: frozenset[str] = frozenset()
    return {
        "first check of a token (ms)": first_ms,
        "validator, cached token (ms)": await per_call(lambda: validator.validate(token)),
        "identification, cached token (ms)": await per_call(lambda: identifier.identify(token_headers, none)),
        "identification, gateway key (ms)": await per_call(lambda: identifier.identify(key_headers, none)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000, help="calls per measurement (bounded)")
    parser.add_argument("--write", action="store_true", help="write the figures into docs/benchmarks.md")
    args = parser.parse_args(argv)
    figures = asyncio.run(measure(max(100, min(args.requests, 1_000_000))))
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in figures.items())
    cached = figures["identification, cached token (ms)"]
    markdown = f"""## Entra ID callers

`.venv/bin/python -m bench.entra --write` — {stamp()}, {machine()}.
In process, RS256 tokens with 2048-bit keys, medians of 5 rounds of {args.requests} calls. Target: <= 0.05 ms per
request after the first: {"met" if cached <= 0.05 else "not met"} ({cached:.4f} ms).

| per request | ms |
|---|---|
{rows}
"""
    print(markdown)
    if args.write:
        update_doc("entra", markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
