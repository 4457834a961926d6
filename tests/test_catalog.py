"""GATEWAY_DEPLOYMENTS and GATEWAY_ALIASES: parsed and refused at start-up, and the chains they make."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.catalog import Catalog, DeploymentSpec
from shared.config import ConfigError, load_settings

SERVED = ["gpt-4.1", "gpt-4o", "gpt-4o-mini", "o3-mini"]
BACKEND = {"id": "uk", "endpoint": "https://uk.openai.azure.com", "region": "uksouth", "deployments": SERVED,
           "auth": "none"}


def settings(deployments: Any = None, aliases: Any = None) -> Any:
    env = {"GATEWAY_BACKENDS": json.dumps([BACKEND]), "GATEWAY_TABLE_CONNECTION_STRING": "UseDevelopmentStorage=true"}
    if deployments is not None:
        env["GATEWAY_DEPLOYMENTS"] = deployments if isinstance(deployments, str) else json.dumps(deployments)
    if aliases is not None:
        env["GATEWAY_ALIASES"] = aliases if isinstance(aliases, str) else json.dumps(aliases)
    return load_settings(env)


def test_a_valid_catalog() -> None:
    catalog = settings(
        {"gpt-4.1": {"fallback": ["gpt-4o"], "context_window": 1047576, "max_output_tokens": 32768},
         "gpt-4o": {"fallback": ["o3-mini", "gpt-4o-mini"], "context_window": 128000},
         "o3-mini": {"family": "reasoning", "context_window": 200000, "max_output_tokens": 100000}},
        {"chat": ["gpt-4.1", "gpt-4o-mini"], "small": ["gpt-4o-mini"]},
    ).catalog
    assert catalog.spec("o3-mini").family == "reasoning"
    assert catalog.spec("gpt-4o-mini") == DeploymentSpec()
    assert catalog.chain("gpt-4.1") == ("gpt-4.1", "gpt-4o", "o3-mini", "gpt-4o-mini")
    assert catalog.chain("gpt-4o-mini") == ("gpt-4o-mini",)
    assert catalog.chain("chat") == ("gpt-4.1", "gpt-4o", "o3-mini", "gpt-4o-mini")
    assert catalog.aliases["small"] == ("gpt-4o-mini",)


def test_nothing_set_is_an_empty_catalog() -> None:
    catalog = settings().catalog
    assert catalog == Catalog() and catalog.chain("gpt-4o") == ("gpt-4o",)


@pytest.mark.parametrize(
    ("deployments", "aliases", "message"),
    [
        ("not json", None, "GATEWAY_DEPLOYMENTS: invalid JSON"),
        ("[]", None, "GATEWAY_DEPLOYMENTS: expected a JSON object"),
        ({"gpt-5": {}}, None, "GATEWAY_DEPLOYMENTS.gpt-5: not a deployment any backend serves"),
        ({"gpt-4o": []}, None, "GATEWAY_DEPLOYMENTS.gpt-4o: expected an object"),
        ({"gpt-4o": {"fallbacks": ["gpt-4o-mini"]}}, None, "GATEWAY_DEPLOYMENTS.gpt-4o.fallbacks: unknown field"),
        ({"gpt-4o": {"fallback": "gpt-4o-mini"}}, None, "GATEWAY_DEPLOYMENTS.gpt-4o.fallback: expected a non-empty list"),
        ({"gpt-4o": {"fallback": ["gpt-5"]}}, None, "'gpt-5' is not a deployment any backend serves"),
        ({"gpt-4o": {"fallback": ["gpt-4o"]}}, None, "cannot fall back to itself"),
        ({"gpt-4o": {"fallback": ["gpt-4o-mini", "gpt-4o-mini"]}}, None, "named twice"),
        ({"gpt-4o": {"fallback": ["gpt-4o-mini"]}, "gpt-4o-mini": {"fallback": ["gpt-4o"]}}, None,
         "the fallbacks form a cycle (gpt-4o -> gpt-4o-mini -> gpt-4o)"),
        ({"gpt-4.1": {"fallback": ["gpt-4o"]}, "gpt-4o": {"fallback": ["o3-mini"]}, "o3-mini": {"fallback": ["gpt-4.1"]}},
         None, "cycle (gpt-4.1 -> gpt-4o -> o3-mini -> gpt-4.1)"),
        ({"gpt-4o": {"context_window": 0}}, None, "GATEWAY_DEPLOYMENTS.gpt-4o.context_window: must be between"),
        ({"gpt-4o": {"context_window": 1.5}}, None, "GATEWAY_DEPLOYMENTS.gpt-4o.context_window: expected a whole number"),
        ({"gpt-4o": {"max_output_tokens": "many"}}, None, "GATEWAY_DEPLOYMENTS.gpt-4o.max_output_tokens: expected a number"),
        ({"gpt-4o": {"family": "vision"}}, None, "GATEWAY_DEPLOYMENTS.gpt-4o.family: expected one of chat, reasoning"),
        (None, "[]", "GATEWAY_ALIASES: expected a JSON object"),
        (None, {"chat": []}, "GATEWAY_ALIASES.chat: expected a non-empty list"),
        (None, {"chat": ["gpt-5"]}, "GATEWAY_ALIASES.chat: 'gpt-5' is not a deployment any backend serves"),
        (None, {"gpt-4o": ["gpt-4o-mini"]}, "GATEWAY_ALIASES.gpt-4o: a deployment has this name"),
        (None, {"bad name!": ["gpt-4o"]}, "GATEWAY_ALIASES.bad name!: bad alias name"),
    ],
)
def test_bad_catalogs_fail_at_start_up_naming_the_setting(deployments: Any, aliases: Any, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        settings(deployments, aliases)
    assert message in str(raised.value)


def test_a_long_acyclic_chain_is_accepted_and_walked_once_per_deployment() -> None:
    # A diamond: both branches reach gpt-4o-mini; it is tried once, at its first place.
    catalog = settings({"gpt-4.1": {"fallback": ["gpt-4o", "o3-mini"]}, "gpt-4o": {"fallback": ["gpt-4o-mini"]},
                        "o3-mini": {"fallback": ["gpt-4o-mini"]}}).catalog
    assert catalog.chain("gpt-4.1") == ("gpt-4.1", "gpt-4o", "gpt-4o-mini", "o3-mini")


@pytest.mark.parametrize(
    ("spec", "prompt", "output", "fits"),
    [
        (DeploymentSpec(), 10**7, 10**6, True),
        (DeploymentSpec(context_window=1000), 900, 100, True),
        (DeploymentSpec(context_window=1000), 901, 100, False),
        (DeploymentSpec(context_window=1000), 1001, 0, False),
        (DeploymentSpec(max_output_tokens=100), 10, 101, False),
        (DeploymentSpec(context_window=1000, max_output_tokens=100), 10, 100, True),
    ],
)
def test_fits(spec: DeploymentSpec, prompt: int, output: int, fits: bool) -> None:
    assert Catalog({"d": spec}).fits("d", prompt, output) is fits
