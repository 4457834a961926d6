"""bench/oracle.py, the scale bench's god's-eye check of a consumer's limit: it must see an admission that no hold or
reported usage keeps, a write that changes another instance's lease, and a minute past the limit."""

from __future__ import annotations

from bench.oracle import LedgerOracle
from shared.limits.ledger import Lease, Ledger, bucket_expiry

T0 = 1_700_000_000.0


def ms(at: float) -> int:
    return int((T0 + at) * 1000)


def test_an_admission_whose_hold_another_claim_replaced_is_a_deficit() -> None:
    oracle = LedgerOracle("c", 10_000, T0)
    claimed = Ledger(leases={"a:1": Lease({"*": 900}, ms(1.0) + 62_000)})
    oracle.written("a", "c", None, claimed.to_entity(), 1.0)
    for _ in range(3):
        oracle.admitted("a", 1.1, 250, "a:1", True)
    oracle.written("b", "c", claimed.to_entity(), claimed.to_entity(), 1.5)  # nothing changed: nothing amiss
    assert oracle.first_deficit is None
    # The same id claimed again for 300: the first lease's 900 are gone while its 750 admitted tokens are in no hold.
    replaced = Ledger(leases={"a:1": Lease({"*": 300}, ms(2.0) + 62_000)})
    oracle.written("a", "c", claimed.to_entity(), replaced.to_entity(), 2.0)
    oracle.written("b", "c", replaced.to_entity(), replaced.to_entity(), 2.5)
    assert oracle.first_deficit is not None
    assert oracle.first_deficit["instance"] == "a" and oracle.first_deficit["admitted_60s"] == 750
    assert oracle.first_deficit["kept"] == 300
    assert any("a:1:900->300" in line for line in oracle.report()["history"])


def test_reported_usage_counts_for_its_writer_and_a_foreign_change_is_named() -> None:
    oracle = LedgerOracle("c", 10_000, T0)
    oracle.written("a", "c", None, Ledger(leases={"a:1": Lease({"*": 600}, ms(1.0) + 62_000)}).to_entity(), 1.0)
    oracle.admitted("a", 1.2, 300, "a:1", False)
    oracle.admitted("a", 1.3, 300, "a:1", False)
    closed = Ledger(windows={"*": {bucket_expiry(ms(1.2)): 600}})  # the close: the hold becomes usage
    oracle.written("a", "c", Ledger(leases={"a:1": Lease({"*": 600}, ms(1.0) + 62_000)}).to_entity(),
                   closed.to_entity(), 2.0)
    oracle.written("b", "c", closed.to_entity(), closed.to_entity(), 2.5)
    assert oracle.first_deficit is None
    # Another instance's write that drops a's live lease is reported.
    held = Ledger(leases={"a:2": Lease({"*": 300}, ms(3.0) + 62_000)})
    oracle.written("a", "c", closed.to_entity(), held.to_entity(), 3.0)
    oracle.written("b", "c", held.to_entity(), closed.to_entity(), 3.5)
    assert oracle.foreign and "b changed a:2" in oracle.foreign[0]


def test_the_first_minute_past_the_limit_is_reported() -> None:
    oracle = LedgerOracle("c", 1_000, T0)
    for k in range(4):
        oracle.admitted("a", 1.0 + k, 300, "a:1", False)
    assert oracle.first_over is not None and oracle.first_over["tokens_in_60s"] == 1_200
    assert oracle.first_over["at"] == 4.0
