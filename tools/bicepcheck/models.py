"""Model deployments checked against a dated snapshot of Azure OpenAI facts (bicep/azure-openai-models.json): the
model version must be generally available (not Legacy, Deprecated or Retired) and not retire within
`MIN_RUNWAY_DAYS` of the snapshot, the deployment's SKU must offer that model version in the account's region, and the
model must need no registration (limited access) unless the parameters file says the subscription has it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, timedelta
from functools import cache
from pathlib import Path
from typing import Any

SNAPSHOT = Path(__file__).resolve().parents[2] / "bicep" / "azure-openai-models.json"

# A default that retires within three months of being chosen is not a default worth shipping.
MIN_RUNWAY_DAYS = 90

PROVISIONED_SKUS = {"ProvisionedManaged", "GlobalProvisionedManaged", "DataZoneProvisionedManaged"}


@dataclass(frozen=True)
class Snapshot:
    date: date
    lifecycle: dict[str, dict[str, str]]
    availability: dict[str, dict[str, list[str]]]
    sources: dict[str, Any]
    limited_access: dict[str, str]
    regions: frozenset[str] = frozenset()  # every region the availability pages list, offered anything or not


@cache
def snapshot(path: Path = SNAPSHOT) -> Snapshot:
    raw = json.loads(path.read_text(encoding="utf-8"))
    availability = raw["availability"]
    regions = frozenset(raw.get("regions") or {r for by in availability.values() for rs in by.values() for r in rs})
    return Snapshot(date.fromisoformat(raw["snapshot_date"]), raw["lifecycle"], availability, raw["sources"],
                    raw["limited_access"], regions)


def check_deployment(model: str, version: str, sku: str, region: str, facts: Snapshot | None = None,
                     registered: frozenset[str] = frozenset()) -> list[str]:
    """`registered`: the limited-access models the parameters file says its subscription is approved for."""
    facts = facts or snapshot()
    key = f"{model}@{version}"
    problems: list[str] = []
    access = facts.limited_access.get(model)
    if access is not None and model not in registered:
        problems.append(f"{model} needs {access} ({facts.sources['access']['form']}): a subscription not approved for "
                        f"it gets no deployment; choose a model that needs none, or, once approved, say so with a "
                        f"line '// bicepcheck: registered {model}' in the parameters file")
    life = facts.lifecycle.get(key)
    if life is None:
        problems.append(f"{key}: not in the model snapshot's retirement schedule (unknown or retired)")
    else:
        if life["lifecycle"] != "GA":
            problems.append(f"{key} is {life['lifecycle']} (retires {life['retirement']}); choose a GA model")
        retires = date.fromisoformat(life["retirement"])
        if retires <= facts.date + timedelta(days=MIN_RUNWAY_DAYS):
            problems.append(f"{key} retires {retires}, within {MIN_RUNWAY_DAYS} days of the snapshot ({facts.date})")
    by_sku = facts.availability.get(sku)
    if by_sku is None:
        problems.append(f"{key}: SKU {sku} is not in the snapshot")
    elif region not in (facts.regions or {r for regions in by_sku.values() for r in regions}):
        problems.append(f"{key}: the snapshot has no facts for {region}; add the region before deploying there")
    elif region not in by_sku.get(key, []):
        offered = sorted(by_sku.get(key, []))
        problems.append(f"{key} is not offered as {sku} in {region} (offered in: {', '.join(offered) or 'none'})")
    return problems


def check_region_skus(region_id: str, skus: list[str]) -> list[str]:
    """A backend is either provisioned (PTU) or pay-as-you-go: GATEWAY_BACKENDS has one `ptu` flag per backend."""
    kinds = {sku in PROVISIONED_SKUS for sku in skus}
    if len(kinds) > 1:
        return [f"backend {region_id} mixes provisioned and pay-as-you-go deployments; split it into two backends"]
    return []
