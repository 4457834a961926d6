"""The audit trail, in-process with the openai SDK: a record per answered request of a consumer whose policy audits,
with the prompt as the model saw it and the completion (a stream's text reassembled), written off the request path in
bounded memory; failures retried, then counted lost; `audit: required` refuses while the trail cannot take records."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest

from shared.clock import FakeClock
from shared.safety.audit import MAX_TRIES, AuditTrail
from shared.storage.memory import MemoryAuditStore
from tests.fakes.gateway import GatewayHarness
from tests.fakes.upstream import Reply
from tools.simulator import safety as stand_in
from tools.simulator.responses_api import _finished, _response, stream_events

KEY = "cs-local-key"
POLICIES = {
    "audited": {"pii": {"mode": "redact", "categories": ["Email"]}, "audit": "on"},
    "must-audit": {"audit": "required", "shield_prompt": True},
}


@pytest.fixture
async def gw() -> AsyncIterator[GatewayHarness]:
    state = stand_in.State(KEY)
    runner = await stand_in.serve("127.0.0.1", 0, state)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    built = GatewayHarness(env={
        "GATEWAY_SAFETY_POLICIES": json.dumps(POLICIES), "GATEWAY_AUDIT_MEMORY_MB": "1",
        "GATEWAY_CONTENT_SAFETY_ENDPOINT": url, "GATEWAY_CONTENT_SAFETY_KEY": KEY,
        "GATEWAY_LANGUAGE_ENDPOINT": url, "GATEWAY_LANGUAGE_KEY": KEY,
    })
    yield built
    await built.close()
    await runner.cleanup()


async def records(gw: GatewayHarness) -> list[dict[str, Any]]:
    trail = gw.services.audit
    assert isinstance(trail, AuditTrail)
    await trail.flush()
    return [orjson.loads(line) for line in gw.audit_store.lines()]


async def test_a_chat_is_recorded_with_the_prompt_as_the_model_saw_it(gw: GatewayHarness) -> None:
    gw.team("claims-team")
    key = gw.consumer("claims", safety="audited", team="claims-team")
    answer = await gw.openai(key).chat.completions.create(
        model="gpt-4o", messages=[{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Mail bob@contoso.com the summary."}],
        extra_headers={"x-ms-client-request-id": "req-42", "x-gateway-user": "alice"})
    [record] = await records(gw)
    assert record["request_id"] == "req-42" and record["consumer"] == "claims" and record["team"] == "claims-team"
    assert record["deployment"] == "gpt-4o" and record["operation"] == "ChatCompletions_Create"
    assert record["policy"] == "audited" and record["status"] == 200 and record["stream"] is False
    assert record["prompt"] == [{"kind": "system", "text": "Be brief."},
                                {"kind": "prompt", "text": "Mail *************** the summary."}]
    assert record["redacted"] == {"Email": 1} and "bob@contoso.com" not in json.dumps(record)
    assert record["completion"] == answer.choices[0].message.content and record["completion"]
    assert record["time"].endswith("Z")
    [name] = gw.audit_store.blobs
    assert name.startswith("claims/") and name.endswith("/harness.jsonl") and name.count("/") == 5


async def test_a_streamed_chat_is_recorded_with_its_text_reassembled(gw: GatewayHarness) -> None:
    key = gw.consumer("claims", safety="audited")
    stream = await gw.openai(key).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Count."}], stream=True, max_tokens=7)
    seen = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    [record] = await records(gw)
    assert record["stream"] is True and record["completion"] == seen and seen and record["ended"] == "complete"


async def test_responses_whole_and_streamed_are_recorded(gw: GatewayHarness) -> None:
    key = gw.consumer("agent", safety="audited")
    client = gw.openai(key)
    for stream in (False, True):
        response = _response({"model": "gpt-4o", "input": "Say it."}, "gpt-4o-2024-11-20", "completed")
        words = (" one", " two", " three")
        final = _finished(response, words, 9, False)
        if stream:
            events = tuple(stream_events(response, words, final))
            gw.upstream.script("uksouth-ptu", Reply(200, {"content-type": "text/event-stream"}, pieces=events))
            async for _ in await client.responses.create(model="gpt-4o", instructions="Short.", input="Say it.",
                                                         stream=True):
                pass
        else:
            gw.upstream.script("uksouth-ptu", Reply(200, {"content-type": "application/json"},
                                                    body=orjson.dumps(final)))
            await client.responses.create(model="gpt-4o", instructions="Short.", input="Say it.")
    whole, streamed = await records(gw)
    for record in (whole, streamed):
        assert record["operation"] == "Responses_Create" and record["completion"] == " one two three"
        assert record["prompt"] == [{"kind": "system", "text": "Short."}, {"kind": "prompt", "text": "Say it."}]
    assert streamed["stream"] is True and whole["stream"] is False


async def test_a_failing_store_never_fails_the_request_and_its_records_are_retried_then_counted_lost(
    gw: GatewayHarness,
) -> None:
    key = gw.consumer("claims", safety="audited")
    gw.audit_store.unavailable = True
    client = gw.openai(key)
    await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "One."}])
    trail = gw.services.audit
    assert isinstance(trail, AuditTrail)
    await trail.flush()
    gw.audit_store.unavailable = False
    await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Two."}])
    assert [r["prompt"][0]["text"] for r in await records(gw)] == ["One.", "Two."]  # retried, in order
    assert gw.telemetry.audit_losses == 0
    gw.audit_store.unavailable = True
    await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Three."}])
    for _ in range(MAX_TRIES):
        await trail.flush()
    assert gw.telemetry.audit_losses == 1 and trail.lost == 1


async def test_audit_required_refuses_while_the_trail_cannot_take_records(gw: GatewayHarness) -> None:
    key = gw.consumer("bank", safety="must-audit")
    client = gw.openai(key)
    gw.audit_store.unavailable = True
    await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "One."}])
    trail = gw.services.audit
    assert isinstance(trail, AuditTrail)
    await trail.flush()  # the append fails: the trail is failing
    sent = len(gw.upstream.sent)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Two."}])
    assert caught.value.code == "audit_unavailable" and "retry-after" in caught.value.response.headers
    assert len(gw.upstream.sent) == sent  # never sent to a model
    gw.audit_store.unavailable = False
    await trail.flush()
    await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Three."}])
    assert [r["prompt"][0]["text"] for r in await records(gw)] == ["One.", "Three."]


async def test_memory_is_bounded_and_what_does_not_fit_is_counted_lost() -> None:
    losses: list[int] = []
    store = MemoryAuditStore()
    trail = AuditTrail(store, FakeClock(), "i1", memory_bytes=50_000, flush_s=1, lost=losses.append, background=False)
    kept = sum(trail.offer({"consumer": "c", "prompt": "x" * 1_000}) for _ in range(200))
    assert 40 <= kept < 50 and sum(losses) == 200 - kept
    assert not trail.ready()
    await trail.flush()
    assert len(store.lines()) == kept and trail.ready()
    assert trail.offer({"consumer": "c", "prompt": "x" * 60_000}) is False  # larger than the whole budget


async def test_records_go_to_a_blob_per_consumer_and_hour() -> None:
    clock = FakeClock()
    store = MemoryAuditStore()
    trail = AuditTrail(store, clock, "i1", memory_bytes=1 << 20, flush_s=1, lost=lambda n: None, background=False)
    trail.offer({"consumer": "a"})
    trail.offer({"consumer": "b"})
    clock.advance(3600)
    trail.offer({"consumer": "a"})
    await trail.flush()
    assert len(store.blobs) == 3 and store.appends == 3
