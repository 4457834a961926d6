"""Faults queued through the control API and taken, in order, by the requests they apply to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("500", "503", "reset", "timeout", "slow", "cut", "malformed", "429", "429-ptu", "429-huge", "429-bare", "401",
         "403", "no-usage", "bare-done", "hold", "content-filter")
# These act on a request the region has admitted; when capacity refuses the request they stay queued.
# no-usage: a stream that never reports its usage; bare-done: nor that, and it ends as Microsoft's aoai-api-simulator
# ends its streams, with a bare `[DONE]` (no `data:` field, no blank line); hold: a stream that stops after `after_chunks` content chunks until
# the faults are cleared (what a client received by then, it received before the backend produced the rest).
AFTER_ADMISSION = frozenset({"cut", "slow", "no-usage", "bare-done", "hold"})
DEFAULT_DELAY_S = {"timeout": 30.0, "slow": 5.0, "429": 2.0, "429-ptu": 0.05}
DEFAULT_AFTER_CHUNKS = 3


@dataclass
class Fault:
    kind: str
    count: int = 1  # -1: until cleared
    deployment: str | None = None  # None: any deployment
    after_chunks: int = DEFAULT_AFTER_CHUNKS  # cut: content chunks delivered before the connection drops
    delay_s: float | None = None  # timeout, slow: seconds before headers; 429, 429-ptu: the Retry-After

    @property
    def delay(self) -> float:
        return self.delay_s if self.delay_s is not None else DEFAULT_DELAY_S.get(self.kind, 0.0)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def fault_from_json(spec: Mapping[str, Any]) -> Fault:
    """The body of POST /_sim/faults -> a Fault; ValueError with a readable message when it is wrong."""
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ValueError('expected {"kind": ..., "count": n, "deployment": d, "after_chunks": k, "delay_s": s}')
    unknown = set(spec) - {"kind", "count", "deployment", "after_chunks", "delay_s"}
    if unknown:
        raise ValueError(f"unknown fault fields {sorted(unknown)}")
    kind = str(spec["kind"])
    if kind not in KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(KINDS)}")
    try:
        count = int(spec.get("count", 1))
        after_chunks = int(spec.get("after_chunks", DEFAULT_AFTER_CHUNKS))
        delay_s = float(spec["delay_s"]) if spec.get("delay_s") is not None else None
    except (TypeError, ValueError):
        raise ValueError("count and after_chunks must be integers, delay_s a number") from None
    if count == 0 or count < -1:
        raise ValueError("count must be positive, or -1 for until cleared")
    if after_chunks < 0 or (delay_s is not None and delay_s < 0):
        raise ValueError("after_chunks and delay_s must not be negative")
    deployment = spec.get("deployment")
    return Fault(kind, count, str(deployment) if deployment is not None else None, after_chunks, delay_s)


class FaultPlan:
    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        self._faults.append(fault)

    def peek(self, deployment: str) -> Fault | None:
        """The fault the next request to `deployment` would take, without taking it."""
        for fault in self._faults:
            if fault.deployment is None or fault.deployment == deployment:
                return fault
        return None

    def use(self, fault: Fault) -> None:
        if fault.count > 0:
            fault.count -= 1
            if fault.count == 0:
                self._faults.remove(fault)

    def take(self, deployment: str) -> Fault | None:
        fault = self.peek(deployment)
        if fault is not None:
            self.use(fault)
        return fault

    def pending(self) -> list[Fault]:
        return list(self._faults)

    def clear(self) -> None:
        self._faults.clear()

    def __len__(self) -> int:
        return len(self._faults)
