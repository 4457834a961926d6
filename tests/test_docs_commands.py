"""Every shell command the README and docs show works as pasted: the offline ones are run (the admin command's
consumer and usage commands, against Azurite, in the order a reader meets them); the rest are checked against the
parser of the command they call (the admin command, scripts/run, the simulator, benchmarks, pytest paths), since
running them needs Azure or a running gateway."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.admin import cli, queries
from tests.conftest import unique
from tests.docs_commands import ROOT, Command, commands
from tools import dev, stack

ALL = commands()
PYTHON = [c for c in ALL if c.python_module() is not None]


def _admin(command: Command) -> list[str] | None:
    module = command.python_module()
    if module is None or module[1] != "shared.admin" or "..." in module[2]:
        return None
    return module[2]


def test_the_docs_show_commands_at_all() -> None:
    assert len(ALL) > 40 and sum(1 for c in ALL if _admin(c)) >= 15


@pytest.mark.parametrize("command", PYTHON, ids=lambda c: c.where[:90])
def test_python_commands_use_the_projects_venv_and_name_modules_that_exist(command: Command) -> None:
    interpreter, module, _ = command.python_module()  # type: ignore[misc]
    assert interpreter == ".venv/bin/python", f"{command.where}: run it with the project's .venv/bin/python"
    assert importlib.util.find_spec(module) is not None, f"{command.where}: no module {module}"


def _created_id(arguments: list[str]) -> str | None:
    args = cli.parser().parse_args(arguments)
    if getattr(args, "action", None) != "create":
        return None
    return str(args.id or cli._slug(args.name))


def test_admin_commands_parse_and_name_only_consumers_the_same_page_created() -> None:
    created: dict[Path, set[str]] = {}
    checked = 0
    for command in ALL:
        arguments = _admin(command)
        if arguments is None:
            continue
        if "query" in arguments[:3]:
            queries.parser().parse_args(arguments[arguments.index("query") + 1:])
            checked += 1
            continue
        try:
            args = cli.parser().parse_args(arguments)
        except SystemExit:
            pytest.fail(f"{command.where}: the admin command refuses these arguments")
        known = created.setdefault(command.path, {"demo"})  # scripts/run creates the demo consumer
        if getattr(args, "action", None) == "create":
            assert args.deployments or args.all_deployments, f"{command.where}: create needs --deployments or --all-deployments"
            known.add(_created_id(arguments) or "")
        elif getattr(args, "id", None) is not None:
            assert args.id in known, f"{command.where}: consumer {args.id!r} was never created on this page"
        checked += 1
    assert checked >= 15


def test_scripts_run_test_and_pytest_commands_parse() -> None:
    seen = set()
    for command in ALL:
        words = command.argv()
        if words[0] == "scripts/run":
            dev.parser().parse_args(words[1:])
            seen.add("run")
        elif words[0] == "scripts/test":
            assert (ROOT / "scripts" / "test").exists()
            seen.add("test")
        module = command.python_module()
        if module is not None and module[1] == "pytest":
            for word in module[2]:
                if word.startswith("tests/"):
                    path = ROOT / word.split("::")[0]
                    assert path.exists(), f"{command.where}: no {word}"
                    if "-k" in module[2]:
                        expression = module[2][module[2].index("-k") + 1]
                        assert expression in path.read_text(), f"{command.where}: -k {expression} selects nothing"
            seen.add("pytest")
    assert seen == {"run", "test", "pytest"}


@pytest.mark.parametrize(
    "command", [c for c in PYTHON if c.python_module()[1].startswith(("tools.", "bench."))],  # type: ignore[index]
    ids=lambda c: c.where[:90],
)
def test_tool_and_benchmark_commands_use_options_their_module_has(command: Command) -> None:
    _, module, arguments = command.python_module()  # type: ignore[misc]
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    origin = Path(spec.origin)
    if origin.name == "__init__.py" and (origin.parent / "__main__.py").exists():
        origin = origin.parent / "__main__.py"
    source = origin.read_text()
    for word in arguments:
        option = word.split("=", 1)[0]
        if option.startswith("--") and option != "--help":
            assert f'"{option}"' in source, f"{command.where}: {module} has no option {option}"


# ---- run: the offline ones, against Azurite -------------------------------------------------------------------------


def _local_backends() -> str:
    values = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    return str(values["GATEWAY_BACKENDS"])


@pytest.mark.e2e
@pytest.mark.parametrize("page", ["README.md", "docs/deploy.md", "docs/developing.md"])
def test_the_admin_commands_of_a_page_run_as_pasted(page: str, azurite: stack.Child, tmp_path: Path) -> None:
    """Each page's consumer and usage commands, in order, on fresh tables: each must succeed. README's against the
    local stack's backends (so --deployments is checked); deploy.md's as an operator runs them (no backends here)."""
    env = {**os.environ, "GATEWAY_TABLE_CONNECTION_STRING": stack.table_connection_string(azurite.port),
           "GATEWAY_TABLE_PREFIX": re.sub(r"[^A-Za-z0-9]", "", unique("docs"))[:30], "SIM_API_KEY": stack.SIM_API_KEY,
           "PYTHONPATH": str(ROOT)}
    env.pop("GATEWAY_BACKENDS", None)
    if page in ("README.md", "docs/developing.md"):
        env["GATEWAY_BACKENDS"] = _local_backends()
    # The file a create-many line names, as its comment describes it.
    (tmp_path / "consumers.jsonl").write_text(json.dumps({"name": "Batch one", "deployments": ["gpt-4o"]}) + "\n")
    ran = 0
    for command in commands([ROOT / page]):
        arguments = _admin(command)
        if arguments is None or "query" in arguments[:3]:
            continue  # queries need Application Insights
        done = subprocess.run([sys.executable, "-m", "shared.admin", *arguments], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{command.where}\n{done.stderr}"
        ran += 1
    assert ran >= {"README.md": 10, "docs/deploy.md": 3, "docs/developing.md": 4}[page]
