"""Helpers for end-to-end tests: a running stack (Azurite, simulated regions, gateway processes) and its controls."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from shared.config import load_settings
from shared.edge.consumers import hash_key, key_prefix, new_key
from shared.limits.ledger_copy import read_ledger
from shared.records.cache import CachePolicy
from shared.records.consumers import Consumer, Limits, Team, UserLimits
from shared.storage.consumer_table import TableConsumerStore
from shared.storage.ledger_table import TableLedgerStore
from shared.storage.tables import Tables
from shared.storage.usage_table import TableUsageStore
from tools import stack

# One client for every control call: a new httpx client costs tens of milliseconds of CPU (its TLS context), and the
# stack's fixtures make a dozen calls around each test.
_control_http = httpx.Client(timeout=10)


@dataclass
class Simulator:
    child: stack.Child
    region: stack.Region

    @property
    def url(self) -> str:
        return self.child.url

    def control(self, method: str, path: str, body: Any = None) -> Any:
        response = _control_http.request(method, f"{self.url}/_sim/{path}", json=body)
        response.raise_for_status()
        return response.json() if response.content else None

    def fault(self, kind: str, count: int = 1, **options: Any) -> None:
        self.control("POST", "faults", {"kind": kind, "count": count, **options})

    def capacity(self, deployment: str, tpm: int, rpm: int | None = None) -> None:
        self.control("POST", "capacity", {"deployment": deployment, "tpm": tpm, "rpm": rpm})

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.control("GET", "stats")
        return result

    def requests(self, limit: int = 20) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.control("GET", f"requests?limit={limit}")
        return result

    def reset(self) -> None:
        self.control("POST", "reset")
        self.control("DELETE", "faults")


@dataclass
class Stack:
    """What the end-to-end tests run against; every address is on 127.0.0.1."""

    table_port: int
    simulators: list[Simulator]
    gateways: list[stack.Child] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)  # every consumer key handed out, for the final leak scan

    @property
    def url(self) -> str:
        return self.gateways[0].url

    def settings_env(self) -> dict[str, str]:
        return self.env

    def run(self, coroutine: Any) -> Any:
        return asyncio.run(coroutine)

    async def _with_tables(self, action: Any) -> Any:
        settings = load_settings(self.env, require_backends=False)
        tables = Tables.from_settings(settings, timeout_s=10)
        try:
            return await action(tables)
        finally:
            await tables.close()

    def create_consumer(
        self,
        consumer_id: str,
        *,
        tpm: int = 0,
        deployment_tpm: Mapping[str, int] | None = None,
        quota: int = 0,
        quota_period: str | None = None,
        deployments: Sequence[str] | None = None,
        priority: str = "normal",
        capabilities: Sequence[str] = (),
        enabled: bool = True,
        team: str | None = None,
        users: UserLimits | None = None,
        cache: CachePolicy | None = None,
        safety: str | None = None,
    ) -> str:
        key = new_key()
        consumer = Consumer(
            id=consumer_id,
            name=consumer_id,
            key_hash=hash_key(key),
            key_prefix=key_prefix(key),
            deployments=frozenset(deployments) if deployments is not None else None,
            limits=Limits(tpm, dict(deployment_tpm or {}), quota, quota_period),
            priority=priority,
            capabilities=frozenset(capabilities),
            enabled=enabled,
            team=team,
            users=users or UserLimits(),
            cache=cache or CachePolicy(),
            safety=safety,
        )

        async def put(tables: Tables) -> None:
            await TableConsumerStore(tables).put(consumer)

        self.run(self._with_tables(put))
        self.keys.append(key)
        return key

    def put_team(self, team_id: str, *, tpm: int = 0, quota: int = 0, quota_period: str | None = None) -> None:
        async def put(tables: Tables) -> None:
            await TableConsumerStore(tables).put_team(Team(team_id, team_id, Limits(tpm, {}, quota, quota_period)))

        self.run(self._with_tables(put))

    def window(self, ledger_key: str, timeout_s: float = 15.0) -> int:
        """Tokens a ledger's window holds once every lease on it is released (a team's: team|<id>)."""
        wait_for(lambda: not self.ledger(ledger_key).leases, timeout_s)
        return int(sum(self.ledger(ledger_key).windows.get("*", {}).values()))

    def rotate_key(self, consumer_id: str) -> str:
        key = new_key()
        self.update_consumer(consumer_id, key_hash=hash_key(key), key_prefix=key_prefix(key))
        self.keys.append(key)
        return key

    def update_consumer(self, consumer_id: str, **changes: Any) -> None:
        async def update(tables: Tables) -> None:
            store = TableConsumerStore(tables)
            consumer = await store.get(consumer_id)
            assert consumer is not None
            if "limits" in changes:
                changes["limits"] = replace(consumer.limits, **changes["limits"])
            await store.put(replace(consumer, version=consumer.version + 1, **changes))

        self.run(self._with_tables(update))

    def ledger(self, consumer_id: str) -> Any:
        async def read(tables: Tables) -> Any:
            return (await read_ledger(TableLedgerStore(tables), consumer_id))[0]

        return self.run(self._with_tables(read))

    def charged(self, consumer_id: str, timeout_s: float = 15.0) -> int:
        """Tokens the consumer's ledger window holds once its leases are released (what it was charged)."""

        def settled() -> bool:
            ledger = self.ledger(consumer_id)
            return not ledger.leases and "*" in ledger.windows

        # A correction learnt after its lease was released (a stream that ended after it) is pending usage on the
        # instance, written within its PENDING_GRACE_S (1 s): the figure counts once it holds still past that.
        deadline = time.monotonic() + timeout_s * patience()
        wait_for(settled, timeout_s)
        total = int(sum(self.ledger(consumer_id).windows["*"].values()))
        while time.monotonic() < deadline:
            time.sleep(1.3)
            wait_for(settled, max(0.1, deadline - time.monotonic()))
            again = int(sum(self.ledger(consumer_id).windows["*"].values()))
            if again == total:
                break
            total = again
        return total

    def usage_rows(self, consumer_id: str) -> list[Any]:
        async def read(tables: Tables) -> list[Any]:
            return await TableUsageStore(tables).query(consumer_id, "0000", "9999")

        result: list[Any] = self.run(self._with_tables(read))
        return result

    def reported_usage(self) -> dict[str, int]:
        totals = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for sim in self.simulators:
            usage = sim.stats()["usage"]
            for key in totals:
                totals[key] += usage[key]
        return totals

    def reset_simulators(self) -> None:
        for sim in self.simulators:
            sim.reset()


