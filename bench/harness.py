"""Starting the stack for a benchmark and running the load generator against it, measuring the proxy process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import cpu_seconds, rss_mb
from shared.config import load_settings
from shared.edge.consumers import hash_key, key_prefix, new_key
from shared.records.consumers import Consumer, Limits
from shared.storage.consumer_table import TableConsumerStore
from shared.storage.tables import Tables
from tools import stack

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PROMPT = " ".join(["The gateway counts every token of every consumer, exactly, across regions."] * 14)
CHAT_BODY = {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": PROMPT}], "max_tokens": 20}


def chat_body(model: str | None = None, stream: bool = False, **extra: Any) -> bytes:
    body: dict[str, Any] = dict(CHAT_BODY, **extra)
    if model:
        body["model"] = model
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


@dataclass
class Bench:
    log_dir: Path
    children: list[stack.Child] = field(default_factory=list)
    table_port: int = 0

    def start_azurite(self) -> stack.Child:
        self.table_port = stack.free_port()
        child = stack.start_azurite(self.table_port, self.log_dir)
        self.children.append(child)
        return child

    def start_counted_store(self) -> int:
        """Azurite behind the counting TCP proxy, which everything started after this talks to; returns the proxy's
        control port (stack.proxy_control reads its counts of Table requests)."""
        azurite = self.start_azurite()
        proxy, control = stack.start_tcpproxy(azurite.port, self.log_dir)
        self.children.append(proxy)
        self.table_port = proxy.port
        return control

    def start_unlimited_regions(self, latency_ms: float = 50, token_latency_ms: float = 5) -> list[stack.Region]:
        """Two simulated regions with capacity no benchmark reaches: what is measured is the gateway, not them."""
        regions = [stack.Region(f"sim{i}", region, stack.free_port(), chat_tpm=10**9, embeddings_tpm=10**9)
                   for i, region in enumerate(("swedencentral", "francecentral"))]
        for region in regions:
            self.start_simulator(region, latency_ms=latency_ms, token_latency_ms=token_latency_ms)
        return regions

    def start_simulator(self, region: stack.Region, latency_ms: float, token_latency_ms: float) -> stack.Child:
        child = stack.start_simulator(region, latency_ms, token_latency_ms, self.log_dir)
        self.children.append(child)
        return child

    def start_gateway(self, regions: Sequence[stack.Region], extra: Mapping[str, str] | None = None, name: str = "gateway") -> stack.Child:
        env = stack.gateway_env(stack.backends_setting(regions), self.table_port, extra)
        child = stack.start_gateway(env, log_dir=self.log_dir, name=name)
        self.children.append(child)
        return child

    def env(self) -> dict[str, str]:
        env = stack.gateway_env("", self.table_port)
        env.pop("GATEWAY_BACKENDS")
        return env

    def consumer(self, consumer_id: str, table_port: int | None = None, priority: str = "normal", **limits: Any) -> str:
        """Create a consumer as the admin command does; `table_port` to reach the store other than through
        `table_port` (e.g. past a counting proxy)."""
        key = new_key()
        consumer = Consumer(consumer_id, consumer_id, hash_key(key), key_prefix(key), limits=Limits(**limits),
                            priority=priority)
        env = self.env()
        if table_port is not None:
            env["GATEWAY_TABLE_CONNECTION_STRING"] = stack.table_connection_string(table_port)

        async def put() -> None:
            tables = Tables.from_settings(load_settings(env, require_backends=False), timeout_s=10)
            try:
                await TableConsumerStore(tables).put(consumer)
            finally:
                await tables.close()

        asyncio.run(put())
        return key

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


@contextlib.contextmanager
def bench_stack() -> Iterator[Bench]:
    log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    bench = Bench(log_dir)
    try:
        yield bench
    finally:
        bench.stop()


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def load_wrk(url: str, body: bytes, concurrency: int, seconds: float, headers: Mapping[str, str],
             measure_pid: int | None, warmup: float) -> dict[str, Any]:
    """Non-streaming load with wrk (C, one thread): it leaves more of the machine to what is measured."""
    with tempfile.TemporaryDirectory() as folder:
        body_file, header_file = Path(folder, "body"), Path(folder, "headers")
        body_file.write_bytes(body)
        header_file.write_text("".join(f"{k}: {v}\n" for k, v in headers.items()))
        env = {**os.environ, "WRK_BODY": str(body_file), "WRK_HEADERS": str(header_file)}
        script = str(ROOT / "bench" / "wrk.lua")

        def wrk(duration: float) -> dict[str, Any]:
            out = subprocess.run(
                ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--timeout", "30s", "-s", script, url],
                env=env, capture_output=True, text=True, timeout=duration + 60, check=True,
            ).stdout
            return dict(json.loads(out.strip().splitlines()[-1]))

        if warmup:
            wrk(warmup)
        cpu_before = cpu_seconds(measure_pid) if measure_pid else 0.0
        raw = wrk(seconds)
        used = cpu_seconds(measure_pid) - cpu_before if measure_pid else 0.0
    elapsed = raw["duration_us"] / 1e6
    ok = raw["requests"] - raw["non_2xx"]
    result: dict[str, Any] = {
        "engine": "wrk",
        "requests": raw["requests"],
        "ok": ok,
        "statuses": {"200": ok, "non-2xx": raw["non_2xx"], "socket errors": raw["socket_errors"]},
        "seconds": round(elapsed, 3),
        "rps": round(raw["requests"] / elapsed, 1),
        "latency_ms": {k: round(raw[f"{k}_us"] / 1000, 3) for k in ("p50", "p95", "p99", "mean")},
    }
    if measure_pid:
        result["proxy_cpu_ms_per_request"] = round(used * 1000 / max(1, raw["requests"]), 3)
        result["proxy_rss_mb"] = round(rss_mb(measure_pid), 1)
    return result


def start_load(url: str | Sequence[str], body: bytes, concurrency: int, seconds: float, *,
               headers: Mapping[str, str] | None = None, stream: bool = False, max_requests: int = 1_000_000,
               warmup: float = 1.0, rate: float | None = None, record: str | None = None, keys: str | None = None,
               rotate: bool = False) -> subprocess.Popen[str]:
    """Start the Python load generator in its own process (see bench/load.py)."""
    urls = [url] if isinstance(url, str) else list(url)
    argv = [sys.executable, "-m", "bench.load", *(a for u in urls for a in ("--url", u)), "--concurrency", str(concurrency),
            "--seconds", str(seconds), "--body", body.decode(), "--max-requests", str(max_requests), "--warmup", str(warmup)]
    if rate:
        argv += ["--rate", str(rate)]
    if record:
        argv += ["--record", record]
    if keys:
        argv += ["--keys", keys]
    if rotate:
        argv.append("--rotate")
    for name, value in (headers or {}).items():
        argv += ["--header", f"{name}:{value}"]
    if stream:
        argv.append("--stream")
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)


def finish_load(process: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    out, _ = process.communicate(timeout=timeout_s)
    result: dict[str, Any] = json.loads(out)
    return result


def load(url: str | Sequence[str], body: bytes, concurrency: int, seconds: float, *, headers: Mapping[str, str] | None = None,
         stream: bool = False, measure_pid: int | None = None, max_requests: int = 1_000_000, warmup: float = 1.0,
         rate: float | None = None, engine: str = "auto", record: str | None = None) -> dict[str, Any]:
    """Run a load in its own process; add the measured process's CPU per request and RSS.

    Non-streaming load at full speed against one URL uses wrk when it is installed (engine "auto"): it leaves more of
    the machine to what is measured. Otherwise the Python generator."""
    if (engine in ("auto", "wrk") and isinstance(url, str) and not stream and rate is None and not record
            and max_requests >= 1_000_000 and wrk_available()):
        return load_wrk(url, body, concurrency, seconds, headers or {}, measure_pid, warmup)
    process = start_load(url, body, concurrency, seconds, headers=headers, stream=stream, max_requests=max_requests,
                         warmup=warmup, rate=rate, record=record)
    cpu_before = 0.0
    if measure_pid:
        time.sleep(warmup)  # the generator warms up first; measure the measured part only
        cpu_before = cpu_seconds(measure_pid)
    result = finish_load(process, seconds + warmup + 120)
    if measure_pid:
        used = cpu_seconds(measure_pid) - cpu_before
        result["proxy_cpu_ms_per_request"] = round(used * 1000 / max(1, result["requests"]), 3)
        result["proxy_rss_mb"] = round(rss_mb(measure_pid), 1)
    return result


def machine() -> str:
    cpus = os.cpu_count()
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{platform.system()} {platform.machine()}, {cpus} cores ({model}), Python {platform.python_version()}"


def save(name: str, data: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def update_doc(section: str, markdown: str) -> None:
    """Replace (or append) the section between its markers in docs/benchmarks.md."""
    doc = ROOT / "docs" / "benchmarks.md"
    doc.parent.mkdir(exist_ok=True)
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\nFigures measured on the development machine; each section names the command that produced it.\n"
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
