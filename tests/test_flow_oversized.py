"""A request larger than a deployment's whole tokens per minute, in-process. Azure answers it with 429 and a
Retry-After of up to a day while its remaining-tokens figure shows room: a statement about the request, not the
region. It must open no breaker, must not be sent on to every region, and the client gets a clear answer."""

from __future__ import annotations

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from shared.routing.breaker import refused_for_size
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
    (200_000, 0, TOO_LARGE, False, True),  # a day's wait with room shown: the request, not the load
    (500, 0, {"retry-after": "3", "x-ratelimit-remaining-tokens": "900"}, False, True),  # room for it, yet refused
    (500, 0, {"retry-after": "3", "x-ratelimit-remaining-tokens": "100"}, False, False),  # a full window
    (500, 0, {"retry-after": "86400"}, False, False),  # nothing known of its size: a health failure, as before
    (500, 400, {"retry-after": "86400"}, False, True),  # larger than anything it ever served, and a day's wait
    (500, 400, {"retry-after": "86400"}, True, False),  # a PTU admits by utilisation, not size
    (500, 400, {"retry-after": "20"}, False, False),  # a wait within the minute: the window, not the size
    (500, 900, {"retry-after": "86400", "x-ratelimit-remaining-tokens": "0"}, False, False),  # it served larger
    (500, 0, {}, False, False),  # a bare 429
    (0, 0, TOO_LARGE, False, False),
    (500, 0, {"retry-after": "86400", "x-ratelimit-remaining-tokens": "-5"}, False, False),
    (500, 0, {"retry-after": "86400", "x-ratelimit-remaining-tokens": "1e9"}, False, False),
])
def test_which_429s_refuse_the_request_rather_than_the_region(
    tokens: int, largest: int, headers: dict[str, str], ptu: bool, expected: bool,
) -> None:
    assert refused_for_size(tokens, largest, headers, 1_700_000_000.0, ptu) is expected
