"""All checks of one parameters file: parse, deploy (evaluate), resource types, names, model deployments."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from . import armtypes, models, names, syntax
from .deployment import Deployment, ResourceInstance, deploy_params_file
from .evaluate import Context, is_unknown

ROOT = Path(__file__).resolve().parents[2]
BICEP = ROOT / "bicep"


@dataclass
class Report:
    params_file: Path
    deployment: Deployment
    problems: list[str] = field(default_factory=list)


def syntax_problems(paths: list[Path]) -> list[str]:
    found: list[str] = []
    for path in paths:
        for p in syntax.problems(syntax.parse_file(path)):
            found.append(f"{path}:{p.line}:{p.column}: {p.message}")
        found.extend(f"{path}: {m}" for m in ambiguous_types(path))
    return found


def ambiguous_types(path: Path) -> list[str]:
    """Valid Bicep the grammar misreads without an error: in an object type, `a: t?` then `b: u` reads as the
    conditional `t ? b : u`; in an array, `[f(x, y)]` after a conditional's `:` reads as `[f, (x, y)]`."""
    found: list[str] = []
    root = syntax.parse_file(path)
    stack = [root]
    while stack:
        current = stack.pop()
        if current.type == "parenthesized_expression" and len(syntax.named(current)) > 1:
            found.append(f"line {current.start_point[0] + 1}: {syntax.text(current)[:40]!r} reads as a list in "
                         "parentheses; give the call its own variable")
        stack.extend(current.named_children)
    if path.suffix != ".bicep":
        return found
    type_nodes = {"primitive_type", "identifier", "nullable_type", "array_type", "union_type", "object", "string",
                  "parenthesized_type", "type", "number", "boolean", "member_expression"}
    for node in syntax.named(root):
        if node.type != "type_declaration":
            continue
        stack = [syntax.named(node)[-1]]
        while stack:
            current = stack.pop()
            if current.type == "object":
                for prop in syntax.named(current):
                    if prop.type == "object_property":
                        value = syntax.named(prop)[-1]
                        if value.type not in type_nodes:
                            found.append(f"line {prop.start_point[0] + 1}: the type of {syntax.text(syntax.named(prop)[0])!r} "
                                         f"reads as a {value.type}; put a decorator or another property between")
                        stack.append(value)
            else:
                stack.extend(syntax.named(current))
    return found


def suppressed_properties(path: Path) -> frozenset[str]:
    """Property names a `#disable-next-line BCP037` (property not in the type definitions) applies to in a file."""
    return _suppressed(path.read_text(encoding="utf-8"))


@cache
def _suppressed(source: str) -> frozenset[str]:
    lines = source.splitlines()
    keys: set[str] = set()
    for i, line in enumerate(lines[:-1]):
        if re.search(r"#disable-next-line\b.*\bBCP037\b", line):
            match = re.match(r"\s*'?([A-Za-z0-9_$]+)'?\s*:", lines[i + 1])
            if match:
                keys.add(match.group(1))
    return frozenset(keys)


def type_problems(resource: ResourceInstance) -> list[str]:
    found: list[str] = []
    suppressed = suppressed_properties(resource.file)
    for problem in armtypes.check_resource(
        resource.type, resource.api_version, resource.sent_body, existing=resource.existing
    ):
        last = problem.path.rsplit(".", 1)[-1]
        if problem.message.startswith("unknown property") and last in suppressed:
            continue
        found.append(f"{resource.file.name}:{resource.line} {resource.symbol}: {problem}")
    return found


def name_problems(deployment: Deployment) -> list[str]:
    found: list[str] = []
    for resource in deployment.all_resources():
        if resource.existing or is_unknown(resource.name) or not isinstance(resource.name, str):
            continue
        for message in names.check_name(resource.type, resource.name.rsplit("/", 1)[-1]):
            found.append(f"{resource.file.name}:{resource.line} {resource.symbol}: {message}")
    for module in deployment.all_modules():
        if isinstance(module.name, str):
            for message in names.check_name("module", module.name):
                found.append(f"{module.file.name}:{module.line} module {module.symbol}: {message}")
    return found


