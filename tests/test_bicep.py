"""What the deployment (bicep/, azure.yaml, .funcignore) creates, checked without a Bicep compiler or Azure.

Each scenario's parameters file is evaluated with tools/bicepcheck (tree-sitter's Bicep grammar, an evaluator of
Bicep expressions): the tests read the resources a deployment would send, with names and values computed, and check
what the issue asks of them. tests/test_bicepcheck.py checks the checker itself (types, names, models). What is not
checked: compilation (`az bicep build`) and ARM validation, which docs/deploy.md says how to run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from shared import config
from shared.telemetry import protocol as telemetry
from tools.bicepcheck import checks, models
from tools.bicepcheck.deployment import Deployment, ResourceInstance, deploy, load_template, params_values
from tools.bicepcheck.evaluate import Context, Unknown, is_unknown

ROOT = Path(__file__).resolve().parent.parent
BICEP = ROOT / "bicep"
MAIN = BICEP / "main.bicep"
SCENARIOS = {p.stem: p for p in checks.params_files()}
DEPLOYER = "22222222-3333-4444-5555-666666666666"

# Built-in role definition ids, from the Azure built-in roles reference:
# https://learn.microsoft.com/azure/role-based-access-control/built-in-roles (read 2026-04).
DOCUMENTED_ROLES = {
    "Storage Blob Data Owner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "Storage Table Data Contributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "Cognitive Services OpenAI User": "5e0bd9bd-7b93-4f28-af87-19fc36ad61bd",
    "Monitoring Metrics Publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
    "Monitoring Reader": "43d0d8ad-25c7-4714-9337-8ba259a9fe05",
    "Cognitive Services User": "a97b65f3-24c7-4388-baec-2e87135dc908",
}

# Settings the code reads that the template deliberately leaves unset, so the code's default applies.
LEFT_AT_DEFAULT = {
    # Table Storage: the template sets GATEWAY_TABLE_ENDPOINT (identity-based); shared keys are off on the account.
    "GATEWAY_TABLE_CONNECTION_STRING",
    # The host's storage connection string: replaced by the identity-based AzureWebJobsStorage__* settings.
    "AzureWebJobsStorage",
    # Only consulted when GATEWAY_TABLE_ENDPOINT is not set.
    "AzureWebJobsStorage__tableServiceUri",
    # Set by the platform; GATEWAY_ID, which the template sets, takes precedence.
    "WEBSITE_SITE_NAME",
    # Table names <prefix>consumers, ledger, breakers, usage: the default prefix "gateway".
    "GATEWAY_TABLE_PREFIX",
    # Tuning and telemetry options with documented defaults (README.md, Settings); set them with extraAppSettings.
    "GATEWAY_MAX_BODY_BYTES",
    "GATEWAY_BODY_MEMORY_MB",
    "GATEWAY_DEFAULT_MAX_TOKENS",
    "GATEWAY_USER_ID_HEADER",
    "GATEWAY_STORE_TIMEOUT_S",
    "GATEWAY_CONSUMER_REFRESH_S",
    "GATEWAY_CONSUMER_CHECK_S",
    "GATEWAY_BREAKER_SYNC_S",
    "GATEWAY_USAGE_FLUSH_S",
    "GATEWAY_MAX_ATTEMPTS",
    "GATEWAY_LEASE_LIFETIME_S",
    "GATEWAY_END_USERS_MAX",
    "GATEWAY_OUTPUT_CAP",
    "GATEWAY_STREAM_SETTLE_S",
    "GATEWAY_ABANDONED_STREAM_DRAIN_S",
    "GATEWAY_TIMEOUT_REPLAYS",
    # The response cache: the host's blob URI is consulted only without GATEWAY_BLOB_ENDPOINT (set); sizes and the
    # seed rule at their documented defaults.
    "AzureWebJobsStorage__blobServiceUri",
    "GATEWAY_CACHE_MEMORY_MB",
    "GATEWAY_CACHE_MAX_ENTRY_BYTES",
    "GATEWAY_CACHE_SEED",
    # Safety policies: none unless the operator defines them (safetyPolicies parameter sets the JSON); keys are never
    # in Azure (the managed identity has Cognitive Services User); verdict and audit tuning at their defaults.
    "GATEWAY_SAFETY_DEFAULT_POLICY",
    "GATEWAY_CONTENT_SAFETY_KEY",
    "GATEWAY_LANGUAGE_KEY",
    "GATEWAY_SAFETY_VERDICT_TTL_S",
    "GATEWAY_SAFETY_TIMEOUT_S",
    "GATEWAY_AUDIT_MEMORY_MB",
    "GATEWAY_AUDIT_FLUSH_S",
    "GATEWAY_ADMIT_ON_BOUND",
    # One line per request on the console: for scripts/run; Azure has the per-request log.
    "GATEWAY_CONSOLE_LOG",
    # The template sets GATEWAY_BACKENDS itself; a file is for hand-written settings.
    "GATEWAY_BACKENDS_FILE",
    # Fallback chains, context windows and aliases: none by default (README.md, Fallback across models).
    "GATEWAY_DEPLOYMENTS",
    "GATEWAY_ALIASES",
    "GATEWAY_METRIC_NAMESPACE",
    "GATEWAY_METRIC_DIMENSIONS",
    "GATEWAY_TRACE_SAMPLING",
    "GATEWAY_TRACES_PER_SECOND",
    "GATEWAY_GC_TUNING",
    "GATEWAY_CLIENT_IP",
    "GATEWAY_USER_ID",
    "GATEWAY_USER_ID_HASH_KEY",
    "GATEWAY_METRIC_SERIES_MAX",
    "GATEWAY_METRIC_SERIES_IDLE_S",
    "GATEWAY_REQUEST_LOG",
    "GATEWAY_REQUEST_LOG_SAMPLING",
    # Cost: no price table unless one is given (every cost then reads 0), no budget refresh tuning.
    "GATEWAY_PRICES",
    "GATEWAY_PRICES_FILE",
    "GATEWAY_BUDGET_REFRESH_S",
    # Entra ID callers: the tenants and audiences are template parameters; these have documented defaults.
    "GATEWAY_ENTRA_AUTHORITY",
    "GATEWAY_ENTRA_REQUIRED_ROLES",
    "GATEWAY_ENTRA_REQUIRED_SCOPES",
    "GATEWAY_ENTRA_USER_ID_CLAIM",
    "GATEWAY_ENTRA_CLOCK_SKEW_S",
    "GATEWAY_ENTRA_KEYS_MIN_REFRESH_S",
    "GATEWAY_ACCEPT_KEYS",
    # Removed: refused at start-up when true, so nobody believes content is recorded (it never is).
    "GATEWAY_RECORD_CONTENT",
    # Edge security (SECURITY.md): the defaults are the safe ones; the admin key hash is set after deployment, by the
    # operator who generated the key; GATEWAY_FORWARDED_HOPS defaults to 1 on the platform (WEBSITE_SITE_NAME).
    "GATEWAY_CONSUMER_MAX_STALE_S",
    "GATEWAY_AUTH_FAIL_MODE",
    "GATEWAY_UNKNOWN_KEY_LOOKUPS_PER_S",
    "GATEWAY_AUTH_FAILURES_PER_MINUTE",
    "GATEWAY_RESPONSE_READS_PER_S",
    "GATEWAY_REVEAL_DEPLOYMENTS",
    "GATEWAY_ADMIN_KEY_SHA256",
    "GATEWAY_API_VERSIONS",
    "GATEWAY_FORWARDED_HOPS",
    "GATEWAY_TRUSTED_PROXIES",
}


def deployed(name: str = "main", env: Mapping[str, str] | None = None, **overrides: Any) -> Deployment:
    """A scenario deployed (evaluated), optionally with parameters replaced; it must deploy without problems."""
    ctx = Context(environment=dict(env or {}))
    template, values, problems = params_values(SCENARIOS[name].resolve(), ctx)
    deployment, more = deploy(template, {**values, **overrides}, ctx, SCENARIOS[name])
    assert not problems + more, [str(p) for p in problems + more]
    return deployment


def of_type(deployment: Deployment, rtype: str) -> list[ResourceInstance]:
    return [r for r in deployment.all_resources() if r.type == rtype and not r.existing]


def one(deployment: Deployment, rtype: str, symbol: str | None = None) -> ResourceInstance:
    found = [r for r in of_type(deployment, rtype) if symbol is None or r.symbol == symbol]
    assert len(found) == 1, [r.symbol for r in found]
    return found[0]


def props(resource: ResourceInstance) -> dict[str, Any]:
    value: dict[str, Any] = resource.body.get("properties", {})
    return value


# ---- the scenarios --------------------------------------------------------------------------------------------------


def test_main_is_resource_group_scoped_and_the_parameters_files_use_it() -> None:
    assert load_template(MAIN.resolve()).target_scope == "resourceGroup"
    for path in SCENARIOS.values():
        assert re.search(r"^using '\./main\.bicep'$", path.read_text(encoding="utf-8"), re.M)


def test_the_default_deploys_pay_as_you_go_only() -> None:
    deployment = deployed("main")
    skus = {r.body["sku"]["name"] for r in of_type(deployment, "Microsoft.CognitiveServices/accounts/deployments")}
    assert skus and not skus & models.PROVISIONED_SKUS
    assert deployment.values["provisionedBackendRegions"] == []
    # PTU is there as a commented example parameter (tests/test_bicepcheck.py uncomments and checks it).
    assert "// param provisionedBackendRegions = [" in SCENARIOS["main"].read_text(encoding="utf-8")


def test_every_deployment_has_its_own_sku_and_regions_mix_them() -> None:
    regions = deployed("main").values["backendRegions"]
    assert all("sku" not in region for region in regions)
    per_region = [{d["sku"] for d in region["deployments"]} for region in regions]
    assert any(len(skus) > 1 for skus in per_region)  # one region, two SKUs: what a per-region SKU could not do


def test_default_models_are_current_and_read_from_the_snapshot() -> None:
    facts = models.snapshot()
    for name in SCENARIOS:
        for deployment in of_type(deployed(name), "Microsoft.CognitiveServices/accounts/deployments"):
            model = deployment.body["properties"]["model"]
            life = facts.lifecycle[f"{model['name']}@{model['version']}"]
            assert life["lifecycle"] == "GA", (name, model)
            # A default must deploy on a subscription Microsoft has not approved for limited-access models.
            assert model["name"] not in facts.limited_access, (name, model)


def test_the_minimal_scenario_scales_to_zero_and_is_public() -> None:
    deployment = deployed("minimal")
    app = one(deployment, "Microsoft.Web/sites")
    assert props(app)["functionAppConfig"]["scaleAndConcurrency"]["alwaysReady"] == []
    assert props(app)["publicNetworkAccess"] == "Enabled"
    assert not of_type(deployment, "Microsoft.Network/virtualNetworks")
    assert len(of_type(deployment, "Microsoft.CognitiveServices/accounts")) == 1


def test_the_existing_accounts_scenario_creates_no_account() -> None:
    deployment = deployed("existing-accounts")
    assert not of_type(deployment, "Microsoft.CognitiveServices/accounts")
    grants = [r for r in deployment.all_resources() if r.type == "Microsoft.Authorization/roleAssignments"
              and r.context.resource_group == "rg-openai"]
    assert len(grants) == 2  # one Cognitive Services OpenAI User per account, in the accounts' resource group


# ---- admin principal and azd ----------------------------------------------------------------------------------------


def admin_grants(deployment: Deployment) -> list[dict[str, Any]]:
    return [props(r) for r in of_type(deployment, "Microsoft.Authorization/roleAssignments")
            if props(r)["principalId"] != Unknown and not is_unknown(props(r)["principalId"])]


def azd_bicepparam_environment(dotenv: Mapping[str, str], signed_in: str) -> dict[str, str]:
    """What azd gives `bicep build-params` (Azure/azure-dev, pkg/infra/provisioning/bicep/bicep_provider.go,
    compileBicep, read at ae35809): the azd environment's .env values, plus AZURE_PRINCIPAL_ID of whoever is signed in
    unless .env has one. Never AZURE_PRINCIPAL_TYPE: only `azd env set` (the preprovision hook) puts it in .env."""
    return {**dotenv, "AZURE_PRINCIPAL_ID": dotenv.get("AZURE_PRINCIPAL_ID", signed_in)}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),  # az deployment without AZURE_PRINCIPAL_ID: no admin
        # azd without the hook's answer: an id and no type (what azd passes a .bicepparam file): no admin, because
        # a guessed type fails the deployment with UnmatchedPrincipalType when it is wrong (a service principal).
        (azd_bicepparam_environment({"AZURE_ENV_NAME": "aigw"}, DEPLOYER), None),
        # azd after the preprovision hook's `azd env set AZURE_PRINCIPAL_TYPE ...`
        (azd_bicepparam_environment({"AZURE_PRINCIPAL_TYPE": "User"}, DEPLOYER), (DEPLOYER, "User")),
        (azd_bicepparam_environment({"AZURE_PRINCIPAL_TYPE": "ServicePrincipal"}, DEPLOYER),
         (DEPLOYER, "ServicePrincipal")),
        (azd_bicepparam_environment({"AZURE_PRINCIPAL_TYPE": "ServicePrincipal",
                                     "GATEWAY_ADMIN_PRINCIPAL_ID": "99999999-0000-0000-0000-000000000000"}, DEPLOYER),
         ("99999999-0000-0000-0000-000000000000", "Group")),  # a group as admin, whoever deploys
        (azd_bicepparam_environment({"GATEWAY_ADMIN_PRINCIPAL_ID": "none", "AZURE_PRINCIPAL_TYPE": "User"}, DEPLOYER),
         None),  # no admin under azd
    ],
)
def test_the_admin_principal_and_its_type_follow_azd(
    scenario: str, env: dict[str, str], expected: tuple[str, str] | None
) -> None:
    grants = admin_grants(deployed(scenario, env))
    if expected is None:
        assert grants == []
    else:
        assert {(g["principalId"], g["principalType"]) for g in grants} == {expected}
        assert len(grants) == 2  # Storage Table Data Contributor and Monitoring Reader


def test_azure_yaml_provisions_bicep_and_deploys_the_function_app() -> None:
    text = (ROOT / "azure.yaml").read_text(encoding="utf-8")
    lines = [line.rstrip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    block = "\n".join(lines)
    assert "infra:\n  provider: bicep\n  path: bicep\n  module: main" in block
    assert "services:\n  gateway:\n    project: .\n    language: python\n    host: function" in block
    assert "AZURE_PRINCIPAL_TYPE" in text  # says where the admin's type comes from
    # The preprovision hook that supplies the type azd leaves out, on both shells azd runs hooks with.
    assert "hooks:\n  preprovision:\n    posix:\n      shell: sh\n      run: python3 -m tools.azd_principal" in block
    assert "    windows:\n      shell: pwsh\n      run: python -m tools.azd_principal" in block


# ---- private networking ----------------------------------------------------------------------------------------------


def endpoints(deployment: Deployment) -> dict[str, dict[str, Any]]:
    return {r.name: props(r) for r in of_type(deployment, "Microsoft.Network/privateEndpoints")}


def test_private_endpoints_of_existing_accounts_ask_for_approval() -> None:
    deployment = deployed("private")
    found = endpoints(deployment)
    shared_account = [p for p in found.values() if "contoso-openai-francecentral" in json.dumps(p)]
    assert len(shared_account) == 1 and shared_account[0]["privateLinkServiceConnections"] == []
    new_account = [p for n, p in found.items() if "oai-swedencentral" in n]
    assert new_account[0]["privateLinkServiceConnections"] and not new_account[0]["manualPrivateLinkServiceConnections"]
    assert deployment.outputs()["PENDING_PRIVATE_ENDPOINT_APPROVALS"] == [
        n for n, p in found.items() if p.get("manualPrivateLinkServiceConnections")
    ]


def test_auto_approval_is_a_choice_for_existing_accounts() -> None:
    values = deployed("private").values
    regions = json.loads(json.dumps(values["backendRegions"]))
    regions[1]["existingAccount"]["privateEndpointApproval"] = "auto"
    found = endpoints(deployed("private", backendRegions=regions))
    assert all(not p.get("manualPrivateLinkServiceConnections") for p in found.values())


def test_openai_endpoints_register_both_account_host_names() -> None:
    deployment = deployed("private")
    zones = {r.name for r in of_type(deployment, "Microsoft.Network/privateDnsZones")}
    assert {"privatelink.openai.azure.com", "privatelink.cognitiveservices.azure.com",
            "privatelink.azurewebsites.net"} <= zones
    groups = [props(r) for r in of_type(deployment, "Microsoft.Network/privateEndpoints/privateDnsZoneGroups")
              if r.symbol == "openAIEndpointDns"]
    assert len(groups) == 2
    for group in groups:
        ids = {c["properties"]["privateDnsZoneId"].rsplit("/", 1)[-1] for c in group["privateDnsZoneConfigs"]}
        assert ids == {"privatelink.openai.azure.com", "privatelink.cognitiveservices.azure.com"}


def test_existing_private_dns_zones_are_used_instead_of_created() -> None:
    hub = "/subscriptions/aaaa/resourceGroups/rg-hub/providers/Microsoft.Network/privateDnsZones/"
    given = {"cognitiveservices": hub + "privatelink.cognitiveservices.azure.com", "blob": hub + "privatelink.blob.x"}
    deployment = deployed("private", existingPrivateDnsZoneIds=given)
    created = {r.name for r in of_type(deployment, "Microsoft.Network/privateDnsZones")}
    assert "privatelink.cognitiveservices.azure.com" not in created and "privatelink.openai.azure.com" in created
    configs = [c["properties"]["privateDnsZoneId"] for r in of_type(deployment, "Microsoft.Network/privateEndpoints/privateDnsZoneGroups")
               for c in props(r)["privateDnsZoneConfigs"]]
    assert given["cognitiveservices"] in configs and given["blob"] in configs


def test_private_inbound_and_explicit_outbound() -> None:
    deployment = deployed("private")
    app = props(one(deployment, "Microsoft.Web/sites"))
    assert app["publicNetworkAccess"] == "Disabled"
    assert app["outboundVnetRouting"] == {"allTraffic": True} and app["virtualNetworkSubnetId"].endswith("/subnets/app")
    site_endpoints = [p for p in endpoints(deployment).values()
                      if p["privateLinkServiceConnections"] and p["privateLinkServiceConnections"][0]["properties"]["groupIds"] == ["sites"]]
    assert len(site_endpoints) == 1
    subnets = {s["name"]: s["properties"] for s in props(one(deployment, "Microsoft.Network/virtualNetworks"))["subnets"]}
    assert subnets["app"]["defaultOutboundAccess"] is False and subnets["app"]["natGateway"]["id"].endswith(
        one(deployment, "Microsoft.Network/natGateways").name
    )
    without_nat = deployed("private", createNatGateway=False)
    assert not of_type(without_nat, "Microsoft.Network/natGateways")
    app_subnet = props(one(without_nat, "Microsoft.Network/virtualNetworks"))["subnets"][0]["properties"]
    assert app_subnet["natGateway"] is None and app_subnet["defaultOutboundAccess"] is False


def test_restricted_inbound_allows_only_the_given_addresses() -> None:
    deployment = deployed("minimal", appInboundAccess="restricted", appAllowedIpRanges=["203.0.113.7", "198.51.100.0/24"])
    site = props(one(deployment, "Microsoft.Web/sites"))["siteConfig"]
    assert site["ipSecurityRestrictionsDefaultAction"] == "Deny"
    assert [r["ipAddress"] for r in site["ipSecurityRestrictions"]] == ["203.0.113.7/32", "198.51.100.0/24"]
    assert props(one(deployed("minimal"), "Microsoft.Web/sites"))["siteConfig"]["ipSecurityRestrictionsDefaultAction"] == "Allow"


def test_public_scenarios_have_no_network() -> None:
    for name in ("main", "minimal", "existing-accounts"):
        deployment = deployed(name)
        assert not of_type(deployment, "Microsoft.Network/privateEndpoints"), name


# ---- monitoring ------------------------------------------------------------------------------------------------------


def test_the_workbook_placeholder_is_replaced_by_application_insights() -> None:
    deployment = deployed("main")
    workbook = one(deployment, "Microsoft.Insights/workbooks")
    data = json.loads(props(workbook)["serializedData"])
    insights = one(deployment, "Microsoft.Insights/components")
    assert "{appinsights-id}" in (BICEP / "workbook.json").read_text(encoding="utf-8")
    assert data["fallbackResourceIds"] == [f"{insights.context.resource_group_id()}/providers/Microsoft.Insights/components/{insights.name}"]
    assert "{appinsights-id}" not in props(workbook)["serializedData"]


def test_log_analytics_and_application_insights_have_local_auth_off() -> None:
    deployment = deployed("main")
    assert props(one(deployment, "Microsoft.OperationalInsights/workspaces"))["features"]["disableLocalAuth"] is True
    insights = props(one(deployment, "Microsoft.Insights/components"))
    assert insights["DisableLocalAuth"] is True and insights["CustomMetricsOptedInType"] == "WithDimensions"


def test_diagnostic_settings_send_accounts_storage_and_the_app_to_the_workspace() -> None:
    deployment = deployed("main")
    workspace = one(deployment, "Microsoft.OperationalInsights/workspaces")
    settings = of_type(deployment, "Microsoft.Insights/diagnosticSettings")
    scopes = {}
    for setting in settings:
        assert props(setting)["workspaceId"].endswith(f"/workspaces/{workspace.name}")
        scopes[setting.body["scope"].type] = scopes.get(setting.body["scope"].type, 0) + 1
    assert scopes == {
        "Microsoft.CognitiveServices/accounts": len(of_type(deployment, "Microsoft.CognitiveServices/accounts")),
        "Microsoft.Storage/storageAccounts": 1,
        "Microsoft.Storage/storageAccounts/blobServices": 1,
        "Microsoft.Storage/storageAccounts/tableServices": 1,
        "Microsoft.Web/sites": 1,
    }


def log_alerts(deployment: Deployment) -> dict[str, dict[str, Any]]:
    return {r.name.split("-")[1] + "-" + r.name.split("-")[2]: props(r)
            for r in of_type(deployment, "Microsoft.Insights/scheduledQueryRules")}


def test_alert_windows_outlast_ingestion_delay() -> None:
    for rule in log_alerts(deployed("main")).values():
        window = int(re.fullmatch(r"PT(\d+)M", rule["windowSize"]).group(1))  # type: ignore[union-attr]
        frequency = int(re.fullmatch(r"PT(\d+)M", rule["evaluationFrequency"]).group(1))  # type: ignore[union-attr]
        assert window >= 15 and window > frequency


def test_alerts_cover_throttling_breakers_5xx_and_store_fallbacks() -> None:
    from tests.test_queries import CHECKER  # the KQL checker: classic schema and the gateway's metric contract

    rules = log_alerts(deployed("main"))
    assert set(rules) == {"consumer-throttled", "breaker-opened", "server-errors", "store-fallbacks"}
    expected_metric = {
        "consumer-throttled": telemetry.THROTTLED_REQUESTS,
        "breaker-opened": telemetry.BREAKER_TRANSITIONS,
        "server-errors": telemetry.GATEWAY_REQUESTS,
        "store-fallbacks": telemetry.STORE_FALLBACKS,
    }
    for key, rule in rules.items():
        condition = rule["criteria"]["allOf"][0]
        report = CHECKER.check(condition["query"])
        assert report.metrics == {expected_metric[key]}, key
        assert {d["name"] for d in condition["dimensions"]} | {condition["metricMeasureColumn"]} == set(report.output)
    assert f"customDimensions['{telemetry.STATUS_CODE}']" in rules["server-errors"]["criteria"]["allOf"][0]["query"]


def test_ptu_utilisation_alerts_exist_only_with_ptu_backends() -> None:
    plain = deployed("main")
    assert not of_type(plain, "Microsoft.Insights/metricAlerts")
    first = plain.values["backendRegions"][0]
    regions = [{**first, "id": "uksouth-ptu", "priority": 1,
                "deployments": [{**first["deployments"][0], "sku": "GlobalProvisionedManaged", "capacity": 15}]}]
    deployment = deployed("main", provisionedBackendRegions=regions)
    [alert] = of_type(deployment, "Microsoft.Insights/metricAlerts")
    criterion = props(alert)["criteria"]["allOf"][0]
    assert criterion["metricName"] == "AzureOpenAIProvisionedManagedUtilizationV2"
    ptu_account = [a.name for a in of_type(deployment, "Microsoft.CognitiveServices/accounts") if "uksouth-ptu" in a.name]
    assert props(alert)["scopes"] == [f"{alert.context.resource_group_id()}/providers/Microsoft.CognitiveServices/accounts/{ptu_account[0]}"]
    backends = json.loads(props(one(deployment, "Microsoft.Web/sites/config"))["GATEWAY_BACKENDS"])
    assert [b["ptu"] for b in backends] == [True, False, False, False]


def test_an_existing_ptu_account_is_paced_and_alerted() -> None:
    """An existing account's deployments carry no SKU here: being listed as provisioned is what makes it a PTU."""
    plain = deployed("existing-accounts")
    first = plain.values["backendRegions"][0]
    ptu = {**first, "id": "eastus2-ptu", "priority": 1,
           "existingAccount": {**first["existingAccount"], "name": "contoso-openai-ptu"}}
    deployment = deployed("existing-accounts", provisionedBackendRegions=[ptu])
    backends = json.loads(props(one(deployment, "Microsoft.Web/sites/config"))["GATEWAY_BACKENDS"])
    assert [(b["id"], b["ptu"]) for b in backends] == [("eastus2-ptu", True), ("eastus2", False), ("westus3", False)]
    [alert] = of_type(deployment, "Microsoft.Insights/metricAlerts")
    assert props(alert)["scopes"] == [
        "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-openai/providers/"
        "Microsoft.CognitiveServices/accounts/contoso-openai-ptu"
    ]


