"""Items of earlier responses, in-process: an `item_reference` (or a reasoning item named by id) is answered only for
the consumer whose response made it, and goes to the region holding it; encrypted reasoning of an unstored response
goes back to the resource that encrypted it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.fakes.gateway import GatewayHarness, gateway_request
from tests.fakes.upstream import Reply, error_reply, json_reply


def made(response_id: str, *items: dict[str, Any], store: bool = True) -> bytes:
    return orjson.dumps({
        "id": response_id, "object": "response", "model": "gpt-4o-2024-11-20", "status": "completed", "store": store,
        "output": list(items), "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
    })


MESSAGE = {"type": "message", "id": "msg_owned", "role": "assistant", "status": "completed",
           "content": [{"type": "output_text", "text": "hi", "annotations": []}]}
REASONING = {"type": "reasoning", "id": "rs_secret", "summary": [], "encrypted_content": "gAAAA-sealed"}


async def create_in_secondary(harness: GatewayHarness, key: str, body: bytes, **extra: Any) -> str:
    """A response made by swedencentral (the PTU refuses this once), as the consumer of `key`."""
    harness.upstream.script("uksouth-ptu", error_reply(503))
    harness.upstream.script("swedencentral", json_reply(body))
    answer = await harness.post("/v1/responses", key, {"model": "gpt-4o", "input": "hi", **extra})
    assert answer.status_code == 200 and answer.headers["x-gateway-backend"] == "swedencentral"
    harness.clock.advance(60)  # the PTU is back: anything not pinned goes there now
    return answer.headers["x-gateway-backend"]


@pytest.mark.parametrize("reference", [
    {"type": "item_reference", "id": "msg_owned"},
    {"type": "Item_Reference", "ID": "msg_owned"},  # as a lenient deserializer would read it
    {"type": "reasoning", "id": "msg_owned", "summary": []},  # no content of its own: read from storage by id
])
async def test_another_consumers_item_is_answered_exactly_as_an_unknown_one(
    harness: GatewayHarness, reference: dict[str, Any],
) -> None:
    owner = harness.consumer("owner")
    other = harness.consumer("other")
    await create_in_secondary(harness, owner, made("resp_owned", MESSAGE))
    before = len(harness.upstream.sent)
    body = {"model": "gpt-4o", "input": [reference, {"role": "user", "content": "and?"}]}
    theirs = await harness.post("/v1/responses", other, body)
    unknown_ref = {k: ("msg_nosuch" if str(k).lower() == "id" else v) for k, v in reference.items()}
    unknown = await harness.post("/v1/responses", other, {**body, "input": [unknown_ref, body["input"][1]]})
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"] == {**unknown.json()["error"], "message": "Item with id 'msg_owned' not found."}
    assert theirs.json()["error"]["code"] == "item_not_found" and theirs.json()["error"]["param"] == "input"
    assert len(harness.upstream.sent) == before  # nothing reached any backend
    # The owner's reference goes to the region holding it, not to the PTU that would take a fresh request.
    harness.upstream.script("swedencentral", json_reply(made("resp_next")))
    mine = await harness.post("/v1/responses", owner, body)
    assert mine.status_code == 200 and mine.headers["x-gateway-backend"] == "swedencentral"
    assert [s.backend_id for s in harness.upstream.sent[before:]] == ["swedencentral"]


async def test_items_held_by_two_regions_cannot_be_continued_together(harness: GatewayHarness) -> None:
    key = harness.consumer("owner")
    await create_in_secondary(harness, key, made("resp_a", MESSAGE))
    harness.upstream.script("uksouth-ptu", json_reply(made("resp_b", {**MESSAGE, "id": "msg_ptu"})))
    assert (await harness.post("/v1/responses", key, {"model": "gpt-4o", "input": "x"})).status_code == 200
    both = [{"type": "item_reference", "id": "msg_owned"}, {"type": "item_reference", "id": "msg_ptu"}]
    answer = await harness.post("/v1/responses", key, {"model": "gpt-4o", "input": both})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "items_in_different_regions"
    mixed = {"model": "gpt-4o", "previous_response_id": "resp_b", "input": both[:1]}
    assert (await harness.post("/v1/responses", key, mixed)).json()["error"]["code"] == "items_in_different_regions"


async def test_references_are_bounded(harness: GatewayHarness) -> None:
    key = harness.consumer("owner")
    many = [{"type": "item_reference", "id": f"msg_{i}"} for i in range(33)]
    answer = await harness.post("/v1/responses", key, {"model": "gpt-4o", "input": many})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "too_many_item_references"
    assert harness.upstream.sent == []


async def test_encrypted_reasoning_of_an_unstored_response_goes_back_to_the_resource_that_encrypted_it(
    harness: GatewayHarness,
) -> None:
    key = harness.consumer("owner")
    await create_in_secondary(harness, key, made("resp_unstored", REASONING, MESSAGE, store=False),
                              store=False, include=["reasoning.encrypted_content"])
    assert "resp_unstored" not in harness.response_store.records  # nothing to follow up: not stored
    follow = {"model": "gpt-4o", "store": False, "include": ["reasoning.encrypted_content"],
              "input": [{"role": "user", "content": "hi"}, REASONING, {"role": "user", "content": "more"}]}
    harness.upstream.script("swedencentral", json_reply(made("resp_2", store=False)))
    before = len(harness.upstream.sent)
    answer = await harness.post("/v1/responses", key, follow)
    assert answer.status_code == 200 and answer.headers["x-gateway-backend"] == "swedencentral"
    assert [s.backend_id for s in harness.upstream.sent[before:]] == ["swedencentral"]
    # That region out: refused with a retryable 503 naming why, never sent to a region that cannot decrypt it.
    harness.upstream.script("swedencentral", error_reply(500))
    refused = await harness.post("/v1/responses", key, follow)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "response_backend_unavailable"
    assert "rs_secret" in refused.json()["error"]["message"]
    # Another consumer's copy of the blob is routed as any request (it names no state of theirs).
    other = harness.consumer("other")
    harness.clock.advance(120)
    elsewhere = await harness.post("/v1/responses", other, follow)
    assert elsewhere.status_code == 200 and elsewhere.headers["x-gateway-backend"] == "uksouth-ptu"


def sse(kind: str, obj: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: ".encode() + orjson.dumps({"type": kind, **obj}) + b"\n\n"


async def test_a_streamed_responses_items_are_recorded_before_its_end_reaches_the_client(harness: GatewayHarness) -> None:
    key = harness.consumer("owner")
    started = orjson.loads(made("resp_s", store=False))
    done = orjson.loads(made("resp_s", REASONING, MESSAGE, store=False))
    pieces = (sse("response.created", {"response": {**started, "status": "in_progress", "usage": None}}),
              sse("response.completed", {"response": done}))
    harness.upstream.script("uksouth-ptu", Reply(200, {"content-type": "text/event-stream"}, pieces=pieces))
    gateway = await harness.gateway()
    answer = await gateway.handle(gateway_request("POST", "/v1/responses", key, {
        "model": "gpt-4o", "input": "x", "stream": True, "store": False, "include": ["reasoning.encrypted_content"]}))
    assert answer.stream is not None
    chunks = [chunk async for chunk in answer.stream if b"response.completed" not in chunk or
              "item:rs_secret" in harness.response_store.records]
    assert any(b"response.completed" in c for c in chunks)  # it came, and only once the item was recorded
    assert harness.response_store.records["item:rs_secret"].backend_id == "uksouth-ptu"
    assert "item:msg_owned" not in harness.response_store.records  # an unstored message cannot be referenced


async def test_a_background_responses_items_can_be_referenced_once_it_was_read_finished(harness: GatewayHarness) -> None:
    key = harness.consumer("owner")
    client = harness.openai(key)
    queued = orjson.loads(made("resp_bg"))
    queued.update(status="queued", usage=None, background=True)
    harness.upstream.script("uksouth-ptu", json_reply(orjson.dumps(queued)),
                            json_reply(orjson.dumps({**orjson.loads(made("resp_bg", MESSAGE)), "background": True})))
    await client.responses.create(model="gpt-4o", input="later", background=True)
    reference = {"model": "gpt-4o", "input": [{"type": "item_reference", "id": "msg_owned"}]}
    assert (await harness.post("/v1/responses", key, reference)).status_code == 404  # not known yet
    await client.responses.retrieve("resp_bg")  # finished: settled, and its items recorded
    assert harness.response_store.records["item:msg_owned"].consumer_id == "owner"
    assert (await harness.post("/v1/responses", key, reference)).status_code == 200
    other = harness.consumer("other")
    assert (await harness.post("/v1/responses", other, reference)).status_code == 404
