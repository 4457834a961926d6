"""Faults queued through the control API, taken by the requests they apply to."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("500", "503", "reset", "timeout", "cut", "malformed", "429", "429-huge", "429-bare")


@dataclass
class Fault:
    kind: str
    count: int = 1  # -1: until cleared
    deployment: str | None = None
    after_chunks: int = 3
    delay_s: float | None = None


class FaultPlan:
    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        if fault.kind not in KINDS:
            raise ValueError(f"unknown fault kind {fault.kind!r}; known: {', '.join(KINDS)}")
        if fault.count == 0 or fault.count < -1:
            raise ValueError("count must be positive, or -1 for until cleared")
        self._faults.append(fault)

    def take(self, deployment: str) -> Fault | None:
        for fault in self._faults:
            if fault.deployment is None or fault.deployment == deployment:
                if fault.count > 0:
                    fault.count -= 1
                    if fault.count == 0:
                        self._faults.remove(fault)
                return fault
        return None

    def clear(self) -> None:
        self._faults.clear()

    def __len__(self) -> int:
        return len(self._faults)