_gateway_ids = itertools.count(1)


class GatewayFactory:
    """Starts gateway processes on the session's Azurite and regions, with extra settings; `several` starts them at
    once (a start is mostly the interpreter importing the app: waiting for each in turn doubles the wait)."""

    def __init__(self, e2e: Stack, log_dir: Path) -> None:
        self.e2e, self.log_dir = e2e, log_dir
        self.started: list[stack.Child] = []

    def __call__(self, extra: Mapping[str, str] | None = None, regions: list[stack.Region] | None = None) -> stack.Child:
        env = gateway_env(self.e2e.table_port, regions or [s.region for s in self.e2e.simulators], extra)
        child = stack.start_gateway(env, log_dir=self.log_dir, name=f"gateway-{os.getpid()}-f{next(_gateway_ids)}")
        self.started.append(child)
        return child

    def several(self, count: int, extra: Mapping[str, str] | None = None,
                regions: list[stack.Region] | None = None) -> list[stack.Child]:
        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(lambda _: self(extra, regions), range(count)))

    def stop(self) -> None:
        """All at once: each flushes what it holds on SIGTERM, in its own time."""
        if self.started:
            with ThreadPoolExecutor(len(self.started)) as pool:
                list(pool.map(lambda child: child.stop(), self.started))
        self.started.clear()


def leaks(secrets: Sequence[str], log_dir: Path) -> tuple[list[str], int]:
    """The log and export files under `log_dir` holding any of `secrets` (a key may appear only as its short non-secret
    prefix), and how many characters were scanned."""
    leaked: list[str] = []
    scanned = 0
    for path in sorted(log_dir.iterdir()):
        if not path.name.startswith(("gateway", "capture")) or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        scanned += len(text)
        leaked += [path.name for secret in secrets if secret in text]
    return leaked, scanned


def patience() -> float:
    """How much longer than on an idle machine a wait may take: the processes under test share the cores with whatever
    else runs (other workers, other checkouts' suites), so a bound that holds on an idle machine is stretched by the
    load per core. A wait that is met returns at once whatever the bound: only a failing test waits longer."""
    return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Until `predicate` holds; fails after `timeout_s` on an idle machine, proportionally longer on a loaded one."""
    deadline = time.monotonic() + timeout_s * patience()
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def start_simulators(regions: Sequence[stack.Region], latency_ms: float, token_latency_ms: float) -> list[Simulator]:
    simulators: list[Simulator] = []
    try:
        for region in regions:
            simulators.append(Simulator(stack.start_simulator(region, latency_ms, token_latency_ms), region))
    except Exception:
        for sim in simulators:
            sim.child.stop()
        raise
    return simulators


def test_regions() -> list[stack.Region]:
    return [
        stack.Region("uksouth-ptu", "uksouth", stack.free_port(), priority=1, ptu=True, chat_tpm=1_000_000),
        stack.Region("swedencentral", "swedencentral", stack.free_port(), priority=2, chat_tpm=1_000_000),
        stack.Region("francecentral", "francecentral", stack.free_port(), priority=2, chat_tpm=1_000_000),
    ]


def gateway_env(table_port: int, regions: Sequence[stack.Region], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = stack.gateway_env(stack.backends_setting(regions), table_port)
    # Usage rows every second (not every minute): the tests read them back. Every test shares 127.0.0.1 and creates
    # keys it uses at once: the spray defences get their own tests (tests/test_e2e_security.py) with the defaults; here
    # they must not turn one test's 401s into another's 429s.
    env.update({"GATEWAY_CONSUMER_REFRESH_S": "0.5", "GATEWAY_MAX_BODY_BYTES": "262144", "GATEWAY_USAGE_FLUSH_S": "1",
                "GATEWAY_AUTH_FAILURES_PER_MINUTE": "100000", "GATEWAY_UNKNOWN_KEY_LOOKUPS_PER_S": "100"})
    env.update(extra or {})
    return env


def sse_lines(response: httpx.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if line:
            yield line


def json_events(lines: Sequence[str]) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
