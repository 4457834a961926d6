"""Large request bodies: their parse is estimated before it happens, and a worker holds at most its budget of them
(shared/flow/bodies.py), in memory and through the real gateway."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from typing import Any

import orjson
import pytest

from shared.flow.bodies import BodyBudget, Held, estimate
from shared.outcomes import BodiesBusy
from tests.fakes.gateway import GatewayHarness
from tests.fakes.upstream import stream_reply

# Shapes a client may send, from a long string (its parse is its size) to the worst known (a list of empty objects).
HOSTILE = {
    "one long string": {"messages": [{"role": "user", "content": "word " * 200_000}]},
    "small messages": {"messages": [{"role": "user", "content": "hi"}] * 30_000},
    "text parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}] * 30_000}]},
    "empty objects": {"input": [{}] * 300_000},
    "empty lists": {"input": [[]] * 300_000},
    "token ids": {"input": [[100_000 + i for i in range(100)] for _ in range(2_000)]},
    "short strings": {"input": ["ab"] * 200_000},
    "non-ASCII strings": {"input": ["é"] * 200_000},
    "escaped text": {"input": ["\\u00e9\\ud83d\\ude00" * 4] * 20_000},
    "many keys": {"metadata": {f"k{i}": i for i in range(60_000)}},
    "floats": {"input": [0.123456789] * 100_000},
}


@pytest.mark.parametrize("shape", sorted(HOSTILE))
def test_the_estimate_is_never_below_what_the_parse_really_takes(shape: str) -> None:
    raw = orjson.dumps(HOSTILE[shape])
    gc.collect()
    tracemalloc.start()
    try:
        parsed = orjson.loads(raw)
        taken, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parsed
    assert estimate(raw) >= len(raw) + taken, (shape, len(raw), taken)


async def test_takers_beyond_the_budget_wait_in_order_and_are_refused_after_the_wait() -> None:
    budget = BodyBudget(100, wait_s=5)
    assert await budget.take(60) == 60
    second = asyncio.ensure_future(budget.take(50))
    third = asyncio.ensure_future(budget.take(10))  # would fit, but comes after the second: first come, first served
    await asyncio.sleep(0)
    assert not second.done() and not third.done() and len(budget) == 2
    budget.give_back(60)
    assert await second == 50 and await third == 10 and budget.used == 60
    impatient = BodyBudget(100, wait_s=0.01)
    await impatient.take(100)
    with pytest.raises(BodiesBusy):
        await impatient.take(1)
    assert impatient.refused == 1 and len(impatient) == 0 and impatient.used == 100


async def test_a_cancelled_waiter_leaves_nothing_behind_and_one_body_larger_than_the_budget_goes_alone() -> None:
    budget = BodyBudget(100, wait_s=5)
    await budget.take(90)
    waiting = asyncio.ensure_future(budget.take(500))
    behind = asyncio.ensure_future(budget.take(5))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await behind == 5 and budget.used == 95
    budget.give_back(95)
    assert await budget.take(10**9) == 100 and budget.used == 100  # the whole budget, not more


async def test_a_stream_gives_its_share_back_when_it_ends_or_is_abandoned() -> None:
    budget = BodyBudget(100)

    async def chunks() -> Any:
        for i in range(3):
            yield b"x%d" % i

    held = Held(budget)
    held.weight = await budget.take(40)
    assert [c async for c in held.until_done(chunks())] == [b"x0", b"x1", b"x2"] and budget.used == 0
    held.weight = await budget.take(40)
    stream = held.until_done(chunks())
    assert await stream.__anext__() == b"x0"
    await stream.aclose()  # the client left after the first chunk
    assert budget.used == 0
    held.give_back()  # once only
    assert budget.used == 0


# ---- through the gateway --------------------------------------------------------------------------------------------


def large_body(i: int) -> dict[str, Any]:
    return {"model": "gpt-4o", "max_tokens": 5, "stream": True,
            "messages": [{"role": "user", "content": f"m{i} {j}"} for j in range(7_000)]}


async def test_concurrent_large_bodies_are_held_to_the_workers_budget_and_every_share_comes_back() -> None:
    harness = GatewayHarness(env={"GATEWAY_BODY_MEMORY_MB": "16"})
    try:
        key = harness.consumer("big", tpm=10_000_000)
        gateway = await harness.gateway()
        budget = gateway.bodies
        raw = orjson.dumps(large_body(0))
        assert 64 * 1024 < len(raw) <= harness.settings.max_body_bytes
        fits = budget.capacity // estimate(raw)
        assert 2 <= fits < 12
        release = asyncio.Event()
        in_flight = most = 0
        send = harness.upstream.send

        async def held_send(*args: Any, **kwargs: Any) -> Any:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            await release.wait()
            in_flight -= 1
            return await send(*args, **kwargs)

        harness.upstream.send = held_send  # type: ignore[method-assign]
        for backend_id in ("uksouth-ptu", "swedencentral", "francecentral"):
            harness.upstream.script(backend_id, *[stream_reply() for _ in range(12)])
        requests = [asyncio.ensure_future(harness.post("/v1/chat/completions", key, large_body(i))) for i in range(12)]
        for _ in range(1_000):  # until every request is either at the backend or waiting for a share (bounded)
            if in_flight + len(budget) == 12:
                break
            await asyncio.sleep(0.01)
        assert in_flight == fits and len(budget) == 12 - fits and budget.used <= budget.capacity
        release.set()
        answers = await asyncio.gather(*requests)
        assert [a.status_code for a in answers] == [200] * 12 and most == fits
        assert all(b"[DONE]" in a.content for a in answers)
        assert budget.used == 0 and len(budget) == 0
        # Refusals and failures give their share back too; a small body never waits for one.
        refused = await harness.post("/v1/chat/completions", key, {**large_body(99), "n": "many"})
        assert refused.status_code == 400 and budget.used == 0
        await budget.take(budget.capacity)
        budget._wait_s = 0.05
        busy = await harness.post("/v1/chat/completions", key, large_body(1))
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "server_busy" and busy.headers["retry-after"]
        small = await harness.post("/v1/chat/completions", key, {"model": "gpt-4o", "max_tokens": 5,
                                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert small.status_code == 200
    finally:
        await harness.close()


async def test_every_walk_of_a_large_body_runs_in_the_worker_thread_not_on_the_event_loop(
    harness: GatewayHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body of many small messages makes each walk slow (over a second for 7 MiB before they moved): estimating its
    memory, parsing, checking its shape and capabilities, both bounds of its prompt, re-serialising it for a backend."""
    import threading

    from shared.flow import admission, bodies, checks, failover, tokens

    seen: dict[str, set[str]] = {}

    def recorded(module: Any, name: str) -> None:
        original = getattr(module, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen.setdefault(name, set()).add(threading.current_thread().name)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for module, name in [(bodies, "estimate"), (checks, "parse_body"), (checks, "check_body"),
                         (checks, "check_capabilities"), (tokens, "prompt_lower_bound"), (admission, "prompt_bound"),
                         (failover, "backend_body")]:
        recorded(module, name)
    key = harness.consumer("big", tpm=10_000_000)
    body = {**large_body(0), "stream_options": {"include_usage": False}}  # the gateway asks for usage: re-serialised
    answer = await harness.post("/v1/chat/completions", key, body)
    assert answer.status_code == 200 and b"[DONE]" in answer.content
    assert set(seen) == {"estimate", "parse_body", "check_body", "check_capabilities", "prompt_lower_bound",
                         "prompt_bound", "backend_body"}
    assert all(threads == {"token-count_0"} for threads in seen.values()), seen
    assert harness.upstream.sent[-1].json["stream_options"] == {"include_usage": True}


async def test_a_large_answer_is_read_for_its_usage_in_the_worker_thread(
    harness: GatewayHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many embeddings make an answer of megabytes; reading its usage means parsing it whole."""
    import threading

    from shared.flow import backend_api
    from tests.fakes.upstream import embeddings_body, json_reply

    threads: list[str] = []
    original = backend_api.usage_from_body

    def recorded(raw: bytes) -> Any:
        threads.append(threading.current_thread().name)
        return original(raw)

    monkeypatch.setattr(backend_api, "usage_from_body", recorded)
    key = harness.consumer("vectors", tpm=10_000_000)
    big = embeddings_body(inputs=64, dimensions=1536)
    assert len(big) > 64 * 1024
    harness.upstream.script("uksouth-ptu", json_reply(big))
    answer = await harness.post("/v1/embeddings", key, {"model": "text-embedding-3-small", "input": ["a"] * 64})
    assert answer.status_code == 200 and len(answer.json()["data"]) == 64
    assert threads == ["token-count_0"]


async def test_a_stream_dropped_before_its_first_chunk_still_gives_its_share_back() -> None:
    """The client left before the answer started: the framework never iterates the stream, nor closes it."""
    budget = BodyBudget(100)

    async def chunks() -> Any:
        yield b"never read"

    held = Held(budget)
    held.weight = await budget.take(70)
    stream = held.until_done(chunks())
    assert budget.used == 70
    del stream
    gc.collect()
    await asyncio.sleep(0)  # given back on the event loop
    assert budget.used == 0
    assert await budget.take(100) == 100
