"""Large request bodies (issue 24): how long one stalls the event loop, and how much memory many take at once.

    .venv/bin/python -m bench.bodies [--json OUT] [--before BEFORE.json --write]

The real Gateway in-process (tests/fakes/gateway.py: in-memory stores, a scripted backend that answers at once, or
after WAIT_S for the memory run), called directly, no HTTP. A consumer with a limit, so admission bounds each prompt.

- stall: the longest event-loop stall (a 1 ms heartbeat) while one ~7.5 MiB body is handled, for three shapes: many
  small messages, one message of many small text parts, one long string; the worst of ROUNDS.
- memory: the process's peak resident memory (VmHWM, reset first) over its resident memory before, while CONCURRENT
  requests with ~4 MiB bodies of small messages are in flight at once (each held WAIT_S at the backend), with
  GATEWAY_BODY_MEMORY_MB=MEMORY_MB; and the wall time of the whole batch (what waiting for a share costs).

`--before` takes the JSON this same file wrote when run in a checkout of the code before the change (the figures to
compare with), and `--write` puts both in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from pathlib import Path
from typing import Any

import orjson

from bench.counting import Heartbeat
from bench.harness import machine, stamp, update_doc
from shared.edge.messages import GatewayRequest
from tests.fakes.gateway import GatewayHarness

ROUNDS = 3
CONCURRENT = 16
WAIT_S = 1.0
MEMORY_MB = 256
PATH = "/openai/deployments/gpt-4o/chat/completions"


def shapes(size: int) -> dict[str, dict[str, Any]]:
    """Bodies of about `size` bytes."""
    return {
        "small messages": {"messages": [{"role": "user", "content": "hi"}] * (size // 31)},
        "text parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}] * (size // 29)}]},
        "one long string": {"messages": [{"role": "user", "content": "word " * (size // 5)}]},
    }


def request(key: str, body: dict[str, Any], i: int) -> GatewayRequest:
    raw = orjson.dumps({**body, "max_tokens": 5, "user": f"bench-{i}"})
    return GatewayRequest("POST", PATH, {"api-version": "2024-10-21"},
                          {"api-key": key, "content-type": "application/json"}, raw, "127.0.0.1")


def harness() -> GatewayHarness:
    return GatewayHarness(env={"GATEWAY_MAX_BODY_BYTES": str(8 * 1024 * 1024), "GATEWAY_BODY_MEMORY_MB": str(MEMORY_MB)})


async def stalls() -> dict[str, dict[str, float]]:
    built = harness()
    try:
        key = built.consumer("big", tpm=1_000_000_000)
        gateway = await built.gateway()
        await gateway.handle(request(key, {"messages": [{"role": "user", "content": "warm up"}]}, 0))
        out = {}
        for name, body in shapes(int(7.5 * 1024 * 1024)).items():
            worst, walls, size = 0.0, [], 0
            for i in range(ROUNDS):
                prepared = request(key, body, i)  # serialising the body is the client's work, not measured
                size = len(prepared.body)
                beat = Heartbeat()
                beat.start()
                await asyncio.sleep(0.05)
                started = time.perf_counter()
                answer = await gateway.handle(prepared)
                walls.append((time.perf_counter() - started) * 1000)
                assert answer.status == 200, answer.body[:300]
                worst = max(worst, await beat.stop())
            out[name] = {"body_mib": round(size / 2**20, 2), "stall_ms": round(worst, 1),
                         "wall_ms": round(sorted(walls)[len(walls) // 2], 1)}
        return out
    finally:
        await built.close()


async def memory() -> dict[str, float]:
    built = harness()
    try:
        key = built.consumer("big", tpm=1_000_000_000)
        gateway = await built.gateway()
        send = built.upstream.send

        async def slow_send(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(WAIT_S)  # the backend takes its time: every admitted request is in flight at once
            return await send(*args, **kwargs)

        built.upstream.send = slow_send  # type: ignore[method-assign]
        body = shapes(4 * 1024 * 1024)["small messages"]
        prepared = [request(key, body, i) for i in range(CONCURRENT)]
        size = len(prepared[0].body)
        await gateway.handle(request(key, {"messages": [{"role": "user", "content": "warm up"}]}, 0))
        gc.collect()
        _reset_peak()
        base = _status_kib("VmRSS") * 1024
        started = time.perf_counter()
        answers = await asyncio.gather(*(gateway.handle(p) for p in prepared))
        wall = time.perf_counter() - started
        peak = _status_kib("VmHWM") * 1024
        assert all(a.status == 200 for a in answers), [a.status for a in answers]
        return {"body_mib": round(size / 2**20, 2), "concurrent": CONCURRENT, "peak_mib": round((peak - base) / 2**20, 1),
                "peak_per_body": round((peak - base) / size / CONCURRENT, 1), "wall_s": round(wall, 2)}
    finally:
        await built.close()


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current resident size


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


async def measure() -> dict[str, Any]:
    return {"memory": await memory(), "stall": await stalls()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--before", type=Path)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    data = {"when": stamp(), "machine": machine(), **asyncio.run(measure())}
    text = json.dumps(data, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    if args.write:
        before = json.loads(args.before.read_text()) if args.before else None
        rows = []
        for name, after in data["stall"].items():
            was = before["stall"][name] if before else None
            rows.append(f"| longest loop stall, one {after['body_mib']} MiB body of {name} | "
                        f"{was['stall_ms'] if was else '-'} ms | {after['stall_ms']} ms |")
            rows.append(f"| its time to the answer | {was['wall_ms'] if was else '-'} ms | {after['wall_ms']} ms |")
        m, mb = data["memory"], (before or {}).get("memory", {})
        rows.append(f"| peak memory, {m['concurrent']} concurrent {m['body_mib']} MiB bodies of small messages | "
                    f"{mb.get('peak_mib', '-')} MiB | {m['peak_mib']} MiB |")
        rows.append(f"| the same, over the {m['concurrent']} bodies' bytes | {mb.get('peak_per_body', '-')}x | {m['peak_per_body']}x |")
        rows.append(f"| the batch's wall time (each held {WAIT_S:g} s at the backend) | {mb.get('wall_s', '-')} s | {m['wall_s']} s |")
        table = "\n".join(rows)
        update_doc("bodies", f"""## Large bodies (issue 24)

