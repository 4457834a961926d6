"""The gateway side by side with a direct call, a bare Python passthrough and LiteLLM's proxy (issue: performance).

    .venv/bin/python -m bench.compare [--seconds 6] [--rounds 2] [--no-litellm] [--write]
    .venv/bin/python -m bench.compare --hot [--seconds 8] [--rounds 3] [--baseline DIR] [--write]

`--hot`: the hot path's measurement (issue 25), the gateway against the aiohttp passthrough only: a consumer with a
token limit, App Insights off; non-streaming chat at 64 clients (wrk: CPU per request, p99), streams at 1 and 16
clients (time to first byte); RSS after start and the first request's latency. `--baseline DIR`: another checkout of
the gateway (an earlier commit, e.g. from `git archive`) runs beside it in the same run, as "gateway-baseline".
`--unlimited`: the same gateway process is also called as a consumer without any limit ("gateway-unlimited": no lease,
no reservation, no x-ratelimit headers), which tells the limiter's share of the gateway's CPU and tail from the rest.

One simulated backend (50 ms; streams of 20 tokens 5 ms apart); every configuration forwards to it:
- direct: the load generator straight to the backend (the floor);
- passthrough: a minimal streaming proxy on one shared httpx.AsyncClient (bench/passthrough.py), and the same on aiohttp;
- gateway: ours, one worker, with consumer auth, token limits on Azurite, routing and metrics + traces exported to a
  local App Insights capture endpoint;
- litellm: LiteLLM's proxy from PyPI in its own virtualenv (bench/.venv-litellm, created on first use), one worker,
  no database, telemetry and cost-map download off.
Workloads: non-streaming chat (~200 prompt tokens), streaming chat, embeddings; at 1, 16 and 64 concurrent clients.
Configurations are measured interleaved (direct, passthrough, gateway, litellm, then again), `--rounds` times, and
the medians kept. Also: start to first response, CPU of a 1,000-chunk stream, memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.harness import ROOT, Bench, bench_stack, load, machine, save, stamp, update_doc
from bench.procs import tree, tree_cpu_seconds, tree_rss_mb
from tools import stack
from tools.capture import Capture

LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
PROMPT = " ".join(["The gateway counts every token of every consumer, exactly, across regions."] * 14)
EMBED_INPUT = "The quick brown fox jumps over the lazy dog near the river bank, where people live happy lives." * 2
AZURE_PATH = "/openai/deployments/{deployment}/{operation}?api-version=2024-10-21"


@dataclass
class Config:
    name: str
    base: str
    style: str  # "azure": Azure paths, api-key; "openai": /v1 paths, bearer
    key: str
    pid: int | None

    def url(self, operation: str, deployment: str) -> str:
        if self.style == "azure":
            return self.base + AZURE_PATH.format(deployment=deployment, operation=operation)
        return f"{self.base}/v1/{operation}"

    def headers(self) -> dict[str, str]:
        return {"api-key": self.key} if self.style == "azure" else {"authorization": f"Bearer {self.key}"}


def body(workload: str, style: str) -> bytes:
    if workload == "embeddings":
        payload: dict[str, Any] = {"input": EMBED_INPUT, "model": "text-embedding-3-small"}
    else:
        payload = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 20, "model": "gpt-4o"}
        if workload == "stream":
            payload["stream"] = True
    if style == "azure":
        payload.pop("model")
    return json.dumps(payload).encode()


def pause_others(configs: list[Config], running: Config) -> None:
    """Stop every other proxy (SIGSTOP) while one is measured, so idle background work of the others (LiteLLM's
    especially) does not take CPU from it on this 2-core machine; the direct floor runs with all of them stopped."""
    for config in configs:
        if config.pid:
            for member in tree(config.pid):
                try:
                    # Two configurations may be one process called two ways (--unlimited): the running one's stays up.
                    os.kill(member, signal.SIGCONT if config.pid == running.pid else signal.SIGSTOP)
                except ProcessLookupError:
                    pass
    time.sleep(0.2)


def measure(config: Config, workload: str, concurrency: int, seconds: float) -> dict[str, Any]:
    operation = "embeddings" if workload == "embeddings" else "chat/completions"
    deployment = "text-embedding-3-small" if workload == "embeddings" else "gpt-4o"
    url, payload, stream = config.url(operation, deployment), body(workload, config.style), workload == "stream"
    load(url, payload, concurrency, 1.0, headers=config.headers(), stream=stream, warmup=0)  # warm up
    cpu = tree_cpu_seconds(config.pid) if config.pid else 0.0
    result = load(url, payload, concurrency, seconds, headers=config.headers(), stream=stream, warmup=0)
    if config.pid:
        result["cpu_ms_per_request"] = round((tree_cpu_seconds(config.pid) - cpu) * 1000 / max(1, result["requests"]), 3)
        result["rss_mb"] = round(tree_rss_mb(config.pid), 1)
    return result


def interleaved(configs: list[Config], workload: str, concurrency: int, rounds_n: int, seconds: float) -> list[dict[str, Any]]:
    """Measure every configuration at one point, rounds interleaved (order reversed every other round, the others
    paused), and state each against the direct call measured in the same rounds."""
    rounds: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
    for round_ in range(rounds_n):
        order = configs if round_ % 2 == 0 else list(reversed(configs))
        for config in order:
            pause_others(configs, config)
            rounds[config.name].append(measure(config, workload, concurrency, seconds))
    direct = merge(rounds["direct"], workload)
    points = []
    for config in configs:
        point = merge(rounds[config.name], workload)
        point.update({"config": config.name, "workload": workload, "concurrency": concurrency})
        # Each round's p99, in round order: configurations measured in the same round ran seconds apart, so
        # their differences round by round are what the machine's drift disturbs least (hot_goals pairs them).
        point["p99_rounds_ms"] = [run.get("latency_ms", {}).get("p99") for run in rounds[config.name]]
        point["added_p50_ms"] = round(point["p50_ms"] - direct["p50_ms"], 3)
        point["added_p99_ms"] = round(point["p99_ms"] - direct["p99_ms"], 3)
        point["throughput_vs_direct"] = round(point["rps"] / max(direct["rps"], 1e-9), 3)
        if workload == "stream":
            point["added_ttfb_p50_ms"] = round(point["ttfb_p50_ms"] - direct["ttfb_p50_ms"], 3)
        points.append(point)
    return points


def ensure_litellm() -> Path:
    binary = LITELLM_VENV / "bin" / "litellm"
    if not binary.exists():
        print("installing LiteLLM into bench/.venv-litellm (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return binary


def start_litellm(bench: Bench, backend: str, log_dir: Path) -> tuple[stack.Child, float]:
    config = log_dir / "litellm.yaml"
    models = "\n".join(
        f"  - model_name: {name}\n    litellm_params:\n      model: azure/{name}\n      api_base: {backend}\n"
        f"      api_key: {stack.SIM_API_KEY}\n      api_version: \"2024-10-21\""
        for name in ("gpt-4o", "text-embedding-3-small")
    )
    config.write_text(f"model_list:\n{models}\ngeneral_settings:\n  master_key: sk-bench\nlitellm_settings:\n  telemetry: false\n")
    port = stack.free_port()
    env = {"LITELLM_TELEMETRY": "False", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_DOCS": "True",
           "DISABLE_SCHEMA_UPDATE": "True", "LITELLM_LOG": "ERROR"}
    argv = [str(ensure_litellm()), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    started = time.monotonic()
    child = stack._spawn("litellm", argv, port, env, log_dir, 120)
    bench.children.append(child)
    first_response_s = wait_first_response(f"http://127.0.0.1:{port}/v1/chat/completions",
                                           {"authorization": "Bearer sk-bench"}, body("chat", "openai"), started)
    return child, first_response_s


def start_passthrough(bench: Bench, backend: str, kind: str, log_dir: Path) -> stack.Child:
    port = stack.free_port()
    argv = [stack.PYTHON, "-m", "bench.passthrough", "--port", str(port), "--backend", backend, "--client", kind]
    child = stack._spawn(f"passthrough-{kind}", argv, port, None, log_dir, 30)
    bench.children.append(child)
    return child


def wait_first_response(url: str, headers: dict[str, str], payload: bytes, started: float, timeout_s: float = 120) -> float:
    with httpx.Client(timeout=10) as client:
        while time.monotonic() - started < timeout_s:
            try:
                if client.post(url, content=payload, headers={**headers, "content-type": "application/json"}).status_code == 200:
                    return round(time.monotonic() - started, 3)
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
    raise TimeoutError(url)


def stream_cpu(config: Config, chunks: int, spacing_ms: float, backend: str) -> float:
    """CPU ms a stream of `chunks` tokens costs the proxy beyond a non-streaming request (from the simulator at
    `backend`, whose token latency is set to `spacing_ms`)."""
    httpx.post(f"{backend}/_sim/latency", json={"latency_ms": 5, "token_latency_ms": spacing_ms})
    try:
        url = config.url("chat/completions", "gpt-4o")
        headers = {**config.headers(), "content-type": "application/json"}

        def cost(stream: bool, count: int) -> float:
            payload = json.loads(body("stream" if stream else "chat", config.style))
            payload["max_tokens"] = chunks
            with httpx.Client(timeout=120) as client:
                client.post(url, json=payload, headers=headers).read()
                before = tree_cpu_seconds(config.pid) if config.pid else 0.0
                for _ in range(count):
                    with client.stream("POST", url, json=payload, headers=headers) as response:
                        for _ in response.iter_bytes():
                            pass
                return (tree_cpu_seconds(config.pid) - before) * 1000 / count if config.pid else 0.0

        return round(cost(True, 10) - cost(False, 10), 2)
    finally:
        httpx.post(f"{backend}/_sim/latency", json={"latency_ms": 50, "token_latency_ms": 5})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, action="append")
    parser.add_argument("--workload", action="append", choices=("chat", "stream", "embeddings"))
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--hot", action="store_true", help="the hot path's measurement (see above)")
    parser.add_argument("--baseline", type=Path, help="with --hot: a checkout of an earlier gateway to run beside it")
    parser.add_argument("--unlimited", action="store_true",
                        help="with --hot: also call the gateway as a consumer without limits (the limiter's share)")
    args = parser.parse_args(argv)
    if args.hot:
        return hot(args)
    concurrencies = args.concurrency or [1, 16, 64]
    workloads = args.workload or ["chat", "stream", "embeddings"]
    results: dict[str, Any] = {"machine": machine(), "date": stamp(), "seconds": args.seconds, "rounds": args.rounds,
                               "points": [], "extras": {}}
    capture = Capture()
    with bench_stack() as bench, tempfile.TemporaryDirectory() as folder:
        log_dir = Path(folder)
        bench.start_azurite()
        # Completions are as long as max_tokens asks, up to 1,000 (the long-stream measurement).
        region = stack.Region("sim", "uksouth", stack.free_port(), chat_tpm=10**9, embeddings_tpm=10**9, completion_tokens=1000)
        bench.start_simulator(region, latency_ms=50, token_latency_ms=5)
        backend = f"http://127.0.0.1:{region.port}"
        key = bench.consumer("bench", tokens_per_minute=10**9)
        started = time.monotonic()
        gateway = bench.start_gateway([region], {"APPLICATIONINSIGHTS_CONNECTION_STRING": capture.connection_string})
        results["extras"]["gateway_first_response_s"] = wait_first_response(
            gateway.url + AZURE_PATH.format(deployment="gpt-4o", operation="chat/completions"), {"api-key": key},
            body("chat", "azure"), started)
        configs = [Config("direct", backend, "azure", stack.SIM_API_KEY, None)]
        for kind in ("httpx", "aiohttp"):
            child = start_passthrough(bench, backend, kind, log_dir)
            configs.append(Config(f"passthrough-{kind}", child.url, "azure", stack.SIM_API_KEY, child.process.pid))
        configs.append(Config("gateway", gateway.url, "azure", key, gateway.process.pid))
        if not args.no_litellm:
            litellm, first = start_litellm(bench, backend, log_dir)
            results["extras"]["litellm_first_response_s"] = first
            configs.append(Config("litellm", litellm.url, "openai", "sk-bench", litellm.process.pid))

        for workload in workloads:
            for concurrency in concurrencies:
                for point in interleaved(configs, workload, concurrency, args.rounds, args.seconds):
                    results["points"].append(point)
                    print(json.dumps(point), flush=True)

        for config in configs:
            if config.pid:
                pause_others(configs, config)
                results["extras"].setdefault("stream_1000_cpu_ms", {})[config.name] = {
                    "spaced_1ms": stream_cpu(config, 1000, 1, backend),
                    "back_to_back": stream_cpu(config, 1000, 0, backend),
                }
                results["extras"].setdefault("rss_mb", {})[config.name] = round(tree_rss_mb(config.pid), 1)
        print(json.dumps(results["extras"]), flush=True)
        for config in configs:  # wake everyone before the stack is stopped
            if config.pid:
                for member in tree(config.pid):
                    try:
                        os.kill(member, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
    capture.stop()
    save("compare", results)
    if args.write:
        plot(results, ROOT / "docs" / "compare.png")
        update_doc("compare", markdown(results))
    return 0


HOT_POINTS = (("chat", 64), ("stream", 1), ("stream", 16))


def hot(args: argparse.Namespace) -> int:
    """The gateway against the aiohttp passthrough and a direct call, interleaved in one run (bench --hot)."""
    points = [(w, c) for w, c in HOT_POINTS if (not args.workload or w in args.workload)
              and (not args.concurrency or c in args.concurrency)]
    results: dict[str, Any] = {"machine": machine(), "date": stamp(), "seconds": args.seconds, "rounds": args.rounds,
                               "points": [], "extras": {}, "load_average": os.getloadavg()[0], "measured": points,
                               "baseline": str(args.baseline) if args.baseline else None, "unlimited": args.unlimited}
    extras = results["extras"]
    with bench_stack() as bench, tempfile.TemporaryDirectory() as folder:
        log_dir = Path(folder)
        bench.start_azurite()
        region = stack.Region("sim", "uksouth", stack.free_port(), chat_tpm=10**9, embeddings_tpm=10**9)
        bench.start_simulator(region, latency_ms=50, token_latency_ms=5)
        backend = f"http://127.0.0.1:{region.port}"
        # A limited consumer (its limit far above what the load asks): the limiter is on the path, no 429s.
        key = bench.consumer("bench", tokens_per_minute=2_000_000_000)
        free_key = bench.consumer("bench-unlimited") if args.unlimited else None
        env = {"APPLICATIONINSIGHTS_CONNECTION_STRING": ""}
        chat_path = AZURE_PATH.format(deployment="gpt-4o", operation="chat/completions")
        started = time.monotonic()
        gateway = bench.start_gateway([region], env)
        extras["gateway_listening_s"] = round(time.monotonic() - started, 3)
        pid = gateway.process.pid
        time.sleep(1.0)  # listening: whatever start-up still does settles
        extras["gateway_rss_after_start_mb"] = round(tree_rss_mb(pid), 1)
        extras.update(first_requests(gateway.url + chat_path, {"api-key": key}, body("chat", "azure")))
        extras["gateway_rss_after_first_requests_mb"] = round(tree_rss_mb(pid), 1)
        baseline: stack.Child | None = None
        if args.baseline is not None:
            baseline = start_baseline(bench, args.baseline, stack.gateway_env(stack.backends_setting([region]),
                                                                              bench.table_port, env), log_dir)
            time.sleep(1.0)
            extras["baseline_rss_after_start_mb"] = round(tree_rss_mb(baseline.process.pid), 1)
            first = first_requests(baseline.url + chat_path, {"api-key": key}, body("chat", "azure"))
            extras.update({k.replace("gateway_", "baseline_"): v for k, v in first.items()})
            extras["baseline_commit"] = args.baseline.name
        passthrough = start_passthrough(bench, backend, "aiohttp", log_dir)
        time.sleep(1.0)
        extras["passthrough_rss_after_start_mb"] = round(tree_rss_mb(passthrough.process.pid), 1)
        configs = [Config("direct", backend, "azure", stack.SIM_API_KEY, None),
                   Config("passthrough-aiohttp", passthrough.url, "azure", stack.SIM_API_KEY, passthrough.process.pid),
                   Config("gateway", gateway.url, "azure", key, pid)]
        if free_key is not None:
            configs.append(Config("gateway-unlimited", gateway.url, "azure", free_key, pid))
        if baseline is not None:
            configs.append(Config("gateway-baseline", baseline.url, "azure", key, baseline.process.pid))
        for workload, concurrency in points:
            for point in interleaved(configs, workload, concurrency, args.rounds, args.seconds):
                results["points"].append(point)
                print(json.dumps(point), flush=True)
        for config in configs:
            if config.pid:
                extras.setdefault("rss_after_run_mb", {})[config.name] = round(tree_rss_mb(config.pid), 1)
                for member in tree(config.pid):  # wake everyone before the stack is stopped
                    try:
                        os.kill(member, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
        print(json.dumps(extras), flush=True)
    results["goals"] = hot_goals(results)
    print(json.dumps(results["goals"], indent=1), flush=True)
    save("compare_hot", results)
    if args.write:
        # Only some of the points (e.g. `--workload chat --concurrency 64 --rounds 25`, the p99 goal over many rounds):
        # a section of their own, so that the full run's section keeps the goals this run did not measure.
        whole = set(points) == set(HOT_POINTS)
        update_doc("hot" if whole else "hot-" + "-".join(f"{w}{c}" for w, c in points), hot_markdown(results))
    return 0


def start_baseline(bench: Bench, root: Path, env: dict[str, str], log_dir: Path) -> stack.Child:
    """The gateway of another checkout (`root`), started as stack.start_gateway starts ours."""
    port = stack.free_port()
    empty = Path(tempfile.gettempdir()) / "gateway-empty-settings.json"
    empty.write_text('{"Values": {}}')
    argv = [stack.PYTHON, "-m", "tools.localhost", "--host", stack.LOOPBACK, "--port", str(port), "--settings", str(empty)]
    with open(log_dir / "baseline.log", "wb") as log:
        process = subprocess.Popen(argv, cwd=root, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    child = stack.Child("baseline", process, port, log_dir / "baseline.log")
    bench.children.append(child)
    stack.wait_port(port, 60, process)
    return child


def first_requests(url: str, headers: dict[str, str], payload: bytes, count: int = 20) -> dict[str, float]:
    """The first request's latency after start against the median of the next ones (one client, sequential): what
    start-up left for the first request to do (building the services, loading anything lazily)."""
    times = []
    with httpx.Client(timeout=30) as client:
        for _ in range(count + 1):
            begin = time.perf_counter()
            response = client.post(url, content=payload, headers={**headers, "content-type": "application/json"})
            times.append((time.perf_counter() - begin) * 1000)
            response.raise_for_status()
    return {"gateway_first_request_ms": round(times[0], 2), "gateway_next_requests_p50_ms": round(statistics.median(times[1:]), 2)}


def paired_differences(values: list[Any], floor: list[Any]) -> list[float]:
    """`values` minus `floor`, round by round (rounds where either has no figure are left out)."""
    return [round(v - f, 2) for v, f in zip(values, floor, strict=False)
            if isinstance(v, (int, float)) and isinstance(f, (int, float))]


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free interval for the median of `values` (the sign test's): the k-th smallest and k-th largest,
    k the largest for which the chance that the median lies outside is at most 1 - `confidence`. None when there are
    too few values for any such k (5 or fewer at 95 %)."""
    ordered = sorted(values)
    n = len(ordered)
    k = 0  # values below the interval's lower end: P(Binomial(n, 1/2) <= k - 1) * 2 must stay within 1 - confidence
    tail = 0.0
    while k < n // 2:
        tail += math.comb(n, k) / 2**n
        if 2 * tail > 1 - confidence:
            break
        k += 1
    if k == 0:
        return None
    return ordered[k - 1], ordered[n - k]


