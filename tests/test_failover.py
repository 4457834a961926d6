"""The failover loop: how many attempts, which backends are claimed, and what is said when none answers."""

from __future__ import annotations

from typing import Any

from shared.outcomes import FailureKind
from shared.routing.router import Router
from tests.fakes.gateway import GatewayHarness, three_regions
from tests.fakes.upstream import Fail, error_reply

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def count_acquires(router: Router) -> list[str]:
    claimed: list[str] = []
    acquire = router.acquire

    def spy(backend: Any, deployment: str, **options: Any) -> bool:
        claimed.append(backend.id)
        return acquire(backend, deployment, **options)

    router.acquire = spy  # type: ignore[method-assign]
    return claimed


async def test_a_backend_is_claimed_only_for_an_attempt_that_is_made() -> None:
    # A half-open breaker lets one probe through: claiming a backend that is then not tried would keep it out.
    harness = GatewayHarness(three_regions(), {"GATEWAY_MAX_ATTEMPTS": "1"})
    try:
        claimed = count_acquires(harness.router)
        harness.upstream.script("uksouth-ptu", error_reply(500))
        response = await harness.post("/v1/chat/completions", harness.consumer(), BODY)
        assert response.status_code == 503
        assert claimed == ["uksouth-ptu"] and len(harness.upstream.sent) == 1
    finally:
        await harness.close()


async def test_a_request_out_of_timeout_replays_claims_no_further_backend() -> None:
    # GATEWAY_TIMEOUT_REPLAYS=1: after two timeouts the loop stops; claiming the third backend first would leave a
    # half-open breaker's probe slot taken by a request never sent (the backend then out for the probe timeout).
    harness = GatewayHarness(three_regions())
    try:
        claimed = count_acquires(harness.router)
        harness.upstream.script("uksouth-ptu", Fail(FailureKind.TIMEOUT))
        harness.upstream.script("swedencentral", Fail(FailureKind.TIMEOUT))
        harness.upstream.script("francecentral", Fail(FailureKind.TIMEOUT))
        response = await harness.post("/v1/chat/completions", harness.consumer(), BODY)
        assert response.status_code == 504
        assert len(harness.upstream.sent) == 2 and claimed == [s.backend_id for s in harness.upstream.sent]
    finally:
        await harness.close()


async def test_every_candidate_is_tried_once_in_order_then_the_reason_is_given(harness: GatewayHarness) -> None:
    claimed = count_acquires(harness.router)
    for backend_id in ("uksouth-ptu", "swedencentral", "francecentral"):
        harness.upstream.script(backend_id, error_reply(503, {"retry-after": "2"}))
    response = await harness.post("/v1/chat/completions", harness.consumer(), BODY)
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert claimed[0] == "uksouth-ptu" and sorted(claimed[1:]) == ["francecentral", "swedencentral"]
    assert [s.backend_id for s in harness.upstream.sent] == claimed
    assert [(f, t) for f, t, _ in harness.telemetry.failovers] == list(zip(claimed, claimed[1:], strict=False))
    assert {reason for _, _, reason in harness.telemetry.failovers} == {"503"}


async def test_nothing_is_sent_when_every_breaker_is_open(harness: GatewayHarness) -> None:
    for backend_id in ("uksouth-ptu", "swedencentral", "francecentral"):
        harness.upstream.script(backend_id, error_reply(429, {"retry-after": "30"}))
    key = harness.consumer()
    assert (await harness.post("/v1/chat/completions", key, BODY)).status_code == 429
    sent = len(harness.upstream.sent)
    response = await harness.post("/v1/chat/completions", key, BODY)
    assert response.status_code == 429 and response.json()["error"]["code"] == "backends_busy"
    assert len(harness.upstream.sent) == sent and harness.telemetry.failovers[-1][2] == "429"
