"""One instance's traffic counts (and model fallbacks) of one 10-s bucket (shared/telemetry/traffic.py writes them;
the console reads them).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TrafficRow:
    """One instance's counts in one 10-s bucket (bucket = epoch seconds // 10), per backend, and its model fallbacks
    per deployment (the deployment no region could serve, whose request the next of its chain took)."""

    bucket: int
    instance: str
    counts: dict[str, tuple[int, ...]] = field(default_factory=dict)  # backend -> FIELDS
    fallbacks: dict[str, int] = field(default_factory=dict)  # deployment -> model fallbacks away from it
    # backend -> deployment -> tokens: what a PTU's capacity (stated or learnt per deployment) is compared with
    deployment_tokens: dict[str, dict[str, int]] = field(default_factory=dict)