# ---- zone redundancy -------------------------------------------------------------------------------------------------


def test_zone_redundancy_is_optional_and_keeps_two_instances_ready() -> None:
    plain = deployed("main")
    assert props(one(plain, "Microsoft.Web/serverfarms"))["zoneRedundant"] is False
    zoned = deployed("private")
    assert zoned.values["zoneRedundant"] is True
    assert props(one(zoned, "Microsoft.Web/serverfarms"))["zoneRedundant"] is True
    assert one(zoned, "Microsoft.Storage/storageAccounts").body["sku"]["name"] == "Standard_ZRS"
    # Flex Consumption requires at least two always-ready instances with zone redundancy.
    ready = props(one(zoned, "Microsoft.Web/sites"))["functionAppConfig"]["scaleAndConcurrency"]["alwaysReady"]
    assert ready and all(group["instanceCount"] >= 2 for group in ready)


# ---- the Function App and its settings -------------------------------------------------------------------------------


def app_settings(deployment: Deployment) -> dict[str, Any]:
    return props(one(deployment, "Microsoft.Web/sites/config", "appSettings"))


def test_function_app_is_flex_consumption_python_311_and_locked_down() -> None:
    deployment = deployed("main")
    plan = one(deployment, "Microsoft.Web/serverfarms").body
    assert plan["sku"] == {"tier": "FlexConsumption", "name": "FC1"} and plan["properties"]["reserved"] is True
    app = one(deployment, "Microsoft.Web/sites")
    assert app.body["kind"] == "functionapp,linux" and app.body["identity"]["type"] == "UserAssigned"
    assert app.body["tags"]["azd-service-name"] == "gateway"
    site = props(app)
    assert site["httpsOnly"] is True
    assert site["siteConfig"]["minTlsVersion"] == "1.2" and site["siteConfig"]["ftpsState"] == "Disabled"
    assert site["functionAppConfig"]["runtime"] == {"name": "python", "version": "3.11"}
    storage = site["functionAppConfig"]["deployment"]["storage"]
    assert storage["type"] == "blobContainer" and storage["authentication"]["type"] == "UserAssignedIdentity"
    policies = {r.name: props(r)["allow"] for r in of_type(deployment, "Microsoft.Web/sites/basicPublishingCredentialsPolicies")}
    assert policies == {"ftp": False, "scm": False}
    # /health answers with what the app allows (details need an admin key, issue 14); nothing in the platform
    # configuration probes or exposes it.
    assert "healthCheckPath" not in site["siteConfig"] and "cors" not in site["siteConfig"]


