"""Azure's naming rules per resource kind, applied to the names a deployment would use.

Source: "Naming rules and restrictions for Azure resources",
https://learn.microsoft.com/azure/azure-resource-manager/management/resource-name-rules (read 2026-12-01), and the
module deployment limits of https://learn.microsoft.com/azure/azure-resource-manager/bicep/modules (a deployment
name is at most 64 characters). Where the generated type definitions carry their own pattern or length for a name,
armtypes.py checks that too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    min_length: int
    max_length: int
    pattern: str  # a full match
    meaning: str


_NETWORK = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_NETWORK_TEXT = "letters, digits, '_', '.', '-'; starts with a letter or digit, ends with a letter, digit or '_'"
_GUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_INSIGHTS = r"[^*<>%{}&:\\?/#|\x00-\x1f]*[^*<>%{}&:\\?/#|\x00-\x1f. ]"

RULES: dict[str, Rule] = {
    "Microsoft.Storage/storageAccounts": Rule(3, 24, r"[a-z0-9]+", "lowercase letters and digits"),
    "Microsoft.Storage/storageAccounts/blobServices/containers": Rule(
        3, 63, r"[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]", "lowercase letters, digits, single hyphens inside"
    ),
    "Microsoft.Web/sites": Rule(2, 60, r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?", "letters, digits, hyphens inside"),
    "Microsoft.Web/serverfarms": Rule(1, 60, r"[A-Za-z0-9-]+", "letters, digits and hyphens"),
    "Microsoft.CognitiveServices/accounts": Rule(
        2, 64, r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?", "letters, digits, hyphens inside (also the custom subdomain)"
    ),
    "Microsoft.CognitiveServices/accounts/deployments": Rule(
        2, 64, r"[A-Za-z0-9][A-Za-z0-9_.-]*", "letters, digits, '_', '.', '-'; starts with a letter or digit"
    ),
    "Microsoft.ManagedIdentity/userAssignedIdentities": Rule(
        3, 128, r"[A-Za-z0-9][A-Za-z0-9_-]*", "letters, digits, '-', '_'; starts with a letter or digit"
    ),
    "Microsoft.OperationalInsights/workspaces": Rule(
        4, 63, r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?", "letters, digits, hyphens inside"
    ),
    "Microsoft.Insights/components": Rule(1, 260, r"[^%&\\?/\x00-\x1f]*[^%&\\?/\x00-\x1f. ]", "no %&\\?/"),
    "Microsoft.Insights/actionGroups": Rule(1, 260, r"[^:<>+/&%\\?\x00-\x1f]*[^:<>+/&%\\?\x00-\x1f. ]", "no :<>+/&%\\?"),
    "Microsoft.Insights/scheduledQueryRules": Rule(1, 260, _INSIGHTS, "no *<>%{}&:\\?/#|"),
    "Microsoft.Insights/diagnosticSettings": Rule(1, 260, r"[^*/%&:\\?+#\x00-\x1f]+", "no */%&:\\?+#"),
    "Microsoft.Insights/workbooks": Rule(36, 36, _GUID, "a GUID"),
    "Microsoft.Authorization/roleAssignments": Rule(36, 36, _GUID, "a GUID"),
    "Microsoft.Network/virtualNetworks": Rule(2, 64, _NETWORK, _NETWORK_TEXT),
    "Microsoft.Network/virtualNetworks/subnets": Rule(1, 80, _NETWORK, _NETWORK_TEXT),
    "Microsoft.Network/privateEndpoints": Rule(2, 64, _NETWORK, _NETWORK_TEXT),
    "Microsoft.Network/privateEndpoints/privateDnsZoneGroups": Rule(1, 80, _NETWORK, _NETWORK_TEXT),
    "Microsoft.Network/privateDnsZones/virtualNetworkLinks": Rule(1, 80, _NETWORK, _NETWORK_TEXT),
    "Microsoft.Network/natGateways": Rule(1, 80, _NETWORK, _NETWORK_TEXT),
    "Microsoft.Network/publicIPAddresses": Rule(1, 80, _NETWORK, _NETWORK_TEXT),
    "Microsoft.Network/networkSecurityGroups": Rule(1, 80, _NETWORK, _NETWORK_TEXT),
    "Microsoft.Network/privateDnsZones": Rule(
        1, 253, r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}", "a DNS name"
    ),
    # Module deployments (Microsoft.Resources/deployments).
    "module": Rule(1, 64, r"[A-Za-z0-9_().-]+", "letters, digits, '_', '(', ')', '.', '-'"),
}


def check_name(kind: str, name: str) -> list[str]:
    rule = RULES.get(kind)
    if rule is None:
        return []
    problems: list[str] = []
    if not rule.min_length <= len(name) <= rule.max_length:
        problems.append(f"{name!r} has {len(name)} characters; {kind} names have {rule.min_length} to {rule.max_length}")
    if not re.fullmatch(rule.pattern, name):
        problems.append(f"{name!r} breaks the {kind} naming rule: {rule.meaning}")
    return problems
