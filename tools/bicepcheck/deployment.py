"""What a deployment of bicep/main.bicep with a parameters file would create: every resource instance (loops
expanded, conditions applied, modules followed with the parameters they are given), with its name and body
evaluated, plus the problems found on the way (unknown or missing parameters, values outside a parameter's declared
type or decorators, expressions that cannot be computed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from . import syntax
from .evaluate import (
    Context,
    EvaluationError,
    Namespace,
    Scope,
    Unknown,
    evaluate,
    evaluate_for,
    is_unknown,
)
from .syntax import Node, named, string_value, text

# Keys of a resource declaration that Bicep consumes itself; they are not sent as part of the resource body.
BICEP_ONLY_KEYS = {"parent", "scope", "dependsOn"}


@dataclass(frozen=True)
class Param:
    name: str
    type_node: Node | None
    default: Node | None
    decorators: dict[str, list[Node]]
    nullable: bool


@dataclass(frozen=True)
class Declared:
    symbol: str
    target: str  # 'Type@version' for a resource, the file path for a module
    value: Node  # object, for_statement or if_statement
    existing: bool
    line: int


@dataclass
class Template:
    path: Path
    root: Node
    params: dict[str, Param] = field(default_factory=dict)
    variables: dict[str, Node] = field(default_factory=dict)
    resources: dict[str, Declared] = field(default_factory=dict)
    modules: dict[str, Declared] = field(default_factory=dict)
    outputs: dict[str, Node] = field(default_factory=dict)
    types: dict[str, Node] = field(default_factory=dict)
    target_scope: str = "resourceGroup"


@dataclass
class ParamsFile:
    path: Path
    root: Node
    using: str
    assignments: dict[str, Node]
    variables: dict[str, Node]


def _decorators(node: Node | None) -> dict[str, list[Node]]:
    found: dict[str, list[Node]] = {}
    if node is None:
        return found
    for decorator in named(node):
        call = named(decorator)[0]
        fn = call.child_by_field_name("function")
        args = call.child_by_field_name("arguments")
        if fn is not None:
            found[text(fn).split(".")[-1]] = named(args) if args is not None else []
    return found


def load_template(path: Path) -> Template:
    """A template, parsed once per version of the file (its size and modification time)."""
    stat = path.stat()
    return _load_template(path, stat.st_mtime_ns, stat.st_size)


@cache
def _load_template(path: Path, _mtime_ns: int, _size: int) -> Template:
    root = syntax.parse_file(path)
    template = Template(path=path, root=root)
    pending: Node | None = None
    for node in named(root):
        if node.type == "decorators":
            pending = node
            continue
        decorators, pending = pending, None
        parts = named(node)
        if node.type == "parameter_declaration":
            type_node = parts[1] if len(parts) > 1 and parts[1].type == "type" else None
            inner = named(type_node)[0] if type_node is not None and named(type_node) else None
            default = parts[2] if len(parts) > 2 else None
            template.params[text(parts[0])] = Param(
                text(parts[0]),
                inner,
                default,
                _decorators(decorators),
                inner is not None and inner.type == "nullable_type",
            )
        elif node.type == "variable_declaration":
            template.variables[text(parts[0])] = parts[-1]
        elif node.type in ("resource_declaration", "module_declaration"):
            target = string_value(parts[1]) or ""
            existing = any(c.type == "existing" for c in node.children)
            declared = Declared(text(parts[0]), target, parts[-1], existing, node.start_point[0] + 1)
            bucket = template.resources if node.type == "resource_declaration" else template.modules
            bucket[declared.symbol] = declared
        elif node.type == "output_declaration":
            template.outputs[text(parts[0])] = parts[-1]
        elif node.type == "type_declaration":
            template.types[text(parts[0])] = parts[-1]
        elif node.type == "target_scope_assignment":
            template.target_scope = string_value(parts[-1]) or ""
    return template


def load_params(path: Path) -> ParamsFile:
    root = syntax.parse_file(path)
    using = ""
    assignments: dict[str, Node] = {}
    variables: dict[str, Node] = {}
    source = path.read_bytes()
    for node in named(root):
        if node.type == "using_statement":
            using = string_value(named(node)[0]) or ""
        elif node.type == "variable_declaration":
            name = text(named(node)[0])
            # The grammar saw `var  name =` where the file says `param name =` (syntax.params_as_bicep).
            if source[node.start_byte : node.start_byte + 5] == b"param":
                assignments[name] = named(node)[-1]
            else:
                variables[name] = named(node)[-1]
    return ParamsFile(path, root, using, assignments, variables)


# ---- references to resources and modules ---------------------------------------------------------------------------


@dataclass
class ResourceRef:
    symbol: str
    type: str
    name: Any
    id: Any
    deployed: bool

    def property(self, key: str) -> Any:
        lowered = key.lower()
        if lowered == "id":
            return self.id
        if lowered == "name":
            return self.name
        if lowered == "type":
            return self.type
        return Unknown(f"{self.symbol}.{key}")


@dataclass
class ModuleRef:
    symbol: str
    name: Any
    outputs_fn: Callable[[], dict[str, Any]]

    def property(self, key: str) -> Any:
        if key == "outputs":
            return self.outputs_fn()
        if key == "name":
            return self.name
        return Unknown(f"{self.symbol}.{key}")


@dataclass(frozen=True)
class ResourceInstance:
    file: Path
    line: int
    symbol: str
    type: str
    api_version: str
    existing: bool
    name: Any
    body: dict[str, Any]
    context: Context
    parent: ResourceInstance | None = None

    @property
    def sent_body(self) -> dict[str, Any]:
        """The body as Azure receives it (Bicep-only keys removed)."""
        return {k: v for k, v in self.body.items() if k not in BICEP_ONLY_KEYS}


@dataclass(frozen=True)
class ModuleInstance:
    file: Path
    line: int
    symbol: str
    name: Any
    target: Path


@dataclass(frozen=True)
class Problem:
    file: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class Deployment:
    """One template deployed with given parameter values, recursively through its modules."""

    def __init__(self, template: Template, values: dict[str, Any], ctx: Context, *, given_line: int = 0):
        self.template = template
        self.values = values
        self.ctx = ctx
        self.resources: list[ResourceInstance] = []
        self.modules: list[ModuleInstance] = []
        self.problems: list[Problem] = []
        self._vars: dict[str, Any] = {}
        self._params: dict[str, Any] = {}
        self._refs: dict[str, Any] = {}
        self._outputs: dict[str, Any] | None = None
        self._resolving: set[str] = set()
        self._children: list[Deployment] = []
        self.scope = Scope(self._resolve, ctx, template.path.parent)
        self._check_given_params(given_line)

    # -- parameters

    def _check_given_params(self, line: int) -> None:
        for name in self.values:
            if name not in self.template.params:
                self.problem(line, f"parameter {name} is not declared by {self.template.path.name}")
        for name, param in self.template.params.items():
            if name in self.values:
                for message in check_value(self.values[name], param, self.template):
                    self.problem(line, f"parameter {name}: {message}")
            elif param.default is None and not param.nullable:
                self.problem(line, f"required parameter {name} of {self.template.path.name} is not given")

    def _param(self, name: str) -> Any:
        if name not in self._params:
            param = self.template.params[name]
            if name in self.values:
                self._params[name] = self.values[name]
            elif param.default is not None:
                self._params[name] = evaluate(param.default, self.scope)
            else:
                self._params[name] = None
        return self._params[name]

    # -- symbols

    def _resolve(self, name: str) -> Any:
        if name in self._resolving:
            raise EvaluationError(f"{name} refers to itself")
        self._resolving.add(name)
        try:
            return self._resolve_inner(name)
        finally:
            self._resolving.discard(name)

    def _resolve_inner(self, name: str) -> Any:
        t = self.template
        if name in t.params:
            return self._param(name)
        if name in t.variables:
            if name not in self._vars:
                self._vars[name] = evaluate(t.variables[name], self.scope)
            return self._vars[name]
        if name in t.resources:
            if name not in self._refs:
                self._refs[name] = self._declare_resource(t.resources[name])
            return self._refs[name]
        if name in t.modules:
            if name not in self._refs:
                self._refs[name] = self._declare_module(t.modules[name])
            return self._refs[name]
        if name in ("az", "sys"):
            return Namespace(name)
        raise EvaluationError(f"unknown symbol {name}")

    # -- resources

    def _instances(self, declared: Declared, build: Callable[[Node, Scope, bool], Any]) -> Any:
        value = declared.value
        if value.type == "for_statement":
            deployed: list[Any] = []

            def each(body: Node, scope: Scope) -> Any:
                item = build(body, scope, True)
                deployed.append(item)
                return item

            return evaluate_for(value, self.scope, each)
        if value.type == "if_statement":
            cond = evaluate(named(value)[0], self.scope)
            return build(named(value)[-1], self.scope, cond is not False)
        return build(value, self.scope, True)

    def _declare_resource(self, declared: Declared) -> Any:
        rtype, _, api = declared.target.partition("@")

        def build(body_node: Node, scope: Scope, deploy: bool) -> ResourceRef:
            body = evaluate(body_node, scope)
            parent = body.get("parent")
            name = body.get("name")
            if isinstance(parent, ResourceRef):
                resource_id: Any = (
                    Unknown("id")
                    if is_unknown(parent.id) or is_unknown(name)
                    else f"{parent.id}/{rtype.split('/')[-1]}/{name}"
                )
            elif "scope" in body and not isinstance(body["scope"], dict):
                target = body["scope"]
                target_id = target.id if isinstance(target, ResourceRef) else Unknown("scope")
                resource_id = (
                    Unknown("id")
                    if is_unknown(target_id) or is_unknown(name)
                    else f"{target_id}/providers/{rtype}/{name}"
                )
            else:
                resource_id = (
                    Unknown("id")
                    if is_unknown(name)
                    else f"{self.ctx.resource_group_id()}/providers/{rtype}/{name}"
                )
            ref = ResourceRef(declared.symbol, rtype, name, resource_id, deploy)
            if deploy:
                self.resources.append(
                    ResourceInstance(
                        self.template.path, declared.line, declared.symbol, rtype, api, declared.existing, name, body,
                        self.ctx,
                    )
                )
            return ref

        return self._instances(declared, build)

    def _declare_module(self, declared: Declared) -> Any:
        target = (self.template.path.parent / declared.target).resolve()

        def build(body_node: Node, scope: Scope, deploy: bool) -> ModuleRef:
            body = evaluate(body_node, scope)
            params = body.get("params", {})
            ctx = self.ctx
            module_scope = body.get("scope")
            if isinstance(module_scope, dict) and module_scope.get("type") == "Microsoft.Resources/resourceGroups":
                ctx = replace(ctx, subscription_id=module_scope["scope"]["subscription"],
                              resource_group=module_scope["scope"]["resourceGroup"])
            child = Deployment(load_template(target), params, ctx, given_line=declared.line)
            if deploy:
                self._children.append(child)
                self.modules.append(ModuleInstance(self.template.path, declared.line, declared.symbol, body.get("name"), target))
            return ModuleRef(declared.symbol, body.get("name"), child.outputs)

        return self._instances(declared, build)

    def outputs(self) -> dict[str, Any]:
        if self._outputs is None:
            self._outputs = {}
            for name, node in self.template.outputs.items():
                try:
                    self._outputs[name] = evaluate(node, self.scope)
                except EvaluationError as error:
                    self.problem(node.start_point[0] + 1, f"output {name}: {error}")
                    self._outputs[name] = Unknown(f"output {name}")
        return self._outputs

    def problem(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.template.path, line, message))

    def run(self) -> Deployment:
        """Evaluate every declaration (each once), then every module's own, depth first."""
        for name in [*self.template.resources, *self.template.modules]:
            try:
                self._resolve(name)
            except (EvaluationError, KeyError, TypeError, ValueError, AttributeError) as error:
                declared = self.template.resources.get(name) or self.template.modules[name]
                self.problem(declared.line, f"{name}: {error}")
        self.outputs()
        for child in self._children:
            child.run()
        return self

    def all_resources(self) -> list[ResourceInstance]:
        return [*self.resources, *(r for c in self._children for r in c.all_resources())]

    def all_modules(self) -> list[ModuleInstance]:
        return [*self.modules, *(m for c in self._children for m in c.all_modules())]

    def all_problems(self) -> list[Problem]:
        return [*self.problems, *(p for c in self._children for p in c.all_problems())]

    def all_deployments(self) -> list[Deployment]:
        return [self, *(d for c in self._children for d in c.all_deployments())]


