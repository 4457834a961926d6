from __future__ import annotations

from collections import Counter

import pytest

from shared.clock import FakeClock
from shared.config import Backend, BreakerRule
from shared.edge.errors import render
from shared.outcomes import AttemptFailure, BackendsBusy, FailureKind, NoBackend
from shared.routing.router import Router
from shared.storage.memory import MemoryBreakerStore
from shared.telemetry.protocol import NullTelemetry

D = "gpt-4o"


def backend(id: str, priority: int = 1, weight: int = 1, reserve: int = 0, deployments: tuple[str, ...] = (D,)) -> Backend:
    return Backend(id=id, endpoint=f"https://{id}.example", region=id, deployments={d: d for d in deployments},
                   priority=priority, weight=weight, reserve_tokens=reserve, breaker=BreakerRule(trip_s=10))


def router(*backends: Backend, clock: FakeClock | None = None, store: MemoryBreakerStore | None = None) -> Router:
    return Router(tuple(backends), clock or FakeClock(), NullTelemetry(), store)


def test_priority_groups_come_in_order_and_unserving_backends_never_appear() -> None:
    r = router(backend("ptu", 1), backend("a", 2), backend("b", 2), backend("other", 1, deployments=("emb",)))
    for _ in range(5):
        ids = [b.id for b in r.candidates(D, 0, "normal")]
        assert ids[0] == "ptu" and set(ids[1:]) == {"a", "b"} and "other" not in ids


@pytest.mark.parametrize("weights", [(1, 1), (3, 1), (5, 2, 1), (1, 0)])
def test_weights_split_traffic_exactly_within_a_group(weights: tuple[int, ...]) -> None:
    backends = [backend(f"b{i}", 1, w) for i, w in enumerate(weights)]
    r = router(*backends)
    first = Counter(r.candidates(D, 0, "normal")[0].id for _ in range(1000))
    total = sum(weights)
    for b, w in zip(backends, weights, strict=True):
        assert abs(first[b.id] / 1000 - w / total) <= 0.03, first


def test_open_breakers_are_skipped_until_their_trip_ends() -> None:
    clock = FakeClock()
    ptu, b = backend("ptu", 1), backend("b", 2)
    r = router(ptu, b, clock=clock)
    r.record_failure(ptu, D, 429, {"retry-after-ms": "3000"})
    assert [x.id for x in r.candidates(D, 0, "normal")] == ["b"]
    clock.advance(3)
    assert [x.id for x in r.candidates(D, 0, "normal")] == ["ptu", "b"]
    assert r.acquire(ptu, D)  # the half-open probe
    assert not r.acquire(ptu, D)  # only one
    r.record_success(ptu, D, {})
    assert r.acquire(ptu, D)


def test_proactive_skip_when_the_last_reported_capacity_is_too_small() -> None:
    clock = FakeClock()
    ptu, b = backend("ptu", 1), backend("b", 2)
    r = router(ptu, b, clock=clock)
    r.record_success(ptu, D, {"x-ratelimit-remaining-tokens": "500"})
    assert [x.id for x in r.candidates(D, 400, "normal")] == ["ptu", "b"]
    assert [x.id for x in r.candidates(D, 600, "normal")] == ["b", "ptu"]  # tried last, not first
    clock.advance(3)  # the report is stale: capacity has refilled since
    assert [x.id for x in r.candidates(D, 600, "normal")] == ["ptu", "b"]


def test_ptu_reserve_is_kept_for_high_priority_consumers() -> None:
    ptu, b = backend("ptu", 1, reserve=10_000), backend("b", 2)
    r = router(ptu, b)
    r.record_success(ptu, D, {"x-ratelimit-remaining-tokens": "8000"})
    assert [x.id for x in r.candidates(D, 100, "normal")] == ["b", "ptu"]
    assert [x.id for x in r.candidates(D, 100, "high")] == ["ptu", "b"]
    r.record_success(ptu, D, {"x-ratelimit-remaining-tokens": "50000"})
    assert [x.id for x in r.candidates(D, 100, "normal")] == ["ptu", "b"]


