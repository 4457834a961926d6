"""The request flow in-process, backends that fail: which one answers next, what the client sees when none does, what
the breakers remember, and what every attempt is charged. Time moves on the fake clock; nothing sleeps."""

from __future__ import annotations

import asyncio

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from shared.flow.tokens import count_chat_prompt, encoding_for
from shared.outcomes import FailureKind
from tests.fakes.gateway import ADMIN_HEADERS, GatewayHarness, backend, gateway_request, three_regions
from tests.fakes.upstream import Fail, Reply, chat_body, error_reply, json_reply

MINI = "gpt-4o-mini"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Write a haiku about failover."}]
CHAT = "/v1/chat/completions"
BODY = {"model": MINI, "messages": MESSAGES, "max_tokens": 20}
PROMPT = count_chat_prompt({"messages": MESSAGES}, encoding_for(MINI))
SECONDARIES = ("swedencentral", "francecentral")


def one_region(**options: object) -> list[dict[str, object]]:
    return [backend("only", "westeurope", 1, **options)]


def state(health: dict[str, object], backend_id: str) -> dict[str, object]:
    entry = next(b for b in health["backends"] if b["id"] == backend_id)  # type: ignore[attr-defined]
    return dict(entry["deployments"][MINI])


@pytest.mark.parametrize(
    ("failure", "reason", "trip_s"),
    [
        (error_reply(500), "500", 10.0),
        (error_reply(503, {"retry-after": "1"}), "503", 1.0),
        (error_reply(429, {"retry-after-ms": "2500"}), "429", 2.5),
        (Fail(FailureKind.CONNECTION), "connection", 10.0),
        (json_reply(chat_body(), breaks_after=0), "broken", 10.0),
    ],
)
async def test_a_failing_primary_fails_over_invisibly_and_is_probed_again_once_its_trip_ends(
    harness: GatewayHarness, failure: Reply | Fail, reason: str, trip_s: float
) -> None:
    key = harness.consumer("app", tpm=100_000)
    harness.upstream.script("uksouth-ptu", failure)
    response = await harness.post(CHAT, key, BODY)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
    assert response.headers["x-gateway-backend"] in SECONDARIES and response.headers["x-gateway-attempts"] == "2"
    assert harness.telemetry.failovers == [("uksouth-ptu", response.headers["x-gateway-backend"], reason)]
    assert [(s.backend_id, s.number, s.status, s.error) for s in harness.telemetry.traces[-1].attempts] == [
        ("uksouth-ptu", 1, None if isinstance(failure, Fail) else failure.status,
         failure.kind.value if isinstance(failure, Fail) else None),
        (response.headers["x-gateway-backend"], 2, 200, None),
    ]
    health = (await harness.http.get("/health/details", headers=ADMIN_HEADERS)).json()
    assert state(health, "uksouth-ptu")["state"] == "open"
    assert state(health, "uksouth-ptu")["recovers_in_s"] == pytest.approx(trip_s)

    harness.clock.advance(trip_s - 0.01)
    assert (await harness.post(CHAT, key, BODY)).headers["x-gateway-backend"] in SECONDARIES
    harness.clock.advance(0.02)  # the trip is over: the next request probes the PTU and finds it healthy
    assert (await harness.post(CHAT, key, BODY)).headers["x-gateway-backend"] == "uksouth-ptu"
    assert ("uksouth-ptu", "closed") in harness.telemetry.transitions


async def test_a_timeout_fails_over_invisibly_but_one_callers_timeouts_leave_the_breaker_closed(
    harness: GatewayHarness,
) -> None:
    # Timeouts trip a breaker only as a rate across callers (issue 13): one caller's long generations cannot take a
    # region out. Three timeouts from two consumers within the interval do.
    keys = [harness.consumer("slow-a", tpm=100_000), harness.consumer("slow-b", tpm=100_000)]
    for key in (keys[0], keys[0], keys[1]):
        harness.upstream.script("uksouth-ptu", Fail(FailureKind.TIMEOUT))
        response = await harness.post(CHAT, key, BODY)
        assert response.status_code == 200 and response.headers["x-gateway-attempts"] == "2"
        health = (await harness.http.get("/health/details", headers=ADMIN_HEADERS)).json()
        if key is keys[0]:
            assert state(health, "uksouth-ptu")["state"] == "closed"
    assert state(health, "uksouth-ptu")["state"] == "open"


