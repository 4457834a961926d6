"""The Bicep expression evaluator of tools/bicepcheck: Bicep's meaning, including where tree-sitter-bicep's grammar
binds operators differently from Bicep (lambda bodies, prefix operators and `??` before member access)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tools.bicepcheck import syntax
from tools.bicepcheck.evaluate import Context, EvaluationError, Scope, Unknown, evaluate, guid_of, unique_string

SYMBOLS: dict[str, Any] = {
    "accounts": [{"create": True, "name": "a", "n": {"m": 1}}, {"create": False, "name": "b", "n": {"m": 2}}],
    "region": {"id": "swedencentral", "existingAccount": None, "deployments": [{"name": "x", "sku": "GlobalStandard"}]},
    "given": {"rg": None},
    "runtime": Unknown("a runtime value"),
}


def value(source: str, **ctx: Any) -> Any:
    root = syntax.parse(f"var v = {source}\n".encode())
    assert not root.has_error, source
    node = syntax.named(syntax.named(root)[0])[-1]
    scope = Scope(lambda name: SYMBOLS[name], Context(**ctx), Path("."))
    return evaluate(node, scope)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("'a-${1 + 2}-${true}'", "a-3-true"),
        ("toLower(take('ABCDEF', 3))", "abc"),
        ("replace(replace('a_b.c', '_', '-'), '.', '-')", "a-b-c"),
        ("last(split('/x/y/z', '/'))", "z"),
        ("union({ a: 1, b: { c: 1 } }, { b: { d: 2 } })", {"a": 1, "b": {"c": 1, "d": 2}}),
        ("concat([1], [2, 3])", [1, 2, 3]),
        ("contains('GlobalProvisionedManaged', 'Provisioned')", True),
        ("empty('') && !empty([1])", True),
        ("[for (a, i) in accounts: '${i}:${a.name}']", ["0:a", "1:b"]),
        ("map(filter(accounts, a => a.create), a => a.name)", ["a"]),
        ("toObject(accounts, a => a.name, a => a.n.m)", {"a": 1, "b": 2}),
        ("map(range(0, 3), i => i * 2)", [0, 2, 4]),
        ("items({ b: 1, a: 2 })", [{"key": "b", "value": 1}, {"key": "a", "value": 2}]),
        ("region.?existingAccount.?name ?? 'new'", "new"),
        ("region.?missing", None),
        ("resourceId('Microsoft.Network/virtualNetworks/subnets', 'v', 'app')",
         "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-aigw/providers/Microsoft.Network/virtualNetworks/v/subnets/app"),
        ("resourceId('s', 'g', 'Microsoft.CognitiveServices/accounts', 'x')",
         "/subscriptions/s/resourceGroups/g/providers/Microsoft.CognitiveServices/accounts/x"),
        ("subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'r')",
         "/subscriptions/00000000-0000-0000-0000-000000000000/providers/Microsoft.Authorization/roleDefinitions/r"),
        ("length(filter(region.deployments, d => contains(d.?sku ?? '', 'Provisioned'))) > 0", False),
    ],
)
def test_expressions(source: str, expected: Any) -> None:
    assert value(source) == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # The grammar reads `a => !a.create` as `(a => !a).create`.
        ("filter(accounts, a => !a.create)", [SYMBOLS["accounts"][1]]),
        # ... and `!a.b` as `(!a).b`.
        ("!accounts[0].create", False),
        # ... and `x ?? f().name` as `(x ?? f()).name`.
        ("given.rg ?? resourceGroup().name", "rg-aigw"),
        ("true ? 1 : accounts[1].n.m", 1),
        ("false ? 1 : accounts[1].n.m", 2),
        ("1 + accounts[1].n.m", 3),
        ("map(accounts, a => a.create ? a.name : 'no')", ["a", "no"]),
    ],
)
def test_where_the_grammar_binds_differently_bicep_wins(source: str, expected: Any) -> None:
    assert value(source) == expected


def test_unknown_values_propagate() -> None:
    assert isinstance(value("'x-${runtime}'"), Unknown)
    assert isinstance(value("toLower(runtime)"), Unknown)
    assert isinstance(value("runtime == 'a'"), Unknown)
    assert value("false && runtime") is False
    assert isinstance(value("runtime ? 1 : 2"), Unknown)
    assert value("runtime ? 1 : 1") == 1


def test_context_functions_are_stand_ins_of_the_right_shape() -> None:
    token = value("uniqueString('a', 'b')")
    assert len(token) == 13 and token.isalnum() and token == token.lower() and token == unique_string("a", "b")
    assert value("guid('a')") == guid_of("a") and len(guid_of("a")) == 36
    assert value("resourceGroup().name", resource_group="rg-x") == "rg-x"
    assert value("readEnvironmentVariable('X', 'd')", environment={"X": "set"}) == "set"
    assert value("readEnvironmentVariable('X', 'd')") == "d"
    with pytest.raises(EvaluationError):
        value("readEnvironmentVariable('X')")


def test_what_cannot_be_evaluated_is_an_error() -> None:
    with pytest.raises(EvaluationError):
        value("notAFunction(1)")
    with pytest.raises(EvaluationError):
        value("accounts[5]")
    with pytest.raises(EvaluationError):
        value("region.nothing")