def hot_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, each as (measured, target, met), for the gateway and (in brackets) the baseline if one ran."""
    rows = {(p["config"], p["workload"], p["concurrency"]): p for p in results["points"]}
    extras = results["extras"]
    names = ["gateway"] + (["gateway-baseline"] if any(p["config"] == "gateway-baseline" for p in results["points"]) else [])
    goals: list[dict[str, Any]] = []

    def goal(label: str, target: str, measure: Any) -> None:
        found = [measure(name) for name in names]
        if found[0] is None:
            return
        text, met = found[0]
        if len(found) > 1 and found[1] is not None:
            text += f" (baseline: {found[1][0]})"
        goals.append({"goal": label, "target": target, "measured": text, "met": met})

    def cpu(name: str) -> tuple[str, bool] | None:
        gw, pt = rows.get((name, "chat", 64)), rows.get(("passthrough-aiohttp", "chat", 64))
        if not gw or not pt:
            return None
        ratio = round(gw["cpu_ms_per_request"] / pt["cpu_ms_per_request"], 2)
        return f"{gw['cpu_ms_per_request']} / {pt['cpu_ms_per_request']} ms = {ratio}", ratio <= 1.8

    def p99(name: str) -> tuple[str, bool] | None:
        gw, pt = rows.get((name, "chat", 64)), rows.get(("passthrough-aiohttp", "chat", 64))
        if not gw or not pt:
            return None
        extra = round(gw["p99_ms"] - pt["p99_ms"], 2)
        text = f"{gw['p99_ms']} vs {pt['p99_ms']} ms: {extra:+}"
        paired = paired_differences(gw.get("p99_rounds_ms", []), pt.get("p99_rounds_ms", []))
        if not paired:
            return text, extra <= 3
        middle = round(statistics.median(paired), 2)
        interval = median_interval(paired)
        within = f", 95 % interval {interval[0]:+} to {interval[1]:+}" if interval else ""
        text += f"; round by round {middle:+} (median{within}; rounds {', '.join(f'{d:+}' for d in paired)})"
        return text, extra <= 3 and middle <= 3  # met only when both say so

    def ttfb(clients: int) -> Any:
        def measure(name: str) -> tuple[str, bool] | None:
            gw, pt = rows.get((name, "stream", clients)), rows.get(("passthrough-aiohttp", "stream", clients))
            if not gw or not pt:
                return None
            extra = round(gw["ttfb_p50_ms"] - pt["ttfb_p50_ms"], 3)
            return f"{gw['ttfb_p50_ms']} vs {pt['ttfb_p50_ms']} ms: {extra:+}", extra <= 0.5
        return measure

    def rss(name: str) -> tuple[str, bool] | None:
        prefix = "gateway" if name == "gateway" else "baseline"
        value = extras.get(f"{prefix}_rss_after_start_mb")
        if value is None:
            return None
        return f"{value} MB", value <= 100

    goal("CPU per request (chat, 64 clients) / passthrough's", "<= 1.8 (then 1.5)", cpu)
    goal("p99 (chat, 64 clients) beyond the passthrough's", "<= 3 ms", p99)
    for clients in (1, 16):
        goal(f"stream TTFB p50 beyond the passthrough's, {clients} client(s)", "<= 0.5 ms", ttfb(clients))
    goal("RSS after start, keys only", "<= 100 MB", rss)
    if goals and goals[-1]["goal"].startswith("RSS"):
        goals[-1]["measured"] += (f"; gateway after the first requests {extras.get('gateway_rss_after_first_requests_mb')}, "
                                  f"after the run {extras.get('rss_after_run_mb', {}).get('gateway')}; passthrough "
                                  f"{extras.get('passthrough_rss_after_start_mb')}")
    return goals


def limiter_share(points: list[dict[str, Any]]) -> str:
    """What the limiter costs at 64 clients: the gateway called by a limited consumer against the same process called by
    an unlimited one (--unlimited), CPU per request and p99 (medians, and round by round); '' without that row."""
    rows = {(p["config"], p["workload"], p["concurrency"]): p for p in points}
    limited, free = rows.get(("gateway", "chat", 64)), rows.get(("gateway-unlimited", "chat", 64))
    if not limited or not free:
        return ""
    paired = paired_differences(limited.get("p99_rounds_ms", []), free.get("p99_rounds_ms", []))
    rounds = (f"; round by round {statistics.median(paired):+.2f} (rounds {', '.join(f'{d:+}' for d in paired)})"
              if paired else "")
    return (f"The limiter's share (chat, 64 clients; the same process called by a consumer without limits): CPU per "
            f"request {limited['cpu_ms_per_request']} against {free['cpu_ms_per_request']} ms "
            f"({limited['cpu_ms_per_request'] - free['cpu_ms_per_request']:+.3f}), p99 {limited['p99_ms']} against "
            f"{free['p99_ms']} ms ({limited['p99_ms'] - free['p99_ms']:+.2f}{rounds}).")


def hot_markdown(results: dict[str, Any]) -> str:
    extras = results["extras"]
    measured = [tuple(p) for p in results.get("measured", HOT_POINTS)]
    subset = "" if set(measured) == set(HOT_POINTS) else "".join(
        f" --workload {w}" for w in dict.fromkeys(w for w, _ in measured)) + "".join(
        f" --concurrency {c}" for c in dict.fromkeys(c for _, c in measured))
    title = "the gateway against the aiohttp passthrough" if not subset else (
        "only " + ", ".join(f"{w} at {c} clients" for w, c in measured) + ", over more rounds")
    lines = [
        f"## The hot path: {title} (issue 25)",
        "",
        f"`.venv/bin/python -m bench.compare --hot{subset} --seconds {results['seconds']:g} --rounds {results['rounds']}"
        f"{' --baseline ' + results['baseline'] if results.get('baseline') else ''}"
        f"{' --unlimited' if results.get('unlimited') else ''} --write` — "
        f"{results['date']}, {results['machine']}; load average {results['load_average']:.2f} at the start.",
        "One 50 ms simulated backend (streams: 20 tokens 5 ms apart); the gateway with one consumer that has a token "
        "limit (far above the load: the limiter is on the path, nothing refused), Azurite, App Insights off; the bare "
        "aiohttp passthrough (bench/passthrough.py) beside it. Configurations interleaved, medians of the rounds (the "
        "p99 goal also round by round: each round's p99 less the passthrough's of the same round, and met only when "
        "both the medians' difference and the median of those are within it); the "
        "one not measured is stopped (SIGSTOP). wrk (one thread) drives chat, the Python generator streams. CPU per "
        "request is the process's own (utime + stime from /proc) over the measured requests.",
        "",
        "| goal | target | measured | met |",
        "|---|---|---|---|",
    ]
    for goal in results["goals"]:
        lines.append(f"| {goal['goal']} | {goal['target']} | {goal['measured']} | {'yes' if goal['met'] else '**no**'} |")
    lines += ["", "| workload | clients | config | req/s | p50 ms | p99 ms | added p99 | TTFB p50 ms | CPU ms/req | errors |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for p in results["points"]:
        lines.append(f"| {p['workload']} | {p['concurrency']} | {p['config']} | {p['rps']} | {p['p50_ms']} | {p['p99_ms']} | "
                     f"{p['added_p99_ms']} | {p.get('ttfb_p50_ms', '')} | {p['cpu_ms_per_request']} | {p['errors']} |")
    lines += ["", f"Listening {extras.get('gateway_listening_s')} s after the process started. First request after "
              f"start: {extras.get('gateway_first_request_ms')} ms (the next ones' p50 "
              f"{extras.get('gateway_next_requests_p50_ms')} ms, one client, sequential)."]
    share = limiter_share(results["points"])
    if share:
        lines.append(share)
    if "baseline_commit" in extras:
        lines.append(f"Baseline ({extras['baseline_commit']}): RSS after start {extras.get('baseline_rss_after_start_mb')} "
                     f"MB, first request {extras.get('baseline_first_request_ms')} ms (next ones' p50 "
                     f"{extras.get('baseline_next_requests_p50_ms')} ms).")
    return "\n".join(lines)


def merge(runs: list[dict[str, Any]], workload: str) -> dict[str, Any]:
    key = "latency_ms"

    def median(path: tuple[str, ...]) -> float:
        values = []
        for run in runs:
            value: Any = run
            for part in path:
                value = value.get(part, {}) if isinstance(value, dict) else None
            if isinstance(value, (int, float)):
                values.append(value)
        return round(statistics.median(values), 3) if values else float("nan")

    point = {
        "rps": median(("rps",)),
        "p50_ms": median((key, "p50")),
        "p95_ms": median((key, "p95")),
        "p99_ms": median((key, "p99")),
        "cpu_ms_per_request": median(("cpu_ms_per_request",)),
        "rss_mb": max((r.get("rss_mb", 0) for r in runs), default=0),
        "errors": sum(r["requests"] - r["ok"] for r in runs),
    }
    if workload == "stream":
        point["ttfb_p50_ms"] = median(("ttfb_ms", "p50"))
        point["ttfb_p99_ms"] = median(("ttfb_ms", "p99"))
    return point


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in results["points"] if p["concurrency"] == max(q["concurrency"] for q in results["points"])]
    configs = [c for c in dict.fromkeys(p["config"] for p in points) if c != "direct"]
    workloads = list(dict.fromkeys(p["workload"] for p in points))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    width = 0.8 / max(1, len(workloads))
    for index, workload in enumerate(workloads):
        rows = {p["config"]: p for p in points if p["workload"] == workload}
        xs = [i + index * width for i in range(len(configs))]
        axes[0].bar(xs, [rows[c]["added_p50_ms"] for c in configs], width, label=workload)
        axes[1].bar(xs, [rows[c]["cpu_ms_per_request"] for c in configs], width, label=workload)
        axes[2].bar(xs, [rows[c]["throughput_vs_direct"] for c in configs], width, label=workload)
    for axis, title in zip(axes, ("added p50 latency (ms)", "proxy CPU per request (ms)", "throughput / direct"), strict=True):
        axis.set_xticks([i + width * (len(workloads) - 1) / 2 for i in range(len(configs))], configs, rotation=15, fontsize=8)
        axis.set_title(title)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{max(p['concurrency'] for p in points)} concurrent clients, 50 ms backend — {results['date']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "## Side by side: direct, Python passthroughs, the gateway, LiteLLM",
        "",
        f"`.venv/bin/python -m bench.compare --seconds {results['seconds']:g} --rounds {results['rounds']} --write` — "
        f"{results['date']}, {results['machine']}.",
        "One 50 ms simulated backend (streams: 20 tokens 5 ms apart). The gateway runs with everything on: consumer "
        "auth, a token limit on Azurite, routing, metrics and traces exported to a local App Insights endpoint. "
        "Configurations interleaved, medians of the rounds; while one is measured the others are stopped (SIGSTOP), "
        "so their idle work does not take CPU on this 2-core machine. wrk (one thread) drives non-streaming load, the "
        "Python generator streams. For streams, latency is to the last byte and TTFB to the first.",
        "",
        "![compare](compare.png)",
        "",
        "| workload | clients | config | req/s | vs direct | p50 ms | p95 ms | p99 ms | added p50 | added p99 | TTFB p50 | CPU ms/req | RSS MB | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results["points"]:
        lines.append(
            f"| {p['workload']} | {p['concurrency']} | {p['config']} | {p['rps']} | {p['throughput_vs_direct']} | {p['p50_ms']} | "
            f"{p['p95_ms']} | {p['p99_ms']} | {p['added_p50_ms']} | {p['added_p99_ms']} | {p.get('ttfb_p50_ms', '')} | "
            f"{p['cpu_ms_per_request']} | {p['rss_mb']} | {p['errors']} |"
        )
    extras = results["extras"]
    lines += ["", "| | " + " | ".join(extras.get("rss_mb", {})) + " |", "|---|" + "---|" * len(extras.get("rss_mb", {}))]
    for label, key in (("CPU ms of a 1,000-chunk stream beyond a plain request, chunks 1 ms apart", "spaced_1ms"),
                       ("same, chunks back to back", "back_to_back")):
        lines.append(f"| {label} | " + " | ".join(str(extras["stream_1000_cpu_ms"][c][key]) for c in extras["rss_mb"]) + " |")
    lines.append("| RSS after the run (MB) | " + " | ".join(str(v) for v in extras["rss_mb"].values()) + " |")
    lines += ["", f"Start to first successful response: gateway {extras.get('gateway_first_response_s')} s"
              + (f", LiteLLM {extras['litellm_first_response_s']} s." if "litellm_first_response_s" in extras else ".")]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    raise SystemExit(main())