async def test_a_whole_answer_that_breaks_off_fails_over_and_the_broken_attempts_prompt_is_charged(
    harness: GatewayHarness,
) -> None:
    key = harness.consumer("cut-whole", tpm=100_000)
    harness.upstream.script("uksouth-ptu", json_reply(chat_body(), breaks_after=0))
    response = await harness.post(CHAT, key, BODY)
    answer = response.json()["usage"]["total_tokens"]
    assert response.status_code == 200 and response.headers["x-gateway-attempts"] == "2"
    # Charged: what the answer used, plus the prompt the broken attempt was billed for; the header says the same.
    assert int(response.headers["x-gateway-tokens-consumed"]) == answer + PROMPT
    assert await harness.charged("cut-whole") == answer + PROMPT
    assert sum(r.total for r in await harness.usage_rows("cut-whole")) == answer + PROMPT
    # Emitted: the broken attempt's prompt under its own backend, the answer under the one that gave it.
    assert [(r.backend_id, r.status, r.usage.total if r.usage else None) for r in harness.telemetry.spent] == [
        ("uksouth-ptu", 502, PROMPT)
    ]
    assert harness.telemetry.tokens_emitted() == answer + PROMPT


async def test_every_backend_throttled_gives_429_with_the_soonest_recovery(harness: GatewayHarness) -> None:
    for backend_id, seconds in zip(("uksouth-ptu", "swedencentral", "francecentral"), (20, 7, 12), strict=True):
        harness.upstream.script(backend_id, error_reply(429, {"retry-after": str(seconds)}))
    with pytest.raises(openai.RateLimitError) as caught:
        await harness.openai(harness.consumer("app")).chat.completions.create(model=MINI, messages=MESSAGES)
    headers = caught.value.response.headers
    assert caught.value.code == "backends_busy"
    assert headers["retry-after-ms"] == "7000" and headers["retry-after"] == "7"
    assert "openai.azure.example" not in caught.value.message
    assert ("app", MINI, "backends") in harness.telemetry.throttles
    # While every breaker is open nothing is sent; the wait shrinks as time passes.
    sent = len(harness.upstream.sent)
    harness.clock.advance(2.5)
    response = await harness.post(CHAT, harness.consumer("other"), BODY)
    assert response.status_code == 429 and response.headers["retry-after-ms"] == "4500"
    assert len(harness.upstream.sent) == sent


async def test_with_every_region_out_one_out_on_the_gateways_judgement_serves_rather_than_a_503(
    harness: GatewayHarness,
) -> None:
    """The soak's bursts of 503 (issue 24): the PTU asked for a day (a 429 with a day's Retry-After) while both
    secondaries were out too, one for a bare 429 (no wait named: the gateway chose the trip), one for a 500. Every
    breaker was open, so every request for the next seconds was refused at once, though both secondaries could serve."""
    key = harness.consumer("app", tpm=1_000_000)
    harness.upstream.script("uksouth-ptu", error_reply(429, {"retry-after": "86400"}))
    harness.upstream.script("swedencentral", error_reply(429))
    harness.upstream.script("francecentral", error_reply(500))
    first = await harness.post(CHAT, key, BODY)
    assert first.status_code == 503  # this request was refused by every region itself
    health = (await harness.http.get("/health/details", headers=ADMIN_HEADERS)).json()
    assert {state(health, b)["state"] for b in ("uksouth-ptu", *SECONDARIES)} == {"open"}
    sent = len(harness.upstream.sent)

    harness.clock.advance(0.5)
    response = await harness.post(CHAT, key, BODY)
    assert response.status_code == 200 and response.headers["x-gateway-backend"] in SECONDARIES
    tried = [s.backend_id for s in harness.upstream.sent[sent:]]
    assert tried == [response.headers["x-gateway-backend"]]  # the PTU asked for a wait: it is left be
    health = (await harness.http.get("/health/details", headers=ADMIN_HEADERS)).json()
    assert state(health, response.headers["x-gateway-backend"])["state"] == "closed"  # it served: back in rotation
    assert state(health, "uksouth-ptu")["state"] == "open"


