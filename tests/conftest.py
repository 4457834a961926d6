from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import platform
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import GatewayFactory, Stack, gateway_env, leaks, start_simulators, test_regions
from tests.fakes.gateway import GatewayHarness
from tests.processguard import Guard
from tools import stack

# Nothing in the tests may leave the machine: Azure Monitor's extras (statsbeat, live metrics, metadata lookups) off.
os.environ.setdefault("APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL", "true")
os.environ.setdefault("APPLICATIONINSIGHTS_SDKSTATS_DISABLED", "true")
os.environ.setdefault("APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED", "true")
os.environ.setdefault("OTEL_EXPERIMENTAL_RESOURCE_DETECTORS", "azure_app_service")



def _one_tls_context() -> None:
    """Every httpx client the tests build (each `openai.OpenAI(...)`, each `httpx.get(...)`) makes a TLS context and
    loads the system's CA bundle into it: tens of milliseconds of CPU, for clients that then speak plain http to
    127.0.0.1. The default context (verify=True, no client certificate) is made once and shared; any other is made as
    asked. In the test process only (httpx, and httpx2 that the openai SDK uses); gateway processes are not touched."""
    for name in ("httpx._transports.default", "httpx2._transports.default"):
        try:
            transports = importlib.import_module(name)
        except ImportError:
            continue
        transports.__dict__["create_ssl_context"] = _shared_default(transports.__dict__["create_ssl_context"])


_tls_shared = [True]


def _shared_default(original: Callable[..., ssl.SSLContext]) -> Callable[..., ssl.SSLContext]:
    made: dict[bool, ssl.SSLContext] = {}

    def create_ssl_context(verify: Any = True, cert: Any = None, trust_env: bool = True) -> ssl.SSLContext:
        if verify is not True or cert is not None or not _tls_shared[0]:
            return original(verify=verify, cert=cert, trust_env=trust_env)
        if trust_env not in made:
            made[trust_env] = original(verify=verify, cert=cert, trust_env=trust_env)
        return made[trust_env]

    return create_ssl_context


_one_tls_context()
_ids = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


# The fixtures that start processes: a test using any of them (directly or through another fixture) is marked
# `process`, so `--quick` leaves it out without each test saying so.
PROCESS_FIXTURES = frozenset({"azurite", "e2e", "gateway_factory", "module_gateways", "fresh_sims"})
_guard = Guard()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--quick", action="store_true",
        help="in-process tests only: leaves out tests marked e2e or process, and fails any test that starts a process",
    )


def pytest_configure(config: pytest.Config) -> None:
    # With pytest-xdist (scripts/test runs several workers) the guard goes on in each worker: the controller must start them.
    controller = getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput")
    if config.getoption("--quick") and not controller:
        # The standard library asks `uname -p` once per interpreter (azure-identity's user agent reads it): asked here,
        # before the guard, it is cached and no test starts it.
        platform.processor()
        _guard.install()
        # ...and reaches nothing beyond 127.0.0.1: the guard the end-to-end tests load into gateway processes, here.
        spec = importlib.util.spec_from_file_location("netguard", Path(__file__).parent / "netguard" / "sitecustomize.py")
        assert spec is not None and spec.loader is not None
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def pytest_unconfigure(config: pytest.Config) -> None:
    _guard.uninstall()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.process)
    if not config.getoption("--quick"):
        return
    kept: list[pytest.Item] = []
    left: list[pytest.Item] = []
    for item in items:
        outside = item.get_closest_marker("e2e") or item.get_closest_marker("process")
        (left if outside else kept).append(item)
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = kept


_call_failed = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if call.when == "call":
        item.stash[_call_failed] = bool(getattr(report, "failed", False))
    return report


@pytest.fixture(autouse=True)
def _in_process_only(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under --quick: a test that asked for a process fails, even if it caught the refusal (once: a test that already
    failed on the refusal is not reported again)."""
    _guard.take()
    yield
    refused = _guard.take()
    if refused and not request.node.stash.get(_call_failed, False):
        pytest.fail(f"--quick runs in-process only, and this test started a process: {refused[0]}", pytrace=False)


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("logs")
    os.environ["GATEWAY_LOG_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def azurite(log_dir: Path) -> Iterator[stack.Child]:
    child = stack.start_azurite(stack.free_port(), log_dir)
    yield child
    child.stop()


@pytest.fixture(scope="session")
def e2e(azurite: stack.Child, log_dir: Path) -> Iterator[Stack]:
    """Azurite, three simulated regions (PTU at priority 1) and one gateway process."""
    regions = test_regions()
    simulators = start_simulators(regions, latency_ms=5, token_latency_ms=2)
    env = gateway_env(azurite.port, regions)
    try:
        gateway = stack.start_gateway(env, log_dir=log_dir)
    except Exception:
        for sim in simulators:
            sim.child.stop()
        raise
    running = Stack(table_port=azurite.port, simulators=simulators, gateways=[gateway], env=env)
    yield running
    gateway.stop()
    for sim in simulators:
        sim.child.stop()
    # Once every test that used the stack is done, whatever their order: nothing the gateways logged or exported may
    # hold a consumer key handed out during the run, or the backends' key.
    if running.keys:
        leaked, scanned = leaks([*running.keys, stack.SIM_API_KEY], log_dir)
        assert scanned > 0, "the gateways logged nothing: the leak scan had nothing to read"
        assert not leaked, f"a key leaked into {sorted(set(leaked))}"


@pytest.fixture
def gateway_factory(e2e: Stack, log_dir: Path) -> Iterator[GatewayFactory]:
    """Extra gateway processes, stopped after the test."""
    factory = GatewayFactory(e2e, log_dir)
    yield factory
    factory.stop()


@pytest.fixture(scope="module")
def module_gateways(e2e: Stack, log_dir: Path) -> Iterator[GatewayFactory]:
    """Extra gateway processes shared by a module's tests (each test with consumers of its own), stopped after it."""
    factory = GatewayFactory(e2e, log_dir)
    yield factory
    factory.stop()


@pytest.fixture
def fresh_sims(e2e: Stack) -> Iterator[Stack]:
    """The session stack with simulator stats, faults and windows cleared before and after the test."""
    e2e.reset_simulators()
    yield e2e
    e2e.reset_simulators()


@pytest.fixture(scope="module")
def own_tls_context() -> Iterator[None]:
    """For a module whose bounds were set at the pace of clients that each build their own TLS context."""
    _tls_shared[0] = False
    yield
    _tls_shared[0] = True


@pytest.fixture
async def harness() -> AsyncIterator[GatewayHarness]:
    """The real gateway in-process: in-memory stores, a fake clock, a scripted upstream, three regions."""
    built = GatewayHarness()
    yield built
    await built.close()