# ---- parameter values against declared types and decorators ----------------------------------------------------------


def check_value(value: Any, param: Param, template: Template) -> list[str]:
    if is_unknown(value):
        return []
    problems = check_type(value, param.type_node, template, "") if param.type_node is not None else []
    return problems + check_decorators(value, param.decorators, template)


def _no_symbols(name: str) -> Any:
    raise EvaluationError(f"a decorator argument refers to {name}")


def check_decorators(value: Any, decorators: dict[str, list[Node]], template: Template) -> list[str]:
    """Problems of a value against @allowed, @minValue, @maxValue, @minLength and @maxLength."""
    if is_unknown(value):
        return []
    problems: list[str] = []
    scope = Scope(_no_symbols, Context(), template.path.parent)
    if "allowed" in decorators:
        allowed = evaluate(decorators["allowed"][0], scope)
        items = value if isinstance(value, list) and not any(isinstance(a, list) for a in allowed) else [value]
        for item in items:
            if item not in allowed:
                problems.append(f"{item!r} is not one of {allowed}")
    bounds: tuple[tuple[str, Callable[[Any, Any], bool], str], ...] = (
        ("minValue", lambda v, n: bool(v >= n), "is below"),
        ("maxValue", lambda v, n: bool(v <= n), "is above"),
        ("minLength", lambda v, n: len(v) >= n, "is shorter than"),
        ("maxLength", lambda v, n: len(v) <= n, "is longer than"),
    )
    for key, test, message in bounds:
        if key in decorators and value is not None:
            bound = evaluate(decorators[key][0], scope)
            if not test(value, bound):
                problems.append(f"{value!r} {message} {bound}")
    return problems


