"""Profile the gateway under load with py-spy: the top functions by own time, and CPU per request by phase.

    .venv/bin/python -m bench.profile [--seconds 10] [--concurrency 64] [--stream] [--tpm N] [--metrics] [--extra JSON]
        [--name NAME] [--passthrough]
    .venv/bin/python -m bench.profile --table bench/out/NAME.json ...   (saved runs' phases side by side)

Needs `py-spy` (pip install py-spy) and permission to read the gateway's memory (root, or ptrace allowed).

Phases: each sample (a stack of a thread on the CPU) goes to the phase of its innermost frame in the gateway's own
code (PHASES: by file), with whatever library code that frame called; a sample with no frame of the gateway's code is
the event loop, the HTTP server's protocol and the HTTP client's callbacks, which any Python proxy pays ("outside").
The shares times the CPU per request measured from /proc over the same load give CPU per request by phase.
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

from bench.harness import OUT, bench_stack, chat_body, load, machine, save, stamp
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


# (phase, path fragments): the first phase one of whose fragments is in a frame's file wins.
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("identity", ("shared/edge/consumers.py", "shared/edge/identity.py", "shared/edge/entra.py",
                  "shared/edge/keyguard.py")),
    ("check", ("shared/flow/checks.py", "shared/flow/jsonbody.py", "shared/flow/translate.py", "shared/flow/gates.py",
               "shared/flow/bodies.py", "shared/flow/cache.py", "shared/cache/", "shared/flow/safety.py",
               "shared/safety/", "shared/catalog.py")),
    ("admission", ("shared/flow/admission.py", "shared/limits/", "shared/flow/tokens.py", "shared/flow/exchange.py",
                   "shared/flow/end_users.py")),
    ("dispatch", ("shared/flow/failover.py", "shared/flow/upstream.py", "shared/routing/", "shared/flow/credentials.py",
                  "shared/flow/backend_api.py")),
    ("relay", ("shared/flow/relay.py", "shared/flow/usage.py", "shared/flow/sse.py", "shared/flow/responses.py")),
    ("books", ("shared/flow/settlement.py", "shared/flow/books.py", "shared/telemetry/usage_rows.py", "shared/storage/")),
    ("telemetry", ("shared/telemetry/", "opentelemetry/", "azure/monitor/")),
    ("edge", ("shared/", "tools/localhost.py", "function_app.py")),
)
# Library code any Python proxy runs (the aiohttp passthrough too): a sample whose innermost frame outside the standard
# library is one of these is theirs, whichever phase called it. Store calls (Azure SDK) are one row of their own.
STORE = "store round trips (Azure SDK, any phase)"
SERVER = "HTTP server (uvicorn, Starlette)"
CLIENT = "HTTP client (aiohttp)"
OUTSIDE = "event loop and the rest"
LIBRARIES = ((SERVER, ("uvicorn/", "starlette/", "httptools/")), (CLIENT, ("aiohttp/", "aiohappyeyeballs/", "yarl/",
                                                                              "multidict/")))
LOOP = "Runner.run (asyncio/runners.py"
IDLE_WAIT = "_worker (concurrent/futures/thread.py:81)"
STORE_FRAMES = ("core/pipeline/", "tables/aio/", "tables/_", "blob/aio/", "azure/core/", "azure/data/")


def phase_of(frames: list[str]) -> str:
    """The phase of one sample (see PHASES and LIBRARIES)."""
    if any(fragment in frame for frame in frames for fragment in STORE_FRAMES):
        return STORE
    for frame in reversed(frames):
        if LOOP in frame:
            break  # what lies beyond is how the process started the loop (uvicorn.run among it), not who is working
        for library, fragments in LIBRARIES:
            if any(fragment in frame for fragment in fragments):
                return library
        for phase, fragments in PHASES:
            if any(fragment in frame for fragment in fragments):
                return phase
    return OUTSIDE


def phase_shares(raw: Path) -> dict[str, float]:
    """Fraction of the samples in each phase (py-spy's raw output: "frame;frame;... count" per line)."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        frames = stack_text.split(";")
        if IDLE_WAIT in frames[-1]:
            continue  # a pool thread waiting for work, which py-spy does not always see as idle
        counts[phase_of(frames)] += int(count_text)
    total = sum(counts.values()) or 1
    return {phase: counts[phase] / total for phase in [p for p, _ in PHASES] + [SERVER, CLIENT, STORE, OUTSIDE]}


def phase_table(runs: list[tuple[str, dict[str, object]]]) -> str:
    """CPU per request by phase (ms, and % of the process's samples) of saved runs, side by side."""
    lines = ["| phase | " + " | ".join(name for name, _ in runs) + " |", "|---|" + "---|" * len(runs)]
    phases: list[str] = list(dict.fromkeys(p for _, run in runs for p in run["phases"]))  # type: ignore[attr-defined]
    for phase in phases:
        cells = []
        for _, run in runs:
            row = run["phases"].get(phase, {})  # type: ignore[attr-defined]
            cells.append(f"{row.get('cpu_ms_per_request', 0):.3f} ({100 * row.get('share', 0):.1f} %)")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    own = [sum(row["cpu_ms_per_request"] for p, row in run["phases"].items()  # type: ignore[attr-defined]
               if p in {name for name, _ in PHASES}) for _, run in runs]
    lines.append("| **the gateway's own code** | " + " | ".join(f"**{v:.3f}**" for v in own) + " |")
    lines.append("| **whole process (from /proc)** | " + " | ".join(
        f"**{run['load']['proxy_cpu_ms_per_request']}**" for _, run in runs) + " |")  # type: ignore[index]
    lines.append("| requests/s, p50 / p99 ms | " + " | ".join(
        f"{run['load']['rps']}, {run['load']['latency_ms']['p50']} / {run['load']['latency_ms']['p99']}"  # type: ignore[index]
        for _, run in runs) + " |")
    return "\n".join(lines)


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
    parser.add_argument("--name", default="profile", help="saved as bench/out/NAME.json")
    parser.add_argument("--passthrough", action="store_true", help="profile the aiohttp passthrough instead (the floor)")
    parser.add_argument("--table", nargs="+", type=Path, metavar="JSON",
                        help="print the phases of saved runs side by side (markdown) and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(phase_table([(path.stem, json.loads(path.read_text())) for path in args.table]))
        return 0
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
        if args.passthrough:
            # The floor for comparison: the aiohttp passthrough (bench/passthrough.py) under the same load.
            port = stack.free_port()
            argv = [stack.PYTHON, "-m", "bench.passthrough", "--port", str(port), "--backend",
                    f"http://127.0.0.1:{region.port}", "--client", "aiohttp"]
            gateway = stack._spawn("passthrough", argv, port, None, bench.log_dir, 30)
            bench.children.append(gateway)
            key = stack.SIM_API_KEY
        else:
            gateway = bench.start_gateway([region], extra)
            key = bench.consumer("bench", tokens_per_minute=args.tpm)
        url = f"{gateway.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        # Warm: the services are built, the tables created, the connections open before anything is sampled.
        load(url, chat_body(stream=args.stream), args.concurrency, 3, headers={"api-key": key}, stream=args.stream,
             warmup=0)
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
    cpu = result.get("proxy_cpu_ms_per_request")
    shares = phase_shares(raw)
    phases = {phase: {"share": round(share, 4), "cpu_ms_per_request": round(share * cpu, 4) if isinstance(cpu, float) else None}
              for phase, share in shares.items()}
    print(f"\n{'phase':<42} {'share %':>8} {'ms/request':>11}")
    for phase, row in phases.items():
        print(f"{phase:<42} {100 * row['share']:8.1f} {row['cpu_ms_per_request'] or 0:11.4f}")
    save(args.name, {"date": stamp(), "machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "table"},
                     "load": result, "phases": phases})
    return 0


if __name__ == "__main__":
    sys.exit(main())
