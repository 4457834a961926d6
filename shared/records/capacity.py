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


@dataclass(frozen=True)
class CapacitySummary:
    """What every instance has told the others about one PTU backend and deployment, merged into one row that each
    instance reads with a point read and writes (ETag-conditional) only when it has news: the instants the PTU named
    lately and the newest rate anyone learnt or estimated, with the instant it was learnt up to."""

    backend_id: str
    deployment: str
    at: float  # wall clock of the last write
    ready: tuple[float, ...]  # instants the PTU named as 100 % (wall time), at least a second apart, newest last
    rate: float | None  # tokens/s, learnt up to `rate_from`
    rate_from: float  # the instant the rate was learnt up to (or the one 429 a first estimate came from)
    rate_learnt: bool  # learnt from two instants (else a first estimate from one 429)
    by: str  # the instance that wrote it last
    rows: int = 0  # the per-instance rows a recent query returned (0: not known): how often to read them, and this row
    rows_at: float = 0.0  # wall clock of that query's answer
    # The fleet's figures (shared/routing/provisioned.py): about once a second one instance reads every per-instance
    # row and writes here what they add up to, so that no other instance needs to read them.
    rate_complete: bool = False  # the rate was learnt from every instance's fresh row (by that instance)
    fleet_at: float = 0.0  # wall clock of that read (or of the claim to make it, by `fleet_by`)
    fleet_by: str = ""
    members: int = 0  # fresh rows of this deployment then: the instances sending to it (0: no figures)
    demand: float = 0.0  # their demand, tokens/s, added up
    demanders: int = 0  # how many of them had any
