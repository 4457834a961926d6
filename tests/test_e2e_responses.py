"""The Responses API end to end: Azurite + simulated regions + gateway processes + the official openai SDK.

Both client styles, sync and async, streamed and not; usage reconciled to the token; follow-ups routed to the region
that holds the response from any gateway instance, never failed over, refused with a retryable 503 when that region
is out; a consumer touches only its own responses."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from shared.flow.responses import count_input
from shared.flow.tokens import encoding_for
from tests.conftest import unique
from tests.e2e import GatewayFactory, Simulator, Stack, wait_for
from tools import stack

pytestmark = pytest.mark.e2e
PREVIEW_VERSION = "2025-04-01-preview"
ENC = encoding_for("gpt-4o")
TOOLS: list[Any] = [{"type": "function", "name": "get_weather", "description": "The weather in a city.",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def clients(url: str, key: str) -> dict[str, openai.OpenAI]:
    return {
        "v1": openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0),
        "openai-v1": openai.OpenAI(base_url=url + "/openai/v1", api_key=key, max_retries=0),
        "azure": openai.AzureOpenAI(azure_endpoint=url, api_key=key, api_version=PREVIEW_VERSION, max_retries=0),
    }


def sim_named(e2e: Stack, backend_id: str) -> Simulator:
    return next(s for s in e2e.simulators if s.region.id == backend_id)


def requests_with(sim: Simulator, response_id: str) -> list[dict[str, Any]]:
    return [r for r in sim.requests(200) if response_id in r["path"] or response_id in str(r.get("body"))]


def recovered(e2e: Stack, url: str, backend_id: str) -> Callable[[], bool]:
    def check() -> bool:
        health = httpx.get(url + "/health/details", headers=stack.ADMIN_HEADERS, timeout=10).json()
        entry = next(b for b in health["backends"] if b["id"] == backend_id)
        return all(d["state"] != "open" for d in entry["deployments"].values())

    return check


@pytest.mark.parametrize("style", ["v1", "openai-v1", "azure"])
def test_create_with_every_client_style_charged_exactly(fresh_sims: Stack, style: str) -> None:
    e2e = fresh_sims
    consumer = unique("resp")
    client = clients(e2e.url, e2e.create_consumer(consumer, tpm=1_000_000))[style]
    body: dict[str, Any] = {"model": "gpt-4o", "input": "Tell me about the fox.", "instructions": "Be brief.",
                            "max_output_tokens": 9}
    raw = client.responses.with_raw_response.create(**body)
    first = raw.parse()
    assert first.status == "incomplete" and first.usage is not None and first.usage.output_tokens == 9
    assert first.usage.input_tokens == count_input(body, ENC)
    assert raw.headers["x-gateway-backend"] == "uksouth-ptu"
    assert raw.headers["x-gateway-tokens-consumed"] == str(first.usage.total_tokens)
    items = [{"role": "user", "content": [{"type": "input_text", "text": "What is the weather in Paris?"}]}]
    second = client.responses.create(model="gpt-4o", input=items, tools=TOOLS)  # type: ignore[arg-type]
    assert second.usage is not None and second.usage.input_tokens == count_input({"input": items, "tools": TOOLS}, ENC)
    assert e2e.charged(consumer) == first.usage.total_tokens + second.usage.total_tokens
    sent = [r for r in e2e.simulators[0].requests(10) if r["method"] == "POST" and r["path"].endswith("/responses")]
    expected_path = "/openai/responses" if style == "azure" else "/openai/v1/responses"
    assert {r["path"] for r in sent[-2:]} == {expected_path}
    assert all(r["body"]["model"] == "gpt-4o" and "stream_options" not in r["body"] for r in sent[-2:])


def test_streamed_sync_and_async_pass_every_event_and_charge_the_usage_of_response_completed(fresh_sims: Stack) -> None:
    e2e = fresh_sims
    consumer = unique("resp-stream")
    key = e2e.create_consumer(consumer, tpm=1_000_000)
    events = list(clients(e2e.url, key)["azure"].responses.create(model="gpt-4o", input="Stream a story.", stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds.count("response.output_text.delta") == 40
    usage = events[-1].response.usage  # type: ignore[union-attr]
    assert usage is not None

    async def run() -> int:
        client = openai.AsyncOpenAI(base_url=e2e.url + "/openai/v1", api_key=key, max_retries=0)
        stream = await client.responses.create(model="gpt-4o-mini", input="Stream another.", stream=True,
                                               max_output_tokens=6)
        seen = [event async for event in stream]
        whole = await client.responses.create(model="gpt-4o-mini", input=[{"role": "user", "content": "Hi"}])
        last = seen[-1].response  # type: ignore[union-attr]
        assert seen[-1].type == "response.incomplete" and last.usage is not None and whole.usage is not None
        assert "".join(e.delta for e in seen if e.type == "response.output_text.delta") == last.output_text
        return last.usage.total_tokens + whole.usage.total_tokens

    more = asyncio.run(run())
    assert e2e.charged(consumer) == usage.total_tokens + more


def test_a_stream_cut_before_response_completed_is_charged_as_chat_streams_are(fresh_sims: Stack) -> None:
    e2e = fresh_sims
    consumer = unique("resp-cut")
    key = e2e.create_consumer(consumer, tpm=1_000_000)
    e2e.simulators[0].fault("cut", after_chunks=5)
    body: dict[str, Any] = {"model": "gpt-4o", "input": "This stream will be cut."}
    deltas = 0
    with pytest.raises(openai.APIError) as caught:
        for event in clients(e2e.url, key)["v1"].responses.create(**body, stream=True):
            deltas += event.type == "response.output_text.delta"
    assert deltas == 5 and "broke off" in caught.value.message, (deltas, caught.value.message)
    assert e2e.charged(consumer) == count_input(body, ENC) + 5


def test_follow_ups_go_to_the_holder_from_any_instance(
    fresh_sims: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    e2e = fresh_sims
    key = e2e.create_consumer(unique("resp-pin"), tpm=1_000_000)
    other = gateway_factory()
    ptu = e2e.simulators[0]
    ptu.fault("503")  # the PTU region refuses once: the response is made (and stored) in a secondary region
    raw = clients(e2e.url, key)["v1"].responses.with_raw_response.create(model="gpt-4o", input="Remember this.")
    made = raw.parse()
    holder = raw.headers["x-gateway-backend"]
    assert holder != "uksouth-ptu"
    wait_for(recovered(e2e, other.url, "uksouth-ptu"))  # fresh requests would go to the PTU region again
    for style, client in clients(other.url, key).items():
        raw_next = client.responses.with_raw_response.create(
            model="gpt-4o", input=f"Continue ({style}).", previous_response_id=made.id, max_output_tokens=3)
        assert raw_next.headers["x-gateway-backend"] == holder
        assert raw_next.parse().usage.input_tokens > made.usage.input_tokens + made.usage.output_tokens  # type: ignore[union-attr]
        assert client.responses.retrieve(made.id).id == made.id
        assert [i.type for i in client.responses.input_items.list(made.id)] == ["message"]
    fresh = clients(other.url, key)["v1"].responses.with_raw_response.create(model="gpt-4o", input="New topic.")
    assert fresh.headers["x-gateway-backend"] == "uksouth-ptu"
    assert requests_with(ptu, made.id) == []  # nothing about it ever went to a region that cannot know it
    clients(other.url, key)["azure"].responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        clients(e2e.url, key)["v1"].responses.retrieve(made.id)


def test_when_the_holder_is_out_follow_ups_get_a_retryable_503_and_are_never_failed_over(
    fresh_sims: Stack,
) -> None:
    e2e = fresh_sims
    key = e2e.create_consumer(unique("resp-down"), tpm=1_000_000)
    client = clients(e2e.url, key)["v1"]
    # The session's gateway may still hold the PTU's breaker open from an earlier test (whichever ran before it).
    wait_for(recovered(e2e, e2e.url, "uksouth-ptu"))
    raw = client.responses.with_raw_response.create(model="gpt-4o", input="Keep this in the PTU region.")
    assert raw.headers["x-gateway-backend"] == "uksouth-ptu"
    made = raw.parse()
    ptu = e2e.simulators[0]
    ptu.fault("503", count=-1)
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            client.responses.create(model="gpt-4o", input="More.", previous_response_id=made.id)
        error = caught.value
        assert error.status_code == 503 and error.code == "response_backend_unavailable"
        assert "uksouth" in error.message and int(error.response.headers["retry-after"]) >= 1
        with pytest.raises(openai.InternalServerError) as again:  # the breaker is open now: refused without a call
            client.responses.retrieve(made.id)
        assert again.value.code == "response_backend_unavailable" and "circuit breaker" in again.value.message
        fresh = client.responses.with_raw_response.create(model="gpt-4o", input="Unrelated.")
        assert fresh.headers["x-gateway-backend"] != "uksouth-ptu"  # fresh requests still fail over
        for sim in e2e.simulators[1:]:
            assert requests_with(sim, made.id) == []
    finally:
        ptu.control("DELETE", "faults")
    wait_for(recovered(e2e, e2e.url, "uksouth-ptu"))
    assert client.responses.retrieve(made.id).id == made.id


def test_a_consumer_touches_only_its_own_responses(fresh_sims: Stack) -> None:
    e2e = fresh_sims
    owner = clients(e2e.url, e2e.create_consumer(unique("owner")))["v1"]
    stranger_key = e2e.create_consumer(unique("stranger"))
    stranger = clients(e2e.url, stranger_key)["v1"]
    made = owner.responses.create(model="gpt-4o", input="Mine.", background=True, metadata={"sim_background_s": "60"})

    def answers(response_id: str) -> list[tuple[int, Any]]:
        results = []
        for method, tail in (("GET", ""), ("DELETE", ""), ("GET", "/input_items"), ("POST", "/cancel")):
            r = httpx.request(method, f"{e2e.url}/v1/responses/{response_id}{tail}", timeout=10,
                              headers={"authorization": f"Bearer {stranger_key}"})
            body = r.json()
            body["error"]["message"] = body["error"]["message"].replace(response_id, "ID")
            results.append((r.status_code, body))
        r = httpx.post(f"{e2e.url}/v1/responses", timeout=10, headers={"authorization": f"Bearer {stranger_key}"},
                       json={"model": "gpt-4o", "input": "x", "previous_response_id": response_id})
        body = r.json()
        body["error"]["message"] = body["error"]["message"].replace(response_id, "ID")
        results.append((r.status_code, body))
        return results

    foreign = answers(made.id)
    assert foreign == answers("resp_" + "0" * 48)  # indistinguishable from an id that does not exist
    assert [status for status, _ in foreign] == [404, 404, 404, 404, 400]
    assert foreign[-1][1]["error"]["code"] == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        stranger.responses.cancel(made.id)
    assert owner.responses.cancel(made.id).status == "cancelled"
    assert owner.responses.retrieve(made.id).status == "cancelled"


def test_limits_and_quotas_hold_for_responses_with_max_output_tokens_in_the_estimate(fresh_sims: Stack) -> None:
    e2e = fresh_sims
    small = clients(e2e.url, e2e.create_consumer(unique("resp-small"), tpm=100))["v1"]
    with pytest.raises(openai.RateLimitError) as caught:
        small.responses.create(model="gpt-4o", input="hi", max_output_tokens=500)  # estimate + 500 > the whole limit
    assert caught.value.code == "tokens_exceed_limit"
    assert small.responses.create(model="gpt-4o", input="hi", max_output_tokens=16).usage is not None
    quota = clients(e2e.url, e2e.create_consumer(unique("resp-quota"), quota=200, quota_period="daily"))["v1"]
    with pytest.raises(openai.PermissionDeniedError) as refused:
        for _ in range(20):
            quota.responses.create(model="gpt-4o", input="Spend my quota.", max_output_tokens=16)
    assert refused.value.code == "quota_exceeded"


def test_usage_rows_and_exported_metrics_carry_the_operation(
    fresh_sims: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    from shared.telemetry import protocol as names
    from tools.capture import Capture

    e2e = fresh_sims
    capture = Capture()
    try:
        gateway = gateway_factory(extra={
            "APPLICATIONINSIGHTS_CONNECTION_STRING": capture.connection_string, "OTEL_METRIC_EXPORT_INTERVAL": "500",
        })
        consumer = unique("resp-metered")
        key = e2e.create_consumer(consumer, tpm=1_000_000)
        client = clients(gateway.url, key)
        whole = client["azure"].responses.create(model="gpt-4o-mini", input="Count me.", max_output_tokens=7)
        events = list(client["v1"].responses.create(model="gpt-4o-mini", input="Count me too.", stream=True))
        client["v1"].responses.retrieve(whole.id)
        streamed = events[-1].response.usage  # type: ignore[union-attr]
        assert whole.usage is not None and streamed is not None
        total = whole.usage.total_tokens + streamed.total_tokens
        wait_for(lambda: sum(row.total for row in e2e.usage_rows(consumer)) == total)
        rows = e2e.usage_rows(consumer)
        assert sum(r.prompt for r in rows) == whole.usage.input_tokens + streamed.input_tokens
        assert sum(r.requests for r in rows) == 2  # a follow-up spends no tokens and is no usage row
        wait_for(lambda: capture.total(names.TOTAL_TOKENS, **{names.SUBSCRIPTION_ID: consumer}) >= total)
        points = [p for p in capture.metrics(names.TOTAL_TOKENS) if p[3].get(names.SUBSCRIPTION_ID) == consumer]
        assert {(p[names.API_ID], p[names.OPERATION_ID]) for *_, p in points} == {
            ("azure-openai", "Responses_Create"), ("openai-v1", "Responses_Create")}
        assert capture.total(names.TOTAL_TOKENS, **{names.SUBSCRIPTION_ID: consumer}) == total
        wait_for(lambda: capture.total(names.GATEWAY_REQUESTS, **{names.SUBSCRIPTION_ID: consumer,
                                                                  names.OPERATION_ID: "Responses_Get"}) == 1)
    finally:
        capture.stop()


def test_a_background_response_is_settled_exactly_once_when_it_is_read_finished(
    fresh_sims: Stack, gateway_factory: GatewayFactory
) -> None:
    e2e = fresh_sims
    consumer = unique("resp-bg")
    key = e2e.create_consumer(consumer, tpm=1_000_000)
    here, there = gateway_factory.several(2)
    body: dict[str, Any] = {"model": "gpt-4o", "input": "Work on this in the background.", "background": True,
                            "metadata": {"sim_background_s": "1"}}
    raw = clients(here.url, key)["v1"].responses.with_raw_response.create(**body)
    queued = raw.parse()
    assert queued.status == "queued" and queued.usage is None
    # The gateway wrote its output cap into the create (the client gave none): the prompt and that cap hold the limits.
    assert queued.max_output_tokens is not None and queued.max_output_tokens <= 4096
    assert raw.headers["x-gateway-tokens-consumed"] == str(count_input(body, ENC) + queued.max_output_tokens)

    def finished() -> bool:
        return clients(here.url, key)["v1"].responses.retrieve(queued.id).status == "completed"

    wait_for(finished)
    # The first finished read settled it; more reads, from both instances at once, settle nothing again.
    async def read_twice() -> list[Any]:
        readers = [openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0) for url in (here.url, there.url)]
        return list(await asyncio.gather(*(r.responses.retrieve(queued.id) for r in readers)))

    done = asyncio.run(read_twice())[0]
    assert done.usage is not None and done.usage.output_tokens == 40
    # What an instance holds of the consumer's limit, and its usage rows, are returned when it stops (given time to,
    # on a loaded machine).
    here.stop(timeout_s=60)
    there.stop(timeout_s=60)
    assert e2e.charged(consumer) == done.usage.total_tokens
    total = done.usage.total_tokens
    wait_for(lambda: sum(r.total for r in e2e.usage_rows(consumer)) == total)
    assert sum(r.requests for r in e2e.usage_rows(consumer)) == 1


def test_a_finished_response_can_be_replayed_as_a_stream_from_a_sequence_number(fresh_sims: Stack) -> None:
    e2e = fresh_sims
    client = clients(e2e.url, e2e.create_consumer(unique("resp-replay")))["openai-v1"]
    made = client.responses.create(model="gpt-4o", input="Replay me.", max_output_tokens=6)
    replay = list(client.responses.retrieve(made.id, stream=True, starting_after=3))
    assert [e.sequence_number for e in replay] == list(range(4, 4 + len(replay)))
    assert replay[-1].type == "response.incomplete" and replay[-1].response.id == made.id  # type: ignore[union-attr]
    assert "".join(e.delta for e in replay if e.type == "response.output_text.delta") == made.output_text


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "gpt-4o"}, 400, "input"),
        ({"model": "gpt-4o", "input": 5}, 400, "input"),
        ({"model": "gpt-4o", "input": [{"content": "no role"}]}, 400, "input[0]"),
        ({"model": "gpt-4o", "input": "x", "max_output_tokens": -1}, 400, "max_output_tokens"),
        ({"model": "gpt-4o", "input": "x", "tools": [{"name": "no type"}]}, 400, "tools[0]"),
        ({"model": "gpt-4o", "input": "x", "previous_response_id": "../../openai/deployments"}, 400, "previous_response_id"),
        ({"model": "gpt-4o", "input": "x", "background": True, "store": False}, 400, "store"),
        ({"model": "gpt-4o", "input": "x", "conversation": {"id": "conv_1"}}, 400, "conversation"),
        ({"model": "gpt-4o", "input": "x", "stream": "yes"}, 400, "stream"),
        ({"input": "x"}, 400, "model"),
        ({"model": "no-such-deployment", "input": "x"}, 404, None),
        ({"model": "../gpt-4o", "input": "x"}, 404, None),
    ],
)
def test_bad_bodies_are_refused_before_any_backend_sees_them(
    fresh_sims: Stack, body: dict[str, Any], status: int, param: str | None
) -> None:
    e2e = fresh_sims
    key = e2e.create_consumer(unique("resp-bad"))
    response = httpx.post(f"{e2e.url}/openai/v1/responses", json=body, timeout=10, headers={"api-key": key})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert key not in response.text
    assert all(sim.stats()["requests"] == 0 for sim in e2e.simulators)


def test_follow_up_paths_and_methods(fresh_sims: Stack) -> None:
    e2e = fresh_sims
    key = e2e.create_consumer(unique("resp-paths"))
    headers = {"authorization": f"Bearer {key}"}
    cases = [
        ("PUT", "/v1/responses/resp_1", 405), ("POST", "/v1/responses/resp_1", 405), ("GET", "/v1/responses", 405),
        ("GET", "/v1/responses/resp_1/items", 404), ("GET", "/openai/responses/a%2F..%2Fb", 404),
        ("GET", "/v1/responses/" + "r" * 400, 404), ("GET", "/openai/unknown", 404),
    ]
    for method, path, status in cases:
        response = httpx.request(method, e2e.url + path, headers=headers, timeout=10)
        assert response.status_code == status, (method, path, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(e2e.url + "/v1/responses/resp_1", timeout=10).status_code == 401  # no key: no lookup at all
    assert all(sim.stats()["requests"] == 0 for sim in e2e.simulators)


def test_items_are_read_only_by_their_owner_and_where_they_are_stored_across_instances(
    fresh_sims: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    """The simulated regions answer an `item_reference` to an item they do not hold with 404, and refuse encrypted
    reasoning another region sealed, as the service does. Made in a secondary region and named through another
    gateway instance, each goes back to its region; another consumer's item is an unknown one."""
    e2e = fresh_sims
    key = e2e.create_consumer(unique("items"), tpm=1_000_000)
    stranger = e2e.create_consumer(unique("stranger"), tpm=1_000_000)
    other = gateway_factory()
    ptu = e2e.simulators[0]
    ptu.fault("503")
    raw = clients(e2e.url, key)["v1"].responses.with_raw_response.create(model="gpt-4o", input="Remember this.")
    made, holder = raw.parse(), raw.headers["x-gateway-backend"]
    assert holder != "uksouth-ptu"
    message_id = made.output[0].id
    wait_for(recovered(e2e, other.url, "uksouth-ptu"))
    reference = {"model": "gpt-4o", "input": [{"type": "item_reference", "id": message_id},
                                              {"role": "user", "content": "Go on."}]}
    mine = httpx.post(f"{other.url}/v1/responses", json=reference, timeout=30, headers={"api-key": key})
    assert mine.status_code == 200 and mine.headers["x-gateway-backend"] == holder
    theirs = httpx.post(f"{other.url}/v1/responses", json=reference, timeout=30, headers={"api-key": stranger})
    unknown = httpx.post(f"{other.url}/v1/responses", timeout=30, headers={"api-key": stranger},
                         json={**reference, "input": [{"type": "item_reference", "id": "msg_" + "0" * 48}]})
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"]["code"] == unknown.json()["error"]["code"] == "item_not_found"
    assert requests_with(ptu, message_id) == []  # never sent where it is not held

    # Unstored, with encrypted reasoning: only the region that sealed it can read it back.
    ptu.fault("503")
    first = clients(e2e.url, key)["v1"].responses.with_raw_response.create(
        model="gpt-4o", input="Think.", store=False, include=["reasoning.encrypted_content"])
    sealed_by = first.headers["x-gateway-backend"]
    assert sealed_by != "uksouth-ptu"
    reasoning = next(item for item in first.parse().output if item.type == "reasoning")
    wait_for(recovered(e2e, other.url, "uksouth-ptu"))
    follow = clients(other.url, key)["v1"].responses.with_raw_response.create(
        model="gpt-4o", store=False, include=["reasoning.encrypted_content"],
        input=[reasoning.model_dump(exclude_none=True), {"role": "user", "content": "And then?"}])  # type: ignore[list-item]
    assert follow.headers["x-gateway-backend"] == sealed_by and follow.parse().status == "completed"
