"""The offline Bicep checks (tools/bicepcheck) on their own: each one passes the real deployment and is shown to fail
on a copy of it with one deliberate mistake (a broken file, a wrong property, a read-only property, a wrong enum
value, a retired model, a SKU a region does not offer, a name too long)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tools.bicepcheck import armtypes, checks, models, names, refresh_types, syntax
from tools.bicepcheck.deployment import load_template, params_values
from tools.bicepcheck.evaluate import Context

ROOT = Path(__file__).resolve().parent.parent
BICEP = ROOT / "bicep"
TYPES = ROOT / "tools" / "bicepcheck" / "azure_types"
SCENARIOS = checks.params_files()


def scenario(name: str) -> Path:
    return BICEP / f"{name}.bicepparam"


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A copy of bicep/ (templates, modules, parameters files, alert queries, workbook, model snapshot)."""
    target = tmp_path / "bicep"
    shutil.copytree(BICEP, target)
    return target


def edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) >= count, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, count), encoding="utf-8")


# ---- full-grammar parse -------------------------------------------------------------------------------------------


def test_there_are_the_four_scenarios() -> None:
    assert {p.stem for p in SCENARIOS} == {"main", "minimal", "existing-accounts", "private"}


@pytest.mark.parametrize("path", [*checks.bicep_files(), *SCENARIOS], ids=lambda p: p.name)
def test_every_file_parses_with_the_full_grammar(path: Path) -> None:
    assert checks.syntax_problems([path]) == []
    root = syntax.parse_file(path)
    assert root.type == "infrastructure" and not root.has_error


@pytest.mark.parametrize(
    "snippet",
    [
        "param name string =",  # no value
        "resource st 'Microsoft.Storage/storageAccounts@2023-05-01' = {\n  name: 'x'\n",  # unclosed object
        "var x = [for y in z {}]",  # for without ':'
        "var a = 'unterminated\n",  # unterminated string
        "output o string = concat('a', 'b'",  # unclosed call
        "resouce st 'Microsoft.Storage/storageAccounts@2023-05-01' = {}\n",  # misspelt keyword
    ],
)
def test_the_parse_rejects_broken_bicep(snippet: str) -> None:
    assert syntax.problems(syntax.parse((snippet + "\n").encode()))


def test_the_parse_rejects_a_broken_copy_of_each_real_file() -> None:
    for path in [BICEP / "main.bicep", scenario("main")]:
        source = path.read_bytes()
        end = source.rindex(b"\n]\n") if path.suffix == ".bicepparam" else source.rindex(b"\n}\n")
        broken = source[:end] + source[end + 2 :]  # drop a closing bracket
        assert syntax.problems(syntax.parse(broken, params_file=path.suffix == ".bicepparam")), path.name


def test_a_parameters_file_keeps_its_positions_through_the_param_rewrite() -> None:
    source = b"using './main.bicep'\nparam a = 1\nparam b = [\n  1\n  }\n]\n"
    assert len(syntax.params_as_bicep(source)) == len(source)
    [problem] = syntax.problems(syntax.parse(source, params_file=True))
    assert problem.line == 5


def test_an_object_type_the_grammar_misreads_is_reported(tmp_path: Path) -> None:
    # `t?` followed by `b: u` parses, without error, as the conditional `t ? b : u`.
    path = tmp_path / "t.bicep"
    path.write_text("type t = {\n  a: foo?\n  b: string\n}\n", encoding="utf-8")
    assert not syntax.parse_file(path).has_error
    assert checks.ambiguous_types(path)
    path.write_text("type t = {\n  a: foo?\n\n  @description('b')\n  b: string\n}\n", encoding="utf-8")
    assert checks.ambiguous_types(path) == []


# ---- the whole check, per scenario ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_every_scenario_passes_every_check(path: Path) -> None:
    report = checks.check(path)
    assert report.problems == []
    assert len(report.deployment.all_resources()) > 10


def with_ptu_example(params: Path) -> None:
    """Uncomment main.bicepparam's commented PTU example, in place."""
    text = params.read_text(encoding="utf-8")
    block = re.search(r"^// param provisionedBackendRegions = \[\n(?:^//.*\n)*?^// \]\n", text, re.M)
    assert block, "the PTU example is a commented param block in main.bicepparam"
    uncommented = re.sub(r"^// ?", "", block.group(0), flags=re.M)
    params.write_text(text.replace("param provisionedBackendRegions = []\n", uncommented), encoding="utf-8")


