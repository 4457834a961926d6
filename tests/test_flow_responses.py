"""The Responses API in-process: the official SDK against the real edge and gateway, a scripted upstream, in-memory
stores and a fake clock. Pinned follow-ups, the state the gateway keeps, and background responses in the books."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from shared.flow.responses import count_input
from shared.flow.tokens import encoding_for
from shared.outcomes import RateLimited
from tests.fakes.gateway import GatewayHarness, gateway_request
from tests.fakes.upstream import Reply, error_reply, json_reply
from tools.simulator.responses_api import _finished, _response, stream_events

ENC = encoding_for("gpt-4o")


def response_body(response_id: str, status: str = "completed", usage: dict[str, int] | None = None, **extra: Any) -> bytes:
    return orjson.dumps({
        "id": response_id, "object": "response", "model": "gpt-4o-2024-11-20", "status": status, "store": True,
        "output": [], "usage": None if usage is None else {
            "input_tokens": usage["input"], "output_tokens": usage["output"],
            "total_tokens": usage["input"] + usage["output"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}},
        **extra,
    })


async def test_a_continuation_goes_only_to_the_holder_and_is_estimated_with_its_context(harness: GatewayHarness) -> None:
    key = harness.consumer("app", tpm=1_000_000)
    client = harness.openai(key)
    harness.upstream.script("uksouth-ptu", error_reply(503))  # made in a secondary region
    for secondary in ("swedencentral", "francecentral"):
        harness.upstream.script(secondary, json_reply(response_body("resp_first", usage={"input": 10, "output": 5})))
    made = await client.responses.with_raw_response.create(model="gpt-4o", input="Remember this.")
    holder = made.headers["x-gateway-backend"]
    first = made.parse()
    harness.clock.advance(60)  # the PTU region is back: a fresh request would go there
    body: dict[str, Any] = {"model": "gpt-4o", "input": "And then?", "previous_response_id": first.id,
                            "max_output_tokens": 20}
    harness.upstream.script(holder, json_reply(response_body("resp_next", usage={"input": 500, "output": 20})))
    before = len(harness.upstream.sent)
    raw = await client.responses.with_raw_response.create(**body)
    assert raw.headers["x-gateway-backend"] == holder and [s.backend_id for s in harness.upstream.sent[before:]] == [holder]
    record = harness.response_store.records[first.id]
    assert record.backend_id == holder and record.consumer_id == "app"
    assert harness.response_store.records["resp_next"].context_tokens == 520
    # The holder refuses now: answered 503 by the gateway, nothing sent anywhere else.
    harness.upstream.script(holder, error_reply(429, {"retry-after": "7"}))
    before = len(harness.upstream.sent)
    refused = await harness.post("/v1/responses", key, body)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "response_backend_unavailable"
    assert int(refused.headers["retry-after"]) >= 7
    assert [s.backend_id for s in harness.upstream.sent[before:]] == [holder]
    before = len(harness.upstream.sent)
    again = await harness.post("/v1/responses", key, body)  # its breaker is open: not even tried
    assert again.status_code == 503 and "circuit breaker" in again.json()["error"]["message"]
    assert len(harness.upstream.sent) == before


async def test_a_background_response_is_held_at_its_prompt_and_cap_and_settled_once_from_the_finished_read(
    harness: GatewayHarness,
) -> None:
    key = harness.consumer("app", tpm=1_000_000)
    client = harness.openai(key)
    body: dict[str, Any] = {"model": "gpt-4o", "input": "Think about it in the background.", "background": True}
    estimate = count_input(body, ENC)
    cap = harness.settings.default_max_tokens
    harness.upstream.script("uksouth-ptu", json_reply(response_body("resp_bg", status="queued", background=True)))
    raw = await client.responses.with_raw_response.create(**body)
    # The output cap is written into the create (the client gave none), and the reservation is what is held.
    assert harness.upstream.sent[-1].json["max_output_tokens"] == cap
    assert raw.headers["x-gateway-tokens-consumed"] == str(estimate + cap)
    assert harness.telemetry.tokens_emitted() == 0  # no figures yet: the metrics wait for the backend's
    assert harness.response_store.records["resp_bg"].unsettled
    harness.clock.advance(300)  # minutes of generation: still held, not gone from the window after 60 s
    harness.upstream.script("uksouth-ptu", json_reply(response_body("resp_bg", status="in_progress", background=True)))
    assert (await client.responses.retrieve("resp_bg")).status == "in_progress"
    assert harness.response_store.records["resp_bg"].unsettled  # nothing to settle from yet
    assert await harness.charged("app") == estimate + cap
    finished = response_body("resp_bg", usage={"input": estimate + 3, "output": 90}, background=True)
    harness.upstream.script("uksouth-ptu", json_reply(finished), json_reply(finished))
    await client.responses.retrieve("resp_bg")
    await client.responses.retrieve("resp_bg")  # read twice: settled once
    total = estimate + 3 + 90
    assert await harness.charged("app") == total
    await harness.usage.flush(everything=True)
    rows = await harness.usage_rows("app")
    assert sum(r.total for r in rows) == total and sum(r.requests for r in rows) == 1
    assert harness.telemetry.tokens_emitted() == total
    assert not harness.response_store.records["resp_bg"].unsettled


async def create_background(harness: GatewayHarness, key: str, response_id: str, **extra: Any) -> int:
    harness.upstream.script("uksouth-ptu", json_reply(response_body(response_id, status="queued", background=True)))
    made = await harness.post("/v1/responses", key, {"model": "gpt-4o", "input": "Go.", "background": True, **extra})
    assert made.status_code == 200, made.text
    return int(made.headers["x-gateway-tokens-consumed"])


def finished_reply(response_id: str, prompt: int, output: int, status: str = "completed") -> Reply:
    return json_reply(response_body(response_id, status=status, usage={"input": prompt, "output": output},
                                    background=True))


async def test_a_read_made_while_the_consumer_is_over_its_limit_still_settles(harness: GatewayHarness) -> None:
    key = harness.consumer("busy", tpm=2_000)
    held = await create_background(harness, key, "resp_busy")
    while (await harness.post("/v1/chat/completions", key, {"model": "gpt-4o", "max_tokens": 50,
                                                            "messages": [{"role": "user", "content": "x"}]})).status_code == 200:
        pass  # the rest of the minute, used up
    before = await harness.charged("busy")
    harness.upstream.script("uksouth-ptu", finished_reply("resp_busy", 9, 1_000))
    assert (await harness.http.get("/v1/responses/resp_busy", headers={"api-key": key})).status_code == 200
    assert await harness.charged("busy") == before - held + 1_009  # the correction is never dropped


async def test_a_replay_with_stream_true_settles_from_its_terminal_event(harness: GatewayHarness) -> None:
    key = harness.consumer("replayer", tpm=100_000)
    held = await create_background(harness, key, "resp_replay")
    response = {**orjson.loads(response_body("resp_replay", background=True)), "usage": None}
    words = tuple(f" w{i}" for i in range(4))
    final = {**_finished(response, words, 9, False), "usage": {"input_tokens": 9, "output_tokens": 700,
                                                               "total_tokens": 709}}
    events = tuple(stream_events(response, words, final))
    harness.upstream.script("uksouth-ptu", Reply(200, {"content-type": "text/event-stream"}, pieces=events))
    replay = await harness.http.get("/v1/responses/resp_replay?stream=true", headers={"api-key": key})
    assert replay.status_code == 200 and b"response.completed" in replay.content
    assert not harness.response_store.records["resp_replay"].unsettled
    assert held > 709 and await harness.charged("replayer") == 709


async def test_a_cancel_answered_with_the_usage_settles(harness: GatewayHarness) -> None:
    key = harness.consumer("canceller", tpm=100_000)
    await create_background(harness, key, "resp_cancel")
    harness.upstream.script("uksouth-ptu", finished_reply("resp_cancel", 9, 40, status="cancelled"))
    assert (await harness.post("/v1/responses/resp_cancel/cancel", key, {})).status_code == 200
    assert await harness.charged("canceller") == 49


async def test_a_background_stream_left_after_its_start_is_held_then_settled_by_the_sweep(
    harness: GatewayHarness,
) -> None:
    """The issue's measurement: a 2,000 TPM key left a background stream after `response.created` and was charged 11
    tokens for 90,000 generated. Now the reservation is held while it runs, and the sweep reads the response at its
    backend before the hold ends and charges what it used: the whole of it, as debt."""
    key = harness.consumer("leaver", tpm=2_000)
    response = {**orjson.loads(response_body("resp_left", background=True)), "usage": None}
    events = tuple(stream_events(response, (" a", " b"), _finished(response, (" a", " b"), 9, False)))
    harness.upstream.script("uksouth-ptu", Reply(200, {"content-type": "text/event-stream"}, pieces=events,
                                                 stalls_after=1))
    gateway = await harness.gateway()
    answer = await gateway.handle(gateway_request("POST", "/v1/responses", key, {
        "model": "gpt-4o", "input": "Write a very long essay.", "background": True, "stream": True}))
    assert answer.stream is not None
    assert b"response.created" in await anext(answer.stream)
    await answer.stream.aclose()  # the client leaves
    sent = harness.upstream.sent[-1].json
    # Capped at what fits in the key's minute: the reservation is the prompt and that cap.
    assert sent["max_output_tokens"] <= 2_000
    reserved = await harness.charged("leaver")
    assert reserved == count_input(sent, ENC) + sent["max_output_tokens"]
    assert harness.response_store.records["resp_left"].unsettled
    harness.clock.advance(400)
    harness.upstream.script("uksouth-ptu", json_reply(response_body("resp_left", status="in_progress", background=True)))
    await gateway.holds.sweep()  # not due yet: nothing read
    harness.clock.advance(100)
    await gateway.holds.sweep()  # due, still running: the hold moves on
    assert gateway.holds.extended == 1 and await harness.charged("leaver") == reserved
    harness.clock.advance(600)
    harness.upstream.script("uksouth-ptu", finished_reply("resp_left", 11, 89_989))
    await gateway.holds.sweep()
    assert gateway.holds.settled == 1 and not harness.response_store.records["resp_left"].unsettled
    assert await harness.charged("leaver") == 90_000
    # ... and the debt keeps the key closed: 90,000 at 2,000 a minute.
    with pytest.raises(RateLimited) as refused:
        await harness.limiter.admit(harness.consumer_store.consumers["leaver"], "gpt-4o", 100)
    assert refused.value.wait_ms > 40 * 60_000


async def test_the_location_is_recorded_before_a_stream_reaches_the_client(harness: GatewayHarness) -> None:
    key = harness.consumer("app")
    response = _response({"model": "gpt-4o", "input": "Stream."}, "gpt-4o-2024-11-20", "completed")
    words = tuple(f" w{i}" for i in range(6))
    events = tuple(stream_events(response, words, _finished(response, words, 9, False)))
    harness.upstream.script("uksouth-ptu", Reply(200, {"content-type": "text/event-stream"}, pieces=events))
    # Driven chunk by chunk (an HTTP client in front would buffer): the id is recorded before the chunk that carries
    # it is handed on, and recorded again with the usage once the stream is done.
    gateway = await harness.gateway()
    answer = await gateway.handle(gateway_request("POST", "/v1/responses", key, {"model": "gpt-4o", "input": "Stream.",
                                                                                  "stream": True}))
    assert answer.stream is not None
    first = await anext(answer.stream)
    assert b"response.created" in first and response["id"].encode() in first
    assert harness.response_store.records[response["id"]].context_tokens == 0
    rest = b"".join([chunk async for chunk in answer.stream])
    assert b"response.completed" in rest
    assert harness.response_store.records[response["id"]].context_tokens == 15


async def test_a_flood_of_stored_response_reads_costs_a_bounded_number_of_table_reads(harness: GatewayHarness) -> None:
    """No admission charges a follow-up or a continuation's look-up, so each consumer has a read rate per instance
    (GATEWAY_RESPONSE_READS_PER_S, burst twice that): past it, 429 before the responses table is read."""
    import openai

    key, other = harness.consumer("app"), harness.consumer("other")
    client = harness.openai(key)
    rate = harness.settings.response_reads_per_s
    answers: list[int] = []
    before = harness.response_store.reads
    for i in range(300):  # GETs, DELETEs, cancels and continuations of ids, in one instant: every kind reads the table
        match i % 4:
            case 0:
                answer = await harness.http.get(f"/v1/responses/resp_{i}", headers={"api-key": key})
            case 1:
                answer = await harness.http.delete(f"/v1/responses/resp_{i}", headers={"api-key": key})
            case 2:
                answer = await harness.post(f"/v1/responses/resp_{i}/cancel", key, {})
            case _:
                answer = await harness.post("/v1/responses", key, {"model": "gpt-4o", "input": "Go on.",
                                                                   "previous_response_id": f"resp_{i}"})
        answers.append(answer.status_code)
        if answer.status_code == 429:
            error = answer.json()["error"]
            assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
            assert int(answer.headers["retry-after"]) >= 1
    reads = harness.response_store.reads - before
    assert reads == 2 * rate and answers.count(429) == 300 - reads  # the burst read, the rest refused unread
    assert set(answers) == {400, 404, 429} and harness.upstream.sent == []  # 400: previous response not found
    with pytest.raises(openai.RateLimitError):  # the SDK sees an OpenAI rate limit (and would retry after the wait)
        await client.responses.retrieve("resp_more")
    # Another consumer is not held by this one's flood; this one reads again as its bucket refills.
    assert (await harness.http.get("/v1/responses/resp_x", headers={"api-key": other})).status_code == 404
    harness.clock.advance(1.0)
    refilled = [(await harness.http.get(f"/v1/responses/r{i}", headers={"api-key": key})).status_code for i in range(40)]
    assert refilled.count(404) == rate and refilled.count(429) == 40 - rate


async def test_a_background_response_is_held_and_settled_at_every_level_it_was_admitted_at(
    harness: GatewayHarness,
) -> None:
    harness.team("research", tpm=50_000)
    key = harness.consumer("member", tpm=20_000, team="research")
    held = await create_background(harness, key, "resp_team", max_output_tokens=500)
    assert await harness.charged("member") == held and await harness.charged("team|research") == held
    harness.clock.advance(200)
    harness.upstream.script("uksouth-ptu", finished_reply("resp_team", 9, 321))
    assert (await harness.http.get("/v1/responses/resp_team", headers={"api-key": key})).status_code == 200
    assert await harness.charged("member") == 330 and await harness.charged("team|research") == 330


@pytest.mark.parametrize("gone", ["deleted", "cancelled without usage"])
async def test_a_held_response_whose_cost_can_never_be_known_is_charged_its_hold_and_let_go(
    harness: GatewayHarness, gone: str
) -> None:
    key = harness.consumer("unknown", tpm=100_000)
    held = await create_background(harness, key, "resp_gone")
    gateway = await harness.gateway()
    harness.clock.advance(500)
    reply = error_reply(404) if gone == "deleted" else json_reply(response_body("resp_gone", status="cancelled",
                                                                                background=True))
    harness.upstream.script("uksouth-ptu", reply)
    await gateway.holds.sweep()
    assert gateway.holds.settled == 1 and gateway.holds.extended == 0
    assert await harness.charged("unknown") == held
    sent = len(harness.upstream.sent)
    harness.clock.advance(3_600)
    await gateway.holds.sweep()  # no longer watched: nothing read again
    assert len(harness.upstream.sent) == sent


async def test_a_held_response_whose_backend_fails_past_its_hold_is_read_once_a_claim_and_settled_when_it_answers(
    harness: GatewayHarness,
) -> None:
    """The holder answers 500 to every read until the hold has ended: each failed read leaves the response claimed for
    CLAIM_S (so a sweep every 31 s reads it at most every other time), and once the backend answers, the sweep still
    settles its whole usage, as debt, though its hold lapsed."""
    key = harness.consumer("patient", tpm=100_000)
    held = await create_background(harness, key, "resp_down")
    gateway = await harness.gateway()
    harness.clock.advance(500)
    before = len(harness.upstream.sent)
    pending = 0
    for _ in range(8):  # 500 s .. 717 s: past the hold's end at 600 s; one 500 always waiting for the next read
        if pending == len(harness.upstream.sent) - before:
            harness.upstream.script("uksouth-ptu", error_reply(500))
            pending += 1
        await gateway.holds.sweep()
        harness.clock.advance(31)
    assert len(harness.upstream.sent) - before == 4  # claimed for 60 s after each failure: every other sweep reads
    assert harness.response_store.records["resp_down"].unsettled and gateway.holds.settled == 0
    harness.clock.advance(600)
    await gateway.holds.sweep()  # the last 500 waiting, read long after the hold's end: still tried
    assert len(harness.upstream.sent) - before == 5 == pending and gateway.holds.settled == 0
    harness.clock.advance(61)
    harness.upstream.script("uksouth-ptu", finished_reply("resp_down", 9, 40_000))
    await gateway.holds.sweep()
    assert gateway.holds.settled == 1 and not harness.response_store.records["resp_down"].unsettled
    assert await harness.charged("patient") >= 40_009 > held
    assert harness.response_store.unsettled == {}


async def test_a_background_response_is_settled_by_another_instance_when_its_creator_is_gone(
    harness: GatewayHarness,
) -> None:
    """The instance that created a background response stops; the other instance's sweep finds it in the shared
    table, moves its hold on while it runs and settles its full usage once, with one query per sweep."""
    key = harness.consumer("orphan", tpm=2_000)
    held = await create_background(harness, key, "resp_orphan")
    await harness.close()  # the creating instance stops (its leases returned, its sweep cancelled)
    other = GatewayHarness(beside=harness, instance_id="harness-2")
    try:
        gateway = await other.gateway()
        harness.clock.advance(500)
        harness.upstream.script("uksouth-ptu", json_reply(response_body("resp_orphan", status="in_progress",
                                                                        background=True)))
        queries = harness.response_store.queries
        await gateway.holds.sweep()  # due and still running: the hold moves on, from this instance
        assert gateway.holds.extended == 1 and await other.charged("orphan") == held
        harness.clock.advance(400)
        await gateway.holds.sweep()  # moved: not due again yet, nothing read
        harness.clock.advance(200)
        harness.upstream.script("uksouth-ptu", finished_reply("resp_orphan", 9, 89_991))
        await gateway.holds.sweep()
        assert harness.response_store.queries - queries == 3  # one query a sweep, whatever it finds
        assert gateway.holds.settled == 1 and await other.charged("orphan") == 90_000
        sent = len(harness.upstream.sent)
        harness.clock.advance(3_600)
        await gateway.holds.sweep()  # settled: nothing left to read
        assert len(harness.upstream.sent) == sent and harness.response_store.unsettled == {}
        assert await other.charged("orphan") == 90_000
    finally:
        await other.close()


@pytest.mark.parametrize("responses", [1, 40])
async def test_two_instances_sweeping_at_once_settle_each_response_once(harness: GatewayHarness, responses: int) -> None:
    keys = {n: harness.consumer(f"c{n}", tpm=1_000_000) for n in range(responses)}
    for n, key in keys.items():
        await create_background(harness, key, f"resp_both{n}")
    other = GatewayHarness(beside=harness, instance_id="harness-2")
    try:
        first, second = await harness.gateway(), await other.gateway()
        harness.clock.advance(500)
        for n in range(responses):  # enough finished answers for both instances to read every response
            harness.upstream.script("uksouth-ptu", finished_reply(f"resp_both{n}", 9, 1_000))
            harness.upstream.script("uksouth-ptu", finished_reply(f"resp_both{n}", 9, 1_000))
        await asyncio.gather(first.holds.sweep(), second.holds.sweep(), first.holds.sweep(), second.holds.sweep())
        assert first.holds.settled + second.holds.settled == responses
        for n in range(responses):
            assert await harness.charged(f"c{n}") == 1_009  # not 2,018: once
        assert await other.charged("c0") == 1_009
        assert harness.response_store.unsettled == {}
    finally:
        await other.close()


async def test_a_background_stream_charged_as_it_went_is_not_charged_twice_when_settled(harness: GatewayHarness) -> None:
    key = harness.consumer("streamer", tpm=1_000_000)
    response = {**orjson.loads(response_body("resp_long", background=True)), "usage": None}
    words = tuple(f" w{i}" for i in range(40))
    events = tuple(stream_events(response, words, _finished(response, words, 9, False)))
    harness.upstream.script("uksouth-ptu", Reply(200, {"content-type": "text/event-stream"}, pieces=events,
                                                 stalls_after=30))
    gateway = await harness.gateway()
    answer = await gateway.handle(gateway_request("POST", "/v1/responses", key, {
        "model": "gpt-4o", "input": "Go on and on.", "background": True, "stream": True}))
    assert answer.stream is not None
    for _ in range(6):  # a few events a while apart: the stream is charged as it goes (GATEWAY_STREAM_SETTLE_S)
        await anext(answer.stream)
        harness.clock.advance(harness.settings.stream_settle_s + 1)
    await answer.stream.aclose()  # the client leaves; the response goes on
    assert harness.response_store.records["resp_long"].unsettled
    harness.upstream.script("uksouth-ptu", finished_reply("resp_long", 9, 5_000))
    assert (await harness.http.get("/v1/responses/resp_long", headers={"api-key": key})).status_code == 200
    assert await harness.charged("streamer") == 5_009
