"""Resource bodies checked against Azure's generated Bicep type definitions (the vendored subset in azure_types/,
from github.com/Azure/bicep-types-az; tools/bicepcheck/refresh_types.py refreshes it).

A body is what the deployment would send: every property must exist in the type, no read-only property may be set,
every required property of a created resource must be given, string literals must be one of the type's values, and
strings, integers and arrays must respect the type's bounds and patterns. Values only Azure knows (`Unknown`) pass.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from .evaluate import Unknown

TYPES_DIR = Path(__file__).resolve().parent / "azure_types"

REQUIRED, READ_ONLY, WRITE_ONLY, DEPLOY_TIME_CONSTANT = 1, 2, 4, 8

# Properties every resource declaration may carry that the generated types do not list on every resource.
_ALWAYS_ALLOWED = {"name", "scope", "parent", "dependsOn"}


@dataclass(frozen=True)
class TypeProblem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class TypeIndex:
    def __init__(self, directory: Path = TYPES_DIR):
        self.files: dict[str, list[dict[str, Any]]] = {}
        self.resources: dict[str, tuple[str, dict[str, Any]]] = {}
        for path in sorted(directory.glob("*@*.json")):
            types = json.loads(path.read_text(encoding="utf-8"))
            self.files[path.name] = types
            for entry in types:
                if entry.get("$type") == "ResourceType":
                    self.resources[entry["name"].lower()] = (path.name, entry)

    def resource(self, rtype: str, api_version: str) -> tuple[str, dict[str, Any]] | None:
        return self.resources.get(f"{rtype}@{api_version}".lower())

    def versions(self, rtype: str) -> list[str]:
        prefix = f"{rtype.lower()}@"
        return sorted(k[len(prefix) :] for k in self.resources if k.startswith(prefix))

    def deref(self, file: str, ref: dict[str, Any]) -> dict[str, Any]:
        return self.files[file][int(ref["$ref"][2:])]


@cache
def index() -> TypeIndex:
    return TypeIndex()


def check_resource(
    rtype: str, api_version: str, body: dict[str, Any], *, existing: bool, types: TypeIndex | None = None
) -> list[TypeProblem]:
    types = types or index()
    found = types.resource(rtype, api_version)
    if found is None:
        known = types.versions(rtype)
        hint = f" (vendored versions: {', '.join(known)})" if known else " (type not vendored)"
        return [TypeProblem(f"{rtype}@{api_version}", f"unknown resource type or API version{hint}")]
    file, resource = found
    body_type = types.deref(file, resource["body"])
    checker = _Checker(types, file, existing)
    if body_type["$type"] == "DiscriminatedObjectType":
        checker.discriminated(body, body_type, rtype, top=True)
    else:
        checker.object(body, body_type, rtype, top=True)
    return checker.problems


class _Checker:
    def __init__(self, types: TypeIndex, file: str, existing: bool):
        self.types = types
        self.file = file
        self.existing = existing
        self.problems: list[TypeProblem] = []

    def report(self, path: str, message: str) -> None:
        self.problems.append(TypeProblem(path, message))

    def resolve(self, ref: dict[str, Any]) -> dict[str, Any]:
        return self.types.deref(self.file, ref)

    def value(self, value: Any, ref: dict[str, Any], path: str) -> None:
        # null leaves an optional property out (ARM drops it); required ones are checked by the object.
        if isinstance(value, Unknown) or value is None:
            return
        t = self.resolve(ref)
        kind = t["$type"]
        if kind == "AnyType":
            return
        if kind == "StringType":
            self.string(value, t, path)
        elif kind == "StringLiteralType":
            if value != t["value"]:
                self.report(path, f"{value!r} is not {t['value']!r}")
        elif kind == "IntegerType":
            if not isinstance(value, int) or isinstance(value, bool):
                self.report(path, f"{value!r} is not an integer")
            elif ("minValue" in t and value < t["minValue"]) or ("maxValue" in t and value > t["maxValue"]):
                self.report(path, f"{value} is outside {t.get('minValue')}..{t.get('maxValue')}")
        elif kind == "BooleanType":
            if not isinstance(value, bool):
                self.report(path, f"{value!r} is not a boolean")
        elif kind == "NullType":
            if value is not None:
                self.report(path, f"{value!r} is not null")
        elif kind == "ArrayType":
            if not isinstance(value, list):
                self.report(path, f"expected an array, got {type(value).__name__}")
                return
            if "minLength" in t and len(value) < t["minLength"] or "maxLength" in t and len(value) > t["maxLength"]:
                self.report(path, f"{len(value)} items, outside {t.get('minLength')}..{t.get('maxLength')}")
            for i, item in enumerate(value):
                self.value(item, t["itemType"], f"{path}[{i}]")
        elif kind == "UnionType":
            self.union(value, t, path)
        elif kind == "ObjectType":
            self.object(value, t, path)
        elif kind == "DiscriminatedObjectType":
            self.discriminated(value, t, path)
        elif kind in ("ResourceFunctionType", "FunctionType"):
            return

    def string(self, value: Any, t: dict[str, Any], path: str) -> None:
        if not isinstance(value, str):
            self.report(path, f"{value!r} is not a string")
            return
        if "minLength" in t and len(value) < t["minLength"]:
            self.report(path, f"{value!r} is shorter than {t['minLength']}")
        if "maxLength" in t and len(value) > t["maxLength"]:
            self.report(path, f"{value!r} ({len(value)} characters) is longer than {t['maxLength']}")
        if "pattern" in t and not re.search(t["pattern"], value):
            self.report(path, f"{value!r} does not match {t['pattern']}")

    def union(self, value: Any, t: dict[str, Any], path: str) -> None:
        members = [self.resolve(e) for e in t["elements"]]
        literals = [m["value"] for m in members if m["$type"] == "StringLiteralType"]
        if isinstance(value, str) and value in literals:
            return
        others = [e for e, m in zip(t["elements"], members, strict=True) if m["$type"] != "StringLiteralType"]
        if literals and isinstance(value, str):
            # Many enums are open in the definitions (the literals, or any string): ARM accepts another string and
            # the resource provider rejects it at deployment. Stricter than Bicep: a string must be one of the
            # documented values, in their case.
            self.report(path, f"{value!r} is not one of {literals}")
            return
        for element in others:
            attempt = _Checker(self.types, self.file, self.existing)
            attempt.value(value, element, path)
            if not attempt.problems:
                return
        if literals and not others:
            self.report(path, f"{value!r} is not one of {literals}")
        elif others:
            attempt = _Checker(self.types, self.file, self.existing)
            attempt.value(value, others[0], path)
            self.problems.extend(attempt.problems)

    def properties(self, t: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return dict(t.get("properties", {}))

    def object(self, value: Any, t: dict[str, Any], path: str, *, top: bool = False) -> None:
        if not isinstance(value, dict):
            self.report(path, f"expected an object, got {value!r}")
            return
        self.object_with(value, self.properties(t), t.get("additionalProperties"), path, top=top)

    def object_with(
        self,
        value: dict[str, Any],
        props: dict[str, dict[str, Any]],
        additional: dict[str, Any] | None,
        path: str,
        *,
        top: bool = False,
    ) -> None:
        by_lower = {k.lower(): k for k in props}
        for key, item in value.items():
            if top and key in _ALWAYS_ALLOWED and key not in props:
                continue
            declared = by_lower.get(key.lower())
            where = f"{path}.{key}"
            if declared is None:
                if additional is not None:
                    self.value(item, additional, where)
                else:
                    self.report(where, f"unknown property (known: {', '.join(sorted(props))})")
                continue
            if declared != key:
                self.report(where, f"property is spelt {declared!r}")
            prop = props[declared]
            flags = prop.get("flags", 0)
            if flags & READ_ONLY and not flags & REQUIRED and not (top and key == "name"):
                if not (self.existing and top):
                    self.report(where, "read-only property is set")
                continue
            self.value(item, prop["type"], where)
        if self.existing and top:
            return
        for name, prop in props.items():
            given = next((v for k, v in value.items() if k.lower() == name.lower()), None)
            if prop.get("flags", 0) & REQUIRED and given is None:
                if top and name in ("name",):
                    continue
                self.report(f"{path}.{name}", "required property is missing")

    def discriminated(self, value: Any, t: dict[str, Any], path: str, *, top: bool = False) -> None:
        if not isinstance(value, dict):
            self.report(path, f"expected an object, got {value!r}")
            return
        key = t["discriminator"]
        chosen = value.get(key)
        base = dict(t.get("baseProperties", {}))
        elements = t.get("elements", {})
        if isinstance(chosen, Unknown):
            return
        if chosen not in elements:
            self.report(f"{path}.{key}", f"{chosen!r} is not one of {sorted(elements)}")
            return
        element = self.resolve(elements[chosen])
        merged = {**base, **self.properties(element)}
        self.object_with(value, merged, element.get("additionalProperties"), path, top=top)