def test_every_resource_declaration_is_checked_by_some_scenario(copy: Path) -> None:
    """Conditional resources only exist in some scenarios; with the PTU example, an alert address, a safety policy,
    ledger accounts and the console's sign-in they cover every declaration, so every resource body meets the type check somewhere."""
    with_ptu_example(copy / "main.bicepparam")
    edit(copy / "main.bicepparam", "param limitFailMode", "param alertEmail = 'ops@example.com'\nparam limitFailMode")
    edit(copy / "main.bicepparam", "param limitFailMode",
         "param safetyPolicies = {\n  strict: {\n    pii: 'redact'\n  }\n}\nparam limitFailMode")
    # Ledgers on storage accounts of their own (GATEWAY_LEDGER_ACCOUNTS), with their private endpoints.
    edit(copy / "private.bicepparam", "param zoneRedundant", "param ledgerAccountCount = 2\nparam zoneRedundant")
    deployer = Context(environment={"AZURE_PRINCIPAL_ID": "22222222-3333-4444-5555-666666666666",
                                    "AZURE_PRINCIPAL_TYPE": "User",
                                    "GATEWAY_CONSOLE_CLIENT_ID": "7d3f5a2e-1b4c-4d8e-9f60-2a1b3c4d5e6f"})
    reports = [checks.check(copy / p.name, deployer) for p in SCENARIOS]
    assert all(r.problems == [] for r in reports), [r.problems for r in reports]
    seen = {(r.file.name, r.symbol) for report in reports for r in report.deployment.all_resources()}
    declared = {(p.name, s) for p in checks.bicep_files() for s in load_template(p.resolve()).resources}
    assert declared - seen == set()


def problems_of(params: Path, ctx: Context | None = None) -> list[str]:
    return checks.check(params, ctx).problems


# ---- resource types against the vendored definitions ---------------------------------------------------------------


def test_vendored_types_are_the_used_ones_with_their_source() -> None:
    source = json.loads((TYPES / "SOURCE.json").read_text(encoding="utf-8"))
    assert source["repository"] == "https://github.com/Azure/bicep-types-az"
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    vendored = {r.lower() for f in source["files"].values() for r in f["resources"]}
    assert vendored == {t.lower() for t in refresh_types.used_types(BICEP)}
    assert set(source["files"]) == {p.name for p in TYPES.glob("*@*.json")}
    index = armtypes.TypeIndex()
    for used in refresh_types.used_types(BICEP):
        rtype, version = used.split("@")
        assert index.resource(rtype, version) is not None, used


def test_refresh_rebuilds_the_vendored_files_from_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A checkout laid out like bicep-types-az (generated/<area>/<namespace>/<version>/types.json), here made of the
    # vendored subsets themselves plus an unrelated type: the refresh must give the same files back.
    checkout = tmp_path / "checkout"
    source = json.loads((TYPES / "SOURCE.json").read_text(encoding="utf-8"))
    for name in source["files"]:
        namespace, version = name[: -len(".json")].split("@")
        target = checkout / "generated" / "area" / namespace / version / "types.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        types = json.loads((TYPES / name).read_text(encoding="utf-8"))
        types.append({"$type": "ResourceType", "name": f"{namespace}/unused@{version}", "body": {"$ref": "#/0"}})
        target.write_text(json.dumps(types), encoding="utf-8")
    out = tmp_path / "out"
    monkeypatch.setattr(refresh_types, "OUT", out)
    assert refresh_types.main([str(checkout), "--commit", "f" * 40]) == 0
    for name in source["files"]:
        assert json.loads((out / name).read_text()) == json.loads((TYPES / name).read_text()), name
    assert json.loads((out / "SOURCE.json").read_text())["commit"] == "f" * 40


def test_refresh_fails_when_the_checkout_lacks_a_used_version(tmp_path: Path) -> None:
    (tmp_path / "generated").mkdir()
    assert refresh_types.main([str(tmp_path), "--commit", "0" * 40]) == 1