async def test_a_last_resort_that_fails_again_stays_out_and_the_request_ends_as_before(harness: GatewayHarness) -> None:
    key = harness.consumer("app", tpm=1_000_000)
    harness.upstream.script("uksouth-ptu", error_reply(429, {"retry-after": "30"}))
    harness.upstream.script("swedencentral", error_reply(503, {"retry-after": "30"}))
    harness.upstream.script("francecentral", error_reply(500), error_reply(500))
    assert (await harness.post(CHAT, key, BODY)).status_code == 503
    sent = len(harness.upstream.sent)
    response = await harness.post(CHAT, key, BODY)
    # Only francecentral was out on the gateway's judgement: tried once more, it failed again, and the request gets
    # the answer it would have had; the regions that asked for 30 s were not contacted.
    assert response.status_code == 503 and [s.backend_id for s in harness.upstream.sent[sent:]] == ["francecentral"]
    # Failed again while out: no last resort until its trip (10 s) is over, so a region that is really down is not
    # sent every request; the next ones are refused at once, as before.
    harness.clock.advance(1.0)
    refused = await harness.post(CHAT, key, BODY)
    assert refused.status_code == 503 and len(harness.upstream.sent) == sent + 1
    harness.clock.advance(9.0)  # its trip is over: an ordinary half-open probe, which the default answer passes
    assert (await harness.post(CHAT, key, BODY)).headers["x-gateway-backend"] == "francecentral"


async def test_a_429_asking_for_a_day_trips_for_the_capped_time() -> None:
    harness = GatewayHarness(one_region(breaker={"trip_s": 0.2, "max_trip_s": 300}))
    try:
        harness.upstream.script("only", error_reply(429, {"retry-after": "86400"}))
        response = await harness.post(CHAT, harness.consumer(), BODY)
        assert response.status_code == 429 and response.json()["error"]["code"] == "backends_busy"
        assert response.headers["retry-after"] == "300"
        assert state((await harness.http.get("/health/details", headers=ADMIN_HEADERS)).json(), "only")["state"] == "open"
    finally:
        await harness.close()


async def test_a_bare_429_trips_for_the_configured_time() -> None:
    harness = GatewayHarness(one_region(breaker={"trip_s": 0.2, "max_trip_s": 300}))
    try:
        key = harness.consumer()
        harness.upstream.script("only", error_reply(429))
        response = await harness.post(CHAT, key, BODY)
        assert response.status_code == 429 and response.headers["retry-after-ms"] == "200"
        harness.clock.advance(0.2)
        assert (await harness.post(CHAT, key, BODY)).status_code == 200
    finally:
        await harness.close()


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (Fail(FailureKind.CONNECTION), 502, "backend_unreachable"),
        (Fail(FailureKind.TIMEOUT), 504, "backend_timeout"),
        (json_reply(chat_body(), breaks_after=0), 502, "backend_error"),
        (error_reply(500), 503, "service_unavailable"),
    ],
)
async def test_with_no_other_region_the_failure_is_mapped_and_the_next_request_succeeds(
    failure: Reply | Fail, status: int, code: str
) -> None:
    harness = GatewayHarness(one_region(breaker={"trip_s": 0.2}))
    try:
        key = harness.consumer("alone", tpm=100_000)
        harness.upstream.script("only", failure)
        response = await harness.post(CHAT, key, BODY)
        assert response.status_code == status and response.json()["error"]["code"] == code
        assert "openai.azure.example" not in response.text and "backend-key" not in response.text
        record = harness.telemetry.requests[-1]
        assert (record.status, record.deployment, record.consumer_id) == (status, MINI, "alone")
        harness.clock.advance(0.2)
        assert (await harness.post(CHAT, key, BODY)).status_code == 200
        # A body that broke off was billed by the backend (its prompt): charged. A request that timed out may still be
        # generating, up to its cap: its reservation is not refunded (issue 13). Nothing else was charged.
        broken = {"backend_error": PROMPT, "backend_timeout": PROMPT + BODY["max_tokens"]}.get(code, 0)
        answer = harness.telemetry.requests[-1].usage
        assert answer is not None
        assert await harness.charged("alone") == broken + answer.total
    finally:
        await harness.close()


