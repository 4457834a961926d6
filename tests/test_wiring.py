"""One wiring (shared/wiring.py): the app's services over Table Storage and the in-process harness's over the
in-memory stores are the same graph of the same types, so a wiring mistake in the app is one the flow tests see."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest

from shared import app
from shared.clock import FakeClock
from shared.config import load_settings
from shared.routing.router import Router
from shared.storage import protocols
from shared.wiring import Built, Stores, build, memory_stores, table_stores
from tests.fakes.gateway import GatewayHarness, three_regions

ENV = {
    "GATEWAY_TABLE_CONNECTION_STRING": "UseDevelopmentStorage=true",  # clients are made, nothing is contacted
    "GATEWAY_BACKENDS": json.dumps(three_regions()),
    "GATEWAY_GC_TUNING": "false",
}
STORE_PROTOCOLS = tuple(
    p for p in vars(protocols).values() if isinstance(p, type) and p.__name__.endswith("Store") and p.__module__ == protocols.__name__
)


def _attributes(obj: Any) -> Iterator[tuple[str, Any]]:
    names: list[str] = list(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        names += [n for n in getattr(cls, "__slots__", ()) if n not in names]
    for name in sorted(names):
        if hasattr(obj, name):
            yield name, getattr(obj, name)


def graph(root: Any, skip: tuple[Any, ...], depth: int = 6) -> dict[str, str]:
    """Path -> type name of every gateway object reachable from `root` (the stores, the upstream client and the
    telemetry sink named by their role: each side passes its own)."""
    found: dict[str, str] = {}
    seen: set[int] = set()

    def walk(obj: Any, path: str, left: int) -> None:
        if obj is None:
            found[path] = "None"
            return
        if any(obj is s for s in skip):
            found[path] = "<given>"
            return
        kind = type(obj)
        if kind.__name__ in ("Tables",) or any(_is_store(obj, p) for p in STORE_PROTOCOLS):
            found[path] = "<store>"
            return
        if isinstance(obj, (list, tuple)) and obj and not isinstance(obj[0], (str, int, float)):
            walk(obj[0], path + "[0]", left)
            return
        if not kind.__module__.startswith("shared.") or id(obj) in seen:
            return
        seen.add(id(obj))
        found[path] = kind.__qualname__
        if left:
            for name, value in _attributes(obj):
                walk(value, f"{path}.{name}", left - 1)

    walk(root, "services", depth)
    return found


def _is_store(obj: Any, protocol: type) -> bool:
    methods = [m for m in vars(protocol) if not m.startswith("_")]
    return bool(methods) and all(callable(getattr(obj, m, None)) for m in methods) and type(obj).__name__.endswith(
        ("Store", "Stores"))


def _given(built: Built, *extra: Any) -> tuple[Any, ...]:
    stores = tuple(getattr(built.stores, f.name) for f in dataclasses.fields(Stores))
    return (*stores, built.services.upstream, *extra)


@pytest.fixture
async def harness() -> Any:
    gw = GatewayHarness(three_regions())
    yield gw
    await gw.close()


async def test_the_app_and_the_harness_build_the_same_services(harness: GatewayHarness) -> None:
    settings = harness.settings  # its stores' connection string names Azurite; nothing is contacted
    built = app.build_services(settings, FakeClock())
    try:
        sink = built.counter._inner._inner  # type: ignore[attr-defined]  # SpendingTelemetry -> the OpenTelemetry sink
        app_graph = graph(built.services, _given(built, sink))
        harness_graph = graph(harness.services, _given(harness.built, harness.telemetry))
    finally:
        await app.Edge(settings, built).close()
    assert app_graph == harness_graph
    assert len(app_graph) > 40  # the walk reached the services' parts, not just the top


async def test_the_harness_serves_through_what_the_wiring_built(harness: GatewayHarness) -> None:
    gateway = await harness.gateway()
    assert gateway.s is harness.built.services
    assert harness.services.limiter._inner is harness.limiter  # type: ignore[attr-defined]


async def test_the_comparison_sees_a_part_wired_differently(harness: GatewayHarness) -> None:
    """What the first test guards against: a worker whose router lost its shared PTU-capacity store (as the harness's
    once had) is a different graph."""
    built = build(harness.settings, memory_stores(), harness.clock, harness.telemetry, upstream=harness.upstream,
                  background=False)
    before = graph(built.services, _given(built, harness.telemetry))
    built.services.router = Router(harness.settings.backends, harness.clock, built.services.telemetry,
                                   built.stores.breakers, harness.settings.breaker_sync_s)
    after = graph(built.services, _given(built, harness.telemetry))
    assert before != after


def test_the_table_stores_fill_every_role() -> None:
    settings = load_settings(ENV)
    stores = table_stores(settings)
    for field in dataclasses.fields(Stores):
        if field.name not in ("audit",):  # an audit store only where a policy audits
            assert getattr(stores, field.name) is not None, field.name
    assert stores.tables is not None
