"""The package's shape: imports point down through the layers below, no import cycle between modules or between
packages (imports inside functions and imports for type checking only count too: a cycle hidden behind
`TYPE_CHECKING` is still two modules that cannot be read, tested or moved apart), and the Function App never imports
the admin commands (only the operations they share with the admin API). docs/architecture.md says why the layers
are in this order."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.add(child.module)
                found.update(f"{child.module}.{alias.name}" for alias in child.names)
            visit(child)

    visit(tree)
    return found


def graph() -> dict[str, set[str]]:
    paths = [*(ROOT / "shared").rglob("*.py"), ROOT / "function_app.py"]
    modules = {module_name(p): p for p in paths}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


# Each part of `shared` and the layer it sits in: a module imports only from its own part and from lower layers.
LAYERS: dict[str, int] = {
    # values and records: what the stores hold and what settings name; import nothing of the package's
    "shared.records": 0, "shared.clock": 0, "shared.text": 0, "shared.outcomes": 0, "shared.catalog": 0,
    "shared.background": 0, "shared.lifecycle": 0, "shared.waits": 0,
    "shared.config": 1,  # the settings, parsed into records
    "shared.storage": 2,  # the store protocols, their Table/Blob implementations and in-memory twins
    # what the request path keeps beside the stores: metrics and books, the response cache, content safety
    "shared.telemetry": 3, "shared.cache": 3, "shared.safety": 3,
    # the request's parts: who calls (keys, Entra, errors rendered once), limits, where it goes
    "shared.edge": 4, "shared.limits": 4, "shared.routing": 4,
    "shared.flow": 5,  # the request's phases, in order
    "shared.adminops": 6,  # the admin operations, shared by the command and the admin API
    "shared.admin": 7, "shared.console": 7,  # the command; the admin API and its page
    "shared.wiring": 8,  # the one builder of the services of every part, over Table or in-memory stores
    "shared.app": 9,  # the worker: the wiring over Table Storage, the HTTP edge, SIGTERM
    "function_app": 10, "shared": 10,
}


def part(module: str) -> str:
    """The package a module belongs to (`shared.limits.ledger` -> `shared.limits`), or the top-level module itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def parts_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for module, targets in edges.items():
        found.setdefault(part(module), set()).update(part(t) for t in targets if part(t) != part(module))
    return found


def test_no_module_imports_itself_through_others() -> None:
    assert cycles(graph()) == []


def test_no_package_imports_itself_through_others() -> None:
    assert cycles(parts_graph(graph())) == []


def test_every_part_of_the_package_has_a_layer() -> None:
    assert set(parts_graph(graph())) == set(LAYERS)


def test_imports_point_down_the_layers() -> None:
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph().items()
        for target in targets
        if part(target) != part(module) and LAYERS[part(target)] >= LAYERS[part(module)]
    )
    assert upward == []


def test_a_type_checking_import_counts(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from shared.flow.exchange import Services\n",
                     encoding="utf-8")
    assert {"shared.flow.exchange", "shared.flow.exchange.Services"} <= imports(probe)


def test_a_module_is_its_package_part() -> None:
    assert part("shared.limits.ledger") == "shared.limits" and part("shared.config") == "shared.config"
    assert parts_graph({"shared.a.x": {"shared.b.y", "shared.a.z"}, "shared.b.y": {"shared.c"}}) == {
        "shared.a": {"shared.b"}, "shared.b": {"shared.c"}}


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_function_app_never_imports_the_admin_commands() -> None:
    edges = graph()
    reached, todo = set(), ["function_app"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(edges.get(module, ()))
    assert "shared.app" in reached and "shared.flow.gateway" in reached
    # The admin API runs the admin operations (shared.adminops), never the command around them (argparse, printing).
    assert "shared.adminops.operations" in reached and "shared.console.api" in reached
    assert not {m for m in reached if m == "shared.admin" or m.startswith("shared.admin.")}


def test_the_admin_operations_never_import_the_command_or_the_http_api() -> None:
    """One implementation of each operation, under both the command and the API: it depends on neither."""
    edges = graph()
    for module in (m for m in edges if m.startswith("shared.adminops")):
        assert not {t for t in edges[module] if t.startswith(("shared.admin.", "shared.console"))}, module
    assert "shared.adminops.operations" in edges["shared.admin.cli"]
    assert "shared.adminops.operations" in edges["shared.console.api"]


@pytest.mark.process
def test_a_gateway_that_accepts_keys_only_never_loads_the_jwt_library() -> None:
    """PyJWT with cryptography is ~9 MB of a worker's memory: loaded only where Entra ID callers are configured."""
    import os
    import subprocess
    import sys

    from tools import stack

    script = (
        "import sys, asyncio, function_app\n"
        "asyncio.run(function_app.edge.gateway())  # everything the first request builds, without sending anything\n"
        "print('jwt' in sys.modules, 'cryptography' in sys.modules)\n"
    )
    env = {
        **os.environ,
        "GATEWAY_BACKENDS": stack.backends_setting([stack.Region("sim", "uksouth", stack.free_port())]),
        "SIM_API_KEY": "not-used",
        "GATEWAY_TABLE_CONNECTION_STRING": stack.table_connection_string(stack.free_port()),
    }
    for name in ("GATEWAY_ENTRA_TENANTS", "GATEWAY_ENTRA_AUDIENCES"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]


def test_the_license_file_and_the_package_metadata_agree() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    text = (root / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n") and "WITHOUT WARRANTY OF ANY KIND" in text