def test_no_keys_or_connection_strings() -> None:
    for path in checks.bicep_files():
        text = path.read_text(encoding="utf-8")
        for forbidden in ("listKeys", "listkeys", "listConnectionStrings", "AccountKey=", "primaryKey", "key1"):
            assert forbidden not in text, f"{path.name} uses {forbidden}"
    deployment = deployed("main")
    assert not [name for name in app_settings(deployment) if re.search(r"KEY|SECRET|PASSWORD", name, re.I)]
    storage = props(one(deployment, "Microsoft.Storage/storageAccounts"))
    assert storage["allowSharedKeyAccess"] is False and storage["allowBlobPublicAccess"] is False
    assert all(props(a)["disableLocalAuth"] is True for a in of_type(deployment, "Microsoft.CognitiveServices/accounts"))


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


CLIENT_ID = "11111111-2222-3333-4444-555555555555"
RUNTIME_SAMPLES = {  # what Azure fills in for the values only known at deployment time
    "AzureWebJobsStorage__clientId": CLIENT_ID,
    "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=00000000-0000-0000-0000-000000000000;"
    "IngestionEndpoint=https://uksouth-1.in.applicationinsights.azure.com/",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": f"Authorization=AAD;ClientId={CLIENT_ID}",
    "AZURE_CLIENT_ID": CLIENT_ID,
    "GATEWAY_TABLE_ENDPOINT": "https://staigwexample.table.core.windows.net/",
    "GATEWAY_BLOB_ENDPOINT": "https://staigwexample.blob.core.windows.net/",
}


