from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from shared.clock import FakeClock
from shared.edge.consumers import ConsumerDirectory, hash_key, key_from_headers, key_prefix, new_key, rotated
from shared.edge.errors import render
from shared.outcomes import AuthStoreUnavailable, ConsumerDisabled, Refusal
from shared.records.consumers import Consumer
from shared.storage.memory import MemoryConsumerStore


def make(store: MemoryConsumerStore, consumer_id: str = "team-a", **changes: object) -> str:
    key = new_key()
    store.consumers[consumer_id] = replace(
        Consumer(id=consumer_id, name=consumer_id, key_hash=hash_key(key), key_prefix=key_prefix(key)), **changes  # type: ignore[arg-type]
    )
    return key


def test_keys_are_long_random_and_only_their_hash_is_kept() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    key = keys.pop()
    assert key.startswith("gw-") and len(key) >= 45
    assert hash_key(key) != key and len(hash_key(key)) == 64
    assert key_prefix(key) == key[:9]


@pytest.mark.parametrize(
    ("headers", "repeated", "key"),
    [
        ({"api-key": "k"}, frozenset(), "k"),
        ({"authorization": "Bearer k"}, frozenset(), "k"),
        ({"authorization": "bearer   k "}, frozenset(), "k"),
        ({"api-key": "k", "authorization": "Bearer k"}, frozenset(), "k"),
    ],
)
def test_key_from_either_header(headers: dict[str, str], repeated: frozenset[str], key: str) -> None:
    assert key_from_headers(headers, repeated) == key


@pytest.mark.parametrize(
    ("headers", "repeated"),
    [
        ({}, frozenset()),
        ({"api-key": ""}, frozenset()),
        ({"authorization": "Basic abc"}, frozenset()),
        ({"authorization": "Bearer "}, frozenset()),
        ({"api-key": "a", "authorization": "Bearer b"}, frozenset()),
        ({"api-key": "a"}, frozenset({"api-key"})),
    ],
)
def test_missing_malformed_or_ambiguous_credentials_are_401(headers: dict[str, str], repeated: frozenset[str]) -> None:
    with pytest.raises(Refusal) as caught:
        key_from_headers(headers, repeated)
    assert render(caught.value).status == 401


async def test_directory_authenticates_from_memory_and_remembers_unknown_keys() -> None:
    store = MemoryConsumerStore()
    key = make(store)
    directory = ConsumerDirectory(store, FakeClock(), refresh_s=5)
    assert (await directory.authenticate(key)).id == "team-a"
    calls = store.calls
    for _ in range(10):
        await directory.authenticate(key)
    assert store.calls == calls  # served from memory
    for _ in range(10):
        with pytest.raises(Refusal):
            await directory.authenticate("gw-wrong")
    assert store.calls == calls + 1  # one lookup for the unknown key, then remembered


async def test_a_consumer_created_after_the_last_reload_is_found_at_once() -> None:
    store = MemoryConsumerStore()
    directory = ConsumerDirectory(store, FakeClock(), refresh_s=60)
    make(store, "first")
    await directory.reload()
    key = make(store, "second")
    assert (await directory.authenticate(key)).id == "second"


async def test_disabled_consumers_and_changes_apply_after_the_refresh_interval() -> None:
    store = MemoryConsumerStore()
    clock = FakeClock()
    key = make(store)
    directory = ConsumerDirectory(store, clock, refresh_s=2)
    await directory.authenticate(key)
    store.consumers["team-a"] = replace(store.consumers["team-a"], enabled=False)
    clock.advance(2.5)
    with pytest.raises(ConsumerDisabled) as caught:
        # Idle for more than two checks: the request waits for the reload it starts (at most CONFIRM_WAIT_S).
        await directory.authenticate(key)
    assert caught.value.consumer_id == "team-a"
    error = render(caught.value)  # answered exactly as a made-up key
    assert (error.status, error.code, error.message) == (401, "invalid_api_key", "The API key is not valid.")


async def test_rotation_with_and_without_grace() -> None:
    store = MemoryConsumerStore()
    clock = FakeClock()
    old = make(store)
    new = new_key()
    store.consumers["team-a"] = rotated(store.consumers["team-a"], new, grace_s=60, now=clock.now())
    directory = ConsumerDirectory(store, clock, refresh_s=1)
    assert (await directory.authenticate(new)).id == "team-a"
    assert (await directory.authenticate(old)).id == "team-a"
    clock.advance(61)
    with pytest.raises(Refusal):
        await directory.authenticate(old)
    newer = new_key()
    store.consumers["team-a"] = rotated(store.consumers["team-a"], newer, grace_s=0, now=clock.now())
    await directory.reload()
    with pytest.raises(Refusal):
        await directory.authenticate(new)
    assert (await directory.authenticate(newer)).id == "team-a"


async def test_store_trouble_keeps_serving_the_cached_consumers() -> None:
    class Failing(MemoryConsumerStore):
        async def list_consumers(self) -> list[Consumer]:
            raise RuntimeError("store down")

    store = Failing()
    key = make(store)
    directory = ConsumerDirectory(store, FakeClock(), refresh_s=1)
    assert (await directory.authenticate(key)).id == "team-a"  # found by the single lookup
    assert directory.reload_failures >= 1


