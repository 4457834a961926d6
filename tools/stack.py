"""Starting the local stack as child processes: Azurite (tables and blobs), simulated regions, gateway processes.

Used by the dev runner, the end-to-end tests and the benchmarks, so all three start things the same way. Everything
listens on 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
LOOPBACK = "127.0.0.1"
DEVSTORE_CONNECTION = "UseDevelopmentStorage=true"
SIM_API_KEY = "sim-backend-key"
# The gateway admin key of local stacks (tests, benchmarks): reads /health/details. Gateways get only its SHA-256.
ADMIN_KEY = "gw-admin-local-stack-only-not-for-deployment"
ADMIN_HEADERS = {"api-key": ADMIN_KEY}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout_s: float, process: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on port {port}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {LOOPBACK}:{port} after {timeout_s}s")


@dataclass
class Child:
    name: str
    process: subprocess.Popen[Any]
    port: int
    log_path: Path
    stop_signal: int = signal.SIGTERM

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _spawn(name: str, argv: Sequence[str], port: int, env: Mapping[str, str] | None, log_dir: Path, ready_s: float) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(argv), cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    child = Child(name, process, port, log_path)
    try:
        wait_port(port, ready_s, process)
    except Exception:
        child.kill()
        raise RuntimeError(f"{name} did not start:\n{child.log()[-3000:]}") from None
    return child


def azurite_binary() -> Path:
    binary = ROOT / "node_modules" / ".bin" / "azurite"
    if not binary.exists():
        raise RuntimeError("Azurite is not installed: run `npm install` in the project (scripts/bootstrap does)")
    return binary


# Table port -> Blob port of the Azurites this process started, so a connection string built from the table port
# (every caller knows only that one) names both services.
_blob_ports: dict[int, int] = {}


def start_azurite(
    port: int = 10002, log_dir: Path | None = None, name: str = "azurite", location: Path | None = None,
    blob_port: int | None = None,
) -> Child:
    """Azurite's Table and Blob services (the tables, and the response cache's entries), in one process; in memory,
    or persisted under `location` (so it can be stopped and started again). Its Queue service, which the gateway does
    not use, listens too (Azurite starts all three): on a free port."""
    storage = ["--location", str(location)] if location else ["--inMemoryPersistence"]
    blob_port = blob_port or (10000 if port == 10002 else free_port())
    queue_port = 10001 if port == 10002 else free_port()
    argv = [
        str(azurite_binary()), "--tableHost", LOOPBACK, "--tablePort", str(port), "--blobHost", LOOPBACK,
        "--blobPort", str(blob_port), "--queueHost", LOOPBACK, "--queuePort", str(queue_port), *storage,
        "--disableTelemetry", "--silent", "--skipApiVersionCheck",
    ]
    child = _spawn(name, argv, port, None, log_dir or _logs(), 30)
    wait_port(blob_port, 30, child.process)
    child.stop_signal = signal.SIGINT  # Azurite saves its data on SIGINT, not on SIGTERM
    _blob_ports[port] = blob_port
    return child


def table_connection_string(port: int, blob_port: int | None = None) -> str:
    """The development account on this Azurite: its Table endpoint, and its Blob endpoint when known (an address
    that only forwards the Table service, such as a counting proxy, has none: the cache then keeps entries in memory)."""
    blob_port = blob_port or _blob_ports.get(port)
    if port == 10002 and blob_port in (None, 10000):
        return DEVSTORE_CONNECTION
    # Azurite's well-known development account and key (public, documented; not a secret).
    key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
    blob = f"BlobEndpoint=http://{LOOPBACK}:{blob_port}/devstoreaccount1;" if blob_port else ""
    return (
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={key};"
        f"TableEndpoint=http://{LOOPBACK}:{port}/devstoreaccount1;{blob}"
    )


@dataclass(frozen=True)
class Region:
    """One simulated Azure OpenAI region and how the gateway routes to it."""

    id: str
    region: str
    port: int
    priority: int = 1
    weight: int = 1
    ptu: bool = False
    chat_tpm: int = 300_000
    embeddings_tpm: int = 1_000_000
    reserve_tokens: int = 0
    timeout_s: float | None = None
    completion_tokens: int = 40  # what the simulated region generates when a request sets no max_tokens
    ptu_burst_s: float | None = None  # a PTU region: seconds of its rate that are 100 % utilisation (None: 60)
    breaker: Mapping[str, Any] = field(default_factory=dict)
    state_capacity: bool = False  # a PTU region: the gateway is told its chat capacity (ptu_tokens_per_minute)
    # Chat deployments beyond gpt-4o and gpt-4o-mini: scripts/run's regions also serve what the templates deploy.
    extra_chat: tuple[str, ...] = ()

    @property
    def chat_deployments(self) -> list[str]:
        return ["gpt-4o", "gpt-4o-mini", *self.extra_chat]

    def backend(self) -> dict[str, Any]:
        backend: dict[str, Any] = {
            "id": self.id,
            "endpoint": f"http://{LOOPBACK}:{self.port}",
            "region": self.region,
            "priority": self.priority,
            "weight": self.weight,
            "ptu": self.ptu,
            "deployments": [*self.chat_deployments, "text-embedding-3-small"],
            "auth": "key",
            "api_key_setting": "SIM_API_KEY",
            "allow_insecure_http": True,  # simulated regions on loopback; a real backend is https://
        }
        if self.reserve_tokens:
            backend["reserve_tokens"] = self.reserve_tokens
        if self.timeout_s is not None:
            backend["timeout_s"] = self.timeout_s
        if self.breaker:
            backend["breaker"] = dict(self.breaker)
        if self.ptu and self.state_capacity:
            backend["ptu_tokens_per_minute"] = {name: self.chat_tpm for name in self.chat_deployments}
        return backend


# The deployment names the Bicep templates create (bicep/main.bicepparam): served locally too, so one name works in both.
TEMPLATE_CHAT = ("gpt-5.4-mini",)
MODEL_VERSIONS = {"gpt-4o": "gpt-4o-2024-11-20", "gpt-4o-mini": "gpt-4o-mini-2024-07-18", "gpt-5.4-mini": "gpt-5.4-mini-2026-03-17"}

EMBEDDED_REGIONS = (
    Region("uksouth-ptu", "uksouth", 18101, priority=1, ptu=True, chat_tpm=30_000, extra_chat=TEMPLATE_CHAT),
    Region("swedencentral", "swedencentral", 18102, priority=2, chat_tpm=300_000, extra_chat=TEMPLATE_CHAT),
    Region("francecentral", "francecentral", 18103, priority=2, chat_tpm=300_000, extra_chat=TEMPLATE_CHAT),
)


def backends_setting(regions: Sequence[Region]) -> str:
    return json.dumps([r.backend() for r in regions])


def simulator_argv(region: Region, latency_ms: float, token_latency_ms: float) -> list[str]:
    # A PTU region's chat deployments are provisioned (utilisation, a leaky bucket); embeddings stay pay-as-you-go.
    chat = f"completion={region.completion_tokens}" + (",ptu=1" if region.ptu else "")
    if region.ptu and region.ptu_burst_s is not None:
        chat += f",burst={region.ptu_burst_s:g}"
    return [
        PYTHON, "-m", "tools.simulator", "--host", LOOPBACK, "--port", str(region.port), "--region", region.region,
        "--api-key", SIM_API_KEY, "--latency-ms", str(latency_ms), "--token-latency-ms", str(token_latency_ms),
        *[arg for name in region.chat_deployments
          for arg in ("--deployment", f"{name}:tpm={region.chat_tpm},model={MODEL_VERSIONS[name]},{chat}")],
        "--deployment", f"text-embedding-3-small:tpm={region.embeddings_tpm},model=text-embedding-3-small",
    ]


def start_simulator(region: Region, latency_ms: float = 50, token_latency_ms: float = 10, log_dir: Path | None = None) -> Child:
    return _spawn(f"sim-{region.id}", simulator_argv(region, latency_ms, token_latency_ms), region.port, None, log_dir or _logs(), 30)


SAFETY_PORT = 18190  # scripts/run's Content Safety and Language stand-in
SAFETY_KEY = "local-safety-key"  # the stand-in's key: not a secret (loopback only)
# scripts/run's demo policy: Prompt Shields, Violence and Hate from medium, the stand-in's demo blocklist, e-mail
# addresses and phone numbers masked, closed when the service is down, an audit trail in Azurite's Blob service.
DEMO_SAFETY_POLICIES = json.dumps({"demo": {
    "categories": {"Violence": 4, "Hate": 4}, "blocklists": ["demo-terms"],
    "pii": {"mode": "redact", "categories": ["Email", "PhoneNumber"]}, "on_unavailable": "closed", "audit": "on"}})


def safety_env(port: int = SAFETY_PORT, policies: str = DEMO_SAFETY_POLICIES) -> dict[str, str]:
    url = f"http://{LOOPBACK}:{port}"
    return {"GATEWAY_SAFETY_POLICIES": policies, "GATEWAY_CONTENT_SAFETY_ENDPOINT": url,
            "GATEWAY_CONTENT_SAFETY_KEY": SAFETY_KEY, "GATEWAY_LANGUAGE_ENDPOINT": url, "GATEWAY_LANGUAGE_KEY": SAFETY_KEY}


def start_safety(port: int = SAFETY_PORT, latency_ms: float = 0, log_dir: Path | None = None) -> Child:
    """The Content Safety and Language stand-in (tools/simulator/safety.py)."""
    argv = [PYTHON, "-m", "tools.simulator.safety", "--host", LOOPBACK, "--port", str(port), "--key", SAFETY_KEY,
            "--latency-ms", str(latency_ms)]
    return _spawn("safety", argv, port, None, log_dir or _logs(), 30)


def safety_control(port: int, method: str, path: str, body: Any = None) -> Any:
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{LOOPBACK}:{port}{path}", data=data, method=method,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def start_tcpproxy(target_port: int, log_dir: Path | None = None, name: str = "tcpproxy") -> tuple[Child, int]:
    """A counting, slowable proxy in front of `target_port`; returns it and its control port."""
    listen, control = free_port(), free_port()
    argv = [PYTHON, "-m", "tools.tcpproxy", "--listen", str(listen), "--target", str(target_port), "--control", str(control)]
    child = _spawn(name, argv, listen, None, log_dir or _logs(), 30)
    wait_port(control, 10, child.process)
    return child, control


def proxy_control(control_port: int, action: str) -> dict[str, Any]:
    """`stats`, `latency?ms=N`, `down`, `up` or `reset` on a tcpproxy's control port."""
    import urllib.request

    with urllib.request.urlopen(f"http://{LOOPBACK}:{control_port}/{action}", timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


def gateway_env(backends_json: str, table_port: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        "GATEWAY_BACKENDS": backends_json,
        "SIM_API_KEY": SIM_API_KEY,
        "GATEWAY_TABLE_CONNECTION_STRING": table_connection_string(table_port),
        "GATEWAY_ADMIN_KEY_SHA256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(),
        "PYTHON_ENABLE_INIT_INDEXING": "1",
        "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
        "APPLICATIONINSIGHTS_SDKSTATS_DISABLED": "true",
        "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true",
        "OTEL_EXPERIMENTAL_RESOURCE_DETECTORS": "azure_app_service",
    }
    env.update(extra or {})
    return env


def start_gateway(env: Mapping[str, str], port: int | None = None, log_dir: Path | None = None, name: str = "gateway") -> Child:
    port = port or free_port()
    # An empty settings file keeps a developer's local.settings.json out of test and benchmark runs.
    # Written whole under another name, then renamed: gateways started at once (test workers) never read it half-written.
    empty = Path(tempfile.gettempdir()) / "gateway-empty-settings.json"
    if not empty.exists() or empty.read_text() != '{"Values": {}}':
        partial = empty.with_name(f"{empty.name}.{os.getpid()}")
        partial.write_text('{"Values": {}}')
        os.replace(partial, empty)
    argv = [PYTHON, "-m", "tools.localhost", "--host", LOOPBACK, "--port", str(port), "--settings", str(empty)]
    return _spawn(name, argv, port, env, log_dir or _logs(), 60)


def _logs() -> Path:
    return Path(os.environ.get("GATEWAY_LOG_DIR", ROOT / ".run" / "logs"))