def settings_as_deployed(name: str = "main") -> dict[str, str]:
    settings = app_settings(deployed(name))
    unknown = {k for k, v in settings.items() if is_unknown(v)}
    assert unknown == set(RUNTIME_SAMPLES), unknown ^ set(RUNTIME_SAMPLES)
    values = {**settings, **RUNTIME_SAMPLES}
    assert all(isinstance(v, str) for v in values.values())
    return values


def test_the_deployed_settings_load_in_every_scenario() -> None:
    for name in SCENARIOS:
        values = settings_as_deployed(name)
        settings = config.load_settings(values)
        assert settings.table_endpoint and settings.table_connection_string is None
        assert settings.managed_identity_client_id == CLIENT_ID
        assert len(settings.backends) == len(deployed(name).values["backendRegions"])
        assert all(b.auth == "identity" and b.api_key is None and b.api == "azure" for b in settings.backends)


def test_backends_follow_the_regions() -> None:
    values = settings_as_deployed("existing-accounts")
    backends = config.parse_backends(values["GATEWAY_BACKENDS"], {})
    regions = deployed("existing-accounts").values["backendRegions"]
    assert [b.endpoint for b in backends] == [
        r["existingAccount"].get("endpoint") or f"https://{r['existingAccount']['name']}.openai.azure.com" for r in regions
    ]
    assert regions[1]["existingAccount"].get("endpoint")  # one region shows an endpoint that is not the name
    for backend, region in zip(backends, regions, strict=True):
        assert backend.deployments == {d["name"]: d.get("deploymentName", d["name"]) for d in region["deployments"]}
    assert any("deploymentName" in d for r in regions for d in r["deployments"])


