"""Profile the gateway under load with py-spy and print the top functions by own time.

    .venv/bin/python -m bench.profile [--seconds 10] [--concurrency 64] [--stream] [--extra JSON]

Needs `py-spy` (pip install py-spy) and permission to read the gateway's memory (root, or ptrace allowed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from bench.harness import OUT, bench_stack, chat_body, load
from tools import stack
from tools.capture import Capture


def top_frames(raw: Path, limit: int) -> list[tuple[str, float, float]]:
    """(function, own %, inclusive %) from py-spy's collapsed-stack output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack_text.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return [(frame, 100 * n / total, 100 * inclusive[frame] / total) for frame, n in own.most_common(limit)]


def py_spy() -> str:
    """The py-spy installed beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else (shutil.which("py-spy") or "py-spy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--extra", default="{}")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--tpm", type=int, default=0, help="give the consumer a token limit (limiter on the path)")
    parser.add_argument("--metrics", action="store_true", help="export metrics and traces to a local capture endpoint")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    raw = OUT / "profile.collapsed"
    extra = json.loads(args.extra)
    capture = Capture() if args.metrics else None
    if capture is not None:
        extra["APPLICATIONINSIGHTS_CONNECTION_STRING"] = capture.connection_string
    with bench_stack() as bench:
        bench.start_azurite()
        region = stack.Region("sim", "uksouth", stack.free_port(), chat_tpm=10**9, embeddings_tpm=10**9)
        bench.start_simulator(region, latency_ms=50, token_latency_ms=5)
        gateway = bench.start_gateway([region], extra)
        key = bench.consumer("bench", tokens_per_minute=args.tpm)
        url = f"{gateway.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        spy = subprocess.Popen(
            [py_spy(), "record", "--pid", str(gateway.process.pid), "--duration", str(int(args.seconds)), "--rate", "500",
             "--format", "raw", "--output", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        result: dict[str, object] = {}
        runner = threading.Thread(target=lambda: result.update(load(
            url, chat_body(stream=args.stream), args.concurrency, args.seconds, headers={"api-key": key},
            stream=args.stream, measure_pid=gateway.process.pid, warmup=0.5)))
        runner.start()
        spy.wait(args.seconds + 60)
        runner.join()
    print(json.dumps({k: result.get(k) for k in ("rps", "latency_ms", "proxy_cpu_ms_per_request")}))
    print(f"{'own %':>6} {'incl %':>7}  function")
    for frame, own_pct, incl_pct in top_frames(raw, args.top):
        print(f"{own_pct:6.1f} {incl_pct:7.1f}  {frame[:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
