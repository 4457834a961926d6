"""The deployment (bicep/, azure.yaml, .funcignore) checked without a Bicep compiler, which cannot be installed on the
development and CI machines.

What is checked here: every .bicep file parses (pycep-parser), and the parse check is shown to fail on broken Bicep;
modules are wired with parameters they declare; the example parameters fit the template; every setting the gateway
reads at start-up is set by the template or deliberately left at its default; the backends the template builds are
ones shared/config.py accepts; role assignments use the documented built-in role ids and deterministic names; API
versions are documented ones; no keys or connection strings; the alert queries pass the KQL checker of
tests/test_queries.py. What is not: type checking and compilation, which `az bicep build --file bicep/main.bicep`
does (docs/deploy.md says where that was run).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from lark.exceptions import LarkError
from pycep import BicepParser

from shared.routing import breaker
from shared import config
from shared.telemetry import events as telemetry

ROOT = Path(__file__).resolve().parent.parent
BICEP = ROOT / "bicep"
MAIN = BICEP / "main.bicep"
PARAMS = BICEP / "main.bicepparam"
FUNCTION_APP = BICEP / "modules" / "functionapp.bicep"
BICEP_FILES = sorted(BICEP.rglob("*.bicep"))

# Built-in role definition ids, from the Azure built-in roles reference:
# https://learn.microsoft.com/azure/role-based-access-control/built-in-roles
# (source: MicrosoftDocs/azure-docs, articles/role-based-access-control/built-in-roles.md, read 2026-04).
DOCUMENTED_ROLES = {
    "Storage Blob Data Owner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "Storage Blob Data Contributor": "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
    "Storage Queue Data Contributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "Storage Table Data Contributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "Cognitive Services OpenAI User": "5e0bd9bd-7b93-4f28-af87-19fc36ad61bd",
    "Monitoring Metrics Publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
    "Monitoring Reader": "43d0d8ad-25c7-4714-9337-8ba259a9fe05",
}

# Exactly what each principal is granted (see the header of bicep/modules/roles.bicep for why).
EXPECTED_GRANTS = {
    ("gatewayPrincipalId", "Storage Blob Data Owner"),  # host storage and the deployment container
    ("gatewayPrincipalId", "Storage Table Data Contributor"),  # the gateway's tables
    ("gatewayPrincipalId", "Monitoring Metrics Publisher"),  # telemetry with local auth off
    ("gatewayPrincipalId", "Cognitive Services OpenAI User"),  # inference on every backend
    ("adminPrincipalId", "Storage Table Data Contributor"),  # the admin CLI
    ("adminPrincipalId", "Monitoring Reader"),  # `python -m shared.admin query`
}

# API versions per resource type, each one verified to exist in Azure's published REST API specifications
# (github.com/Azure/azure-rest-api-specs, specification/<service>/resource-manager/<namespace>/stable/<version>/) or in
# the ARM template reference (learn.microsoft.com/azure/templates/<namespace>/<version>/<type>). Only stable versions.
DOCUMENTED_API_VERSIONS = {
    # msi/.../Microsoft.ManagedIdentity/stable/2023-01-31/ManagedIdentity.json
    "Microsoft.ManagedIdentity/userAssignedIdentities": {"2023-01-31"},
    # storage/.../Microsoft.Storage/stable/2023-05-01 (StorageAccount, BlobServices, BlobContainer)
    "Microsoft.Storage/storageAccounts": {"2023-05-01"},
    "Microsoft.Storage/storageAccounts/blobServices": {"2023-05-01"},
    "Microsoft.Storage/storageAccounts/blobServices/containers": {"2023-05-01"},
    # operationalinsights/.../Microsoft.OperationalInsights/stable/2023-09-01/Workspaces.json
    "Microsoft.OperationalInsights/workspaces": {"2023-09-01"},
    # applicationinsights/.../Microsoft.Insights/stable/2020-02-02/components_API.json
    "Microsoft.Insights/components": {"2020-02-02"},
    # applicationinsights/.../Microsoft.Insights/stable/2023-06-01/workbooks_API.json
    "Microsoft.Insights/workbooks": {"2023-06-01"},
    # monitor/.../Microsoft.Insights/stable/2023-12-01/scheduledQueryRule_API.json
    "Microsoft.Insights/scheduledQueryRules": {"2023-12-01"},
    # monitor/.../Microsoft.Insights/stable/2023-01-01/actionGroups_API.json
    "Microsoft.Insights/actionGroups": {"2023-01-01"},
    # web/.../Microsoft.Web/stable/2024-04-01: AppServicePlans.json, WebApps.json (its Flex Consumption example
    # CreateOrUpdateFunctionAppFlexConsumptionWithDetails.json has functionAppConfig with alwaysReady and triggers)
    "Microsoft.Web/serverfarms": {"2024-04-01"},
    "Microsoft.Web/sites": {"2024-04-01"},
    "Microsoft.Web/sites/config": {"2024-04-01"},
    "Microsoft.Web/sites/basicPublishingCredentialsPolicies": {"2024-04-01"},
    # cognitiveservices/.../Microsoft.CognitiveServices/stable/2024-10-01/cognitiveservices.json (PutDeployment.json)
    "Microsoft.CognitiveServices/accounts": {"2024-10-01"},
    "Microsoft.CognitiveServices/accounts/deployments": {"2024-10-01"},
    # authorization/.../Microsoft.Authorization/stable/2022-04-01/authorization-RoleAssignmentsCalls.json
    "Microsoft.Authorization/roleAssignments": {"2022-04-01"},
    # network/.../Microsoft.Network/stable/2023-11-01/virtualNetwork.json; template reference
    # microsoft.network/2023-11-01/privateendpoints and .../privateendpoints/privatednszonegroups
    "Microsoft.Network/virtualNetworks": {"2023-11-01"},
    "Microsoft.Network/privateEndpoints": {"2023-11-01"},
    "Microsoft.Network/privateEndpoints/privateDnsZoneGroups": {"2023-11-01"},
    # privatedns/.../Microsoft.Network/stable/2020-06-01/privatedns.json
    "Microsoft.Network/privateDnsZones": {"2020-06-01"},
    "Microsoft.Network/privateDnsZones/virtualNetworkLinks": {"2020-06-01"},
}

# Settings shared/config.py reads that the template deliberately leaves unset, so the code's default applies.
LEFT_AT_DEFAULT = {
    # Table Storage: the template sets GATEWAY_TABLE_ENDPOINT (identity-based). A connection string would carry the
    # account key, and shared keys are off on the account.
    "GATEWAY_TABLE_CONNECTION_STRING",
    # The host's storage connection string: replaced by the identity-based AzureWebJobsStorage__* settings.
    "AzureWebJobsStorage",
    # Only consulted when GATEWAY_TABLE_ENDPOINT is not set.
    "AzureWebJobsStorage__tableServiceUri",
    # Set by the platform; GATEWAY_ID, which the template sets, takes precedence.
    "WEBSITE_SITE_NAME",
    # Table names <prefix>consumers, ledger, breakers, usage: the default prefix "gateway".
    "GATEWAY_TABLE_PREFIX",
    # Tuning and telemetry options with documented defaults (README.md, Settings); set them through the template's
    # extraAppSettings parameter.
    "GATEWAY_MAX_BODY_BYTES",
    "GATEWAY_DEFAULT_MAX_TOKENS",
    "GATEWAY_USER_ID_HEADER",
    "GATEWAY_STORE_TIMEOUT_S",
    "GATEWAY_CONSUMER_REFRESH_S",
    "GATEWAY_BREAKER_SYNC_S",
    "GATEWAY_MAX_ATTEMPTS",
    "GATEWAY_LEASE_LIFETIME_S",
    "GATEWAY_METRIC_NAMESPACE",
    "GATEWAY_METRIC_DIMENSIONS",
    "GATEWAY_TRACE_SAMPLING",
    "GATEWAY_TRACES_PER_SECOND",
    "GATEWAY_GC_TUNING",
    # Prompts and completions are never recorded unless this is set; the deployment keeps it off.
    "GATEWAY_RECORD_CONTENT",
}

# PTU minimums and increments for regional provisioned deployments (ProvisionedManaged), from "What is provisioned
# throughput?": https://learn.microsoft.com/azure/ai-services/openai/concepts/provisioned-throughput
REGIONAL_PTU_STEP = {"gpt-4o": 50, "gpt-4o-mini": 25}

CLIENT_ID = "11111111-2222-3333-4444-555555555555"


# ---- parsing --------------------------------------------------------------------------------------------------


@cache
def _parser() -> BicepParser:
    return BicepParser()


def parse_text(text: str) -> dict[str, Any]:
    parsed: dict[str, Any] = dict(_parser().parse(text=text))
    return parsed


@cache
def parse(path: Path) -> dict[str, Any]:
    return parse_text(path.read_text(encoding="utf-8"))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def body(declaration: dict[str, Any]) -> dict[str, Any]:
    """The object of a resource or module declaration, unwrapped from its loop and condition."""
    node: dict[str, Any] = declaration["config"]
    while ("loop_type" in node or "condition" in node) and isinstance(node.get("config"), dict):
        node = node["config"]
    return node


def resources() -> Iterator[tuple[Path, str, dict[str, Any]]]:
    for path in BICEP_FILES:
        for name, resource in parse(path).get("resources", {}).items():
            yield path, name, resource


def parse_params_file(path: Path) -> tuple[str, dict[str, Any]]:
    """A .bicepparam file: its `using` target and its parameter values.

    pycep-parser reads .bicep only; a parameters file is `using '<file>'` followed by `param name = value` lines, so
    it is parsed as a .bicep file of `var name = value` declarations (values are ordinary Bicep expressions).
    """
    text = path.read_text(encoding="utf-8")
    using = re.findall(r"^using\s+'([^']+)'\s*$", text, re.M)
    assert len(using) == 1, f"{rel(path)}: expected one using declaration"
    declarations = re.sub(r"^using\s+'[^']+'\s*$", "", text, flags=re.M)
    declarations = re.sub(r"^param\s+(\w+)\s*=", r"var \1 =", declarations, flags=re.M)
    assert not re.search(r"^\s*param\s", declarations, re.M), "every param line must be `param name = value`"
    parsed = parse_text(declarations)
    return using[0], {name: var["value"] for name, var in parsed.get("variables", {}).items()}


def object_types(path: Path) -> dict[str, dict[str, tuple[str, bool]]]:
    """User-defined object types of a file: {type: {property: (type, optional)}} (pycep drops the `?`)."""
    types: dict[str, dict[str, tuple[str, bool]]] = {}
    for match in re.finditer(r"^type\s+(\w+)\s*=\s*\{\n(.*?)^\}", path.read_text(encoding="utf-8"), re.M | re.S):
        props = re.findall(r"^  (\w+):\s*([\w\[\]]+)(\?)?\s*$", match.group(2), re.M)
        types[match.group(1)] = {name: (kind, bool(optional)) for name, kind, optional in props}
    return types


def union_type_values(path: Path, name: str) -> set[str]:
    match = re.search(rf"^type\s+{name}\s*=\s*(.+)$", path.read_text(encoding="utf-8"), re.M)
    assert match, f"type {name} not found in {rel(path)}"
    return set(re.findall(r"'([^']+)'", match.group(1)))


def app_settings() -> dict[str, Any]:
    """The app settings object of the Function App (the literal object inside union(extraAppSettings, {...}))."""
    resource = parse(FUNCTION_APP)["resources"]["appSettings"]
    assert resource["type"] == "Microsoft.Web/sites/config" and body(resource)["name"] == "appsettings"
    properties = body(resource)["properties"]
    if "function" in properties:
        assert properties["function"]["type"] == "union"
        literal = [arg for arg in properties["function"]["parameters"].values() if isinstance(arg, dict)]
        assert len(literal) == 1, "expected union(extraAppSettings, { ... })"
        # The literal object comes last, so extra settings can never replace the template's.
        assert list(properties["function"]["parameters"].values())[-1] is literal[0]
        properties = literal[0]
    settings: dict[str, Any] = properties
    return settings


def literal_settings() -> dict[str, str]:
    """App settings whose value is a plain string in the Bicep text (pycep cannot tell a literal from a symbol)."""
    text = FUNCTION_APP.read_text(encoding="utf-8")
    return {
        name: value for name, value in re.findall(r"^\s+(\w+):\s*'([^'$]*)'\s*$", text, re.M) if name in app_settings()
    }


# ---- every file parses, and the check can fail ------------------------------------------------------------------


def test_there_is_a_template_and_modules() -> None:
    assert MAIN in BICEP_FILES and PARAMS.is_file()
    assert len([p for p in BICEP_FILES if p.parent.name == "modules"]) >= 6


@pytest.mark.parametrize("path", BICEP_FILES, ids=rel)
def test_bicep_file_parses(path: Path) -> None:
    parsed = parse(path)
    assert parsed.get("resources") or parsed.get("modules"), f"{rel(path)} declares nothing"


def test_parameters_file_parses() -> None:
    using, values = parse_params_file(PARAMS)
    assert using == "./main.bicep" and values


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
def test_the_parse_check_rejects_broken_bicep(snippet: str) -> None:
    with pytest.raises((LarkError, ValueError)):
        parse_text(snippet + "\n")


def test_the_parse_check_rejects_a_broken_copy_of_the_real_template() -> None:
    text = MAIN.read_text(encoding="utf-8")
    parse_text(text)
    end = text.rindex("\n}\n")  # the end of the last module declaration
    broken = text[:end] + text[end + 2 :]
    with pytest.raises((LarkError, ValueError)):
        parse_text(broken)


# ---- modules are wired with the parameters they declare ----------------------------------------------------------


def test_every_module_exists_is_used_and_gets_its_parameters() -> None:
    used: set[Path] = set()
    for path in BICEP_FILES:
        for name, module in parse(path).get("modules", {}).items():
            target = (path.parent / module["detail"]["path"]).resolve()
            assert target.is_file(), f"{rel(path)}: module {name} points at a missing file"
            used.add(target)
            declared = parse(target).get("parameters", {})
            given = body(module).get("params", {})
            assert set(given) <= set(declared), f"{name}: unknown parameters {set(given) - set(declared)}"
            required = {p for p, spec in declared.items() if spec["default"] is None}
            assert required <= set(given), f"{name}: missing parameters {required - set(given)}"
    assert used == {p.resolve() for p in BICEP_FILES if p != MAIN}, "every module is used by main.bicep"


def test_loaded_files_exist_and_fit() -> None:
    loaded_any = False
    for path in BICEP_FILES:
        for loaded in re.findall(r"loadTextContent\('([^']+)'\)", path.read_text(encoding="utf-8")):
            target = path.parent / loaded
            assert target.is_file(), f"{rel(path)} loads a missing file {loaded}"
            # loadTextContent accepts at most 131,072 characters (Bicep file functions reference).
            assert len(target.read_text(encoding="utf-8")) < 131_072, f"{loaded} is too large for loadTextContent"
            loaded_any = True
    assert loaded_any


def test_main_is_resource_group_scoped() -> None:
    assert parse(MAIN)["globals"]["scope"]["value"] == "resourceGroup"


# ---- the example parameters ----------------------------------------------------------------------------------------


def _check_constraints(name: str, spec: dict[str, Any], value: Any) -> None:
    for decorator in spec["decorators"]:
        kind, argument = decorator["type"], decorator.get("argument")
        if kind == "allowed":
            assert value in argument, f"{name}={value!r} is not one of {argument}"
        elif kind == "min_value":
            assert value >= argument, f"{name}={value} < {argument}"
        elif kind == "max_value":
            assert value <= argument, f"{name}={value} > {argument}"
        elif kind == "min_length":
            assert len(value) >= argument, f"{name} is shorter than {argument}"
        elif kind == "max_length":
            assert len(value) <= argument, f"{name} is longer than {argument}"


def _is_literal(value: Any) -> bool:
    return not (isinstance(value, dict) and ({"function"} & set(value) or {"operator"} & set(value)))


def test_example_parameters_are_template_parameters_and_give_every_required_one() -> None:
    _, values = parse_params_file(PARAMS)
    declared = parse(MAIN)["parameters"]
    assert set(values) <= set(declared), f"unknown parameters: {set(values) - set(declared)}"
    required = {name for name, spec in declared.items() if spec["default"] is None}
    assert required <= set(values), f"required parameters missing: {required - set(values)}"
    for name, value in values.items():
        if _is_literal(value):
            _check_constraints(name, declared[name], value)


def test_environment_defaults_in_the_parameters_file() -> None:
    _, values = parse_params_file(PARAMS)
    name = values["environmentName"]["function"]
    assert name["type"] == "readEnvironmentVariable" and name["parameters"]["arg_1"] == "AZURE_ENV_NAME"
    admin = values["adminPrincipalId"]["function"]
    assert admin["parameters"] == {"arg_1": "AZURE_PRINCIPAL_ID", "arg_2": ""}


def example_regions() -> list[dict[str, Any]]:
    _, values = parse_params_file(PARAMS)
    regions = values["backendRegions"]
    assert isinstance(regions, list)
    return regions


def test_example_regions_fit_the_backend_region_type() -> None:
    types = object_types(MAIN)
    region_type = types["backendRegion"]
    deployment_type = object_types(BICEP / "modules" / "openai.bicep")["modelDeployment"]
    skus = union_type_values(MAIN, "deploymentSku")
    sku_param = parse(BICEP / "modules" / "openai.bicep")["parameters"]["sku"]
    assert skus == set(next(d["argument"] for d in sku_param["decorators"] if d["type"] == "allowed"))
    for region in example_regions():
        assert set(region) <= set(region_type), f"{region['id']}: unknown fields {set(region) - set(region_type)}"
        required = {name for name, (_, optional) in region_type.items() if not optional}
        assert required <= set(region), f"{region.get('id')}: missing {required - set(region)}"
        assert region["sku"] in skus
        for deployment in region["deployments"]:
            assert set(deployment) <= set(deployment_type)
            assert {n for n, (_, optional) in deployment_type.items() if not optional} <= set(deployment)
            assert isinstance(deployment["capacity"], int) and deployment["capacity"] > 0


def test_example_is_the_seed_three_regions() -> None:
    regions = {r["location"]: r for r in example_regions()}
    assert set(regions) == {"uksouth", "swedencentral", "francecentral"}
    ptu = regions["uksouth"]
    assert ptu["sku"] == "ProvisionedManaged" and ptu["priority"] == 1
    for location in ("swedencentral", "francecentral"):
        assert regions[location]["priority"] == 2 and regions[location]["sku"] in {"Standard", "GlobalStandard"}
    for deployment in ptu["deployments"]:
        step = REGIONAL_PTU_STEP[deployment["model"]]
        assert deployment["capacity"] >= step and deployment["capacity"] % step == 0, deployment


# ---- the backends the template builds --------------------------------------------------------------------------


def backends_from_regions(regions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What main.bicep's `backends` variable yields for these regions (the test below keeps the two in step)."""
    return [
        {
            "id": r["id"],
            "endpoint": (r.get("existingAccount") or {}).get("endpoint")
            or f"https://oai-example-{r['id']}.openai.azure.com",
            "region": r["location"],
            "deployments": {d["name"]: d.get("deploymentName", d["name"]) for d in r["deployments"]},
            "priority": r["priority"],
            "weight": r["weight"],
            "ptu": "Provisioned" in r["sku"],
            "api": "azure",
            "auth": "identity",
            "reserve_tokens": r.get("reserveTokens", 0),
            "breaker": r.get("breaker", {}),
        }
        for r in regions
    ]


