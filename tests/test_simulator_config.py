"""The simulator's configuration: the CLI's deployment syntax and regions JSON."""

from __future__ import annotations

import pytest

from tools.simulator.config import DeploymentConfig, RegionConfig, parse_deployment, region_from_json


def test_deployment_syntax() -> None:
    assert parse_deployment("gpt-4o") == DeploymentConfig("gpt-4o")
    parsed = parse_deployment("gpt-4o:tpm=30000,rpm=180,model=gpt-4o-2024-11-20,completion=12,dimensions=256")
    assert parsed == DeploymentConfig("gpt-4o", tpm=30000, rpm=180, model="gpt-4o-2024-11-20", completion_tokens=12,
                                      dimensions=256)
    assert parsed.model_name == "gpt-4o-2024-11-20" and DeploymentConfig("x").model_name == "x"


def test_provisioned_deployment_syntax() -> None:
    assert parse_deployment("gpt-4o:tpm=30000,ptu=1") == DeploymentConfig("gpt-4o", tpm=30000, ptu=True)
    assert parse_deployment("gpt-4o:ptu=1,burst=5") == DeploymentConfig("gpt-4o", ptu=True, burst_s=5)
    assert parse_deployment("gpt-4o:ptu=0").ptu is False
    config, _, _ = region_from_json({"region": "r", "port": 1, "deployments": [{"name": "p", "ptu": True, "burst": 2.5}]})
    assert config.deployments[0].ptu and config.deployments[0].burst_s == 2.5


@pytest.mark.parametrize("text", ["gpt-4o:tpm=many", "gpt-4o:colour=red", "gpt-4o:tpm", "gpt-4o:tpm=0", ":tpm=1",
                                  "a/b", "gpt-4o:completion=0", "gpt-4o:ptu=2", "gpt-4o:ptu=1,rpm=10",
                                  "gpt-4o:ptu=1,burst=0"])
def test_bad_deployments_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_deployment(text)


def test_regions_json_entry() -> None:
    config, host, port = region_from_json({
        "region": "swedencentral", "port": 18102, "api_key": "k", "latency_ms": 5, "completion_tokens": 7,
        "deployments": ["gpt-4o:tpm=1000", {"name": "emb", "model": "text-embedding-3-small", "completion": 3}],
    })
    assert (host, port) == ("127.0.0.1", 18102)
    assert config.region == "swedencentral" and config.api_key == "k" and config.latency_ms == 5
    gpt, emb = config.deployments
    assert gpt.tpm == 1000 and config.completion_for(gpt) == 7 and config.completion_for(emb) == 3
    with pytest.raises(ValueError):
        region_from_json({"region": "x", "port": 1, "deployments": [], "colour": "red"})


def test_duplicate_deployments_are_refused() -> None:
    with pytest.raises(ValueError):
        RegionConfig("r", (DeploymentConfig("a"), DeploymentConfig("a")))