def names_read_by_the_code() -> set[str]:
    samples = settings_as_deployed("main")
    runs = [samples, {"GATEWAY_BACKENDS": samples["GATEWAY_BACKENDS"]},
            {"GATEWAY_BACKENDS": samples["GATEWAY_BACKENDS"], "AzureWebJobsStorage__accountName": "st"},
            # with Entra ID callers on (entraTenantIds / entraAudiences given), which reads their tuning settings
            {**samples, "GATEWAY_ENTRA_TENANT_IDS": "72f988bf-86f1-41af-91ab-2d7cd011db47",
             "GATEWAY_ENTRA_AUDIENCES": "api://3f1c1b9e-5a4e-4c43-9a43-1c2f5b0c7d11"}]
    read: set[str] = set()
    for values in runs:
        env = RecordingEnv(values)
        try:
            config.load_settings(env)
        except config.ConfigError:
            pass
        read |= env.read
    pattern = re.compile(
        r"""(?:_env|environ\.get|getenv)\(\s*["']([A-Za-z_][A-Za-z0-9_]*)["']|environ\[\s*["']([A-Za-z_][A-Za-z0-9_]*)["']"""
    )
    for path in [ROOT / "function_app.py", *sorted((ROOT / "shared").rglob("*.py"))]:
        for match in pattern.finditer(path.read_text(encoding="utf-8")):
            read.add(match.group(1) or match.group(2))
    return read


