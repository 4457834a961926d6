"""Multi-region routing end to end: PTU first, invisible failover, stream cuts, breaker trips shared between processes.

These gateways get backend ids of their own (pointing at the session's simulated regions), so their breakers, which are
shared through Table Storage by backend id, cannot disturb other tests; and they use the `gpt-4o-mini` deployment,
whose capacity and faults the tests change.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import httpx
import openai
import pytest

from shared.flow.tokens import count_chat_prompt, encoding_for
from tests.conftest import unique
from tests.e2e import GatewayFactory, Stack
from tools import stack

pytestmark = pytest.mark.e2e
MINI = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Write a haiku about failover."}]


def regions(e2e: Stack, **ptu_options: object) -> list[stack.Region]:
    tag = unique("r")
    ptu, sweden, france = (sim.region for sim in e2e.simulators)
    return [
        stack.Region(f"{tag}-uksouth-ptu", ptu.region, ptu.port, priority=1, ptu=True, **ptu_options),  # type: ignore[arg-type]
        stack.Region(f"{tag}-sweden", sweden.region, sweden.port, priority=2),
        stack.Region(f"{tag}-france", france.region, france.port, priority=2),
    ]


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def served_by(c: openai.OpenAI, **options: object) -> str:
    raw = c.chat.completions.with_raw_response.create(model=MINI, messages=MESSAGES, max_tokens=20, **options)  # type: ignore[arg-type]
    raw.parse()
    backend = raw.headers["x-gateway-backend"]
    return next(name for name in ("uksouth-ptu", "sweden", "france") if backend.endswith(name))


def test_ptu_saturates_and_traffic_flows_to_the_secondaries_with_no_429(
    fresh_sims: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    e2e = fresh_sims
    e2e.simulators[0].capacity(MINI, tpm=600)  # the PTU region takes ~10 of these requests a minute
    gateway = gateway_factory(regions=regions(e2e))
    c = client(gateway.url, e2e.create_consumer(unique("app")))
    served = Counter(served_by(c) for _ in range(40))
    assert served["uksouth-ptu"] >= 5  # PTU first, while it has capacity
    assert served["sweden"] + served["france"] >= 15  # and every one of the 40 succeeded: no 429 reached the client
    assert abs(served["sweden"] - served["france"]) <= 2  # equal weights split evenly
    stats = e2e.simulators[0].stats()
    # Wasted round trips: the PTU's 429s are few, because its breaker honours Retry-After.
    assert stats["by_status"].get("429", 0) <= 3


def test_a_stream_cut_mid_way_ends_with_an_error_event_and_is_accounted(
    fresh_sims: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    e2e = fresh_sims
    gateway = gateway_factory(regions=regions(e2e))
    consumer = unique("streamer")
    key = e2e.create_consumer(consumer, tpm=100_000)
    e2e.simulators[0].fault("cut", deployment=MINI, after_chunks=5)
    words = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client(gateway.url, key).chat.completions.create(model=MINI, messages=MESSAGES, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                words.append(chunk.choices[0].delta.content)
    assert len(words) == 5 and "stream" in str(caught.value.message)
    # The raw stream: an OpenAI-style error event, then a clean end.
    e2e.simulators[0].fault("cut", deployment=MINI, after_chunks=2)
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers={"api-key": key},
                      json={"model": MINI, "messages": MESSAGES, "stream": True}, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1].startswith('data: {"error"') and '"code":"stream_interrupted"' in lines[-1]

    charged = e2e.charged(consumer)
    # Each cut stream is charged its prompt plus the words delivered before the cut (5 and 2), counted by the gateway.
    prompt = count_chat_prompt({"messages": MESSAGES}, encoding_for(MINI))
    assert charged == 2 * prompt + 5 + 2


def test_a_whole_answer_that_breaks_off_fails_over_and_the_broken_attempts_prompt_is_charged(
    fresh_sims: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    e2e = fresh_sims
    gateway = gateway_factory(regions=regions(e2e))
    consumer = unique("cut-whole")
    key = e2e.create_consumer(consumer, tpm=100_000)
    e2e.simulators[0].fault("cut", deployment=MINI)  # headers and half the body, then the connection drops
    raw = client(gateway.url, key).chat.completions.with_raw_response.create(model=MINI, messages=MESSAGES, max_tokens=20)
    completion = raw.parse()  # the client sees one whole answer, from a secondary
    assert raw.headers["x-gateway-backend"].endswith(("sweden", "france")) and raw.headers["x-gateway-attempts"] == "2"
    assert completion.usage is not None and completion.choices[0].message.content
    prompt = count_chat_prompt({"messages": MESSAGES}, encoding_for(MINI))
    assert e2e.simulators[0].stats()["streams_cut"] == 1
    # Charged: what the answer used, plus the prompt the broken attempt was billed for; the header says the same.
    assert int(raw.headers["x-gateway-tokens-consumed"]) == completion.usage.total_tokens + prompt
    assert e2e.charged(consumer) == completion.usage.total_tokens + prompt
    health = httpx.get(gateway.url + "/health/details", headers=stack.ADMIN_HEADERS).json()
    ptu = next(b for b in health["backends"] if b["id"].endswith("uksouth-ptu"))
    assert ptu["deployments"][MINI]["state"] == "open"  # a backend whose answers break off is taken out


def test_a_breaker_trip_seen_by_one_gateway_is_honoured_by_another(
    fresh_sims: Stack, gateway_factory: GatewayFactory
) -> None:
    e2e = fresh_sims
    shared_regions = regions(e2e)
    first, second = gateway_factory.several(2, regions=shared_regions)
    key = e2e.create_consumer(unique("app"))
    assert served_by(client(second.url, key)) == "uksouth-ptu"
    e2e.simulators[0].fault("429", deployment=MINI, delay_s=30)
    assert served_by(client(first.url, key)) != "uksouth-ptu"  # the 429 trips the PTU in the first gateway
    time.sleep(1.0)  # the trip is shared within a second
    before = e2e.simulators[0].stats()["requests"]
    for _ in range(5):
        assert served_by(client(second.url, key)) != "uksouth-ptu"
    assert e2e.simulators[0].stats()["requests"] == before  # the second gateway never tried the tripped PTU
    health = httpx.get(second.url + "/health/details", headers=stack.ADMIN_HEADERS).json()
    ptu = next(b for b in health["backends"] if b["id"].endswith("uksouth-ptu"))
    assert ptu["deployments"][MINI]["state"] == "open" and 25 <= ptu["deployments"][MINI]["recovers_in_s"] <= 30


def test_a_late_write_of_an_older_breaker_transition_never_replaces_a_newer_shared_trip(e2e: Stack) -> None:
    from shared.records.breaker import BreakerRecord
    from shared.storage.breaker_table import TableBreakerStore

    backend = unique("late-writer")

    async def scenario(tables: object) -> list[list[tuple[str, float]]]:
        store = TableBreakerStore(tables)  # type: ignore[arg-type]

        async def shared() -> list[tuple[str, float]]:
            return [(r.state, r.since) for r in await store.load() if r.backend_id == backend]

        seen = []
        await store.save(BreakerRecord(backend, MINI, "open", 2_000.0, 1_010.0, "429"))  # instance A trips it
        await store.save(BreakerRecord(backend, MINI, "closed", 0.0, 1_005.0, ""))  # B's older recovery lands late
        seen.append(await shared())
        await store.save(BreakerRecord(backend, MINI, "closed", 0.0, 1_020.0, ""))  # a newer recovery does land
        seen.append(await shared())
        # Many instances writing the same trip at once: one of them is shared, the others find it told (news only).
        await asyncio.gather(
            *(store.save(BreakerRecord(backend, MINI, "open", 3_000.0, 1_030.0 + i, "500")) for i in range(8))
        )
        seen.append(await shared())
        # A trip ending later is news again, and is shared over the one before.
        await store.save(BreakerRecord(backend, MINI, "open", 3_100.0, 1_040.0, "500"))
        for _ in range(12):  # every copy and the rows (a read is a copy, or now and then the rows)
            seen.append(await shared())
        return seen

    after_late, after_newer, after_race, *after_longer = e2e.run(e2e._with_tables(scenario))
    assert after_late == [("open", 1_010.0)]
    assert after_newer == [("closed", 1_020.0)]
    assert len(after_race) == 1 and after_race[0][0] == "open" and 1_030.0 <= after_race[0][1] <= 1_037.0
    assert all(seen == [("open", 1_040.0)] for seen in after_longer)


def test_a_request_larger_than_every_regions_minute_opens_no_region_and_is_told_why(
    fresh_sims: Stack, gateway_factory: Callable[..., stack.Child]
) -> None:
    """The simulated regions answer as Azure does a request larger than the whole tokens-per-minute: 429, a Retry-After
    of a day, the remaining tokens still showing room. Only one region is asked; none is taken out."""
    e2e = fresh_sims
    tag = unique("r")
    _, sweden, france = e2e.simulators
    for sim in (sweden, france):
        sim.capacity(MINI, tpm=2_000)
    gateway = gateway_factory(regions=[
        stack.Region(f"{tag}-sweden", sweden.region.region, sweden.region.port, priority=1),
        stack.Region(f"{tag}-france", france.region.region, france.region.port, priority=2),
    ])
    c = openai.OpenAI(base_url=gateway.url + "/v1", api_key=e2e.create_consumer(unique("big")), max_retries=2)
    with pytest.raises(openai.RateLimitError) as raised:
        c.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=5_000)  # type: ignore[arg-type]
    assert raised.value.code == "tokens_exceed_backend_limit"
    throttled = [sim.stats()["by_status"].get("429", 0) for sim in (sweden, france)]
    assert throttled == [1, 0]  # asked once, of the first region only, and the SDK did not retry
    for _ in range(3):  # the first region is still in rotation: it serves the next requests
        assert served_by(client(gateway.url, e2e.create_consumer(unique("small")))) == "sweden"