def test_subset_keeps_only_what_is_referenced() -> None:
    types = [
        {"$type": "StringType"},
        {"$type": "ObjectType", "properties": {"a": {"type": {"$ref": "#/0"}, "flags": 0}}},
        {"$type": "IntegerType"},
        {"$type": "ResourceType", "name": "A.B/c@1", "body": {"$ref": "#/1"}},
    ]
    kept = refresh_types.subset(types, [3])
    assert [t["$type"] for t in kept] == ["StringType", "ObjectType", "ResourceType"]
    assert kept[2]["body"] == {"$ref": "#/1"} and kept[1]["properties"]["a"]["type"] == {"$ref": "#/0"}


@pytest.mark.parametrize(
    ("file", "old", "new", "expected"),
    [
        # A property name the type does not have.
        ("modules/storage.bicep", "allowBlobPublicAccess: false", "allowBlobPublicAcess: false", "unknown property"),
        # A value outside the type's enum.
        ("modules/storage.bicep", "minimumTlsVersion: 'TLS1_2'", "minimumTlsVersion: 'TLS1_4'", "is not one of"),
        # A read-only property.
        ("modules/identity.bicep", "  tags: tags\n", "  tags: tags\n  properties: {\n    clientId: 'x'\n  }\n",
         "read-only"),
        # A required property left out.
        ("modules/identity.bicep", "  location: location\n", "", None),
        ("modules/openai.bicep",
         "    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', cognitiveServicesOpenAIUser)\n",
         "", "required property is missing"),
        # An API version Azure does not publish for the type.
        ("modules/identity.bicep", "userAssignedIdentities@2023-01-31", "userAssignedIdentities@2023-02-31",
         "unknown resource type or API version"),
        # Wrong case in an enum value.
        ("modules/functionapp.bicep", "ftpsState: 'Disabled'", "ftpsState: 'disabled'", None),
    ],
)
def test_the_type_check_reports_a_seeded_mistake(copy: Path, file: str, old: str, new: str, expected: str | None) -> None:
    assert problems_of(copy / "main.bicepparam") == []
    edit(copy / file, old, new)
    found = problems_of(copy / "main.bicepparam")
    assert found, f"no problem reported after changing {old!r} in {file}"
    if expected:
        assert any(expected in p for p in found), found


def test_a_bicep037_suppression_only_covers_its_own_property(copy: Path) -> None:
    edit(copy / "modules/monitoring.bicep", "    #disable-next-line BCP037\n", "")
    assert any("CustomMetricsOptedInType" in p for p in problems_of(copy / "main.bicepparam"))


def test_values_from_parameters_reach_the_type_check(copy: Path) -> None:
    # The storage SKU comes from a parameter: a value the template allows but Azure's type does not must be caught
    # once the parameter's own @allowed list is widened (the check follows values through modules).
    edit(copy / "main.bicep", "  'Standard_ZRS'\n])\nparam storageSkuName", "  'Standard_ZRS'\n  'Standard_XYZ'\n])\nparam storageSkuName")
    edit(copy / "modules/storage.bicep", "  'Standard_ZRS'\n])", "  'Standard_ZRS'\n  'Standard_XYZ'\n])")
    edit(copy / "minimal.bicepparam", "param alwaysReadyInstances = 0", "param alwaysReadyInstances = 0\nparam storageSkuName = 'Standard_XYZ'")
    assert any("Standard_XYZ" in p for p in problems_of(copy / "minimal.bicepparam"))


def test_parameter_values_are_checked_against_declared_types(copy: Path) -> None:
    edit(copy / "minimal.bicepparam", "        sku: 'GlobalStandard'\n        capacity: 100", "        sku: 'GlobalStandrd'\n        capacity: 100")
    assert any("GlobalStandrd" in p for p in problems_of(copy / "minimal.bicepparam"))
    shutil.copy(BICEP / "minimal.bicepparam", copy / "minimal.bicepparam")
    edit(copy / "minimal.bicepparam", "    weight: 1\n", "    weight: 1\n    colour: 'blue'\n")
    assert any("unknown field 'colour'" in p for p in problems_of(copy / "minimal.bicepparam"))
    shutil.copy(BICEP / "minimal.bicepparam", copy / "minimal.bicepparam")
    edit(copy / "minimal.bicepparam", "param alwaysReadyInstances = 0", "param alwaysReadyInstances = 0\nparam nonsense = 1")
    assert any("nonsense is not declared" in p for p in problems_of(copy / "minimal.bicepparam"))


