"""Run the gateway locally on its embedded default: Azurite, three simulated regions, a demo consumer.

    python -m tools.dev [--port 7071] [--no-simulators] [--fresh] [--quiet]

Settings come from the environment, then local.settings.json (created from local.settings.example.json when absent).
When GATEWAY_BACKENDS names real backends, no simulators start. The gateway is served by `func start` when Azure
Functions Core Tools are installed, otherwise by tools.localhost, which serves the same registrations.

Local state (consumers, keys, limits, usage, spend) is kept by Azurite in .run/azurite (git-ignored), so a restart
keeps it; --fresh wipes it first. A gateway admin key (it reads /health/details) is generated for each run and
printed beside the demo key, unless GATEWAY_ADMIN_KEY_SHA256 is set. Each request is printed as one line
(GATEWAY_CONSOLE_LOG) unless --quiet.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from shared.config import ConfigError, backends_text, load_settings, local_environment
from tools import stack

ROOT = stack.ROOT
STATE = ROOT / ".run" / "azurite"  # Azurite's tables for scripts/run: kept across restarts, git-ignored


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((stack.LOOPBACK, port)) == 0


def _uses_embedded_backends(env: dict[str, str]) -> bool:
    """Whether the backends are the simulated regions (by address): a local.settings.json copied from an older example,
    naming fewer deployments, still gets its simulators (they serve a superset)."""
    try:
        configured: object = json.loads(backends_text(env)[0] or "[]")
    except (json.JSONDecodeError, ConfigError):
        return False
    embedded = {backend["endpoint"] for backend in json.loads(stack.backends_setting(stack.EMBEDDED_REGIONS))}
    return (isinstance(configured, list) and bool(configured)
            and all(isinstance(b, dict) and b.get("endpoint") in embedded for b in configured))


async def _demo_consumer(env: dict[str, str], consumer_id: str = "demo", safety: str | None = None
                         ) -> tuple[str, str] | None:
    from shared.edge.consumers import hash_key, key_prefix, new_key
    from shared.records.consumers import Consumer, Limits
    from shared.storage.consumer_table import TableConsumerStore
    from shared.storage.tables import Conflict, Tables

    settings = load_settings(env, require_backends=False)
    tables = Tables.from_settings(settings, timeout_s=10)
    try:
        key = new_key()
        consumer = Consumer(
            id=consumer_id, name="Demo consumer" + (" with a safety policy" if safety else ""), key_hash=hash_key(key),
            key_prefix=key_prefix(key), limits=Limits(tokens_per_minute=100_000), safety=safety,
        )
        try:
            await TableConsumerStore(tables).create(consumer)
        except Conflict:
            return None
        return consumer.id, key
    finally:
        await tables.close()


def _get_setting(env: dict[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    return "" if value == "{}" else value


def prepare_state(location: Path, fresh: bool) -> str:
    """The folder Azurite keeps the local tables in; emptied first with --fresh. Returns what to tell the user."""
    if fresh and location.exists():
        shutil.rmtree(location)
        location.mkdir(parents=True)
        return f"local state wiped (--fresh): {location.relative_to(ROOT) if location.is_relative_to(ROOT) else location}"
    existed = location.exists() and any(location.iterdir())
    location.mkdir(parents=True, exist_ok=True)
    where = location.relative_to(ROOT) if location.is_relative_to(ROOT) else location
    return f"local state kept in {where} ({'from earlier runs' if existed else 'new'}; `scripts/run --fresh` wipes it)"


def admin_key(env: dict[str, str]) -> str | None:
    """A gateway admin key for this run, its SHA-256 put in `env`; None when the settings name one already."""
    if env.get("GATEWAY_ADMIN_KEY_SHA256", "").strip():
        return None
    key = "gw-admin-" + secrets.token_urlsafe(32)
    env["GATEWAY_ADMIN_KEY_SHA256"] = hashlib.sha256(key.encode()).hexdigest()
    return key


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="scripts/run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root.add_argument("--port", type=int, default=7071)
    root.add_argument("--no-simulators", action="store_true")
    root.add_argument("--fresh", action="store_true", help="wipe the local state (.run/azurite) before starting")
    root.add_argument("--quiet", action="store_true", help="no line per request")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    settings_file = ROOT / "local.settings.json"
    if not settings_file.exists():
        shutil.copy(ROOT / "local.settings.example.json", settings_file)
        print(f"created {settings_file.name} from local.settings.example.json")
    env = local_environment(str(settings_file))
    load_settings(env)  # fail now, with the name of the bad setting, rather than in the gateway process
    if not args.quiet:
        env["GATEWAY_CONSOLE_LOG"] = "true"
    admin = admin_key(env)

    children: list[stack.Child] = []
    try:
        if env.get("GATEWAY_TABLE_CONNECTION_STRING", "").startswith("UseDevelopmentStorage"):
            if _listening(10002):
                print("azurite: one is listening on 10002 already; using it (its state is its own"
                      + ("; --fresh did not wipe it)" if args.fresh else ")"))
            else:
                print(prepare_state(STATE, args.fresh))
                children.append(stack.start_azurite(10002, location=STATE))
                print("azurite (tables) on http://127.0.0.1:10002, (blobs: the response cache) on http://127.0.0.1:10000")
        if not args.no_simulators and _uses_embedded_backends(env):
            for region in stack.EMBEDDED_REGIONS:
                if not _listening(region.port):
                    children.append(stack.start_simulator(region))
                print(f"simulated region {region.region:<14} {'PTU, priority 1' if region.ptu else 'priority 2':<16} http://127.0.0.1:{region.port}")
            if not _get_setting(env, "GATEWAY_SAFETY_POLICIES"):
                # The Content Safety and Language stand-in with a demo policy, for the consumer demo-safe.
                if not _listening(stack.SAFETY_PORT):
                    children.append(stack.start_safety())
                env.update(stack.safety_env())
                print(f"content safety and PII stand-in  http://127.0.0.1:{stack.SAFETY_PORT} (policy 'demo', "
                      "docs/safety.md)")

        if env.get("GATEWAY_SAFETY_POLICIES") == stack.DEMO_SAFETY_POLICIES:
            safe = asyncio.run(_demo_consumer(env, "demo-safe", "demo"))
            if safe:
                print(f"\ndemo consumer 'demo-safe' (policy 'demo': Prompt Shields, harm categories, PII masked, "
                      f"audited), key (shown once):\n\n    {safe[1]}")
        created = asyncio.run(_demo_consumer(env))
        url = f"http://127.0.0.1:{args.port}"
        if created:
            consumer_id, key = created
            print(f"\ndemo consumer '{consumer_id}' (100,000 tokens/minute), key (shown once):\n\n    {key}\n")
        else:
            print("\ndemo consumer exists already (its key was printed when it was created); "
                  "`.venv/bin/python -m shared.admin consumers rotate demo` prints a new one\n")
        if admin:
            print(f"gateway admin key for this run (reads /health/details):\n\n    {admin}\n\n"
                  f"    curl -H 'api-key: {admin}' {url}/health/details\n")
        print(f"OpenAI(base_url='{url}/v1', api_key=KEY)  or  AzureOpenAI(azure_endpoint='{url}', api_key=KEY, api_version='2024-10-21')")

        if shutil.which("func"):
            command = ["func", "start", "--port", str(args.port)]
        else:
            command = [stack.PYTHON, "-m", "tools.localhost", "--port", str(args.port)]
        print(f"serving with: {' '.join(command[:3])} ...  (Ctrl-C stops everything)", flush=True)
        gateway = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env})
        signal.signal(signal.SIGTERM, lambda *_: gateway.terminate())
        try:
            return gateway.wait()
        except KeyboardInterrupt:
            gateway.terminate()
            gateway.wait(10)
            return 0
    finally:
        for child in reversed(children):
            child.stop()


if __name__ == "__main__":
    sys.exit(main())
