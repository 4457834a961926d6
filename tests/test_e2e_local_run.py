"""What scripts/run promises a newcomer, with the real processes: local state survives a restart (Azurite with a
location), `--fresh` wipes it, the admin command's `--json` is only JSON against a real store, and a gateway with
GATEWAY_CONSOLE_LOG prints one line per request, refusals with their reason."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import unique
from tests.e2e import Stack, wait_for
from tools import dev, stack

pytestmark = pytest.mark.e2e


def admin(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_TABLE_CONNECTION_STRING": stack.table_connection_string(port)}
    env.pop("GATEWAY_BACKENDS", None)
    return subprocess.run([sys.executable, "-m", "shared.admin", "--settings", "", "--json", *args],
                          cwd=stack.ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_consumer_survives_an_azurite_restart_and_fresh_wipes_it(tmp_path: Path, log_dir: Path) -> None:
    state = tmp_path / "azurite"
    dev.prepare_state(state, fresh=False)
    port = stack.free_port()
    first = stack.start_azurite(port, log_dir, name=unique("azurite-kept"), location=state)
    try:
        created = admin(port, "consumers", "create", "Kept Team", "--tpm", "1234", "--deployments", "gpt-4o")
        assert created.returncode == 0, created.stderr
        made = json.loads(created.stdout)  # --json: the whole of stdout is one document
        assert made["id"] == "kept-team" and made["key"].startswith("gw-")
    finally:
        first.stop()  # SIGINT: Azurite saves its tables
    second = stack.start_azurite(port, log_dir, name=unique("azurite-restarted"), location=state)
    try:
        shown = admin(port, "consumers", "show", "kept-team")
        assert shown.returncode == 0, shown.stderr
        kept = json.loads(shown.stdout)
        assert (kept["tokens_per_minute"], kept["deployments"], kept["key_prefix"]) == (1234, ["gpt-4o"], made["key_prefix"])
    finally:
        second.stop()
    assert "wiped" in dev.prepare_state(state, fresh=True)
    third = stack.start_azurite(port, log_dir, name=unique("azurite-fresh"), location=state)
    try:
        gone = admin(port, "consumers", "show", "kept-team")
        assert gone.returncode == 1 and json.loads(gone.stdout)["error"]["code"] == "refused"
    finally:
        third.stop()


def test_the_console_prints_a_line_per_request_with_the_refusals_reason(
    e2e: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    consumer = unique("console")
    key = e2e.create_consumer(consumer, tpm=100_000, deployments=["gpt-4o"])
    gateway = gateway_factory(extra={"GATEWAY_CONSOLE_LOG": "true", "GATEWAY_PRICES": json.dumps(
        {"currency": "EUR", "deployments": {"gpt-4o": {"input": 2.5, "output": 10}}})})
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(gateway.url + "/v1/models", headers={"api-key": "gw-not-a-key"}).status_code == 401

    def lines() -> list[str]:
        return [line for line in gateway.log().splitlines() if f" {consumer[:15]}" in line]

    wait_for(lambda: len(lines()) >= 2, 20)
    served, refused = lines()[:2]
    assert served.split()[1:3] == ["200", consumer[:15] + "~" if len(consumer) > 16 else consumer]
    assert served.split()[3] == "gpt-4o" and served.split()[4] in {s.region.id for s in e2e.simulators}
    assert " tok (" in served and ("EUR " in served or "PTU (hourly)" in served)
    assert refused.split()[1] == "404" and refused.endswith("DeploymentNotFound")
    assert key not in gateway.log() and hashlib.sha256(key.encode()).hexdigest() not in gateway.log()


def test_usage_and_show_report_cost_and_freshness_from_the_real_tables(
    e2e: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    prices = json.dumps({"currency": "EUR", "deployments": {"gpt-4o": {"input": 2.5, "output": 10}}})
    consumer = unique("spender")
    key = e2e.create_consumer(consumer, tpm=100_000, deployments=["gpt-4o"])
    gateway = gateway_factory(regions=[s.region for s in e2e.simulators if not s.region.ptu],
                              extra={"GATEWAY_PRICES": prices, "GATEWAY_USAGE_FLUSH_S": "0.5"})
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    answer = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert answer.usage is not None
    cost = (answer.usage.prompt_tokens * 2.5 + answer.usage.completion_tokens * 10) / 1e6

    def cli(*args: str) -> dict[str, object]:
        env = {**os.environ, "GATEWAY_TABLE_CONNECTION_STRING": stack.table_connection_string(e2e.table_port),
               "GATEWAY_PRICES": prices}
        done = subprocess.run([sys.executable, "-m", "shared.admin", "--settings", "", "--json", *args], cwd=stack.ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        result: dict[str, object] = json.loads(done.stdout)
        return result

    def reported() -> bool:
        usage = cli("usage", "--consumer", consumer)["usage"]
        return bool(usage) and abs(usage[0]["cost"] - cost) < 1e-9  # type: ignore[index]

    wait_for(reported, 20)
    report = cli("usage", "--consumer", consumer)
    assert report["currency"] == "EUR" and report["behind_at_most_s"] == 60.0
    assert isinstance(report["last_written"], str) and report["last_written"].endswith("Z")
    shown = cli("consumers", "show", consumer)["spend"]
    assert shown["amount"] == round(cost, 6) and shown["source"] == "usage rows"  # type: ignore[index]
    assert shown["last_written"] is not None  # type: ignore[index]