# ---- names ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "ok"),
    [
        ("Microsoft.Network/privateEndpoints", "pe-" + "a" * 61, True),
        ("Microsoft.Network/privateEndpoints", "pe-" + "a" * 62, False),  # 65 characters
        ("Microsoft.Network/privateEndpoints", "pe-account-", False),  # ends with a hyphen
        ("Microsoft.Storage/storageAccounts", "staigw" + "a" * 18, True),
        ("Microsoft.Storage/storageAccounts", "stAigw", False),
        ("Microsoft.CognitiveServices/accounts", "oai-a-", False),
        ("Microsoft.Web/sites", "func-" + "a" * 56, False),
        ("module", "x" * 65, False),
        ("Microsoft.Authorization/roleAssignments", "not-a-guid", False),
    ],
)
def test_naming_rules(kind: str, name: str, ok: bool) -> None:
    assert (names.check_name(kind, name) == []) is ok


def hostile_names(path: Path) -> None:
    """Longest allowed backend ids and existing account names in a parameters file, in place."""
    text = path.read_text(encoding="utf-8")
    text = text.replace("id: 'swedencentral'", "id: 'swedencentral_" + "x" * 19 + ".a-'")
    text = text.replace("'contoso-openai-francecentral'", "'" + "c" * 63 + "-'")
    path.write_text(text, encoding="utf-8")


def test_names_fit_with_hostile_ids_and_account_names(copy: Path) -> None:
    hostile_names(copy / "private.bicepparam")
    report = checks.check(copy / "private.bicepparam")
    assert report.problems == []
    endpoints = [r.name for r in report.deployment.all_resources() if r.type == "Microsoft.Network/privateEndpoints"]
    assert len(endpoints) == 5 and all(len(n) <= 64 for n in endpoints)
    assert max(len(n) for n in endpoints) > 60  # the hostile names did reach the endpoint names


def test_the_name_check_reports_the_old_private_endpoint_names(copy: Path) -> None:
    # The names private endpoints had before: cut at 80 characters.
    edit(copy / "modules/network.bicep",
         "'pe-oai-${take(last(split(account.id, '/')), 40)}-${uniqueString(account.id)}'",
         "take('pe-${uniqueString(account.id)}-${last(split(account.id, '/'))}', 80)")
    hostile_names(copy / "private.bicepparam")
    found = problems_of(copy / "private.bicepparam")
    assert any("Microsoft.Network/privateEndpoints names have 2 to 64" in p for p in found), found


# ---- models against the dated snapshot -----------------------------------------------------------------------------


def test_the_snapshot_is_dated_and_sourced() -> None:
    facts = models.snapshot()
    for source in facts.sources.values():
        assert source["url"].startswith("https://learn.microsoft.com/") and source["page_date"] and source["read"]
    assert facts.availability and facts.lifecycle


def test_the_model_check_reports_the_findings_of_the_issue() -> None:
    # text-embedding-3-small as regional Standard in swedencentral: not offered there.
    assert any("not offered as Standard in swedencentral" in p
               for p in models.check_deployment("text-embedding-3-small", "1", "Standard", "swedencentral"))
    # The old defaults: gpt-4o-mini 2024-07-18 is Deprecated, gpt-4o 2024-11-20 Legacy.
    assert any("Deprecated" in p for p in models.check_deployment("gpt-4o-mini", "2024-07-18", "GlobalStandard", "uksouth"))
    assert any("Legacy" in p for p in models.check_deployment("gpt-4o", "2024-11-20", "GlobalStandard", "uksouth"))
    # A region the snapshot knows nothing about, and a model it does not list.
    current = minimal_deployments()[0]
    assert any("no facts for newzealandnorth" in p for p in models.check_deployment(
        current["model"], current["modelVersion"], "GlobalStandard", "newzealandnorth"))
    assert any("not in the model snapshot" in p for p in models.check_deployment("gpt-9", "1", "GlobalStandard", "uksouth"))
    assert models.check_region_skus("x", ["GlobalStandard", "ProvisionedManaged"])