`.venv/bin/python -m bench.bodies --before before.json --write` ({data['when']}, {data['machine']}; other helpers
shared the 2 cores). "Before" is the same file run in a checkout of the code before the change
({before['when'] if before else '-'}). The real Gateway in-process, called directly, in-memory stores, a scripted
backend; a consumer with a limit (admitted on the prompt's upper bound). Memory is the process's peak resident size
(VmHWM, reset before the batch) over its size before, with `GATEWAY_BODY_MEMORY_MB={MEMORY_MB}`; the stall rows are
the worst of {ROUNDS} rounds.

| | before | after |
|---|---|---|
{table}

Before, the prompt's lower and upper bounds and the shape check walked every message on the event loop (for 240,000
small messages, most of the 266 ms above; profiled, they were the largest steps on the loop). They now run in the
worker thread, with the parse, the capability check, the memory estimate and any re-serialising for a backend
(`test_bodies.py::test_every_walk_of_a_large_body_runs_in_the_worker_thread_not_on_the_event_loop`). What still
stalls the loop is one C call at a time in that thread holding the GIL: orjson parsing a body of hundreds of
thousands of objects (~100 ms for 7 MiB of small messages or text parts, which is why that row did not move; a long
string parses in a few ms). One C call cannot be split, and a process of its own would copy the body there and its
parse back. The extra hops to the worker thread cost the large request itself some time (its "time to the answer";
the machine was shared, so single runs vary by tens of percent). A parsed body takes 1x (one long string) to 24x (a
list of empty objects) its size (`test_bodies.py::test_the_estimate_is_never_below_what_the_parse_really_takes`); the
budget holds concurrent large bodies to its estimate (their bytes twice + 128 bytes per JSON value), so beyond it
they queue, first come first served (up to 30 s, then 503 `server_busy`): the batch takes about as long, the peak
stays near the budget.
""")


if __name__ == "__main__":
    main()
