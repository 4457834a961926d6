"""The simulator's fault plan: what the control API accepts, and which request takes which fault."""

from __future__ import annotations

from typing import Any

import pytest

from tools.simulator.faults import KINDS, Fault, FaultPlan, fault_from_json


def test_a_fault_spec_gets_defaults() -> None:
    fault = fault_from_json({"kind": "cut"})
    assert fault == Fault("cut", count=1, deployment=None, after_chunks=3, delay_s=None)
    assert fault_from_json({"kind": "timeout"}).delay == 30.0
    assert fault_from_json({"kind": "slow"}).delay == 5.0
    assert fault_from_json({"kind": "429"}).delay == 2.0
    assert fault_from_json({"kind": "429", "delay_s": 0.5}).delay == 0.5


@pytest.mark.parametrize(
    "spec",
    [{}, {"kind": "teapot"}, {"kind": "500", "count": 0}, {"kind": "500", "count": -2}, {"kind": "cut", "after_chunks": -1},
     {"kind": "timeout", "delay_s": -1}, {"kind": "500", "count": "many"}, {"kind": "500", "colour": "red"}, []],
)
def test_bad_fault_specs_are_refused_with_a_reason(spec: Any) -> None:
    with pytest.raises(ValueError, match=r".+"):
        fault_from_json(spec)


def test_every_kind_is_accepted() -> None:
    for kind in KINDS:
        assert fault_from_json({"kind": kind}).kind == kind


def test_faults_are_taken_in_order_and_counted_down() -> None:
    plan = FaultPlan()
    plan.add(Fault("500", count=2))
    plan.add(Fault("reset"))
    assert [getattr(plan.take("d"), "kind", None) for _ in range(4)] == ["500", "500", "reset", None]


def test_a_deployment_fault_skips_other_deployments() -> None:
    plan = FaultPlan()
    plan.add(Fault("500", deployment="a"))
    plan.add(Fault("503"))
    taken = plan.take("b")
    assert taken is not None and taken.kind == "503"
    assert plan.take("b") is None
    taken = plan.take("a")
    assert taken is not None and taken.kind == "500"


def test_until_cleared_and_peek_without_taking() -> None:
    plan = FaultPlan()
    plan.add(Fault("429", count=-1))
    for _ in range(5):
        taken = plan.take("d")
        assert taken is not None and taken.kind == "429"
    peeked = plan.peek("d")
    assert peeked is not None and len(plan) == 1
    plan.clear()
    assert plan.take("d") is None
