"""The hostile mix against real processes (issue 13): limits that cannot be outrun by long or many-choice requests.

    .venv/bin/python -m bench.hostile [--seconds 200] [--write]

Azurite, one simulated region whose generations run long when nothing caps them (8,000 tokens per choice), and four
gateway processes (GATEWAY_INSTANCE_COUNT=4) sharing one 10,000 TPM consumer. Sixteen clients
(four per gateway) send nothing but hostile requests: streamed, no max_tokens, n=4. A refused client waits what it was
told (retry-after-ms) and tries again. Every token is timed where the client receives it (the prompt with the first
chunk, each content chunk as it arrives), and the most tokens served in any 60 s span is reported against the limit:

- with the output cap on (GATEWAY_OUTPUT_CAP=true), at 60 ms a token so that even a capped generation (1,024 tokens a
  choice) runs past a minute: target <= 1.02 x the limit;
- without it, at 8 ms a token (an uncapped generation: 64 s): the worst case is the limit plus the overrun of the requests in flight together (at most
  limit / reservation of them fit beside each other), stated and compared with what was measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httpx

from bench.figures import most_in_any_window
from bench.harness import bench_stack, machine, save, stamp, update_doc
from shared.flow.tokens import count_chat_prompt, encoding_for
from tools import stack

LIMIT = 10_000
CHOICES = 4
GENERATED = 8_000
TOKEN_LATENCY_MS = {True: 60, False: 8}  # by output cap: every generation runs past 60 s either way
DEFAULT_CAP = 1_024
GATEWAYS = 4
CLIENTS_PER_GATEWAY = 4
MESSAGES = [{"role": "user", "content": "Write for as long as you can."}]


async def client(url: str, key: str, until: float, served: list[tuple[float, int]], outcomes: dict[str, int],
                 prompt: int) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "n": CHOICES}
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10)) as http:
        while time.time() < until:
            try:
                async with http.stream("POST", url + "/v1/chat/completions", json=body, headers={"api-key": key}) as r:
                    if r.status_code != 200:
                        await r.aread()
                        outcomes[str(r.status_code)] = outcomes.get(str(r.status_code), 0) + 1
                        wait_ms = float(r.headers.get("retry-after-ms") or 500)
                        await asyncio.sleep(min(wait_ms, 5_000) / 1000)
                        continue
                    outcomes["200"] = outcomes.get("200", 0) + 1
                    first = True
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        tokens = sum(1 for c in chunk.get("choices") or () if (c.get("delta") or {}).get("content"))
                        if first:
                            tokens += prompt
                            first = False
                        if tokens:
                            served.append((time.time(), tokens))
            except httpx.HTTPError as error:
                outcomes[type(error).__name__] = outcomes.get(type(error).__name__, 0) + 1
                await asyncio.sleep(0.5)


def run(cap: bool, seconds: float) -> dict[str, Any]:
    with bench_stack() as bench:
        bench.start_azurite()
        region = stack.Region("hostile", "westus", stack.free_port(), completion_tokens=GENERATED, chat_tpm=100_000_000)
        bench.start_simulator(region, latency_ms=20, token_latency_ms=TOKEN_LATENCY_MS[cap])
        extra = {"GATEWAY_INSTANCE_COUNT": str(GATEWAYS), "GATEWAY_OUTPUT_CAP": "true" if cap else "false"}
        gateways = [bench.start_gateway([region], extra, name=f"gateway-{i}") for i in range(GATEWAYS)]
        key = bench.consumer("hostile", tokens_per_minute=LIMIT)
        prompt = count_chat_prompt({"messages": MESSAGES}, encoding_for("gpt-4o-mini"))
        served: list[tuple[float, int]] = []
        outcomes: dict[str, int] = {}

        async def main() -> None:
            until = time.time() + seconds
            await asyncio.gather(*(client(g.url, key, until, served, outcomes, prompt)
                                   for g in gateways for _ in range(CLIENTS_PER_GATEWAY)))

        asyncio.run(main())
    worst = most_in_any_window(served)
    reserve = prompt + CHOICES * DEFAULT_CAP
    bound = LIMIT + (LIMIT // reserve) * CHOICES * (GENERATED - DEFAULT_CAP)
    return {
        "cap": cap, "seconds": seconds, "limit": LIMIT, "worst_60s": worst, "ratio": round(worst / LIMIT, 3),
        "served_total": sum(t for _, t in served), "outcomes": outcomes, "reservation": reserve,
        "stated_bound": LIMIT if cap else bound,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=200.0)
    parser.add_argument("--write", action="store_true", help="write the figures into docs/benchmarks.md")
    args = parser.parse_args()
    results = [run(True, args.seconds), run(False, args.seconds)]
    data = {"when": stamp(), "machine": machine(), "results": results}
    print(json.dumps(data, indent=2))
    save("hostile", data)
    if args.write:
        on, off = results
        rows = "\n".join(
            f"| {'on' if r['cap'] else 'off'} | {r['worst_60s']:,} | {r['ratio']:.3f} | {r['stated_bound']:,} | "
            f"{r['served_total']:,} | {', '.join(f'{k}: {v}' for k, v in sorted(r['outcomes'].items()))} |"
            for r in (on, off)
        )
        update_doc("hostile", f"""## The hostile mix (issue 13)

`.venv/bin/python -m bench.hostile --seconds {args.seconds:g} --write` ({data['when']}, {data['machine']}; other work
shared the 2 cores). One 10,000 TPM consumer on four gateway processes; 16 clients sending only streamed requests with
no `max_tokens` and `n`=4, each generation running {GENERATED:,} tokens per choice unless capped, every generation
longer than 60 s: with the cap, {DEFAULT_CAP:,} tokens at {TOKEN_LATENCY_MS[True]} ms a token; without it, {GENERATED:,}
at {TOKEN_LATENCY_MS[False]} ms. Tokens timed where the client receives them.

| output cap | most tokens served in any 60 s | / limit | bound | served in the run | answers |
|---|---|---|---|---|---|
{rows}

With the cap on, a request asking no cap is sent with `max_completion_tokens` = the reservation's default ({DEFAULT_CAP:,}),
so none can run past its reservation, and streams are charged as they deliver: target <= 1.02 x the limit. Without it
the worst case is the limit plus the overrun of every request in flight together; the window (charged as streams
deliver) admits only what fits beside each other, at most limit / reservation = {LIMIT // on['reservation']} of these
requests ({on['reservation']:,} tokens each), so the bound is {LIMIT:,} + {LIMIT // on['reservation']} x
{CHOICES} x ({GENERATED:,} - {DEFAULT_CAP:,}) = {off['stated_bound']:,} tokens. `tests/test_hostile_mix.py` checks both
statements on the real limiter with a fake clock.
""")


if __name__ == "__main__":
    main()