def test_template_backends_are_what_config_accepts() -> None:
    variable = parse(MAIN)["variables"]["backends"]["value"]
    assert variable["loop_type"]["detail"]["array_name"] == "backendRegions"
    fields = variable["config"]
    mirror = backends_from_regions(example_regions())
    assert set(fields) == set(mirror[0]), "keep backends_from_regions in step with main.bicep"
    assert set(fields) <= config._BACKEND_FIELDS and {"id", "endpoint", "region", "deployments"} <= set(fields)
    assert "api_key" not in fields and "api_key_setting" not in fields
    assert fields["auth"] == "identity" and fields["api"] == "azure"  # literal values: no keys, Azure paths
    assert "string(backends)" in FUNCTION_APP.read_text(encoding="utf-8").replace(" ", "")

    parsed = config.parse_backends(json.dumps(mirror), {})
    by_region = {b.region: b for b in parsed}
    assert by_region["uksouth"].ptu and by_region["uksouth"].priority == 1 and by_region["uksouth"].reserve_tokens
    assert not by_region["swedencentral"].ptu and by_region["francecentral"].priority == 2
    assert all(b.auth == "identity" and b.api_key is None for b in parsed)
    assert set(by_region["swedencentral"].deployments) >= set(by_region["uksouth"].deployments)