def registered_models(params_file: Path) -> frozenset[str]:
    """Limited-access models a parameters file says its subscription is approved for: `// bicepcheck: registered m`."""
    text = params_file.read_text(encoding="utf-8")
    found = re.findall(r"^\s*// bicepcheck: registered ([A-Za-z0-9._-]+)\s*$", text, re.M)
    return frozenset(found)


def model_problems(deployment: Deployment, registered: frozenset[str] = frozenset()) -> list[str]:
    found: list[str] = []
    for d in deployment.all_deployments():
        accounts = [r for r in d.resources if r.type == "Microsoft.CognitiveServices/accounts" and not r.existing]
        for r in d.resources:
            if r.type != "Microsoft.CognitiveServices/accounts/deployments" or r.existing:
                continue
            parent = r.body.get("parent")
            account = next((a for a in accounts if getattr(parent, "name", None) == a.name), None)
            region = account.body.get("location") if account else None
            model = r.body.get("properties", {}).get("model", {})
            sku = r.body.get("sku", {}).get("name")
            values = (model.get("name"), model.get("version"), sku, region)
            if any(not isinstance(v, str) for v in values):
                found.append(f"{r.file.name}:{r.line}: model deployment {r.name}: cannot tell {values}")
                continue
            for message in models.check_deployment(*values, registered=registered):  # type: ignore[arg-type]
                found.append(f"{r.file.name}:{r.line}: deployment {r.name} in {region}: {message}")
    regions: Any = deployment.values.get("backendRegions", [])
    for region in regions if isinstance(regions, list) else []:
        if isinstance(region, dict) and region.get("existingAccount") is None:
            skus = [d.get("sku") for d in region.get("deployments", []) if isinstance(d, dict)]
            found.extend(models.check_region_skus(str(region.get("id")), [s for s in skus if isinstance(s, str)]))
    provisioned: Any = deployment.values.get("provisionedBackendRegions", [])
    for region in provisioned if isinstance(provisioned, list) else []:
        if isinstance(region, dict) and region.get("existingAccount") is None:
            unpaced = {str(d.get("sku")) for d in region.get("deployments", []) if isinstance(d, dict)}
            unpaced -= models.PROVISIONED_SKUS
            if unpaced:
                found.append(f"provisioned backend {region.get('id')} creates pay-as-you-go deployments "
                             f"({', '.join(sorted(unpaced))}); it would be "
                             "paced as a PTU: move them to backendRegions")
    return found


def combination_problems(values: dict[str, Any]) -> list[str]:
    """Parameter combinations that deploy but do not work (Bicep has no assertions to refuse them)."""
    found: list[str] = []
    if values.get("appInboundAccess") == "private" and not values.get("enablePrivateNetworking"):
        found.append("appInboundAccess 'private' needs enablePrivateNetworking: without the network the app would "
                     "have public access off and no private endpoint, so no one could call it")
    if values.get("appInboundAccess") == "restricted" and not values.get("appAllowedIpRanges"):
        found.append("appInboundAccess 'restricted' with no appAllowedIpRanges refuses every caller")
    ready = values.get("alwaysReadyInstances", 1)
    if values.get("zoneRedundant") and isinstance(ready, int) and ready < 2:
        found.append(f"zoneRedundant with alwaysReadyInstances {ready}: a zone-redundant Flex Consumption app needs at "
                     "least two always-ready instances (Flex Consumption's requirement for zone redundancy)")
    return found


def check(params_file: Path, ctx: Context | None = None) -> Report:
    deployment, problems = deploy_params_file(params_file.resolve(), ctx or Context())
    report = Report(params_file, deployment, [str(p) for p in problems])
    report.problems.extend(f"{params_file.name}: {m}" for m in combination_problems(deployment.values))
    for resource in deployment.all_resources():
        report.problems.extend(type_problems(resource))
    report.problems.extend(name_problems(deployment))
    report.problems.extend(model_problems(deployment, registered_models(params_file)))
    return report


def params_files() -> list[Path]:
    return sorted(BICEP.glob("*.bicepparam"))


def bicep_files() -> list[Path]:
    return sorted(BICEP.rglob("*.bicep"))