@pytest.mark.parametrize("region", ["eastus2", "westus3", "canadaeast", "brazilsouth", "japaneast", "australiaeast",
                                    "southindia", "uaenorth", "southafricanorth", "swedencentral"])
def test_the_snapshot_covers_the_regions_of_every_continent_the_templates_may_name(region: str) -> None:
    """The templates take any `location`: the snapshot covers every public region Microsoft's availability pages list,
    so a region outside Europe is checked, not just reported as unknown."""
    facts = models.snapshot()
    assert region in facts.regions
    offered = [p for p in models.check_deployment("gpt-5.4-mini", "2026-03-17", "GlobalStandard", region, facts,
                                                   frozenset({"gpt-5.4-mini"}))]
    assert offered == [], offered
    # A data-zone SKU where the region has no data zone (Asia Pacific, Middle East and Africa) is "not offered".
    zone = models.check_deployment("gpt-5.4-mini", "2026-03-17", "DataZoneStandard", region, facts)
    assert all("no facts" not in p for p in zone), zone


def test_every_region_of_the_snapshot_is_offered_something() -> None:
    facts = models.snapshot()
    offered = {r for by in facts.availability.values() for rs in by.values() for r in rs}
    assert facts.regions == offered and len(facts.regions) >= 28


def minimal_deployments() -> list[dict[str, Any]]:
    """The minimal scenario's model deployments, as its parameters file gives them (so no version is written here)."""
    _, values, _ = params_values(scenario("minimal").resolve(), Context())
    deployments: list[dict[str, Any]] = values["backendRegions"][0]["deployments"]
    return deployments


def deprecated_model() -> tuple[str, str]:
    """A model version the snapshot lists as Deprecated (one of the issue's old defaults)."""
    key = next(k for k, v in models.snapshot().lifecycle.items() if v["lifecycle"] == "Deprecated")
    model, version = key.split("@")
    return model, version


def test_every_deployment_of_a_parameters_file_is_checked(copy: Path) -> None:
    region = scenario("minimal").read_text(encoding="utf-8")
    location = re.search(r"location: '([^']+)'", region).group(1)  # type: ignore[union-attr]
    first, last = minimal_deployments()[0], minimal_deployments()[-1]
    block = f"        model: '{first['model']}'\n        modelVersion: '{first['modelVersion']}'"
    offered_standard = {r for regions in models.snapshot().availability["Standard"].values() for r in regions}
    cases = [
        # A SKU the region does not offer for the model (regional Standard, as the issue found).
        (f"        sku: '{last['sku']}'\n        capacity: {last['capacity']}",
         f"        sku: 'Standard'\n        capacity: {last['capacity']}",
         "in " + location if location in offered_standard else "no Standard facts"),
        # A version that does not exist.
        (f"        modelVersion: '{first['modelVersion']}'", "        modelVersion: '1999-01-01'", "not in the model snapshot"),
        # A deprecated model.
        (block, "        model: '{}'\n        modelVersion: '{}'".format(*deprecated_model()), "Deprecated"),
        # A region the snapshot has no facts for.
        (f"    location: '{location}'", "    location: 'newzealandnorth'", "facts for newzealandnorth"),
    ]
    for old, new, expected in cases:
        shutil.copy(scenario("minimal"), copy / "minimal.bicepparam")
        edit(copy / "minimal.bicepparam", old, new)
        found = problems_of(copy / "minimal.bicepparam")
        assert any(expected in p for p in found), (old, found)


def test_a_retirement_within_the_runway_is_reported(tmp_path: Path) -> None:
    raw = json.loads(models.SNAPSHOT.read_text(encoding="utf-8"))
    current = minimal_deployments()[0]
    key = f"{current['model']}@{current['modelVersion']}"
    soon = models.snapshot().date.toordinal() + models.MIN_RUNWAY_DAYS - 1
    from datetime import date

    raw["lifecycle"][key]["retirement"] = date.fromordinal(soon).isoformat()
    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    facts = models.snapshot(path)
    assert any("retires" in p for p in models.check_deployment(current["model"], current["modelVersion"], current["sku"], "uksouth", facts))


