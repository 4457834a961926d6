"""What a simulated region is configured with, and its two textual forms: the CLI's deployment syntax and regions JSON.

Deployment syntax: ``NAME[:key=value[,key=value...]]`` with keys ``tpm``, ``rpm``, ``model`` (the model name reported in
bodies and used to pick the tokenizer; default NAME), ``completion`` (tokens generated when a request sets no
max_tokens; default the region's), ``dimensions`` (embeddings), ``ptu`` (1: a provisioned deployment, admitted by
utilisation, whose ``tpm`` is the rate its utilisation drains at) and ``burst`` (provisioned: seconds of that rate that
are 100 % utilisation; default 60). Example: ``gpt-4o:tpm=30000,model=gpt-4o-2024-11-20,ptu=1``.

Regions JSON: a list of objects ``{"region": "uksouth", "port": 18101, "host": "127.0.0.1", "api_key": "...",
"latency_ms": 50, "token_latency_ms": 10, "completion_tokens": 40, "pace_non_streaming": false,
"deployments": ["gpt-4o:tpm=30000", {"name": "text-embedding-3-small", "tpm": 350000}]}``; only region, port and
deployments are required.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

DEFAULT_COMPLETION_TOKENS = 40
DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True)
class DeploymentConfig:
    name: str
    tpm: int = 300_000
    rpm: int | None = None
    model: str = ""
    completion_tokens: int | None = None  # None: the region's default
    dimensions: int = 1536
    ptu: bool = False  # provisioned: a leaky bucket instead of the sliding window
    burst_s: float = 60.0  # provisioned: seconds of the drain rate that make 100 % utilisation

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or ":" in self.name:
            raise ValueError(f"invalid deployment name {self.name!r}")
        if self.tpm <= 0:
            raise ValueError(f"{self.name}: tpm must be positive")
        if self.rpm is not None and self.rpm <= 0:
            raise ValueError(f"{self.name}: rpm must be positive")
        if self.completion_tokens is not None and self.completion_tokens < 1:
            raise ValueError(f"{self.name}: completion must be at least 1")
        if self.dimensions < 1:
            raise ValueError(f"{self.name}: dimensions must be positive")
        if not isinstance(self.ptu, bool):
            raise ValueError(f"{self.name}: ptu must be true or false")
        if self.ptu and self.rpm is not None:
            raise ValueError(f"{self.name}: a provisioned deployment has no rpm limit")
        if not self.burst_s > 0:
            raise ValueError(f"{self.name}: burst must be positive")

    @property
    def model_name(self) -> str:
        return self.model or self.name


@dataclass(frozen=True)
class RegionConfig:
    region: str
    deployments: tuple[DeploymentConfig, ...]
    api_key: str | None = None
    latency_ms: float = 50.0  # before the response headers
    token_latency_ms: float = 10.0  # between streamed tokens
    completion_tokens: int = DEFAULT_COMPLETION_TOKENS
    pace_non_streaming: bool = False  # non-streamed answers also wait token_latency_ms per token
    recent_requests: int = 200

    def __post_init__(self) -> None:
        names = [d.name for d in self.deployments]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.region}: duplicate deployment names")
        if self.latency_ms < 0 or self.token_latency_ms < 0:
            raise ValueError(f"{self.region}: latencies must not be negative")
        if self.completion_tokens < 1:
            raise ValueError(f"{self.region}: completion_tokens must be at least 1")

    def completion_for(self, deployment: DeploymentConfig) -> int:
        return deployment.completion_tokens or self.completion_tokens


_DEPLOYMENT_KEYS = {"tpm": "tpm", "rpm": "rpm", "model": "model", "completion": "completion_tokens", "dimensions": "dimensions",
                    "ptu": "ptu", "burst": "burst_s"}


def parse_deployment(text: str) -> DeploymentConfig:
    name, _, options = text.partition(":")
    values: dict[str, Any] = {}
    for option in filter(None, options.split(",")):
        key, sep, value = option.partition("=")
        field_name = _DEPLOYMENT_KEYS.get(key.strip())
        if field_name is None or not sep:
            raise ValueError(f"bad deployment option {option!r} in {text!r}; keys: {', '.join(_DEPLOYMENT_KEYS)}")
        try:
            if field_name == "model":
                values[field_name] = value.strip()
            else:
                values[field_name] = float(value) if field_name == "burst_s" else int(value)
        except ValueError:
            raise ValueError(f"{key} must be a number in {text!r}") from None
        if field_name == "ptu":
            if values["ptu"] not in (0, 1):
                raise ValueError(f"ptu must be 0 or 1 in {text!r}")
            values["ptu"] = bool(values["ptu"])
    return DeploymentConfig(name=name.strip(), **values)


def deployment_from_json(spec: str | Mapping[str, Any]) -> DeploymentConfig:
    if isinstance(spec, str):
        return parse_deployment(spec)
    known = {f.name for f in fields(DeploymentConfig)}
    renamed = {"completion": "completion_tokens", "burst": "burst_s"}
    values = {renamed.get(k, k): v for k, v in spec.items()}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown deployment keys {sorted(unknown)}")
    return DeploymentConfig(**values)


_REGION_KEYS = {"region", "port", "host", "deployments", "api_key", "latency_ms", "token_latency_ms",
                "completion_tokens", "pace_non_streaming", "recent_requests"}


def region_from_json(spec: Mapping[str, Any]) -> tuple[RegionConfig, str, int]:
    """One entry of regions JSON -> (config, host, port)."""
    if not isinstance(spec, Mapping):
        raise ValueError("each region must be a JSON object")
    unknown = set(spec) - _REGION_KEYS
    missing = {"region", "port", "deployments"} - set(spec)
    if unknown or missing:
        raise ValueError(f"region {spec.get('region', '?')}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    options = {k: spec[k] for k in ("api_key", "latency_ms", "token_latency_ms", "completion_tokens",
                                     "pace_non_streaming", "recent_requests") if k in spec}
    config = RegionConfig(
        region=str(spec["region"]), deployments=tuple(deployment_from_json(d) for d in spec["deployments"]), **options,
    )
    return config, str(spec.get("host", DEFAULT_HOST)), int(spec["port"])