async def test_a_trip_seen_by_one_instance_is_honoured_by_another() -> None:
    clock = FakeClock()
    store = MemoryBreakerStore()
    ptu, b = backend("ptu", 1), backend("b", 2)
    one, two = router(ptu, b, clock=clock, store=store), router(ptu, b, clock=clock, store=store)
    one.record_failure(ptu, D, 429, {"retry-after": "20"})
    await one.close()  # lets the shared write finish
    assert store.saves == 1
    await two.sync()
    assert [x.id for x in two.candidates(D, 0, "normal")] == ["b"]
    clock.advance(20)
    assert one.acquire(ptu, D)
    one.record_success(ptu, D, {})
    await one.close()
    assert store.records[f"ptu|{D}"].state == "closed"


def test_exhaustion_answers_429_with_the_soonest_recovery_when_all_are_throttled() -> None:
    clock = FakeClock()
    a, b = backend("a"), backend("b")
    r = router(a, b, clock=clock)
    r.record_failure(a, D, 429, {"retry-after-ms": "4200"})
    r.record_failure(b, D, 429, {"retry-after": "9"})
    busy = r.exhausted(D, [AttemptFailure.of_status(429), AttemptFailure.of_status(429)])
    assert isinstance(busy, BackendsBusy) and busy.wait_ms == 4200
    error = render(busy)
    assert error.status == 429 and error.headers["retry-after"] == "5" and error.headers["retry-after-ms"] == "4200"
    assert isinstance(r.exhausted(D, []), BackendsBusy)  # nothing was even tried: every breaker open on 429


def test_exhaustion_otherwise() -> None:
    clock = FakeClock()
    a, b = backend("a"), backend("b")
    r = router(a, b, clock=clock)
    timeout, connection, broken = (AttemptFailure(k) for k in (FailureKind.TIMEOUT, FailureKind.CONNECTION, FailureKind.BROKEN))
    assert render(r.exhausted(D, [timeout])).status == 504
    assert render(r.exhausted(D, [connection, connection])).code == "backend_unreachable"
    assert render(r.exhausted(D, [broken, broken])).code == "backend_error"
    assert render(r.exhausted(D, [connection, broken])).code == "backend_unreachable"
    r.record_failure(a, D, 500, {})
    none = r.exhausted(D, [AttemptFailure.of_status(500), timeout])
    assert isinstance(none, NoBackend) and none.wait_ms == 10_000
    error = render(none)
    assert error.status == 503 and error.headers["retry-after"] == "10"


def test_health_shows_states_without_secrets() -> None:
    clock = FakeClock()
    a = Backend(id="a", endpoint="https://secret-host.example", region="uksouth", deployments={D: D}, api_key="k3y")
    r = router(a, clock=clock)
    r.record_failure(a, D, 429, {"retry-after": "30"})
    health = r.health()
    text = str(health)
    assert "secret-host" not in text and "k3y" not in text
    assert health["backends"][0]["state"] == "open"
    assert health["backends"][0]["deployments"][D] == {
        "state": "open", "reason": "429", "recovers_at": "2023-11-14T22:13:50.000Z", "recovers_in_s": 30
    }


def test_a_full_deployment_does_not_take_the_accounts_other_deployments_out() -> None:
    ptu, b = backend("ptu", 1, deployments=(D, "emb")), backend("b", 2, deployments=(D, "emb"))
    r = router(ptu, b)
    r.record_failure(ptu, D, 429, {"retry-after": "30"})
    assert [x.id for x in r.candidates(D, 0, "normal")] == ["b"]
    assert [x.id for x in r.candidates("emb", 0, "normal")] == ["ptu", "b"]


def test_a_refused_credential_takes_the_backend_out_at_once_for_at_least_a_minute() -> None:
    clock = FakeClock()
    bad, good = backend("bad"), backend("good")
    r = router(bad, good, clock=clock)
    r.record_auth_failure(bad, D, 403)
    assert [b.id for b in r.candidates(D, 0, "normal")] == ["good"]
    clock.advance(59)
    assert [b.id for b in r.candidates(D, 0, "normal")] == ["good"]
    error = render(r.exhausted(D, [AttemptFailure.of_status(403), AttemptFailure.of_status(401)]))
    assert (error.status, error.code) == (502, "backend_auth_failed")


def test_retry_after_is_the_regions_own_wait_rounded_up_when_their_breakers_stay_closed() -> None:
    clock = FakeClock()
    a, b = backend("a"), backend("b")
    r = router(a, b, clock=clock)
    error = render(r.exhausted(D, [AttemptFailure.of_status(429)] * 2, {"a": clock.now() + 2.2, "b": clock.now() + 1.4}))
    assert error.code == "backends_busy"
    assert error.headers == {"retry-after": "2", "retry-after-ms": "1400"}