def check_type(value: Any, node: Node, template: Template, where: str) -> list[str]:
    """Problems of a value against a Bicep type expression (primitive, literal union, array, object, named type)."""
    if is_unknown(value):
        return []
    at = where or "value"
    kind = node.type
    if kind == "type":
        return check_type(value, named(node)[0], template, where)
    if kind == "nullable_type":
        return [] if value is None else check_type(value, named(node)[0], template, where)
    if kind == "parenthesized_type":
        return check_type(value, named(node)[0], template, where)
    if kind == "primitive_type":
        expected = text(node)
        python = _PYTHON_TYPES.get(expected)
        if expected == "int" and isinstance(value, bool):
            return [f"{at}: {value!r} is not an int"]
        if python is not None and not isinstance(value, python):
            return [f"{at}: {value!r} is not a{'n' if expected[0] in 'aio' else ''} {expected}"]
        return []
    if kind == "identifier":
        name = text(node)
        if name in template.types:
            return check_type(value, template.types[name], template, where)
        if name in _PYTHON_TYPES:
            return _primitive_check(value, name, at)
        return []
    if kind == "array_type":
        if not isinstance(value, list):
            return [f"{at}: expected an array"]
        item_type = named(node)[0]
        return [p for i, item in enumerate(value) for p in check_type(item, item_type, template, f"{where}[{i}]")]
    if kind == "union_type" or kind == "string":
        options = [string_value(n) for n in (named(node) if kind == "union_type" else [node])]
        literals = [o for o in options if o is not None]
        if literals and len(literals) == len(options):
            return [] if value in literals else [f"{at}: {value!r} is not one of {literals}"]
        return []
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{at}: expected an object"]
        problems: list[str] = []
        declared: dict[str, Node] = {}
        decorated: dict[str, dict[str, list[Node]]] = {}
        pending: Node | None = None
        for prop in named(node):
            if prop.type == "decorators":
                pending = prop
            elif prop.type == "object_property":
                key = text(named(prop)[0]).strip("'")
                declared[key] = named(prop)[-1]
                decorated[key], pending = _decorators(pending), None
        for key in value:
            if key not in declared:
                problems.append(f"{at}: unknown field {key!r} (declared: {sorted(declared)})")
        for key, type_node in declared.items():
            sub = f"{where}.{key}" if where else key
            if key in value:
                problems.extend(check_type(value[key], type_node, template, sub))
                problems.extend(f"{sub}: {m}" for m in check_decorators(value[key], decorated[key], template))
            elif type_node.type != "nullable_type":
                problems.append(f"{at}: missing required field {key!r}")
        return problems
    return []