def test_a_breaker_rule_type_matches_config() -> None:
    rule = object_types(MAIN)["breakerRule"]
    assert set(rule) == set(config._BREAKER_FIELDS) and all(optional for _, optional in rule.values())


# ---- app settings: everything the code reads is set, or left at its default on purpose ---------------------------


class RecordingEnv(Mapping[str, str]):
    """App settings that remember every name the code looks up."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self._values[key]

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self._values.get(key, default)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def sample_settings() -> dict[str, str]:
    """Values the deployed app gets for each setting the template sets (its literals, examples for expressions)."""
    _, values = parse_params_file(PARAMS)
    samples = {
        "AzureWebJobsStorage__accountName": "staigwexample",
        "AzureWebJobsStorage__credential": "managedidentity",
        "AzureWebJobsStorage__clientId": CLIENT_ID,
        "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=00000000-0000-0000-0000-000000000000;"
        "IngestionEndpoint=https://uksouth-1.in.applicationinsights.azure.com/",
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": f"Authorization=AAD;ClientId={CLIENT_ID}",
        "AZURE_CLIENT_ID": CLIENT_ID,
        "PYTHON_ENABLE_INIT_INDEXING": "1",
        "GATEWAY_BACKENDS": json.dumps(backends_from_regions(example_regions())),
        "GATEWAY_TABLE_ENDPOINT": "https://staigwexample.table.core.windows.net/",
        "GATEWAY_INSTANCE_COUNT": str(values["maximumInstanceCount"]),
        "GATEWAY_LIMIT_FAIL_MODE": values["limitFailMode"],
        "GATEWAY_ID": "func-aigw-example",
    }
    settings = set(app_settings())
    assert settings == set(samples), f"give a sample value for {settings ^ set(samples)}"
    for name, literal in literal_settings().items():
        assert samples[name] == literal, f"{name}: the template sets {literal!r}"
    return samples


def names_load_settings_reads() -> set[str]:
    samples = sample_settings()
    runs = [
        samples,  # as deployed
        {"GATEWAY_BACKENDS": samples["GATEWAY_BACKENDS"]},  # nothing else: every table-storage fallback is tried
        {"GATEWAY_BACKENDS": samples["GATEWAY_BACKENDS"], "AzureWebJobsStorage__accountName": "st"},  # all defaults
    ]
    read: set[str] = set()
    for values in runs:
        env = RecordingEnv(values)
        try:
            config.load_settings(env)
        except config.ConfigError:
            pass
        read |= env.read
    return read


def names_read_elsewhere() -> set[str]:
    """Settings the deployed code reads straight from the environment, outside load_settings."""
    pattern = re.compile(
        r"""(?:_env|environ\.get|getenv)\(\s*["']([A-Za-z_][A-Za-z0-9_]*)["']|environ\[\s*["']([A-Za-z_][A-Za-z0-9_]*)["']"""
    )
    names: set[str] = set()
    for path in [ROOT / "function_app.py", *sorted((ROOT / "shared").rglob("*.py"))]:
        for match in pattern.finditer(path.read_text(encoding="utf-8")):
            names.add(match.group(1) or match.group(2))
    return names


def test_every_setting_the_code_reads_is_set_or_left_at_its_default_on_purpose() -> None:
    template = set(app_settings())
    read = names_load_settings_reads() | names_read_elsewhere()
    unaccounted = read - template - LEFT_AT_DEFAULT
    assert not unaccounted, (
        f"set these in bicep/modules/functionapp.bicep or add them to LEFT_AT_DEFAULT: {unaccounted}"
    )
    assert not LEFT_AT_DEFAULT & template, "a setting cannot be both set and left at its default"
    stale = LEFT_AT_DEFAULT - read
    assert not stale, f"the code no longer reads {stale}; remove them from LEFT_AT_DEFAULT"


def test_the_settings_required_at_start_up_are_set() -> None:
    template = set(app_settings())
    assert {"GATEWAY_BACKENDS", "GATEWAY_TABLE_ENDPOINT"} <= template
    assert {
        "AzureWebJobsStorage__accountName",
        "AzureWebJobsStorage__credential",
        "AzureWebJobsStorage__clientId",
    } <= template
    assert {
        "AZURE_CLIENT_ID",
        "APPLICATIONINSIGHTS_CONNECTION_STRING",
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
    } <= template
    assert {
        "GATEWAY_INSTANCE_COUNT",
        "GATEWAY_LIMIT_FAIL_MODE",
        "GATEWAY_ID",
        "PYTHON_ENABLE_INIT_INDEXING",
    } <= template
    literals = literal_settings()
    assert literals["PYTHON_ENABLE_INIT_INDEXING"] == "1"
    assert literals["AzureWebJobsStorage__credential"] == "managedidentity"
    assert (
        "Authorization=AAD;ClientId=${identityClientId}" == app_settings()["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"]
    )


def test_the_deployed_settings_load() -> None:
    samples = sample_settings()
    settings = config.load_settings(samples)
    assert settings.table_endpoint and settings.table_connection_string is None
    assert settings.managed_identity_client_id == CLIENT_ID
    assert settings.instance_count == int(samples["GATEWAY_INSTANCE_COUNT"]) and settings.limit_fail_mode == "open"
    assert len(settings.backends) == 3


def test_instance_count_is_the_plans_maximum() -> None:
    settings = app_settings()
    assert settings["GATEWAY_INSTANCE_COUNT"] == {
        "function": {"type": "string", "parameters": {"value_to_convert": "maximumInstanceCount"}}
    }
    scale = body(parse(FUNCTION_APP)["resources"]["app"])["properties"]["functionAppConfig"]["scaleAndConcurrency"]
    assert scale["maximumInstanceCount"] == "maximumInstanceCount"
    main_spec = parse(MAIN)["parameters"]["maximumInstanceCount"]
    module_spec = parse(FUNCTION_APP)["parameters"]["maximumInstanceCount"]
    bounds = {d["type"]: d["argument"] for d in main_spec["decorators"] if d["type"] in ("min_value", "max_value")}
    assert bounds == {
        d["type"]: d["argument"] for d in module_spec["decorators"] if d["type"] in ("min_value", "max_value")
    }
    for value in bounds.values():  # every value the template allows is one the gateway accepts
        config.load_settings({**sample_settings(), "GATEWAY_INSTANCE_COUNT": str(value)})


def test_fail_mode_choices_are_the_gateways() -> None:
    for path in (MAIN, FUNCTION_APP):
        allowed = next(
            d["argument"] for d in parse(path)["parameters"]["limitFailMode"]["decorators"] if d["type"] == "allowed"
        )
        assert set(allowed) == {"open", "closed"}
        for mode in allowed:
            config.load_settings({**sample_settings(), "GATEWAY_LIMIT_FAIL_MODE": mode})


# ---- the Function App --------------------------------------------------------------------------------------------


def test_function_app_is_flex_consumption_python_311_and_locked_down() -> None:
    found = parse(FUNCTION_APP)["resources"]
    plan = body(found["plan"])
    assert plan["sku"] == {"tier": "FlexConsumption", "name": "FC1"} and plan["properties"]["reserved"] is True
    app = body(found["app"])
    assert app["kind"] == "functionapp,linux"
    assert app["identity"]["type"] == "UserAssigned"
    props = app["properties"]
    assert props["httpsOnly"] is True
    assert props["siteConfig"]["minTlsVersion"] == "1.2" and props["siteConfig"]["ftpsState"] == "Disabled"
    assert props["functionAppConfig"]["runtime"] == {"name": "python", "version": "3.11"}
    storage = props["functionAppConfig"]["deployment"]["storage"]
    assert storage["type"] == "blobContainer" and storage["authentication"]["type"] == "UserAssignedIdentity"
    policies = {
        body(r)["name"]: body(r)["properties"]["allow"]
        for r in found.values()
        if r["type"].endswith("/basicPublishingCredentialsPolicies")
    }
    assert policies == {"ftp": False, "scm": False}
    assert "'azd-service-name': 'gateway'" in FUNCTION_APP.read_text(encoding="utf-8")


def test_no_keys_or_connection_strings() -> None:
    for path in BICEP_FILES:
        text = path.read_text(encoding="utf-8")
        for forbidden in ("listKeys", "listkeys", "listConnectionStrings", "AccountKey=", "primaryKey", "key1"):
            assert forbidden not in text, f"{rel(path)} uses {forbidden}"
    assert not [name for name in app_settings() if re.search(r"KEY|SECRET|PASSWORD", name, re.I)]
    assert "AzureWebJobsStorage" not in app_settings()
    storage = body(parse(BICEP / "modules" / "storage.bicep")["resources"]["storage"])["properties"]
    assert storage["allowSharedKeyAccess"] is False and storage["allowBlobPublicAccess"] is False
    assert storage["minimumTlsVersion"] == "TLS1_2" and storage["supportsHttpsTrafficOnly"] is True
    account = body(parse(BICEP / "modules" / "openai.bicep")["resources"]["account"])["properties"]
    assert account["disableLocalAuth"] is True
    insights = body(parse(BICEP / "modules" / "monitoring.bicep")["resources"]["appInsights"])["properties"]
    assert insights["DisableLocalAuth"] is True and insights["CustomMetricsOptedInType"] == "WithDimensions"


# ---- role assignments -------------------------------------------------------------------------------------------


def role_assignments() -> Iterator[tuple[Path, str, dict[str, Any]]]:
    for path, name, resource in resources():
        if resource["type"] == "Microsoft.Authorization/roleAssignments":
            yield path, name, resource


def role_variables(path: Path) -> dict[str, str]:
    variables = parse(path).get("variables", {})
    return {
        name: v["value"]
        for name, v in variables.items()
        if isinstance(v["value"], str) and re.fullmatch(r"[0-9a-f-]{36}", v["value"])
    }


def test_role_ids_are_the_documented_built_in_ones() -> None:
    by_id = {guid: name for name, guid in DOCUMENTED_ROLES.items()}
    for path in BICEP_FILES:
        text = path.read_text(encoding="utf-8")
        for guid in re.findall(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", text):
            assert guid.lower() in by_id, f"{rel(path)}: {guid} is not a documented built-in role id"
        for variable, guid in role_variables(path).items():
            expected = by_id[guid].replace(" ", "")
            assert variable.lower() == expected.lower(), f"{rel(path)}: {variable} holds the id of {by_id[guid]}"


def test_every_role_assignment_is_deterministic_and_uses_a_documented_role() -> None:
    grants: set[tuple[str, str]] = set()
    assignments = list(role_assignments())
    assert assignments
    for path, name, resource in assignments:
        spec = body(resource)
        roles = role_variables(path)
        definition = spec["properties"]["roleDefinitionId"]["function"]
        assert definition["type"] == "subscription_resource_id", f"{name}: use subscriptionResourceId(...)"
        assert definition["parameters"]["resource_type"] == "Microsoft.Authorization/roleDefinitions"
        role_var = definition["parameters"]["resource_name_1"]
        assert role_var in roles, f"{rel(path)} {name}: the role id must be a variable holding a documented id"
        principal = spec["properties"]["principalId"]
        guid = spec["name"]["function"]
        assert guid["type"] == "guid", f"{name}: the name must be guid(scope, principal, role)"
        arguments = json.dumps(guid["parameters"])
        assert principal in arguments and role_var in arguments and ".id" not in role_var
        assert "scope" in spec
        if principal == "gatewayPrincipalId":
            assert spec["properties"]["principalType"] == "ServicePrincipal"
        grants.add((principal, next(n for n, g in DOCUMENTED_ROLES.items() if g == roles[role_var])))
    assert grants == EXPECTED_GRANTS
    for path in BICEP_FILES:
        text = path.read_text(encoding="utf-8")
        assert "newGuid(" not in text and "utcNow(" not in text


# ---- API versions -------------------------------------------------------------------------------------------------


def test_api_versions_are_documented_ones() -> None:
    used = {(r["type"], r["api_version"]) for _, _, r in resources()}
    assert used
    for kind, version in sorted(used):
        assert kind in DOCUMENTED_API_VERSIONS, f"{kind}: add its documented API versions (with the source)"
        assert version in DOCUMENTED_API_VERSIONS[kind], f"{kind}@{version} is not a version verified here"
        assert "preview" not in version
    unused = set(DOCUMENTED_API_VERSIONS) - {kind for kind, _ in used}
    assert not unused, f"documented but unused: {unused}"


# ---- monitoring: workbook and alerts ----------------------------------------------------------------------------


def test_workbook_file_is_a_workbook_and_is_loaded() -> None:
    workbook = json.loads((BICEP / "workbook.json").read_text(encoding="utf-8"))
    assert workbook["version"] == "Notebook/1.0" and isinstance(workbook["items"], list)
    monitoring = BICEP / "modules" / "monitoring.bicep"
    resource = body(parse(monitoring)["resources"]["workbook"])
    assert resource["kind"] == "shared"
    assert "loadTextContent('../workbook.json')" in monitoring.read_text(encoding="utf-8")


def alert_rules() -> dict[str, dict[str, Any]]:
    path = BICEP / "modules" / "alerts.bicep"
    return {
        n: body(r) for n, r in parse(path)["resources"].items() if r["type"] == "Microsoft.Insights/scheduledQueryRules"
    }


def alert_query(rule: dict[str, Any]) -> str:
    query = rule["properties"]["criteria"]["allOf"][0]["query"]["function"]
    assert query["type"] == "load_text_content"
    path = BICEP / "modules" / str(query["parameters"]["file_path"])
    return path.read_text(encoding="utf-8")


def test_alerts_on_throttled_consumers_and_breaker_trips() -> None:
    from tests.test_queries import CHECKER  # the KQL checker: classic schema and the gateway's metric contract

    rules = alert_rules()
    assert set(rules) == {"consumerThrottled", "breakerOpened"}
    for rule in rules.values():
        assert rule["kind"] == "LogAlert" and rule["properties"]["scopes"] == ["appInsightsId"]
        condition = rule["properties"]["criteria"]["allOf"][0]
        report = CHECKER.check(alert_query(rule))
        assert condition["metricMeasureColumn"] in report.output
        assert {d["name"] for d in condition["dimensions"]} | {condition["metricMeasureColumn"]} == set(report.output)

    throttled = alert_query(rules["consumerThrottled"])
    assert f"name == '{telemetry.THROTTLED_REQUESTS}'" in throttled
    assert f"customDimensions['{telemetry.SUBSCRIPTION_ID}']" in throttled and "'quota'" not in throttled
    assert CHECKER.check(throttled).metrics == {telemetry.THROTTLED_REQUESTS}
    opened = alert_query(rules["breakerOpened"])
    assert f"name == '{telemetry.BREAKER_TRANSITIONS}'" in opened and f"State == '{breaker.OPEN}'" in opened
    assert {telemetry.BACKEND_ID, telemetry.LOCATION, telemetry.STATE} <= CHECKER.check(opened).dimensions


def test_throttle_reasons_in_the_alert_are_the_gateways_429s() -> None:
    gateway = (ROOT / "shared" / "flow" / "gateway.py").read_text(encoding="utf-8")
    reasons = re.findall(r"Reason in \(([^)]*)\)", alert_query(alert_rules()["consumerThrottled"]))
    assert reasons and set(re.findall(r"'(\w+)'", reasons[0])) == {"rate", "backends"}
    for reason in ("rate", "backends", "quota"):
        assert f'"{reason}"' in gateway, f"the gateway no longer reports reason {reason!r}"


# ---- private networking -----------------------------------------------------------------------------------------


def test_private_networking_is_optional_and_complete() -> None:
    main = parse(MAIN)
    assert main["parameters"]["enablePrivateNetworking"]["default"] is False
    network = BICEP / "modules" / "network.bicep"
    text = network.read_text(encoding="utf-8")
    assert "'Microsoft.App/environments'" in text  # the delegation Flex Consumption requires
    for zone in ("privatelink.blob.", "privatelink.table.", "privatelink.openai.azure.com"):
        assert zone in text
    groups = set(re.findall(r"groupIds: \[\s*'?(\w+)'?\s*\]", text, re.S))
    assert groups == {"group", "account"}  # storage: the 'blob' and 'table' groups loop; Azure OpenAI: 'account'
    assert "'blob'" in text and "'table'" in text


# ---- azd and the package ----------------------------------------------------------------------------------------


def test_azure_yaml_provisions_bicep_and_deploys_the_function_app() -> None:
    text = (ROOT / "azure.yaml").read_text(encoding="utf-8")
    lines = [line.rstrip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    block = "\n".join(lines)
    assert "infra:\n  provider: bicep\n  path: bicep\n  module: main" in block
    assert "services:\n  gateway:\n    project: .\n    language: python\n    host: function" in block


def test_funcignore_keeps_the_app_and_drops_the_rest() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".funcignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for excluded in (
        ".venv",
        "node_modules",
        "tests",
        "bench",
        "tools",
        "docs",
        "bicep",
        ".ci",
        ".git*",
        "local.settings.json",
    ):
        assert excluded in patterns, f".funcignore should exclude {excluded}"
    for needed in ("function_app.py", "host.json", "requirements.txt", "shared", "queries"):
        assert (ROOT / needed).exists()
        assert not any(needed == p or needed.startswith(p + "/") for p in patterns), f".funcignore drops {needed}"


def test_deploy_document_gives_the_commands_and_says_what_was_checked() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    for command in (
        "azd up",
        "az deployment group create",
        "-f bicep/main.bicep -p bicep/main.bicepparam",
        "func azure functionapp publish",
        "az bicep build --file bicep/main.bicep",
        "python -m shared.admin",
    ):
        assert command in text, f"docs/deploy.md should show `{command}`"
    assert "pycep" in text and "not compiled" in text.lower()
