"""A small evaluator of Bicep expressions over tree-sitter nodes: enough of the language to compute what a deployment
would send to Azure Resource Manager for given parameters (names, SKUs, property values), without Azure.

Values are Python values (str, int, bool, None, list, dict). What only Azure knows at deployment time (a resource's
runtime properties, an identity's principal id) is an `Unknown`, which every operation propagates. Functions that
depend on the deployment's context (`resourceGroup()`, `subscription()`, `uniqueString()`, `guid()`) return
deterministic stand-ins of the real shape and length, from a `Context` the caller chooses.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .syntax import Node, named, string_value, text, unescape


class EvaluationError(Exception):
    """An expression this evaluator cannot compute, or that Bicep would reject."""


@dataclass(frozen=True)
class Unknown:
    """A value only known during the deployment (for example a resource's runtime property)."""

    what: str

    def __repr__(self) -> str:
        return f"<unknown {self.what}>"


@dataclass(frozen=True)
class Context:
    """Where the deployment happens: the stand-ins for Azure's context functions."""

    subscription_id: str = "00000000-0000-0000-0000-000000000000"
    tenant_id: str = "11111111-1111-1111-1111-111111111111"
    resource_group: str = "rg-aigw"
    location: str = "uksouth"
    environment: Mapping[str, str] = field(default_factory=dict)  # for readEnvironmentVariable in .bicepparam files

    def resource_group_id(self, subscription_id: str | None = None, resource_group: str | None = None) -> str:
        return f"/subscriptions/{subscription_id or self.subscription_id}/resourceGroups/{resource_group or self.resource_group}"


@dataclass
class Lambda:
    """A lambda value: its parameters, the scope it was written in, and its body."""

    params: list[str]
    scope: Scope
    body: Callable[[Scope], Any]

    def __call__(self, *args: Any) -> Any:
        inner = self.scope.child(dict(zip(self.params, args, strict=False)))
        return self.body(inner)



class Scope:
    """Names visible to an expression: locals (loop and lambda variables) over a resolver of the file's symbols."""

    def __init__(self, resolve: Callable[[str], Any], ctx: Context, base: Path, local: dict[str, Any] | None = None):
        self._resolve = resolve
        self.ctx = ctx
        self.base = base  # the file's folder, for loadTextContent
        self._local = local or {}

    def child(self, local: dict[str, Any]) -> Scope:
        return Scope(self._resolve, self.ctx, self.base, {**self._local, **local})

    def lookup(self, name: str) -> Any:
        if name in self._local:
            return self._local[name]
        return self._resolve(name)


def is_unknown(value: Any) -> bool:
    if isinstance(value, Unknown):
        return True
    if isinstance(value, list):
        return any(is_unknown(v) for v in value)
    if isinstance(value, dict):
        return any(is_unknown(v) for v in value.values())
    return False


def unique_string(*parts: Any) -> str:
    """13 lowercase base-32 characters, like Bicep's uniqueString (not the same hash: a stand-in of the same shape)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return base64.b32encode(digest).decode().lower()[:13]


def guid_of(*parts: Any) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "|".join(str(p) for p in parts)))


_COMPOSITE = ("member_expression", "subscript_expression", "binary_expression", "ternary_expression", "call_expression")


_POSTFIX = ("member_expression", "subscript_expression", "call_expression")
_MISBOUND = ("unary_expression", "binary_expression", "ternary_expression")


def _leftmost(node: Node, through: tuple[str, ...]) -> Node:
    while node.type in through and node.named_child_count:
        node = node.named_children[0]
    return node


def _leftmost_lambda(node: Node) -> Node | None:
    found = _leftmost(node, _COMPOSITE)
    return found if found.type == "lambda_expression" else None


def evaluate(node: Node, scope: Scope) -> Any:
    kind = node.type
    if kind in _COMPOSITE:
        # tree-sitter-bicep ends a lambda's body at its first operand (`x => !x.a` reads as `(x => !x).a`); the
        # lambda really spans the whole expression, so its body is re-read from the source.
        inner = _leftmost_lambda(node)
        if inner is not None and inner.start_byte == node.start_byte:
            return _lambda_span(inner, node, scope)
    if kind in _POSTFIX:
        # Likewise member access, indexing and calls bind looser than prefix and infix operators in the grammar
        # (`!a.b` reads as `(!a).b`, `a ?? f().b` as `(a ?? f()).b`): the operator's last operand is re-read with
        # the postfix operations that follow it.
        inner = _leftmost(node, _POSTFIX)
        if inner is not node and inner.start_byte == node.start_byte and inner.type in _MISBOUND:
            return _reassociate(inner, node, scope)
    if kind == "string":
        return _string(node, scope)
    if kind == "number":
        return int(text(node))
    if kind == "boolean":
        return text(node) == "true"
    if kind == "null":
        return None
    if kind == "identifier":
        return scope.lookup(text(node))
    if kind == "parenthesized_expression":
        if len(named(node)) != 1:
            raise EvaluationError(f"line {node.start_point[0] + 1}: misread parentheses {text(node)[:40]!r}")
        return evaluate(named(node)[0], scope)
    if kind == "array":
        return [evaluate(item, scope) for item in named(node)]
    if kind == "object":
        return _object(node, scope)
    if kind == "member_expression":
        return _member(node, scope)
    if kind == "subscript_expression":
        return _subscript(node, scope)
    if kind == "call_expression":
        return _call(node, scope)
    if kind == "unary_expression":
        return _unary(node, scope)
    if kind == "binary_expression":
        return _binary(node, scope)
    if kind == "ternary_expression":
        return _ternary(node, scope)
    if kind == "lambda_expression":
        return _lambda(node, scope)
    if kind == "for_statement":
        return evaluate_for(node, scope, lambda body, s: evaluate(body, s))
    raise EvaluationError(f"line {node.start_point[0] + 1}: cannot evaluate a {kind}: {text(node)[:60]!r}")


def _string(node: Node, scope: Scope) -> Any:
    literal = string_value(node)
    if literal is not None:
        return literal
    if text(node).startswith("'''"):
        return text(node)[3:-3]
    parts: list[str] = []
    unknown = False
    for child in node.named_children:
        if child.type == "string_content":
            parts.append(text(child))
        elif child.type == "escape_sequence":
            parts.append(unescape(text(child)))
        elif child.type == "interpolation":
            value = evaluate(named(child)[0], scope)
            if is_unknown(value):
                unknown = True
            parts.append(value if isinstance(value, str) else to_string(value))
    return Unknown(f"string {text(node)[:60]}") if unknown else "".join(parts)


def to_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def _object(node: Node, scope: Scope) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for prop in named(node):
        if prop.type == "decorators":
            continue
        if prop.type != "object_property":
            raise EvaluationError(f"line {prop.start_point[0] + 1}: unexpected {prop.type} in an object")
        key_node, value_node = named(prop)[0], named(prop)[-1]
        if key_node.type == "string":
            key = _string(key_node, scope)
            if isinstance(key, Unknown):
                continue  # a computed key only Azure knows: leave it out
        else:
            key = text(key_node)
        result[key] = evaluate(value_node, scope)
    return result


def property_of(value: Any, name: str, *, safe: bool = False) -> Any:
    if isinstance(value, Unknown):
        return Unknown(f"{value.what}.{name}")
    if value is None and safe:
        return None
    if hasattr(value, "property"):
        return value.property(name)
    if isinstance(value, dict):
        for key in value:
            if key.lower() == name.lower():  # Bicep property access is case-insensitive
                return value[key]
        if safe:
            return None
        raise EvaluationError(f"no property {name!r} in {sorted(value)}")
    raise EvaluationError(f"cannot read .{name} of {type(value).__name__}")


def _member(node: Node, scope: Scope) -> Any:
    obj_node = node.child_by_field_name("object")
    prop = node.child_by_field_name("property")
    assert obj_node is not None and prop is not None
    safe = any(c.type == ".?" for c in node.children)
    name = text(prop)
    obj = evaluate(obj_node, scope)
    if isinstance(obj, Namespace):
        return obj.function(name)
    return property_of(obj, name, safe=safe)


def index_of(value: Any, index: Any, *, safe: bool = False) -> Any:
    if isinstance(value, Unknown) or isinstance(index, Unknown):
        return Unknown("indexed value")
    if value is None and safe:
        return None
    if isinstance(value, list) and isinstance(index, int):
        if 0 <= index < len(value):
            return value[index]
        if safe:
            return None
        raise EvaluationError(f"index {index} out of range ({len(value)} items)")
    if isinstance(index, str):
        return property_of(value, index, safe=safe)
    raise EvaluationError(f"cannot index {type(value).__name__} with {index!r}")


def _subscript(node: Node, scope: Scope) -> Any:
    obj_node = node.child_by_field_name("object")
    idx_node = node.child_by_field_name("index")
    assert obj_node is not None and idx_node is not None
    safe = any(c.type == "[?" or text(c) == "?" for c in node.children if not c.is_named)
    obj = evaluate(obj_node, scope)
    return index_of(obj, evaluate(idx_node, scope), safe=safe)


def _unary(node: Node, scope: Scope) -> Any:
    op = node.child_by_field_name("operator")
    arg_node = node.child_by_field_name("argument")
    assert op is not None and arg_node is not None
    return _apply_unary(text(op), evaluate(arg_node, scope))


def _apply_unary(op: str, value: Any) -> Any:
    if isinstance(value, Unknown):
        return value
    if op == "!":
        return not value
    if op == "-":
        return -value
    raise EvaluationError(f"unknown unary operator {op}")


def apply_binary(op: str, left: Any, right_thunk: Callable[[], Any]) -> Any:
    if op == "??":
        return left if left is not None else right_thunk()
    if op == "&&":
        if left is False:
            return False
        right = right_thunk()
        return Unknown("&&") if is_unknown(left) or is_unknown(right) else bool(left and right)
    if op == "||":
        if left is True:
            return True
        right = right_thunk()
        return Unknown("||") if is_unknown(left) or is_unknown(right) else bool(left or right)
    right = right_thunk()
    if is_unknown(left) or is_unknown(right):
        return Unknown(f"a {op} b")
    if op == "==":
        return _equal(left, right)
    if op == "!=":
        return not _equal(left, right)
    if op == "=~":
        return str(left).lower() == str(right).lower()
    if op == "!~":
        return str(left).lower() != str(right).lower()
    if op in ("<", "<=", ">", ">="):
        return {"<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right}[op]
    if op in ("+", "-", "*", "/", "%"):
        if op == "/":
            return int(left / right)
        if op == "%":
            return left - right * int(left / right)
        return {"+": left + right, "-": left - right, "*": left * right}[op]
    raise EvaluationError(f"unknown operator {op}")


def _equal(left: Any, right: Any) -> bool:
    return bool(left == right) and type(left) is type(right) or (left is None and right is None)


def _binary(node: Node, scope: Scope) -> Any:
    op_node = node.child_by_field_name("operator")
    left_node = node.child_by_field_name("left")
    right_node = node.child_by_field_name("right")
    assert op_node is not None and left_node is not None and right_node is not None
    op = text(op_node)
    left = evaluate(left_node, scope)
    return apply_binary(op, left, lambda: evaluate(right_node, scope))


def _ternary(node: Node, scope: Scope) -> Any:
    cond_node = node.child_by_field_name("condition")
    yes = node.child_by_field_name("consequence")
    no = node.child_by_field_name("alternative")
    assert cond_node is not None and yes is not None and no is not None
    cond = evaluate(cond_node, scope)

    def pick(value: Any, s: Scope) -> Any:
        if is_unknown(value):
            # Either branch may be taken; keep the value when both agree, else unknown.
            a, b = evaluate(yes, s), evaluate(no, s)
            return a if a == b else Unknown("conditional")
        return evaluate(yes if value else no, s)

    return pick(cond, scope)


def _rest(whole: Node, start: int) -> Node:
    return _expression((whole.text or b"")[start - whole.start_byte :].strip())


def _reassociate(inner: Node, whole: Node, scope: Scope) -> Any:
    if inner.type == "unary_expression":
        op = inner.child_by_field_name("operator")
        assert op is not None
        return _apply_unary(text(op), evaluate(_rest(whole, op.end_byte), scope))
    if inner.type == "binary_expression":
        op = inner.child_by_field_name("operator")
        left = inner.child_by_field_name("left")
        right = inner.child_by_field_name("right")
        assert op is not None and left is not None and right is not None
        return apply_binary(text(op), evaluate(left, scope), lambda: evaluate(_rest(whole, right.start_byte), scope))
    cond = inner.child_by_field_name("condition")
    yes = inner.child_by_field_name("consequence")
    no = inner.child_by_field_name("alternative")
    assert cond is not None and yes is not None and no is not None
    value = evaluate(cond, scope)
    if is_unknown(value):
        return Unknown("conditional")
    return evaluate(yes, scope) if value else evaluate(_rest(whole, no.start_byte), scope)


def _lambda_params(node: Node) -> list[str]:
    params: list[str] = []
    for p in named(node)[:-1]:
        if p.type == "identifier":
            params.append(text(p))
        else:  # (a, b) => ...
            params.extend(text(i) for i in p.named_children if i.type == "identifier")
    return params


def _lambda(node: Node, scope: Scope) -> Lambda:
    body = named(node)[-1]
    return Lambda(_lambda_params(node), scope, lambda s: evaluate(body, s))


@cache
def _expression(source: bytes) -> Node:
    from .syntax import parse

    root = parse(b"var lambdaBody = " + source + b"\n")
    if root.has_error:
        raise EvaluationError(f"cannot read the lambda body {source[:60]!r}")
    return named(named(root)[0])[-1]


def _lambda_span(lam: Node, whole: Node, scope: Scope) -> Lambda:
    arrow = next(c for c in lam.children if c.type == "=>")
    source = (whole.text or b"")[arrow.end_byte - whole.start_byte :]
    body = _expression(source.strip())
    return Lambda(_lambda_params(lam), scope, lambda s: evaluate(body, s))


def evaluate_for(node: Node, scope: Scope, each: Callable[[Node, Scope], Any]) -> list[Any]:
    """A `[for ... in ...: body]` loop; `each` evaluates the body (an `if` body is filtered on its condition)."""
    parts = named(node)
    body = node.child_by_field_name("body") or parts[-1]
    variables: list[str]
    if parts[0].type == "for_loop_parameters":
        variables = [text(c) for c in parts[0].named_children]
    else:
        variables = [text(parts[0])]
    source = evaluate(parts[1], scope)
    if isinstance(source, Unknown):
        raise EvaluationError(f"line {node.start_point[0] + 1}: a loop over an unknown collection")
    if isinstance(source, int):
        raise EvaluationError("loop over an integer")
    results: list[Any] = []
    for index, item in enumerate(source):
        local = {variables[0]: item}
        if len(variables) > 1:
            local[variables[1]] = index
        inner = scope.child(local)
        if body.type == "if_statement":
            cond = evaluate(named(body)[0], inner)
            if cond is False:
                continue
            results.append(each(named(body)[-1], inner))
        else:
            results.append(each(body, inner))
    return results


class Namespace:
    """`az.` and `sys.`: qualified access to the built-in functions."""

    def __init__(self, name: str):
        self.name = name

    def function(self, name: str) -> Any:
        return BuiltIn(name)


@dataclass(frozen=True)
class BuiltIn:
    name: str


def _call(node: Node, scope: Scope) -> Any:
    fn_node = node.child_by_field_name("function")
    args_node = node.child_by_field_name("arguments")
    assert fn_node is not None
    arg_nodes = named(args_node) if args_node is not None else []
    if fn_node.type == "identifier":
        name = text(fn_node)
    else:
        target = evaluate(fn_node, scope)
        if not isinstance(target, BuiltIn):
            raise EvaluationError(f"cannot call {text(fn_node)}")
        name = target.name
    fn = FUNCTIONS.get(name)
    if fn is None:
        raise EvaluationError(f"line {node.start_point[0] + 1}: function {name}() is not supported by the evaluator")
    args = [evaluate(a, scope) for a in arg_nodes]
    return fn(scope, *args)


# ---- built-in functions --------------------------------------------------------------------------------------------


def _strict(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A function of known values: any unknown argument makes the result unknown."""

    def call(scope: Scope, *args: Any) -> Any:
        if any(is_unknown(a) for a in args):
            return Unknown(f"{fn.__name__}(...)")
        return fn(scope, *args)

    call.__name__ = fn.__name__
    return call


def _union(_s: Scope, *values: Any) -> Any:
    if all(isinstance(v, list) for v in values):
        merged: list[Any] = []
        for v in values:
            merged.extend(x for x in v if x not in merged)
        return merged
    result: dict[str, Any] = {}
    for v in values:
        if isinstance(v, Unknown):
            return v
        for key, item in v.items():
            if isinstance(item, dict) and isinstance(result.get(key), dict):
                result[key] = _union(_s, result[key], item)
            else:
                result[key] = item
    return result


def _take(_s: Scope, value: Any, count: int) -> Any:
    return value[: max(count, 0)]


def _skip(_s: Scope, value: Any, count: int) -> Any:
    return value[max(count, 0) :]


def _resource_id(scope: Scope, *args: Any) -> str:
    # resourceId([subscriptionId], [resourceGroupName], resourceType, name1, [name2...])
    strs = [str(a) for a in args]
    type_index = next(i for i, a in enumerate(strs) if "/" in a and "." in a.split("/")[0])
    prefix = strs[:type_index]
    sub = prefix[0] if len(prefix) == 2 else scope.ctx.subscription_id
    rg = prefix[-1] if prefix else scope.ctx.resource_group
    rtype, names = strs[type_index], strs[type_index + 1 :]
    return _id_of(scope.ctx.resource_group_id(sub, rg), rtype, names)


def _id_of(parent: str, rtype: str, names: list[str]) -> str:
    namespace, *types = rtype.split("/")
    path = "/".join(f"{t}/{n}" for t, n in zip(types, names, strict=False))
    return f"{parent}/providers/{namespace}/{path}"


def _subscription_resource_id(scope: Scope, *args: Any) -> str:
    strs = [str(a) for a in args]
    if "/" in strs[0]:
        sub, rest = scope.ctx.subscription_id, strs
    else:
        sub, rest = strs[0], strs[1:]
    return _id_of(f"/subscriptions/{sub}", rest[0], rest[1:])


def _read_env(scope: Scope, name: str, default: Any = None) -> Any:
    if name in scope.ctx.environment:
        return scope.ctx.environment[name]
    if default is None:
        raise EvaluationError(f"environment variable {name} is not set and has no default")
    return default


def _load_text(scope: Scope, path: str, *_rest: Any) -> str:
    return (scope.base / path).read_text(encoding="utf-8")


def _contains(_s: Scope, container: Any, item: Any) -> bool:
    if isinstance(container, str):
        return str(item) in container  # case-sensitive for strings, as in ARM
    if isinstance(container, dict):
        return any(k.lower() == str(item).lower() for k in container)
    return item in container


def _empty(_s: Scope, value: Any) -> bool:
    return value is None or len(value) == 0


def _to_object(_s: Scope, items: list[Any], key: Lambda, value: Lambda | None = None) -> dict[str, Any]:
    return {key(i): (value(i) if value else i) for i in items}


def _split(_s: Scope, value: str, sep: Any) -> list[str]:
    if isinstance(sep, list):
        parts = [value]
        for s in sep:
            parts = [p for part in parts for p in part.split(s)]
        return parts
    return value.split(sep)


def _resource_group(scope: Scope, *args: Any) -> dict[str, Any]:
    ctx = scope.ctx
    name = str(args[-1]) if args else ctx.resource_group
    sub = str(args[0]) if len(args) == 2 else ctx.subscription_id
    return {
        "id": ctx.resource_group_id(sub, name),
        "name": name,
        "location": ctx.location,
        "type": "Microsoft.Resources/resourceGroups",
        "scope": {"subscription": sub, "resourceGroup": name},
    }


def _subscription(scope: Scope, *args: Any) -> dict[str, Any]:
    sub = str(args[0]) if args else scope.ctx.subscription_id
    return {"id": f"/subscriptions/{sub}", "subscriptionId": sub, "tenantId": scope.ctx.tenant_id, "displayName": "sub"}


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "toLower": _strict(lambda _s, v: v.lower()),
    "toUpper": _strict(lambda _s, v: v.upper()),
    "take": _strict(_take),
    "skip": _strict(_skip),
    "replace": _strict(lambda _s, v, old, new: v.replace(old, new)),
    "uniqueString": _strict(lambda _s, *parts: unique_string(*parts)),
    "guid": _strict(lambda _s, *parts: guid_of(*parts)),
    "union": _union,
    "concat": _strict(lambda _s, *v: [x for part in v for x in part] if isinstance(v[0], list) else "".join(map(to_string, v))),
    "empty": _strict(_empty),
    "contains": _strict(_contains),
    "startsWith": _strict(lambda _s, v, p: v.lower().startswith(p.lower())),
    "endsWith": _strict(lambda _s, v, p: v.lower().endswith(p.lower())),
    "length": _strict(lambda _s, v: len(v)),
    "first": _strict(lambda _s, v: v[0] if v else None),
    "last": _strict(lambda _s, v: v[-1] if v else None),
    "split": _strict(_split),
    "join": _strict(lambda _s, v, sep: sep.join(v)),
    "trim": _strict(lambda _s, v: v.strip()),
    "substring": _strict(lambda _s, v, start, n=None: v[start:] if n is None else v[start : start + n]),
    "string": _strict(lambda _s, v: v if isinstance(v, str) else to_string(v)),
    "int": _strict(lambda _s, v: int(v)),
    "bool": _strict(lambda _s, v: v if isinstance(v, bool) else str(v).lower() == "true"),
    "min": _strict(lambda _s, *v: min(v[0]) if len(v) == 1 else min(v)),
    "max": _strict(lambda _s, *v: max(v[0]) if len(v) == 1 else max(v)),
    "range": _strict(lambda _s, start, count: list(range(start, start + count))),
    "flatten": _strict(lambda _s, v: [x for part in v for x in part]),
    "coalesce": lambda _s, *v: next((x for x in v if x is not None), None),
    "any": lambda _s, v: v,
    "filter": _strict(lambda _s, items, pred: [i for i in items if pred(i) is True]),
    "map": _strict(lambda _s, items, fn: [fn(i) for i in items]),
    "toObject": _strict(_to_object),
    "items": _strict(lambda _s, v: [{"key": k, "value": x} for k, x in v.items()]),
    "resourceId": _strict(_resource_id),
    "subscriptionResourceId": _strict(_subscription_resource_id),
    "resourceGroup": _strict(_resource_group),
    "subscription": _strict(_subscription),
    "tenant": lambda s: {"tenantId": s.ctx.tenant_id},
    "environment": lambda _s: {
        "name": "AzureCloud",
        "suffixes": {"storage": "core.windows.net", "acrLoginServer": ".azurecr.io"},
        # What AzureCloud's environment() holds (Bicep docs, environment function): the Entra ID sign-in endpoint.
        "authentication": {"loginEndpoint": "https://login.microsoftonline.com/",
                           "audiences": ["https://management.core.windows.net/", "https://management.azure.com/"]},
    },
    "loadTextContent": _strict(_load_text),
    "readEnvironmentVariable": _strict(_read_env),
    "format": _strict(lambda _s, f, *a: f.format(*a)),
}
