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


@pytest.mark.parametrize("text", ["gpt-4o:tpm=many", "gpt-4o:colour=red", "gpt-4o:tpm", "gpt-4o:tpm=0", ":tpm=1",
                                  "a/b", "gpt-4o:completion=0"])
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