async def test_a_spray_of_unknown_keys_costs_at_most_the_lookup_budget() -> None:
    store = MemoryConsumerStore()
    clock = FakeClock()
    directory = ConsumerDirectory(store, clock, refresh_s=5, lookups_per_s=2, failures_per_minute=10**6)
    await directory.reload()
    base = store.calls
    for second in range(30):
        for i in range(1000):
            with pytest.raises(Refusal):
                await directory.authenticate(f"gw-bogus-{second}-{i}", client=f"10.0.{i // 250}.{i % 250}")
        clock.advance(1.0)
        directory._reload_if_due()  # the regular reload, as a request would start it
        await asyncio.sleep(0)
    checks, reloads = 30, 30 // 5 + 1  # a marker read a second; a full reload (marker + list) every 5 s
    assert store.calls - base <= 2 * 30 + 2 + checks + 2 * reloads  # budget x seconds + the initial burst + those
    assert len(directory.unknown) <= 2 * 30 + 2


async def test_a_key_created_during_a_spray_works_at_the_next_lookup_the_budget_allows() -> None:
    store = MemoryConsumerStore()
    clock = FakeClock()
    directory = ConsumerDirectory(store, clock, refresh_s=60, lookups_per_s=2, failures_per_minute=10**6)
    await directory.reload()
    for i in range(50):
        with pytest.raises(Refusal):
            await directory.authenticate(f"gw-bogus-{i}")
    key = make(store, "fresh")
    with pytest.raises(Refusal):
        await directory.authenticate(key)  # the budget is spent: not looked up (and not remembered as unknown)
    clock.advance(0.5)
    assert (await directory.authenticate(key)).id == "fresh"


async def test_a_key_created_during_a_spray_that_takes_every_lookup_works_within_a_check() -> None:
    """The spray spends the lookup budget as fast as it refills; the new key is still seen at the next change-marker
    check (one point read a second), long before the full reload."""
    store = MemoryConsumerStore()
    clock = FakeClock()
    directory = ConsumerDirectory(store, clock, refresh_s=60, check_s=1.0, lookups_per_s=2, failures_per_minute=10**6)
    await directory.reload()
    key = new_key()
    await store.create(Consumer(id="fresh", name="fresh", key_hash=hash_key(key), key_prefix=key_prefix(key)))
    served_at = None
    for tick in range(30):  # 3 s in steps of 0.1 s, 20 bogus keys each step: the budget never has a lookup left
        for i in range(20):
            with pytest.raises(Refusal):
                await directory.authenticate(f"gw-bogus-{tick}-{i}")
        try:
            await directory.authenticate(key)
            served_at = tick * 0.1
            break
        except Refusal:
            pass
        clock.advance(0.1)
        await asyncio.sleep(0)  # the check the requests started runs
        await asyncio.sleep(0)
    assert served_at is not None and served_at <= 1.2, served_at
    assert directory.reloads == 2  # the first load and the one the marker asked for: not one per request


async def test_nothing_changed_costs_one_marker_read_a_check_and_no_listing() -> None:
    store = MemoryConsumerStore()
    clock = FakeClock()
    key = make(store)
    directory = ConsumerDirectory(store, clock, refresh_s=60, check_s=1.0)
    assert (await directory.authenticate(key)).id == "team-a"
    base, reloads = store.calls, directory.reloads
    for _ in range(30):
        clock.advance(1.0)
        await directory.authenticate(key)
        await asyncio.sleep(0)
    assert directory.reloads == reloads and store.calls - base == 30
    store.consumers["team-a"] = replace(store.consumers["team-a"], enabled=False)  # edited behind the marker's back
    await directory.authenticate(key)  # still served: only the full reload sees edits made outside the store's API
    clock.advance(31)
    directory._reload_if_due()
    await asyncio.sleep(0)
    with pytest.raises(Refusal):
        await directory.authenticate(key)


async def test_a_consumer_disabled_through_the_store_is_refused_within_a_check() -> None:
    store = MemoryConsumerStore()
    clock = FakeClock()
    key = make(store)
    directory = ConsumerDirectory(store, clock, refresh_s=60, check_s=1.0)
    assert (await directory.authenticate(key)).id == "team-a"
    await store.put(replace(store.consumers["team-a"], enabled=False))
    clock.advance(1.0)
    await directory.authenticate(key)  # starts the check; this request is still served from the cache
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    with pytest.raises(Refusal):
        await directory.authenticate(key)


async def test_past_the_maximum_staleness_a_closed_directory_refuses_every_key() -> None:
    class Switchable(MemoryConsumerStore):
        down = False

        async def list_consumers(self) -> list[Consumer]:
            if self.down:
                raise RuntimeError("store down")
            return await super().list_consumers()

    for fail_closed in (True, False):
        store = Switchable()
        clock = FakeClock()
        key = make(store)
        directory = ConsumerDirectory(store, clock, refresh_s=5, max_stale_s=60, fail_closed=fail_closed)
        assert (await directory.authenticate(key)).id == "team-a"
        store.down = True
        for _ in range(11):
            clock.advance(5)
            await directory.reload()
        assert (await directory.authenticate(key)).id == "team-a"  # 55 s stale: still served
        clock.advance(10)
        await directory.reload()
        if fail_closed:
            with pytest.raises(Refusal) as caught:
                await directory.authenticate(key)
            assert isinstance(caught.value, AuthStoreUnavailable) and render(caught.value).status == 503
        else:
            assert (await directory.authenticate(key)).id == "team-a"
        store.down = False
        await directory.reload()
        assert (await directory.authenticate(key)).id == "team-a"