_PYTHON_TYPES: dict[str, type] = {"string": str, "int": int, "bool": bool, "array": list, "object": dict}


def _primitive_check(value: Any, name: str, at: str) -> list[str]:
    if name == "int" and isinstance(value, bool) or not isinstance(value, _PYTHON_TYPES[name]):
        return [f"{at}: {value!r} is not of type {name}"]
    return []


# ---- a parameters file deployed ---------------------------------------------------------------------------------------


def params_values(path: Path, ctx: Context) -> tuple[Template, dict[str, Any], list[Problem]]:
    """A .bicepparam file's template and evaluated values (readEnvironmentVariable reads ctx.environment)."""
    params = load_params(path)
    problems = [Problem(path, p.line, p.message) for p in syntax.problems(params.root)]
    template = load_template((path.parent / params.using).resolve())
    values: dict[str, Any] = {}
    variables: dict[str, Any] = {}

    def resolve(name: str) -> Any:
        if name in params.variables:
            if name not in variables:
                variables[name] = evaluate(params.variables[name], scope)
            return variables[name]
        if name in values:
            return values[name]
        raise EvaluationError(f"unknown symbol {name}")

    scope = Scope(resolve, ctx, path.parent)
    for name, node in params.assignments.items():
        try:
            values[name] = evaluate(node, scope)
        except EvaluationError as error:
            problems.append(Problem(path, node.start_point[0] + 1, f"parameter {name}: {error}"))
    return template, values, problems


def deploy(template: Template, values: dict[str, Any], ctx: Context, origin: Path) -> tuple[Deployment, list[Problem]]:
    deployment = Deployment(template, values, ctx, given_line=1)
    problems = [Problem(origin, 1, p.message) for p in deployment.problems]  # they belong to the parameters
    deployment.problems.clear()
    deployment.run()
    return deployment, problems + deployment.all_problems()


def deploy_params_file(path: Path, ctx: Context) -> tuple[Deployment, list[Problem]]:
    """Evaluate a .bicepparam file's values and deploy its template with them."""
    template, values, problems = params_values(path, ctx)
    deployment, more = deploy(template, values, ctx, path)
    return deployment, problems + more
