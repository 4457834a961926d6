"""The pinning rule with the in-memory store and a fake clock: where a stored response lives, who may see it, how
long it is remembered, and the answers when its holder is out or the store cannot be read."""

from __future__ import annotations

import pytest

from shared.clock import FakeClock
from shared.config import Backend, BreakerRule
from shared.edge.errors import GatewayError, render
from shared.flow.pinning import RETENTION_S, Pinning
from shared.flow.responses import Created
from shared.flow.translate import AZURE_API, FOLLOW_UPS, OPENAI_API, Operation, match_route
from shared.outcomes import ResponseBackendUnavailable, ResponseNotFound, ResponseStateUnavailable
from shared.records.usage import TokenUsage
from shared.routing.router import Router
from shared.storage.memory import MemoryResponseStore
from shared.telemetry.protocol import NullTelemetry

D = "gpt-4o"
PTU = Backend(id="ptu", endpoint="https://ptu.example", region="uksouth", deployments={D: D}, breaker=BreakerRule(trip_s=10))
SWEDEN = Backend(id="se", endpoint="https://se.example", region="swedencentral", deployments={D: D, "mini": "mini"},
                 priority=2, breaker=BreakerRule(trip_s=10))


def setup() -> tuple[Pinning, MemoryResponseStore, Router, FakeClock]:
    clock = FakeClock()
    store = MemoryResponseStore()
    router = Router((PTU, SWEDEN), clock, NullTelemetry())
    return Pinning(store, (PTU, SWEDEN), router, clock), store, router, clock


@pytest.mark.asyncio
async def test_the_creator_finds_the_holder_until_the_retention_ends() -> None:
    pinning, store, _, clock = setup()
    await pinning.remember(Created("resp_1", "gpt-4o", True, False), SWEDEN, "team-a", D, TokenUsage(100, 20, 120))
    holder = await pinning.holder("resp_1", "team-a", previous=True)
    assert holder.backend is SWEDEN and holder.record.context_tokens == 120 and holder.record.deployment == D
    clock.advance(RETENTION_S - 1)
    assert (await pinning.holder("resp_1", "team-a", previous=False)).backend is SWEDEN
    clock.advance(1)
    with pytest.raises(ResponseNotFound) as caught:
        await pinning.holder("resp_1", "team-a", previous=False)
    assert render(caught.value).status == 404 and store.records == {}  # the expired record was dropped as it was read


@pytest.mark.asyncio
async def test_another_consumer_gets_exactly_the_unknown_answer() -> None:
    pinning, _, _, _ = setup()
    await pinning.remember(Created("resp_1", None, True, False), PTU, "team-a", D, None)
    for previous, status in ((True, 400), (False, 404)):
        answers = []
        for response_id, consumer in (("resp_1", "team-b"), ("resp_2", "team-a")):
            with pytest.raises(ResponseNotFound) as caught:
                await pinning.holder(response_id, consumer, previous=previous)
            error = render(caught.value)
            answers.append((error.status, error.code, error.param, error.message.replace(response_id, "ID")))
        assert answers[0] == answers[1] and answers[0][0] == status


@pytest.mark.asyncio
async def test_unstored_responses_are_not_recorded_and_removed_backends_are_unknown() -> None:
    pinning, store, _, _ = setup()
    await pinning.remember(Created("resp_x", None, False, False), PTU, "team-a", D, None)
    assert store.records == {}
    await pinning.remember(Created("resp_m", None, True, True), SWEDEN, "team-a", "mini", None)
    shrunk = Pinning(store, (PTU,), Router((PTU,), FakeClock(), NullTelemetry()), FakeClock())
    with pytest.raises(ResponseNotFound) as caught:
        await shrunk.holder("resp_m", "team-a", previous=False)
    assert render(caught.value).status == 404


@pytest.mark.asyncio
async def test_an_open_breaker_refuses_with_a_retryable_503_naming_region_and_reason() -> None:
    pinning, _, router, clock = setup()
    await pinning.remember(Created("resp_1", None, True, False), PTU, "team-a", D, None)
    holder = await pinning.holder("resp_1", "team-a", previous=False)
    pinning.claim(holder, D)  # healthy: goes through
    router.record_failure(PTU, D, 429, {"retry-after-ms": "7500"})
    with pytest.raises(ResponseBackendUnavailable) as caught:
        pinning.claim(holder, D)
    error = render(caught.value)
    assert error.status == 503 and error.code == "response_backend_unavailable"
    assert error.headers["retry-after"] == "8" and "uksouth" in error.message and "circuit breaker" in error.message
    clock.advance(7.5)
    pinning.claim(holder, D)  # the half-open probe is this follow-up


@pytest.mark.asyncio
async def test_store_failures() -> None:
    pinning, store, _, _ = setup()
    store.unavailable = True
    with pytest.raises(ResponseStateUnavailable) as caught:
        await pinning.holder("resp_1", "team-a", previous=True)
    error = render(caught.value)
    assert error.status == 503 and error.code == "response_state_unavailable"
    assert error.headers["retry-after"] == "1"
    await pinning.remember(Created("resp_1", None, True, False), PTU, "team-a", D, None)  # logged, not raised
    assert pinning.unrecorded == 1
    await pinning.forget("resp_1")  # logged, not raised


@pytest.mark.parametrize(
    ("method", "path", "api", "operation", "response_id"),
    [
        ("POST", "/v1/responses", OPENAI_API, Operation.RESPONSES, None),
        ("POST", "/openai/v1/responses/", OPENAI_API, Operation.RESPONSES, None),
        ("POST", "/openai/responses", AZURE_API, Operation.RESPONSES, None),
        ("GET", "/v1/responses/resp_1", OPENAI_API, Operation.RESPONSE_GET, "resp_1"),
        ("DELETE", "/openai/responses/resp_1", AZURE_API, Operation.RESPONSE_DELETE, "resp_1"),
        ("GET", "/openai/v1/responses/resp_1/input_items", OPENAI_API, Operation.RESPONSE_INPUT_ITEMS, "resp_1"),
        ("POST", "/openai/responses/resp_a-B_9/cancel", AZURE_API, Operation.RESPONSE_CANCEL, "resp_a-B_9"),
    ],
)
def test_routes(method: str, path: str, api: str, operation: Operation, response_id: str | None) -> None:
    route = match_route(method, path)
    assert (route.api, route.operation, route.response_id, route.deployment) == (api, operation, response_id, None)
    assert (operation in FOLLOW_UPS) is (response_id is not None)
    assert "{response_id}" in route.template or response_id is None


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/v1/responses", 405, "POST"),
        ("POST", "/v1/responses/resp_1", 405, "GET, DELETE"),
        ("DELETE", "/v1/responses/resp_1/cancel", 405, "POST"),
        ("POST", "/v1/responses/resp_1/input_items", 405, "GET"),
        ("GET", "/v1/responses/resp_1/other", 404, None),
        ("GET", "/v1/responses/resp_1/input_items/x", 404, None),
        ("GET", "/v1/responses/..%2Fsecrets", 404, None),
        ("GET", "/v1/responses/a%2Fb", 404, None),
        ("GET", "/v1/responses/" + "r" * 300, 404, None),
        ("GET", "/openai/responses", 405, "POST"),
        ("POST", "/openai/other", 404, None),
    ],
)
def test_hostile_or_wrong_follow_up_paths(method: str, path: str, status: int, allow: str | None) -> None:
    with pytest.raises(GatewayError) as caught:
        match_route(method, path)
    assert caught.value.status == status and caught.value.headers.get("allow") == allow