def test_every_setting_the_code_reads_is_set_or_left_at_its_default_on_purpose() -> None:
    template = set(app_settings(deployed("main")))
    read = names_read_by_the_code()
    assert not read - template - LEFT_AT_DEFAULT, "set these in functionapp.bicep or add them to LEFT_AT_DEFAULT"
    assert not LEFT_AT_DEFAULT & template
    assert not LEFT_AT_DEFAULT - read, "the code no longer reads these; remove them from LEFT_AT_DEFAULT"


def test_extra_settings_cannot_replace_the_templates() -> None:
    settings = app_settings(deployed("main", extraAppSettings={"GATEWAY_LIMIT_FAIL_MODE": "bogus", "GATEWAY_MAX_ATTEMPTS": "3"}))
    assert settings["GATEWAY_LIMIT_FAIL_MODE"] == "open" and settings["GATEWAY_MAX_ATTEMPTS"] == "3"


# ---- the console's sign-in (App Service Authentication) --------------------------------------------------------------

CONSOLE_APP = "7d3f5a2e-1b4c-4d8e-9f60-2a1b3c4d5e6f"
TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"


def function_routes() -> list[str]:
    """Every route function_app.py registers, as a path (routePrefix is empty in host.json)."""
    prefix = json.loads((ROOT / "host.json").read_text())["extensions"]["http"]["routePrefix"]
    assert prefix == ""
    return ["/" + m for m in re.findall(r'@app\.route\(route="([^"]+)"', (ROOT / "function_app.py").read_text())]


