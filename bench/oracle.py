"""A god's-eye check of one consumer's limit for the scale bench (bench/scale.py `--oracle`): it sees every admission
of every instance (with the tokens the request will use) and every stored write of the ledger (who wrote it, the row
before and after), which no instance can.

What it checks, as the ledger's promise says (shared/limits/ledger.py): at every instant the ledger's occupancy bounds
what was admitted in the last 60 s. Per instance: what the instance's own writes put in the window (attributed from
each write's difference, after what left the window) plus the holds of its leases in the ledger, against what it
admitted in the last 60 s (the tokens used). An instance whose admissions exceed what the ledger keeps for it is where
admissions went uncounted; the first such instant, and the history of that instance's writes and admissions around it,
are what `report` gives. Also: the first admission that took any 60 s past the limit (what bench.scale reports), and
any write that removed or changed another instance's live lease.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.limits.ledger import CONSUMER_SCOPE, Ledger

CHECK_EVERY_S = 0.25  # simulated seconds between per-instance checks (each costs one pass over every instance)
HISTORY = 400  # events kept per instance for the report
EXPIRED_SLACK_MS = 2_000  # a write lands after its writer pruned the ledger (a store round trip's latency at most)


def owner(lease_id: str) -> str:
    return lease_id.split(":", 1)[0]


@dataclass
class _Instance:
    admit_at: list[float] = field(default_factory=list)
    admit_used: list[int] = field(default_factory=list)
    cumulative: list[int] = field(default_factory=list)  # running sum of admit_used
    window: dict[int, int] = field(default_factory=dict)  # expiry ms -> tokens its writes put in the window
    events: list[str] = field(default_factory=list)

    def admitted_since(self, after: float, until: float) -> int:
        lo, hi = bisect_right(self.admit_at, after), bisect_right(self.admit_at, until)
        if hi <= lo:
            return 0
        return self.cumulative[hi - 1] - (self.cumulative[lo - 1] if lo else 0)

    def note(self, line: str) -> None:
        self.events.append(line)
        if len(self.events) > 2 * HISTORY:
            del self.events[:HISTORY]


class LedgerOracle:
    def __init__(self, consumer_id: str, limit: int, t0: float) -> None:
        self.consumer_id = consumer_id
        self.limit = limit
        self.t0 = t0  # the simulated wall clock at loop time 0 (SimClock)
        self.instances: dict[str, _Instance] = {}
        self.ledger = Ledger()
        self._recent: list[tuple[float, int]] = []
        self._recent_sum = 0
        self._recent_first = 0
        self.first_over: dict[str, Any] | None = None
        self.first_deficit: dict[str, Any] | None = None
        self.foreign: list[str] = []  # writes that removed or changed another instance's live lease
        self.carried = 0  # writes whose window was past the limit (debt carried: attribution approximate)
        self._next_check = 0.0
        self.writes = 0

    def _inst(self, name: str) -> _Instance:
        inst = self.instances.get(name)
        if inst is None:
            inst = self.instances[name] = _Instance()
        return inst

    def admitted(self, name: str, at: float, used: int, lease: str, quiet: bool) -> None:
        inst = self._inst(name)
        inst.admit_at.append(at)
        inst.admit_used.append(used)
        inst.cumulative.append((inst.cumulative[-1] if inst.cumulative else 0) + used)
        inst.note(f"{at:9.3f} admit {used} from {lease}{' (quiet)' if quiet else ''}")
        self._recent.append((at, used))
        self._recent_sum += used
        while self._recent[self._recent_first][0] <= at - 60:
            self._recent_sum -= self._recent[self._recent_first][1]
            self._recent_first += 1
        if self._recent_sum > self.limit and self.first_over is None:
            self.first_over = {"at": round(at, 3), "tokens_in_60s": self._recent_sum, "instance": name}
            self._check(at, force=True)

    def written(self, writer: str, consumer_id: str, before_row: Mapping[str, object] | None,
                after_row: Mapping[str, object], at: float) -> None:
        if consumer_id != self.consumer_id:
            return
        self.writes += 1
        now_ms = int((self.t0 + at) * 1000)
        before = Ledger.from_entity(before_row) if before_row is not None else Ledger()
        after = Ledger.from_entity(after_row)
        self._check(at)
        old_w = before.windows.get(CONSUMER_SCOPE, {})
        new_w = after.windows.get(CONSUMER_SCOPE, {})
        if sum(t for e, t in old_w.items() if e > now_ms) > self.limit:
            self.carried += 1
        inst = self._inst(writer)
        diff = {e: new_w.get(e, 0) - old_w.get(e, 0) for e in set(old_w) | set(new_w) if e > now_ms}
        diff = {e: d for e, d in diff.items() if d}
        for e, d in diff.items():
            inst.window[e] = inst.window.get(e, 0) + d
        lease_changes = []
        for lid in set(before.leases) | set(after.leases):
            b, a = before.leases.get(lid), after.leases.get(lid)
            bt = b.tokens.get(CONSUMER_SCOPE, 0) if b else None
            at_ = a.tokens.get(CONSUMER_SCOPE, 0) if a else None
            if (bt, b.expires_ms if b else None) == (at_, a.expires_ms if a else None):
                continue
            if a is None and b is not None and b.expires_ms <= now_ms + EXPIRED_SLACK_MS:
                continue  # it left the window (the writer pruned it a moment before the write landed)
            lease_changes.append(f"{lid}:{bt}->{at_}" + (f" until {(a.expires_ms / 1000 - self.t0):.3f}" if a else ""))
            if owner(lid) != writer:
                self.foreign.append(f"{at:.3f} {writer} changed {lid}: {bt} -> {at_}")
        inst.note(f"{at:9.3f} write: window {sum(diff.values()):+d} "
                  f"{ {round(e / 1000 - self.t0, 1): d for e, d in sorted(diff.items())} } leases {lease_changes}")
        self.ledger = after

    def _check(self, at: float, force: bool = False) -> None:
        if self.first_deficit is not None or (at < self._next_check and not force):
            return
        self._next_check = at + CHECK_EVERY_S
        now_ms = int((self.t0 + at) * 1000)
        holds: dict[str, int] = {}
        for lid, lease in self.ledger.leases.items():
            if lease.expires_ms > now_ms:
                holds[owner(lid)] = holds.get(owner(lid), 0) + lease.tokens.get(CONSUMER_SCOPE, 0)
        for name, inst in self.instances.items():
            admitted = inst.admitted_since(at - 60, at)
            if not admitted:
                continue
            kept = sum(t for e, t in inst.window.items() if e > now_ms) + holds.get(name, 0)
            if admitted > kept:
                self.first_deficit = {"at": round(at, 3), "instance": name, "admitted_60s": admitted, "kept": kept,
                                      "hold": holds.get(name, 0)}
                return

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"writes_seen": self.writes, "first_over": self.first_over,
                               "first_deficit": self.first_deficit, "foreign_lease_changes": self.foreign[:20],
                               "writes_with_debt": self.carried}
        if self.first_deficit is not None:
            inst = self.instances[self.first_deficit["instance"]]
            at = self.first_deficit["at"]
            out["history"] = [e for e in inst.events if at - 75 <= float(e.split()[0]) <= at + 1][-HISTORY:]
        return out
