"""A request larger than a deployment's whole tokens per minute, in-process. Azure answers it with 429 and a
Retry-After of up to a day while its remaining-tokens figure shows room: a statement about the request, not the
region. It must open no breaker, must not be sent on to every region, and the client gets a clear answer."""

from __future__ import annotations

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from shared.routing.breaker import ROOM, SIZE, refusal_kind
from tests.fakes.gateway import ADMIN_HEADERS, GatewayHarness, backend
from tests.fakes.upstream import chat_body, error_reply, json_reply

MINI = "gpt-4o-mini"
CHAT = "/v1/chat/completions"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Summarise this."}]
SMALL = {"model": MINI, "messages": MESSAGES, "max_tokens": 20}
HUGE = {"model": MINI, "messages": MESSAGES, "max_tokens": 200_000}  # more than any region's minute
TOO_LARGE = {"retry-after": "86400", "retry-after-ms": "86400000", "x-ratelimit-remaining-tokens": "30000",
             "x-ratelimit-remaining-requests": "299"}
REGIONS = ("westeurope", "swedencentral", "francecentral")


@pytest.fixture
async def paygo() -> GatewayHarness:  # type: ignore[misc]
    harness = GatewayHarness([backend(r, r, 1 + i) for i, r in enumerate(REGIONS)])
    yield harness
    await harness.close()


def states(health: dict[str, object]) -> dict[str, str]:
    return {b["id"]: b["deployments"][MINI]["state"] for b in health["backends"]}  # type: ignore[attr-defined, index]


async def test_one_oversized_request_opens_no_region_and_is_told_why(paygo: GatewayHarness) -> None:
    key = paygo.consumer("app")
    for region in REGIONS:
        paygo.upstream.script(region, error_reply(429, TOO_LARGE))
    # The SDK would retry a 429 twice; the gateway tells it not to.
    client = openai.AsyncOpenAI(base_url="http://gateway.test/v1", api_key=key, max_retries=2, http_client=paygo.http)
    with pytest.raises(openai.RateLimitError) as raised:
        await client.chat.completions.create(**HUGE)
    assert raised.value.code == "tokens_exceed_backend_limit" and "200" in raised.value.message
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert [s.backend_id for s in paygo.upstream.sent] == ["westeurope"]  # once: not every region, not again
    health = (await paygo.http.get("/health/details", headers=ADMIN_HEADERS)).json()
    assert set(states(health).values()) == {"closed"}
    assert await paygo.charged("app") == 0  # Azure bills no refused call
    normal = await paygo.post(CHAT, key, SMALL)  # the same instant: served where it would have been
    assert normal.status_code == 200 and normal.headers["x-gateway-backend"] == "westeurope"


async def test_a_region_that_served_so_large_a_request_is_still_tried(paygo: GatewayHarness) -> None:
    key = paygo.consumer("app")
    # francecentral (the last choice) has a larger quota: it served a request this large before.
    paygo.upstream.script("westeurope", error_reply(503), error_reply(429, TOO_LARGE))
    paygo.upstream.script("swedencentral", error_reply(503))
    paygo.upstream.script("francecentral", json_reply(chat_body(9)), json_reply(chat_body(9)))
    assert (await paygo.post(CHAT, key, HUGE)).headers["x-gateway-backend"] == "francecentral"
    paygo.clock.advance(60)  # both trips over
    paygo.upstream.script("swedencentral", error_reply(429, TOO_LARGE))
    sent = len(paygo.upstream.sent)
    answer = await paygo.post(CHAT, key, HUGE)
    assert answer.status_code == 200 and answer.headers["x-gateway-backend"] == "francecentral"
    # swedencentral never served so much: skipped once westeurope refused the request for its size.
    assert [s.backend_id for s in paygo.upstream.sent[sent:]] == ["westeurope", "francecentral"]


