"""What one instance shares about a PTU backend (shared/routing/capacity.py computes it; the capacity store holds it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CapacityReport:
    """What one instance shares about one PTU backend and deployment."""

    backend_id: str
    deployment: str
    instance: str
    at: float  # wall clock when published; its charges are complete up to about then
    charges: tuple[tuple[float, float], ...]  # (wall time, tokens): admissions (+), 429 refunds (-), corrections (+/-)
    ready: tuple[float, ...]  # instants the PTU named as 100 % (wall time)
    demand: float  # tokens/s this instance offered the PTU lately
    rate: float | None  # tokens/s this instance believes the PTU drains (for a newcomer before the first run)
