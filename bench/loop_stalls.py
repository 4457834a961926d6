"""How long the gateway's event loop is held by one step, under the hot path's load (issue 25: where the p99 comes from).

    .venv/bin/python -m bench.loop_stalls [--seconds 20] [--concurrency 64]

A step that holds the loop for milliseconds (a background sync parsing a large answer, a first request building
something) delays every request in flight at that moment, so a few of them a second move the p99 of a 64-client load
by about their length. This starts the hot path's stack (Azurite, a 50 ms simulated region, a consumer with a limit,
App Insights off), runs the gateway with every loop callback timed, puts the chat load on it, and prints how many steps
took how long and which ones took 1 ms or more (a task's coroutine and the line it was at), with the part of that time
the thread was on the CPU: a step much longer than its CPU time was the process waiting for a core (the load generator,
the simulated region and Azurite share the two), not the gateway's code holding the loop.

The callbacks are timed by wrapping `asyncio.events.Handle._run` in the gateway process (a `sitecustomize` on its
PYTHONPATH, written to a temporary folder), which only the standard event loop calls: the gateway runs on it here, not
on uvloop as it does otherwise (LOCALHOST_LOOP), so the step counts are the standard loop's; what holds the loop is
the gateway's own code either way. The wrapper costs about a microsecond a step, and the printed figures are what the
load saw with it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.compare import AZURE_PATH, body
from bench.harness import bench_stack, load
from tools import stack

# Bounds of the histogram's buckets, in seconds: a step is counted in the first bucket whose bound it is under.
BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)
SLOW_S = 0.001  # steps at least this long are named

HOOK = '''
import os
if os.environ.get("LOOP_STALLS_OUT"):
    import asyncio.events, collections, json, threading, time
    _out = os.environ["LOOP_STALLS_OUT"]
    _bounds = {bounds!r}
    _hist = [0] * (len(_bounds) + 1)
    _slow = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    _run = asyncio.events.Handle._run

    def _name(handle):
        owner = getattr(handle._callback, "__self__", None)
        if owner is not None and hasattr(owner, "get_coro"):
            coro = owner.get_coro()
            frame = getattr(coro, "cr_frame", None)
            where = f"{{frame.f_code.co_filename.rsplit('/', 1)[-1]}}:{{frame.f_lineno}}" if frame else "done"
            return f"task {{getattr(coro, '__qualname__', type(coro).__name__)}} @ {{where}}"
        return getattr(handle._callback, "__qualname__", repr(handle._callback))

    def _timed(self):
        started, cpu = time.perf_counter(), time.thread_time()
        _run(self)
        took = time.perf_counter() - started
        _hist[next((i for i, b in enumerate(_bounds) if took < b), len(_bounds))] += 1
        if took >= {slow!r}:
            entry = _slow[_name(self)]
            entry[0] += 1
            entry[1] += took
            entry[2] = max(entry[2], took)
            entry[3] += time.thread_time() - cpu

    asyncio.events.Handle._run = _timed

    def _dump():
        while True:
            time.sleep(0.2)
            if os.path.exists(_out + ".reset"):  # what came before (start-up, warm-up) is left out
                _hist[:] = [0] * len(_hist)
                _slow.clear()
                os.remove(_out + ".reset")
                continue
            with open(_out + ".tmp", "w") as f:
                json.dump({{"histogram": _hist, "slow": dict(_slow)}}, f)
            os.replace(_out + ".tmp", _out)

    threading.Thread(target=_dump, daemon=True).start()
'''


def measure(seconds: float, concurrency: int) -> dict[str, Any]:
    with bench_stack() as bench, tempfile.TemporaryDirectory() as folder:
        Path(folder, "sitecustomize.py").write_text(HOOK.format(bounds=BUCKETS_S, slow=SLOW_S))
        out = Path(folder, "stalls.json")
        bench.start_azurite()
        region = stack.Region("sim", "uksouth", stack.free_port(), chat_tpm=10**9, embeddings_tpm=10**9)
        bench.start_simulator(region, latency_ms=50, token_latency_ms=5)
        key = bench.consumer("bench", tokens_per_minute=2_000_000_000)
        env = {"APPLICATIONINSIGHTS_CONNECTION_STRING": "", "LOCALHOST_LOOP": "asyncio", "PYTHONPATH": folder,
               "LOOP_STALLS_OUT": str(out)}
        gateway = bench.start_gateway([region], env)
        url = gateway.url + AZURE_PATH.format(deployment="gpt-4o", operation="chat/completions")
        payload, headers = body("chat", "azure"), {"api-key": key}
        load(url, payload, concurrency, 1.0, headers=headers, warmup=0)  # warm: start-up's steps are not counted
        reset = Path(f"{out}.reset")
        reset.touch()
        deadline = time.monotonic() + 10
        while reset.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        result = load(url, payload, concurrency, seconds, headers=headers, warmup=0)
        time.sleep(0.6)  # the next dump holds the whole load (and a moment of idling after it)
        figures = json.loads(out.read_text())
    return {"load": {k: v for k, v in result.items() if not isinstance(v, (dict, list))}, **figures}


def report(figures: dict[str, Any]) -> str:
    load_figures, histogram = figures["load"], figures["histogram"]
    steps = sum(histogram)
    labels = [f"< {b * 1000:g} ms" for b in BUCKETS_S] + [f">= {BUCKETS_S[-1] * 1000:g} ms"]
    lines = [f"load: {load_figures.get('requests')} requests in {load_figures.get('seconds')} s "
             f"({load_figures.get('rps')} req/s), {steps} loop steps ({steps / max(1, load_figures.get('requests', 1)):.1f} "
             "a request)", "", "| step took | steps |", "|---|---|"]
    lines += [f"| {label} | {count} |" for label, count in zip(labels, histogram, strict=True)]
    lines += ["", "| steps >= 1 ms | total ms | of which on the CPU | longest ms | what |", "|---|---|---|---|---|"]
    for name, (count, total, longest, cpu) in sorted(figures["slow"].items(), key=lambda kv: -kv[1][1])[:25]:
        lines.append(f"| {int(count)} | {total * 1000:.1f} | {cpu * 1000:.1f} | {longest * 1000:.1f} | `{name}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    print(report(measure(args.seconds, args.concurrency)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