async def test_a_full_window_still_trips_and_fails_over(paygo: GatewayHarness) -> None:
    key = paygo.consumer("app")
    full = {"retry-after": "7", "x-ratelimit-remaining-tokens": "0", "x-ratelimit-remaining-requests": "12"}
    paygo.upstream.script("westeurope", error_reply(429, full))
    answer = await paygo.post(CHAT, key, SMALL)
    assert answer.status_code == 200 and answer.headers["x-gateway-backend"] == "swedencentral"
    assert states((await paygo.http.get("/health/details", headers=ADMIN_HEADERS)).json())["westeurope"] == "open"


@pytest.mark.parametrize(("tokens", "largest", "headers", "ptu", "expected"), [
    (200_000, 0, TOO_LARGE, False, SIZE),  # a day's wait with room shown: the request, not the load
    (500, 0, {"retry-after": "3", "x-ratelimit-remaining-tokens": "900"}, False, ROOM),  # room for it, yet refused
    (500, 0, {"retry-after": "3", "x-ratelimit-remaining-tokens": "100"}, False, None),  # a full window
    (500, 0, {"retry-after": "86400"}, False, None),  # nothing known of its size: a health failure, as before
    (500, 400, {"retry-after": "86400"}, False, SIZE),  # larger than anything it ever served, and a day's wait
    (500, 400, {"retry-after": "86400"}, True, None),  # a PTU admits by utilisation, not size
    (500, 400, {"retry-after": "20"}, False, None),  # a wait within the minute: the window, not the size
    (500, 900, {"retry-after": "86400", "x-ratelimit-remaining-tokens": "0"}, False, None),  # it served larger
    (500, 0, {}, False, None),  # a bare 429
    (500, 0, {"retry-after": "9", "x-ratelimit-remaining-tokens": "90000", "x-ratelimit-remaining-requests": "0"},
     False, None),  # room for tokens, no requests left: the requests-per-minute limit, a statement about load
    (0, 0, TOO_LARGE, False, None),
    (500, 0, {"retry-after": "86400", "x-ratelimit-remaining-tokens": "-5"}, False, None),
    (500, 0, {"retry-after": "86400", "x-ratelimit-remaining-tokens": "1e9"}, False, None),
])
def test_what_a_429_says_about_the_request_and_the_region(
    tokens: int, largest: int, headers: dict[str, str], ptu: bool, expected: str | None,
) -> None:
    assert refusal_kind(tokens, largest, headers, 1_700_000_000.0, ptu) == expected


async def test_a_429_that_shows_room_for_the_request_opens_no_breaker_but_fails_over(paygo: GatewayHarness) -> None:
    """The region may count the request larger than the gateway does (a default output length): its 429 says nothing
    of its health, and the next region may well serve it."""
    key = paygo.consumer("app")
    paygo.upstream.script("westeurope", error_reply(429, {"retry-after": "4", "x-ratelimit-remaining-tokens": "9000",
                                                          "x-ratelimit-remaining-requests": "50"}))
    answer = await paygo.post(CHAT, key, SMALL)
    assert answer.status_code == 200 and answer.headers["x-gateway-backend"] == "swedencentral"
    assert set(states((await paygo.http.get("/health/details", headers=ADMIN_HEADERS)).json()).values()) == {"closed"}


async def test_a_requests_per_minute_429_with_tokens_to_spare_still_fails_over(paygo: GatewayHarness) -> None:
    key = paygo.consumer("app")
    rpm = {"retry-after": "9", "x-ratelimit-remaining-tokens": "90000", "x-ratelimit-remaining-requests": "0"}
    paygo.upstream.script("westeurope", error_reply(429, rpm))
    answer = await paygo.post(CHAT, key, SMALL)
    assert answer.status_code == 200 and answer.headers["x-gateway-backend"] == "swedencentral"
    assert states((await paygo.http.get("/health/details", headers=ADMIN_HEADERS)).json())["westeurope"] == "open"