def excluded(path: str, patterns: list[str]) -> bool:
    """Easy Auth's excludedPaths: an exact path, or a prefix ending in /*."""
    return any(path == p or (p.endswith("/*") and path.startswith(p[:-1])) for p in patterns)


def test_without_a_console_app_registration_there_is_no_easy_auth_and_its_header_is_not_believed() -> None:
    for name in SCENARIOS:
        deployment = deployed(name)
        assert not [r for r in of_type(deployment, "Microsoft.Web/sites/config") if r.name.endswith("authsettingsV2")]
        assert app_settings(deployment)["GATEWAY_CONSOLE_EASY_AUTH"] == "false"
        assert not config.load_settings(settings_as_deployed(name)).console_easy_auth


def test_the_console_sign_in_is_easy_auth_with_entra_in_front_of_the_page_only() -> None:
    deployment = deployed("main", consoleSignInClientId=CONSOLE_APP, consoleSignInTenantId=TENANT_ID)
    auth = [r for r in of_type(deployment, "Microsoft.Web/sites/config") if r.name.endswith("authsettingsV2")]
    assert len(auth) == 1
    assert checks.type_problems(auth[0]) == []  # every property as Azure's Microsoft.Web@2024-11-01 types have it
    body = props(auth[0])
    assert body["platform"]["enabled"] is True
    validation = body["globalValidation"]
    assert validation["requireAuthentication"] is True and validation["unauthenticatedClientAction"] == "RedirectToLoginPage"
    aad = body["identityProviders"]["azureActiveDirectory"]
    assert aad["enabled"] is True and aad["registration"]["clientId"] == CONSOLE_APP
    assert aad["registration"]["openIdIssuer"] == f"https://login.microsoftonline.com/{TENANT_ID}/v2.0"
    assert "clientSecretSettingName" not in aad["registration"]  # no secret in the template: ID tokens
    assert body["httpSettings"]["requireHttps"] is True
    # The sign-in stands in front of the page only: every OpenAI route, /health and the admin API stay as they are
    # without Easy Auth (keys and tokens decide), and the page is not excluded.
    patterns = validation["excludedPaths"]
    for route in function_routes():
        concrete = re.sub(r"\{\*?[a-z]+\}", "x", route)
        assert excluded(concrete, patterns) == (not concrete.startswith("/console") or
                                                concrete.startswith("/console/api/")), route
    for page in ("/console", "/console/", "/console/static/console.js"):
        assert not excluded(page, patterns), page
    for api in ("/console/api/consumers", "/openai/deployments/gpt-4o/chat/completions", "/v1/chat/completions",
                "/health", "/health/details"):
        assert excluded(api, patterns), api
    settings = app_settings(deployment)
    assert settings["GATEWAY_CONSOLE_EASY_AUTH"] == "true"


def test_instance_count_is_the_plans_maximum() -> None:
    deployment = deployed("main", maximumInstanceCount=120)
    assert app_settings(deployment)["GATEWAY_INSTANCE_COUNT"] == "120"
    scale = props(one(deployment, "Microsoft.Web/sites"))["functionAppConfig"]["scaleAndConcurrency"]
    assert scale["maximumInstanceCount"] == 120


# ---- role assignments ------------------------------------------------------------------------------------------------


def test_role_assignments_are_exactly_the_documented_grants() -> None:
    deployment = deployed("main", {"AZURE_PRINCIPAL_ID": DEPLOYER, "AZURE_PRINCIPAL_TYPE": "User"})
    by_id = {f"/subscriptions/00000000-0000-0000-0000-000000000000/providers/Microsoft.Authorization/roleDefinitions/{g}": n
             for n, g in DOCUMENTED_ROLES.items()}
    grants = set()
    for r in of_type(deployment, "Microsoft.Authorization/roleAssignments"):
        p = props(r)
        role = by_id[p["roleDefinitionId"]]
        who = "admin" if p["principalId"] == DEPLOYER else "gateway"
        assert who == "admin" or p["principalType"] == "ServicePrincipal"
        assert is_unknown(r.name) or re.fullmatch(r"[0-9a-f-]{36}", r.name)  # guid(scope, principal, role)
        grants.add((who, role, r.body["scope"].type))
    assert grants == {
        ("gateway", "Storage Blob Data Owner", "Microsoft.Storage/storageAccounts"),
        ("gateway", "Storage Table Data Contributor", "Microsoft.Storage/storageAccounts"),
        ("gateway", "Monitoring Metrics Publisher", "Microsoft.Insights/components"),
        ("gateway", "Cognitive Services OpenAI User", "Microsoft.CognitiveServices/accounts"),
        ("admin", "Storage Table Data Contributor", "Microsoft.Storage/storageAccounts"),
        ("admin", "Monitoring Reader", "Microsoft.Insights/components"),
    }
    for path in checks.bicep_files():
        text = path.read_text(encoding="utf-8")
        assert "newGuid(" not in text and "utcNow(" not in text