def test_the_commented_ptu_example_passes_the_checks_once_uncommented(copy: Path) -> None:
    with_ptu_example(copy / "main.bicepparam")
    report = checks.check(copy / "main.bicepparam")
    assert report.problems == []
    skus = {r.body["sku"]["name"] for r in report.deployment.all_resources()
            if r.type == "Microsoft.CognitiveServices/accounts/deployments"}
    assert skus & models.PROVISIONED_SKUS


def test_decorators_on_type_fields_are_checked(copy: Path) -> None:
    # backendRegion.id is @maxLength(40): longer ids would push new account names past 64 characters.
    edit(copy / "minimal.bicepparam", "id: 'swedencentral'", "id: 'swedencentral-" + "x" * 28 + "'")
    found = problems_of(copy / "minimal.bicepparam")
    assert any("parameter backendRegions: [0].id:" in p and "is longer than 40" in p for p in found), found
    shutil.copy(BICEP / "minimal.bicepparam", copy / "minimal.bicepparam")
    edit(copy / "minimal.bicepparam", "capacity: 100", "capacity: 0")  # modelDeployment.capacity is @minValue(1)
    assert any("capacity" in p and "is below 1" in p for p in problems_of(copy / "minimal.bicepparam"))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("param appInboundAccess = 'private'", "needs enablePrivateNetworking"),
        ("param appInboundAccess = 'restricted'", "refuses every caller"),
    ],
)
def test_combinations_that_lock_everyone_out_are_reported(copy: Path, extra: str, expected: str) -> None:
    edit(copy / "minimal.bicepparam", "param alwaysReadyInstances = 0", f"param alwaysReadyInstances = 0\n{extra}")
    assert any(expected in p for p in problems_of(copy / "minimal.bicepparam"))


def test_a_registration_only_model_is_reported_unless_the_file_says_it_is_approved(copy: Path) -> None:
    first = minimal_deployments()[0]
    limited = "gpt-5.4"
    assert limited in models.snapshot().limited_access and "gpt-5.4-mini" not in models.snapshot().limited_access
    version = next(k for k in models.snapshot().lifecycle if k.startswith(limited + "@")).split("@")[1]
    edit(copy / "minimal.bicepparam", f"        model: '{first['model']}'\n        modelVersion: '{first['modelVersion']}'",
         f"        model: '{limited}'\n        modelVersion: '{version}'")
    found = problems_of(copy / "minimal.bicepparam")
    assert [p for p in found if "needs registration" in p and "aka.ms/oai/gpt5access" in p], found
    # Approved: one comment line in the parameters file; a commented-out one does not count.
    text = (copy / "minimal.bicepparam").read_text(encoding="utf-8")
    (copy / "minimal.bicepparam").write_text(text + f"// // bicepcheck: registered {limited}\n", encoding="utf-8")
    assert any("needs registration" in p for p in problems_of(copy / "minimal.bicepparam"))
    (copy / "minimal.bicepparam").write_text(text + f"// bicepcheck: registered {limited}\n", encoding="utf-8")
    assert not [p for p in problems_of(copy / "minimal.bicepparam") if "registration" in p]


def test_zone_redundancy_with_fewer_than_two_ready_instances_is_reported(copy: Path) -> None:
    edit(copy / "private.bicepparam", "param alwaysReadyInstances = 2", "param alwaysReadyInstances = 1")
    assert any("zoneRedundant with alwaysReadyInstances 1" in p for p in problems_of(copy / "private.bicepparam"))
    edit(copy / "minimal.bicepparam", "param alwaysReadyInstances = 0", "param alwaysReadyInstances = 0\nparam zoneRedundant = true")
    assert any("zoneRedundant with alwaysReadyInstances 0" in p for p in problems_of(copy / "minimal.bicepparam"))


def test_a_provisioned_backend_with_pay_as_you_go_deployments_is_reported(copy: Path) -> None:
    with_ptu_example(copy / "main.bicepparam")
    edit(copy / "main.bicepparam", "\n        sku: 'GlobalProvisionedManaged'", "\n        sku: 'GlobalStandard'")
    found = problems_of(copy / "main.bicepparam")
    assert any("provisioned backend uksouth-ptu creates pay-as-you-go deployments (GlobalStandard)" in p for p in found), found