async def test_a_200_with_malformed_json_is_502_and_charged_the_prompt() -> None:
    harness = GatewayHarness(one_region())
    try:
        harness.upstream.script("only", json_reply(b'{"choices": [{"mess'))
        response = await harness.post(CHAT, harness.consumer("malformed", tpm=100_000), BODY)
        assert response.status_code == 502 and response.json()["error"]["code"] == "backend_malformed_response"
        assert await harness.charged("malformed") == PROMPT
        record = harness.telemetry.requests[-1]
        assert record.status == 502 and record.usage is not None and record.usage.total == PROMPT
        assert not record.usage.reported
    finally:
        await harness.close()


@pytest.mark.parametrize("status", [401, 403])
async def test_a_backend_refusing_the_gateways_credential_is_502(status: int) -> None:
    harness = GatewayHarness(one_region())
    try:
        harness.upstream.script("only", error_reply(status))
        response = await harness.post(CHAT, harness.consumer(), BODY)
        assert response.status_code == 502 and response.json()["error"]["code"] == "backend_auth_failed"
    finally:
        await harness.close()


async def test_a_client_error_from_the_backend_is_passed_through_and_not_retried(harness: GatewayHarness) -> None:
    harness.upstream.script("uksouth-ptu", error_reply(400, code="context_length_exceeded"))
    response = await harness.post(CHAT, harness.consumer(), BODY)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert len(harness.upstream.sent) == 1 and harness.telemetry.failovers == []


async def test_max_attempts_bounds_the_failover() -> None:
    harness = GatewayHarness(three_regions(), {"GATEWAY_MAX_ATTEMPTS": "2"})
    try:
        for backend_id in ("uksouth-ptu", "swedencentral", "francecentral"):
            harness.upstream.script(backend_id, error_reply(500))
        response = await harness.post(CHAT, harness.consumer(), BODY)
        assert response.status_code == 503 and len(harness.upstream.sent) == 2
    finally:
        await harness.close()


async def test_ptu_first_then_an_even_split_over_equal_secondaries(harness: GatewayHarness) -> None:
    key = harness.consumer()
    harness.upstream.script("uksouth-ptu", error_reply(429, {"retry-after": "60"}))
    served = [(await harness.post(CHAT, key, BODY)).headers["x-gateway-backend"] for _ in range(20)]
    assert set(served) == set(SECONDARIES)
    assert served.count("swedencentral") == served.count("francecentral") == 10
    assert len(harness.upstream.to("uksouth-ptu")) == 1  # its breaker honoured Retry-After: one wasted round trip


@pytest.mark.parametrize("after_a_timeout", [False, True])
async def test_a_request_cancelled_once_sent_is_charged_its_reservation_like_a_timeout(
    harness: GatewayHarness, after_a_timeout: bool
) -> None:
    """The client left (or the host cancelled the call) while the backend was generating: the backend bills it, up to
    its cap, so its reservation is not refunded (issue 24: it was, in full)."""
    key = harness.consumer("leaver", tpm=100_000)
    body = {**BODY, "max_tokens": 300}
    if after_a_timeout:
        harness.upstream.script("uksouth-ptu", Fail(FailureKind.TIMEOUT))  # first a timeout, then the stall elsewhere
        for region in SECONDARIES:
            harness.upstream.script(region, json_reply(chat_body(), stalls_after=0))
    else:
        harness.upstream.script("uksouth-ptu", json_reply(chat_body(), stalls_after=0))
    gateway = await harness.gateway()
    call = asyncio.create_task(gateway.handle(gateway_request("POST", CHAT, key, body)))
    for _ in range(100):
        await asyncio.sleep(0)
    assert harness.upstream.sent and not call.done()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await harness.charged("leaver") == PROMPT + 300


async def test_a_request_cancelled_before_it_was_sent_is_not_charged(harness: GatewayHarness) -> None:
    key = harness.consumer("early-leaver", tpm=100_000)
    gateway = await harness.gateway()
    call = asyncio.create_task(gateway.handle(gateway_request("POST", CHAT, key, BODY)))
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert not harness.upstream.sent and await harness.charged("early-leaver") == 0