def test_safety_policies_bring_their_services_the_identitys_access_and_the_settings() -> None:
    assert not of_type(deployed("main"), "Microsoft.CognitiveServices/accounts") or all(
        r.body["kind"] == "OpenAI" for r in of_type(deployed("main"), "Microsoft.CognitiveServices/accounts"))
    policies = {"strict": {"categories": {"Violence": 4}, "pii": "redact", "audit": "on"}}
    deployment = deployed("main", safetyPolicies=policies)
    accounts = {r.body["kind"]: r for r in of_type(deployment, "Microsoft.CognitiveServices/accounts")}
    for kind in ("ContentSafety", "TextAnalytics"):
        assert props(accounts[kind])["disableLocalAuth"] is True
    user = f"/subscriptions/00000000-0000-0000-0000-000000000000/providers/Microsoft.Authorization/roleDefinitions/" \
           f"{DOCUMENTED_ROLES['Cognitive Services User']}"
    grants = [r for r in of_type(deployment, "Microsoft.Authorization/roleAssignments")
              if props(r)["roleDefinitionId"] == user]
    assert len(grants) == 2 and all(props(g)["principalType"] == "ServicePrincipal" for g in grants)
    settings = app_settings(deployment)
    assert json.loads(settings["GATEWAY_SAFETY_POLICIES"]) == policies
    assert settings["GATEWAY_CONTENT_SAFETY_ENDPOINT"].endswith(".cognitiveservices.azure.com")
    assert settings["GATEWAY_LANGUAGE_ENDPOINT"].endswith(".cognitiveservices.azure.com")
    assert "GATEWAY_CONTENT_SAFETY_KEY" not in settings  # the identity, never a key
    existing = deployed("main", safetyPolicies=policies, existingContentSafetyName="cs-shared")
    kinds = [r.body["kind"] for r in of_type(existing, "Microsoft.CognitiveServices/accounts")]
    assert "ContentSafety" not in kinds and "TextAnalytics" in kinds
    assert app_settings(existing)["GATEWAY_CONTENT_SAFETY_ENDPOINT"] == "https://cs-shared.cognitiveservices.azure.com"


def test_audit_blobs_are_deleted_by_a_lifecycle_rule() -> None:
    rules = props(one(deployed("main", auditRetentionDays=30), "Microsoft.Storage/storageAccounts/managementPolicies"))
    [audit] = [r for r in rules["policy"]["rules"] if r["name"] == "audit-retention"]
    assert audit["definition"]["filters"] == {"blobTypes": ["appendBlob"], "prefixMatch": ["gateway-audit/"]}
    assert audit["definition"]["actions"]["baseBlob"]["delete"]["daysAfterModificationGreaterThan"] == 30


# ---- the package and the documents ---------------------------------------------------------------------------------


def test_funcignore_keeps_the_app_and_drops_the_rest() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".funcignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for excluded in (".venv", "node_modules", "tests", "bench", "tools", "docs", "bicep", ".ci", ".git*",
                     "local.settings.json"):
        assert excluded in patterns, f".funcignore should exclude {excluded}"
    for needed in ("function_app.py", "host.json", "requirements.txt", "shared", "queries"):
        assert (ROOT / needed).exists()
        assert not any(needed == p or needed.startswith(p + "/") for p in patterns), f".funcignore drops {needed}"


def test_deploy_document_gives_the_commands_costs_and_what_was_checked() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    for command in ("azd up", "az deployment group create", "-f bicep/main.bicep -p bicep/main.bicepparam",
                    "func azure functionapp publish", "az bicep build --file bicep/main.bicep", "python -m shared.admin",
                    "az network private-endpoint-connection approve", "python -m tools.bicepcheck"):
        assert command in text, f"docs/deploy.md should show `{command}`"
    for scenario in SCENARIOS:
        assert f"{scenario}.bicepparam" in text
    assert "What it costs at rest" in text and "tree-sitter" in text and "not compiled" in text.lower()
    readme = (BICEP / "README.md").read_text(encoding="utf-8")
    for scenario in SCENARIOS:
        assert f"{scenario}.bicepparam" in readme


def test_the_breaker_rule_type_is_the_gateways() -> None:
    from tools.bicepcheck.syntax import named, text

    rule = load_template(MAIN.resolve()).types["breakerRule"]
    fields = {text(named(p)[0]): named(p)[-1].type for p in named(rule) if p.type == "object_property"}
    assert set(fields) == set(config._BREAKER_FIELDS) and set(fields.values()) == {"nullable_type"}


def test_backend_ids_the_template_accepts_are_ones_the_gateway_accepts() -> None:
    longest = "a" + "-_." * 13  # 40 characters, the template's @maxLength
    assert len(longest) == 40 and config._ID_RE.fullmatch(longest)


def test_ledger_accounts_are_optional_each_one_locked_down_granted_and_listed_in_the_setting() -> None:
    assert app_settings(deployed("main"))["GATEWAY_LEDGER_ACCOUNTS"] == ""
    for scenario in ("main", "private"):
        deployment = deployed(scenario, ledgerAccountCount=3)
        accounts = [r for r in of_type(deployment, "Microsoft.Storage/storageAccounts") if str(r.name).startswith("stlg")]
        assert len(accounts) == 3
        for account in accounts:
            p = props(account)
            assert p["allowSharedKeyAccess"] is False and p["minimumTlsVersion"] == "TLS1_2"
            assert len(str(account.name)) <= 24 and re.fullmatch(r"[a-z0-9]+", str(account.name))
        listed = app_settings(deployment)["GATEWAY_LEDGER_ACCOUNTS"].split(",")
        assert listed == [f"https://{a.name}.table.core.windows.net/" for a in accounts]
        settings = config.load_settings({**settings_as_deployed(scenario), "GATEWAY_LEDGER_ACCOUNTS": ",".join(listed)})
        assert len(settings.ledger_accounts) == 3
        table_grants = [r for r in of_type(deployment, "Microsoft.Authorization/roleAssignments")
                        if props(r)["roleDefinitionId"].endswith(DOCUMENTED_ROLES["Storage Table Data Contributor"])]
        assert len(table_grants) >= 4  # the tables' account and each ledger account
        endpoints = [r for r in of_type(deployment, "Microsoft.Network/privateEndpoints") if str(r.name).startswith("pe-stlg")]
        assert len(endpoints) == (3 if scenario == "private" else 0)
