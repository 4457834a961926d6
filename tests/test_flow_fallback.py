"""The request flow in-process, across models: a request falls back to the next deployment of its chain only when every
region of the current one was throttled, open or failed for it, before any byte reached the client; an answer (a 4xx
included) is never routed around; the books, metrics and log follow the deployment that served."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import openai
import pytest

from shared.admin.cli import Admin, parser
from shared.flow.tokens import count_chat_prompt, encoding_for
from shared.limits.ledger import deployment_scope
from shared.outcomes import FailureKind
from shared.records.cache import CachePolicy
from shared.storage.memory import MemoryConsumerStore
from tests.fakes.gateway import ADMIN_HEADERS, GatewayHarness
from tests.fakes.upstream import Fail, Reply, chat_body, error_reply, json_reply, stream_reply

DEPLOYMENTS = ["gpt-4.1", "gpt-4o", "o3-mini", "text-embedding-3-small", "text-embedding-3-large"]
REGIONS = ("uksouth", "swedencentral")
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Write a haiku about fallbacks."}]
PROMPT = count_chat_prompt({"messages": MESSAGES}, encoding_for("gpt-4.1"))
BUSY = error_reply(429, {"retry-after": "7"}, code="429")
CATALOG = {
    "gpt-4.1": {"fallback": ["gpt-4o"], "context_window": 1_000_000},
    "gpt-4o": {"fallback": ["o3-mini"], "context_window": 128_000, "max_output_tokens": 16_384},
    "o3-mini": {"family": "reasoning", "context_window": 200_000},
    "text-embedding-3-large": {"fallback": ["text-embedding-3-small"]},
}


def regions(**options: Any) -> list[dict[str, Any]]:
    return [
        {"id": region, "endpoint": f"https://{region}.openai.azure.example", "region": region, "priority": i + 1,
         "api_key": f"backend-key-{region}", "deployments": DEPLOYMENTS, **options}
        for i, region in enumerate(REGIONS)
    ]


def make(catalog: dict[str, Any] | None = None, aliases: dict[str, Any] | None = None, **env: str) -> GatewayHarness:
    return GatewayHarness(regions(), env={
        "GATEWAY_DEPLOYMENTS": json.dumps(CATALOG if catalog is None else catalog),
        "GATEWAY_ALIASES": json.dumps(aliases or {"chat": ["gpt-4.1", "gpt-4o"]}),
        **env,
    })


@pytest.fixture
async def fb() -> Any:
    harness = make()
    yield harness
    await harness.close()


def throttle(harness: GatewayHarness, *steps: Reply | Fail) -> None:
    """Every region answers these to its next requests."""
    for region in REGIONS:
        harness.upstream.script(region, *(steps or (BUSY,)))


def deployments_sent(harness: GatewayHarness) -> list[tuple[str, str]]:
    return [(s.backend_id, s.path.split("/deployments/")[1].split("/")[0]) for s in harness.upstream.sent]


async def test_every_region_throttled_falls_back_to_the_next_deployment_invisibly(fb: GatewayHarness) -> None:
    key = fb.consumer("app", tpm=100_000, deployment_tpm={"gpt-4.1": 50_000, "gpt-4o": 50_000})
    throttle(fb)
    client = fb.openai(key)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4.1", messages=MESSAGES, max_tokens=20)  # type: ignore[arg-type]
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert raw.headers["x-gateway-deployment"] == "gpt-4o" and raw.headers["x-gateway-backend"] == "uksouth"
    assert deployments_sent(fb) == [("uksouth", "gpt-4.1"), ("swedencentral", "gpt-4.1"), ("uksouth", "gpt-4o")]
    assert fb.telemetry.model_fallbacks == [("gpt-4.1", "gpt-4o", "BackendsBusy")]
    (record,) = fb.telemetry.requests
    assert (record.deployment, record.requested, record.step, record.status) == ("gpt-4o", "gpt-4.1", 1, 200)
    # The books: the deployment that served holds the whole charge; the one left holds nothing.
    assert record.usage is not None and record.usage.completion == 20
    total = record.usage.total
    assert await fb.charged("app") == total
    assert await fb.charged("app", deployment_scope("gpt-4o")) == total
    assert await fb.charged("app", deployment_scope("gpt-4.1")) == 0
    assert {(row.deployment, row.total) for row in await fb.usage_rows("app")} == {("gpt-4o", total)}


async def test_a_stream_falls_back_before_its_first_byte(fb: GatewayHarness) -> None:
    key = fb.consumer("app", tpm=100_000)
    throttle(fb, error_reply(503, {"retry-after": "3"}))
    stream = await fb.openai(key).chat.completions.create(
        model="gpt-4.1", messages=MESSAGES, max_tokens=12, stream=True  # type: ignore[arg-type]
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text and [d for _, d in deployments_sent(fb)] == ["gpt-4.1", "gpt-4.1", "gpt-4o"]
    assert fb.telemetry.requests[-1].deployment == "gpt-4o" and fb.telemetry.requests[-1].stream
    served = fb.telemetry.requests[-1].usage
    assert served is not None and served.completion == 12 and await fb.charged("app") == served.total


@pytest.mark.parametrize(
    "answer",
    [
        error_reply(400, code="content_filter"),
        error_reply(400, code="context_length_exceeded"),
        error_reply(404, code="DeploymentNotFound"),
        error_reply(422, code="invalid_value"),
    ],
)
async def test_a_backend_4xx_is_the_answer_never_routed_around(fb: GatewayHarness, answer: Reply) -> None:
    key = fb.consumer("app", tpm=100_000)
    fb.upstream.script("uksouth", answer)
    response = await fb.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES})
    assert response.status_code == answer.status
    assert response.json() == json.loads(answer.body or b"")
    assert deployments_sent(fb) == [("uksouth", "gpt-4.1")] and fb.telemetry.model_fallbacks == []
    assert response.headers["x-gateway-deployment"] == "gpt-4.1"


async def test_a_region_with_room_keeps_the_request_on_its_deployment(fb: GatewayHarness) -> None:
    key = fb.consumer("app")
    fb.upstream.script("uksouth", BUSY)
    response = await fb.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES})
    assert response.status_code == 200 and response.headers["x-gateway-deployment"] == "gpt-4.1"
    assert deployments_sent(fb) == [("uksouth", "gpt-4.1"), ("swedencentral", "gpt-4.1")]


async def test_a_reasoning_fallback_gets_max_completion_tokens_and_no_sampling_parameters(fb: GatewayHarness) -> None:
    key = fb.consumer("app")
    throttle(fb)  # gpt-4o's regions: o3-mini serves
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 30, "temperature": 0.3, "top_p": 0.9, "seed": 1}
    response = await fb.post(CHAT, key, body)
    assert response.status_code == 200 and response.headers["x-gateway-deployment"] == "o3-mini"
    sent = fb.upstream.sent
    assert json.loads(sent[0].body) == body  # the requested deployment gets the body as written
    assert json.loads(sent[-1].body) == {"model": "gpt-4o", "messages": MESSAGES, "max_completion_tokens": 30, "seed": 1}
    assert fb.telemetry.requests[-1].step == 1


async def test_a_chain_is_walked_through_fallbacks_of_fallbacks(fb: GatewayHarness) -> None:
    key = fb.consumer("app")
    throttle(fb, BUSY, BUSY)
    response = await fb.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES, "max_tokens": 10})
    assert response.headers["x-gateway-deployment"] == "o3-mini"
    assert [d for _, d in deployments_sent(fb)] == ["gpt-4.1", "gpt-4.1", "gpt-4o", "gpt-4o", "o3-mini"]
    assert fb.telemetry.requests[-1].step == 2
    assert [(f, t) for f, t, _ in fb.telemetry.model_fallbacks] == [("gpt-4.1", "gpt-4o"), ("gpt-4o", "o3-mini")]


async def test_a_prompt_too_large_for_a_fallbacks_window_skips_it() -> None:
    harness = make({"gpt-4.1": {"fallback": ["gpt-4o", "o3-mini"]}, "gpt-4o": {"context_window": PROMPT + 50},
                    "o3-mini": {"family": "reasoning"}})
    try:
        key = harness.consumer("app")
        throttle(harness)
        response = await harness.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES, "max_tokens": 51})
        assert response.status_code == 200 and response.headers["x-gateway-deployment"] == "o3-mini"
        assert "gpt-4o" not in {d for _, d in deployments_sent(harness)}
        assert harness.telemetry.model_fallbacks == [("gpt-4.1", "o3-mini", "BackendsBusy")]
        # Exactly at the window it fits.
        harness.clock.advance(7)
        throttle(harness)
        response = await harness.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES, "max_tokens": 50})
        assert response.headers["x-gateway-deployment"] == "gpt-4o"
    finally:
        await harness.close()


async def test_an_output_above_a_fallbacks_maximum_skips_it(fb: GatewayHarness) -> None:
    key = fb.consumer("app")
    throttle(fb)
    response = await fb.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES, "max_tokens": 16_385})
    # gpt-4o takes at most 16,384: passed over; its own fallback, next in the chain, serves.
    assert response.status_code == 200 and response.headers["x-gateway-deployment"] == "o3-mini"
    assert [d for _, d in deployments_sent(fb)] == ["gpt-4.1", "gpt-4.1", "o3-mini"]


async def test_a_consumer_with_fallback_off_gets_the_429_with_the_true_retry_after(fb: GatewayHarness) -> None:
    key = fb.consumer("strict", tpm=100_000, fallback=False)
    throttle(fb)
    with pytest.raises(openai.RateLimitError) as raised:
        await fb.openai(key).chat.completions.create(model="gpt-4.1", messages=MESSAGES, max_tokens=5)  # type: ignore[arg-type]
    assert raised.value.response.headers["retry-after"] == "7"
    assert raised.value.code == "backends_busy"
    assert {d for _, d in deployments_sent(fb)} == {"gpt-4.1"} and fb.telemetry.model_fallbacks == []
    assert await fb.charged("strict") == 0


async def test_a_consumer_falls_back_only_to_deployments_it_may_use(fb: GatewayHarness) -> None:
    key = fb.consumer("narrow", deployments=["gpt-4.1", "text-embedding-3-small"])
    throttle(fb)
    response = await fb.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES})
    assert response.status_code == 429 and {d for _, d in deployments_sent(fb)} == {"gpt-4.1"}
    models = (await fb.http.get("/v1/models", headers={"api-key": key})).json()["data"]
    assert [m["id"] for m in models] == ["gpt-4.1", "text-embedding-3-small", "chat"]
    # Allowed o3-mini but not gpt-4o: the chain goes on past gpt-4o to o3-mini.
    other = fb.consumer("other", deployments=["gpt-4.1", "o3-mini"])
    fb.clock.advance(7)
    throttle(fb)
    response = await fb.post(CHAT, other, {"model": "gpt-4.1", "messages": MESSAGES})
    assert response.headers["x-gateway-deployment"] == "o3-mini"
    assert "gpt-4o" not in {d for _, d in deployments_sent(fb)}


async def test_the_retry_after_of_a_chain_that_is_all_busy_is_the_soonest_deployments(fb: GatewayHarness) -> None:
    key = fb.consumer("app")
    for region in REGIONS:
        fb.upstream.script(region, error_reply(429, {"retry-after": "20"}), error_reply(429, {"retry-after": "9"}),
                           error_reply(429, {"retry-after": "30"}))
    response = await fb.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES})
    assert response.status_code == 429 and response.headers["retry-after"] == "9"
    assert [d for _, d in deployments_sent(fb)] == ["gpt-4.1"] * 2 + ["gpt-4o"] * 2 + ["o3-mini"] * 2
    # A client that waits that long is served (gpt-4o's regions are back).
    fb.clock.advance(9)
    response = await fb.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES})
    assert response.status_code == 200 and response.headers["x-gateway-deployment"] == "gpt-4o"


async def test_open_breakers_send_the_request_on_without_an_attempt(fb: GatewayHarness) -> None:
    key = fb.consumer("app")
    throttle(fb)
    await fb.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES})  # trips both gpt-4.1 breakers for 7 s
    fb.upstream.sent.clear()
    response = await fb.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES})
    assert response.headers["x-gateway-deployment"] == "gpt-4o" and deployments_sent(fb) == [("uksouth", "gpt-4o")]
    health = (await fb.http.get("/health/details", headers=ADMIN_HEADERS)).json()
    assert health["backends"][0]["deployments"]["gpt-4.1"]["state"] == "open"


@pytest.mark.parametrize("failure", [Fail(FailureKind.CONNECTION), error_reply(500), error_reply(401)])
async def test_failed_regions_fall_back_too(fb: GatewayHarness, failure: Reply | Fail) -> None:
    key = fb.consumer("app")
    throttle(fb, failure)
    response = await fb.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES})
    assert response.status_code == 200 and response.headers["x-gateway-deployment"] == "gpt-4o"


async def test_a_timeout_past_the_replays_never_falls_back() -> None:
    harness = make(GATEWAY_TIMEOUT_REPLAYS="0")
    try:
        key = harness.consumer("app", tpm=100_000)
        throttle(harness, Fail(FailureKind.TIMEOUT))
        response = await harness.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES, "max_tokens": 10})
        assert response.status_code == 504 and deployments_sent(harness) == [("uksouth", "gpt-4.1")]
        # What it was charged is kept (the backend may still be generating it), at the deployment it was sent to.
        assert await harness.charged("app") == PROMPT + 10
    finally:
        await harness.close()


async def test_max_attempts_below_the_regions_never_falls_back() -> None:
    harness = make(GATEWAY_MAX_ATTEMPTS="1")
    try:
        key = harness.consumer("app")
        throttle(harness)
        response = await harness.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES})
        assert response.status_code == 429 and deployments_sent(harness) == [("uksouth", "gpt-4.1")]
    finally:
        await harness.close()


async def test_a_broken_attempt_is_charged_to_the_deployment_that_spent_it(fb: GatewayHarness) -> None:
    key = fb.consumer("app", tpm=100_000, deployment_tpm={"gpt-4.1": 50_000, "gpt-4o": 50_000})
    throttle(fb, json_reply(chat_body(), breaks_after=0))
    response = await fb.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES, "max_tokens": 10})
    assert response.status_code == 200 and response.headers["x-gateway-deployment"] == "gpt-4o"
    served = fb.telemetry.requests[-1].usage
    assert served is not None
    assert await fb.charged("app", deployment_scope("gpt-4.1")) == 2 * PROMPT  # two regions billed the prompt
    assert await fb.charged("app", deployment_scope("gpt-4o")) == served.total
    assert await fb.charged("app") == 2 * PROMPT + served.total
    rows = {row.deployment: row.total for row in await fb.usage_rows("app")}
    assert rows == {"gpt-4.1": 2 * PROMPT, "gpt-4o": served.total}
    assert {r.deployment for r in fb.telemetry.spent if r.status == 502} == {"gpt-4.1"}


async def test_a_full_per_deployment_limit_at_the_fallback_keeps_the_first_refusal(fb: GatewayHarness) -> None:
    key = fb.consumer("app", tpm=100_000, deployment_tpm={"gpt-4o": 10, "o3-mini": 10})  # nothing fits there
    throttle(fb)
    response = await fb.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES})
    assert response.status_code == 429 and response.json()["error"]["code"] == "backends_busy"
    assert response.headers["retry-after"] == "7"
    assert {d for _, d in deployments_sent(fb)} == {"gpt-4.1"}
    assert await fb.charged("app") == 0


async def test_embeddings_never_fall_back_to_another_model(fb: GatewayHarness) -> None:
    key = fb.consumer("app")
    throttle(fb)
    response = await fb.post("/v1/embeddings", key, {"model": "text-embedding-3-large", "input": "x"})
    assert response.status_code == 429
    assert {d for _, d in deployments_sent(fb)} == {"text-embedding-3-large"}


async def test_an_alias_is_listed_resolved_to_its_first_deployment_and_falls_back_along_its_list(
    fb: GatewayHarness,
) -> None:
    key = fb.consumer("app")
    models = (await fb.http.get("/v1/models", headers={"api-key": key})).json()["data"]
    assert [m["id"] for m in models] == [*sorted(DEPLOYMENTS), "chat"]
    response = await fb.post(CHAT, key, {"model": "chat", "messages": MESSAGES})
    assert response.status_code == 200 and response.headers["x-gateway-deployment"] == "gpt-4.1"
    assert fb.telemetry.requests[-1].requested == "chat" and fb.telemetry.requests[-1].step == 0
    throttle(fb)
    response = await fb.post("/openai/deployments/chat/chat/completions?api-version=2024-10-21", key,
                             {"messages": MESSAGES})
    assert response.status_code == 200 and response.headers["x-gateway-deployment"] == "gpt-4o"


async def test_an_alias_passes_over_a_deployment_with_every_region_open_even_without_fallback(
    fb: GatewayHarness,
) -> None:
    strict = fb.consumer("strict", fallback=False)
    throttle(fb)
    response = await fb.post(CHAT, strict, {"model": "chat", "messages": MESSAGES})
    assert response.status_code == 429  # attempted at gpt-4.1: no fallback for this consumer
    fb.upstream.sent.clear()
    response = await fb.post(CHAT, strict, {"model": "chat", "messages": MESSAGES})  # gpt-4.1 open: resolved past it
    assert response.status_code == 200 and response.headers["x-gateway-deployment"] == "gpt-4o"
    assert deployments_sent(fb) == [("uksouth", "gpt-4o")]


async def test_an_alias_of_deployments_the_key_may_not_use_does_not_exist_for_it(fb: GatewayHarness) -> None:
    key = fb.consumer("embedder", deployments=["text-embedding-3-small"])
    response = await fb.post(CHAT, key, {"model": "chat", "messages": MESSAGES})
    assert response.status_code == 404 and response.json()["error"]["code"] == "DeploymentNotFound"
    models = (await fb.http.get("/v1/models", headers={"api-key": key})).json()["data"]
    assert [m["id"] for m in models] == ["text-embedding-3-small"]


async def test_many_concurrent_fallbacks_keep_the_books_exact(fb: GatewayHarness) -> None:
    key = fb.consumer("app", tpm=1_000_000, deployment_tpm={"gpt-4.1": 500_000, "gpt-4o": 500_000})
    throttle(fb)  # gpt-4.1's regions trip: the first requests fall back after attempts, the others at once
    bodies = [{"model": "gpt-4.1", "messages": MESSAGES, "max_tokens": 1 + i % 7} for i in range(40)]
    responses = await asyncio.gather(*(fb.post(CHAT, key, body) for body in bodies))
    assert all(r.status_code == 200 for r in responses)
    served = [r.usage.total for r in fb.telemetry.requests if r.usage is not None]
    by_deployment = {d: sum(r.usage.total for r in fb.telemetry.requests if r.deployment == d and r.usage)
                     for d in ("gpt-4.1", "gpt-4o")}
    assert by_deployment["gpt-4o"] > 0
    assert await fb.charged("app") == sum(served)
    for deployment, total in by_deployment.items():
        assert await fb.charged("app", deployment_scope(deployment)) == total


async def test_the_admin_cli_turns_a_consumers_fallback_off_and_on_again() -> None:
    store = MemoryConsumerStore()
    admin = Admin(store, io.StringIO())  # type: ignore[arg-type]
    assert await admin.create(parser().parse_args(["consumers", "create", "strict", "--all-deployments",
                                                   "--fallback", "off"])) == 0
    assert (await store.get("strict")).fallback is False  # type: ignore[union-attr]
    await admin.update(parser().parse_args(["consumers", "set", "strict", "--tpm", "5"]))
    assert (await store.get("strict")).fallback is False  # type: ignore[union-attr]  # untouched unless named
    await admin.update(parser().parse_args(["consumers", "set", "strict", "--fallback", "on"]))
    assert (await store.get("strict")).fallback is True  # type: ignore[union-attr]
    assert await admin.create(parser().parse_args(["consumers", "create", "plain", "--all-deployments"])) == 0
    assert (await store.get("plain")).fallback is True  # type: ignore[union-attr]
    with pytest.raises(SystemExit):
        parser().parse_args(["consumers", "set", "plain", "--fallback", "never"])


async def test_an_answer_from_a_fallback_is_never_kept_in_the_cache_under_the_deployment_asked_for() -> None:
    harness = make()
    try:
        shared = CachePolicy(enabled=True, scope="gateway")
        tolerant = harness.consumer("tolerant", cache=shared)
        strict = harness.consumer("strict", cache=shared, fallback=False)
        body = {"model": "gpt-4.1", "messages": MESSAGES, "temperature": 0}
        throttle(harness)
        first = await harness.post(CHAT, tolerant, body)
        assert first.headers["x-gateway-deployment"] == "gpt-4o" and first.headers["x-gateway-cache"] == "miss"
        harness.clock.advance(7)  # gpt-4.1's regions are back
        second = await harness.post(CHAT, strict, body)
        assert second.headers["x-gateway-cache"] == "miss" and second.headers["x-gateway-deployment"] == "gpt-4.1"
        third = await harness.post(CHAT, tolerant, body)  # what gpt-4.1 itself answered is kept, and served
        assert third.headers["x-gateway-cache"] == "hit"
        assert third.content == second.content
    finally:
        await harness.close()


async def test_a_stream_that_breaks_after_its_first_byte_never_falls_back(fb: GatewayHarness) -> None:
    key = fb.consumer("app", tpm=100_000)
    fb.upstream.script("uksouth", stream_reply(20, breaks_after=3))
    response = await fb.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES, "stream": True})
    assert response.status_code == 200 and response.headers["x-gateway-deployment"] == "gpt-4.1"
    assert '"error"' in response.text  # the break is told in the stream, as a stream cut without fallback is
    assert deployments_sent(fb) == [("uksouth", "gpt-4.1")] and fb.telemetry.model_fallbacks == []


async def test_a_responses_call_falls_back_translated_for_a_reasoning_model(fb: GatewayHarness) -> None:
    key = fb.consumer("app", tpm=100_000)
    throttle(fb)  # gpt-4o's regions: its fallback o3-mini serves
    usage = {"input_tokens": 9, "output_tokens": 4, "total_tokens": 13, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens_details": {"reasoning_tokens": 0}}
    fb.upstream.script("uksouth", json_reply(json.dumps({
        "id": "resp_o3", "object": "response", "model": "o3-mini-2025-01-31", "status": "completed", "store": False,
        "output": [], "usage": usage}).encode()))
    body = {"model": "gpt-4o", "input": "Hello", "temperature": 0.2, "max_output_tokens": 30, "store": False}
    response = await fb.post("/v1/responses", key, body)
    assert response.status_code == 200 and response.headers["x-gateway-deployment"] == "o3-mini"
    assert response.json()["model"] == "o3-mini-2025-01-31"  # the backend's
    sent = json.loads(fb.upstream.sent[-1].body)
    assert sent == {"model": "o3-mini", "input": "Hello", "max_output_tokens": 30, "store": False}
    assert await fb.charged("app") == 13


async def test_spend_is_priced_at_the_deployment_that_served() -> None:
    prices = {"currency": "EUR", "deployments": {"gpt-4.1": {"input": 100, "output": 100},
                                                 "gpt-4o": {"input": 1, "output": 1}}}
    harness = make(GATEWAY_PRICES=json.dumps(prices))
    try:
        key = harness.consumer("team", budget=10.0)
        throttle(harness)
        response = await harness.post(CHAT, key, {"model": "gpt-4.1", "messages": MESSAGES, "max_tokens": 20})
        assert response.headers["x-gateway-deployment"] == "gpt-4o"
        served = harness.telemetry.requests[-1].usage
        assert served is not None
        assert harness.budgets.spent("team") == pytest.approx(served.total * 1 / 1e6)
    finally:
        await harness.close()
