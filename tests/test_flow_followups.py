"""Follow-ups of a stored response (GET, replay, input_items, cancel, DELETE) through the phases every request takes
(issue 25): the caller named as admission names it, the failover's pinned dispatch (its breaker bookkeeping, its
refusals), the books' request record. In-process: the real edge and gateway, a scripted upstream, in-memory stores."""

from __future__ import annotations

import orjson

from shared.outcomes import FailureKind
from shared.records.consumers import UserLimits
from tests.fakes.gateway import GatewayHarness
from tests.fakes.upstream import Fail, Reply, error_reply, json_reply
from tools.simulator.responses_api import _finished, stream_events

HOLDER = "uksouth-ptu"


def stored(response_id: str, status: str = "completed", **extra: object) -> bytes:
    return orjson.dumps({"id": response_id, "object": "response", "model": "gpt-4o", "status": status, "output": [],
                         "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}, **extra})


async def create(harness: GatewayHarness, key: str, response_id: str, headers: dict[str, str] | None = None) -> None:
    harness.upstream.script(HOLDER, json_reply(stored(response_id)))
    made = await harness.post("/v1/responses", key, {"model": "gpt-4o", "input": "hi"}, headers=headers or {})
    assert made.status_code == 200 and made.headers["x-gateway-backend"] == HOLDER


async def test_an_end_user_is_named_in_its_follow_ups_as_in_its_create(harness: GatewayHarness) -> None:
    """A consumer that limits its end users: the end user named by x-gateway-user is the request's user id on the
    create and on its follow-ups alike. A follow-up spends nothing, so one that names no end user is not refused
    (where the consumer requires one of every call)."""
    key = harness.consumer("people", users=UserLimits(tokens_per_minute=50_000, required=True))
    alice = {"x-gateway-user": "alice"}
    await create(harness, key, "resp_alice", alice)
    assert harness.telemetry.requests[-1].user_id == "alice"
    harness.upstream.script(HOLDER, json_reply(stored("resp_alice")), json_reply(stored("resp_alice")))
    read = await harness.http.get("/v1/responses/resp_alice", headers={"api-key": key, **alice})
    assert read.status_code == 200
    assert (harness.telemetry.requests[-1].operation, harness.telemetry.requests[-1].user_id) == ("Responses_Get", "alice")
    anonymous = await harness.http.get("/v1/responses/resp_alice", headers={"api-key": key})
    assert anonymous.status_code == 200 and harness.telemetry.requests[-1].user_id == ""


async def test_a_replay_is_recorded_once_at_its_end_as_a_stream(harness: GatewayHarness) -> None:
    key = harness.consumer("replayer", tpm=100_000)
    await create(harness, key, "resp_replay")
    before = len(harness.telemetry.requests)
    response = {**orjson.loads(stored("resp_replay")), "usage": None}
    words = (" a", " b", " c")
    events = tuple(stream_events(response, words, _finished(response, words, 3, False)))
    harness.upstream.script(HOLDER, Reply(200, {"content-type": "text/event-stream"}, pieces=events))
    replay = await harness.http.get("/v1/responses/resp_replay?stream=true", headers={"api-key": key})
    assert replay.status_code == 200 and b"response.completed" in replay.content
    assert "stream=true" in harness.upstream.sent[-1].url  # the replay is asked of the backend
    records = harness.telemetry.requests[before:]
    assert len(records) == 1
    assert (records[0].operation, records[0].status, records[0].stream, records[0].backend_id) == (
        "Responses_Get", 200, True, HOLDER)


async def test_a_holder_refusing_the_gateways_credential_is_tripped_as_on_any_request(harness: GatewayHarness) -> None:
    """The backend's 401 to a read is about the gateway's credential, not the client's key: as for a create, the
    breaker learns that no request will succeed there, and the client is told its response's backend is unavailable
    (503, retryable), not that its own key was refused."""
    key = harness.consumer("reader", tpm=100_000)
    await create(harness, key, "resp_creds")
    harness.upstream.script(HOLDER, error_reply(401))
    read = await harness.http.get("/v1/responses/resp_creds", headers={"api-key": key})
    assert read.status_code == 503 and read.json()["error"]["code"] == "response_backend_unavailable"
    assert harness.telemetry.requests[-1].deployment == "gpt-4o"  # the refusal counted under its deployment
    before = len(harness.upstream.sent)
    again = await harness.http.get("/v1/responses/resp_creds", headers={"api-key": key})
    assert again.status_code == 503 and "circuit breaker" in again.json()["error"]["message"]
    assert len(harness.upstream.sent) == before  # out of rotation: not even tried


async def test_a_follow_up_that_times_out_charges_nothing(harness: GatewayHarness) -> None:
    """A read that outran the timeout read nothing the backend bills: unlike a create's attempt, no prompt is charged
    for it, and the response stays where it is."""
    key = harness.consumer("slow", tpm=100_000)
    await create(harness, key, "resp_slow")
    charged = await harness.charged("slow")
    harness.upstream.script(HOLDER, Fail(FailureKind.TIMEOUT))
    read = await harness.http.get("/v1/responses/resp_slow", headers={"api-key": key})
    assert read.status_code == 503 and read.json()["error"]["code"] == "response_backend_unavailable"
    assert await harness.charged("slow") == charged
    rows = await harness.usage_rows("slow")
    assert sum(r.requests for r in rows) == 1 and sum(r.total for r in rows) == charged  # the create alone
    assert "resp_slow" in harness.response_store.records


async def test_a_cancel_and_a_delete_are_sent_with_their_methods_and_only_the_query_they_may_carry(
    harness: GatewayHarness,
) -> None:
    key = harness.consumer("owner", tpm=100_000)
    await create(harness, key, "resp_methods")
    harness.upstream.script(HOLDER, json_reply(stored("resp_methods", status="cancelled")),
                            json_reply(b'{"object": "list", "data": []}'),
                            json_reply(b'{"id": "resp_methods", "object": "response", "deleted": true}'))
    assert (await harness.post("/v1/responses/resp_methods/cancel", key, {})).status_code == 200
    listed = await harness.http.get("/v1/responses/resp_methods/input_items?limit=5&secret=x", headers={"api-key": key})
    assert listed.status_code == 200
    assert "limit=5" in harness.upstream.sent[-1].url and "secret" not in harness.upstream.sent[-1].url
    deleted = await harness.http.delete("/v1/responses/resp_methods", headers={"api-key": key})
    assert deleted.status_code == 200
    assert [s.method for s in harness.upstream.sent[-3:]] == ["POST", "GET", "DELETE"]
    assert "resp_methods" not in harness.response_store.records  # forgotten once the backend no longer has it
