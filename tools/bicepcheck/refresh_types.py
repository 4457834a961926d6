"""Refresh the vendored subset of Azure's generated Bicep type definitions (tools/bicepcheck/azure_types/).

Usage, from the repository root, with a local checkout of github.com/Azure/bicep-types-az:

    .venv/bin/python -m tools.bicepcheck.refresh_types /path/to/bicep-types-az [--commit SHA]

It lists every `resource ... 'Type@version'` in bicep/**/*.bicep, finds each one in the checkout's
generated/**/types.json, and writes, per source file, only those resource types and the types they reference
(renumbered), plus SOURCE.json with the repository's commit (read with git, or given with --commit) and the source
path of every file. A type or version the checkout does not have is an error: change the API version in the Bicep.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .deployment import load_template

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "azure_types"
REPOSITORY = "https://github.com/Azure/bicep-types-az"


def used_types(bicep_dir: Path) -> set[str]:
    """'Type@version' of every resource declared in the Bicep files."""
    found: set[str] = set()
    for path in sorted(bicep_dir.rglob("*.bicep")):
        for declared in load_template(path.resolve()).resources.values():
            found.add(declared.target)
    return found


def _refs(value: Any) -> Iterable[int]:
    if isinstance(value, dict):
        ref = value.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            yield int(ref[2:])
        for item in value.values():
            yield from _refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


def _renumber(value: Any, mapping: dict[int, int]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$ref"}:
            return {"$ref": f"#/{mapping[int(value['$ref'][2:])]}"}
        return {k: _renumber(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_renumber(v, mapping) for v in value]
    return value


def subset(types: list[dict[str, Any]], roots: list[int]) -> list[dict[str, Any]]:
    """The given entries of a types.json and everything they reference, renumbered in their original order."""
    keep: set[int] = set()
    todo = list(roots)
    while todo:
        index = todo.pop()
        if index in keep:
            continue
        keep.add(index)
        todo.extend(_refs(types[index]))
    order = sorted(keep)
    mapping = {old: new for new, old in enumerate(order)}
    return [_renumber(types[i], mapping) for i in order]


def find(checkout: Path, wanted: set[str]) -> dict[Path, list[tuple[str, int]]]:
    """For each types.json that declares a wanted resource type: [(name, index)]."""
    lowered = {w.lower(): w for w in wanted}
    hits: dict[Path, list[tuple[str, int]]] = {}
    for path in sorted((checkout / "generated").rglob("types.json")):
        namespace = path.parent.parent.name  # generated/<area>/<namespace>/<version>/types.json
        if not any(w.split("/")[0].lower() == namespace.lower() for w in lowered):
            continue
        types = json.loads(path.read_text(encoding="utf-8"))
        for index, entry in enumerate(types):
            if entry.get("$type") == "ResourceType" and entry["name"].lower() in lowered:
                hits.setdefault(path, []).append((lowered[entry["name"].lower()], index))
    return hits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", type=Path, help="a local checkout of Azure/bicep-types-az")
    parser.add_argument("--commit", help="the checkout's commit, when it is not a git work tree")
    args = parser.parse_args(argv)
    commit = args.commit or subprocess.run(
        ["git", "-C", str(args.checkout), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    wanted = used_types(ROOT / "bicep")
    hits = find(args.checkout, wanted)
    covered = {name for entries in hits.values() for name, _ in entries}
    missing = wanted - covered
    if missing:
        print(f"not in the checkout: {sorted(missing)}", file=sys.stderr)
        return 1
    OUT.mkdir(exist_ok=True)
    for old in OUT.glob("*.json"):
        old.unlink()
    files: dict[str, dict[str, Any]] = {}
    for path, entries in sorted(hits.items()):
        types = json.loads(path.read_text(encoding="utf-8"))
        namespace, version = path.parent.parent.name, path.parent.name
        name = f"{namespace}@{version}.json"
        (OUT / name).write_text(json.dumps(subset(types, [i for _, i in entries]), indent=1) + "\n", encoding="utf-8")
        files[name] = {"source": str(path.relative_to(args.checkout)), "resources": sorted(n for n, _ in entries)}
    source = {
        "repository": REPOSITORY,
        "commit": commit,
        "refreshed": datetime.now(UTC).date().isoformat(),
        "files": files,
    }
    (OUT / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(files)} files for {len(wanted)} resource types from {REPOSITORY}@{commit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
