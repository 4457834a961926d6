"""The consumer listing at scale (issue 32): 10,000 consumers read in full by 64 instances asked more of the consumer
partition than its 2,000 entities/s, cold instances got no listing, and valid keys were refused with 401. Now a cold
instance that cannot look a key up answers 503 (not 401), a failed reload is retried after a growing jittered pause,
the periodic full reload is stretched with the rows (the change marker shows changes), and the reloads a change asks
for are spread over the instances."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from shared.clock import FakeClock
from shared.edge.consumers import LIST_ROWS_PER_S, MARKER_ROWS_PER_S, ConsumerDirectory, hash_key, key_prefix, new_key
from shared.outcomes import AuthStoreUnavailable, ConsumerDisabled, InvalidKey
from shared.records.consumers import Consumer
from shared.storage.memory import MemoryConsumerStore
from shared.storage.protocols import StoreBusy


class Listing(MemoryConsumerStore):
    """Counts full listings; throttles them (503 ServerBusy) while `busy`."""

    def __init__(self) -> None:
        super().__init__()
        self.listings = 0
        self.busy = False

    async def list_all(self):  # type: ignore[no-untyped-def]
        self.listings += 1
        if self.busy:
            raise StoreBusy("503 ServerBusy")
        return await super().list_all()


def fill(store: MemoryConsumerStore, count: int) -> list[str]:
    keys = []
    for i in range(count):
        key = new_key()
        store.consumers[f"c{i}"] = Consumer(id=f"c{i}", name=f"c{i}", key_hash=hash_key(key), key_prefix=key_prefix(key))
        keys.append(key)
    store.writes += 1
    return keys


async def settle(directory: ConsumerDirectory) -> None:
    for _ in range(3):
        await asyncio.sleep(0)
    if directory._reloading is not None:
        await directory._reloading


async def test_a_cold_instance_whose_listing_is_throttled_answers_valid_keys_503_never_401() -> None:
    store = Listing()
    keys = fill(store, 50)
    store.busy = True
    directory = ConsumerDirectory(store, FakeClock(), refresh_s=60, lookups_per_s=2, failures_per_minute=10**6)
    found = unavailable = 0
    for key in keys:
        try:
            await directory.authenticate(key)
            found += 1  # within the lookup budget: a point read finds it
        except AuthStoreUnavailable:
            unavailable += 1
        except InvalidKey:
            pytest.fail("a valid key was refused as invalid while the instance had no listing")
    assert found >= 1 and unavailable > 0 and found + unavailable == len(keys)


async def test_an_unknown_key_is_still_401_once_the_listing_is_loaded() -> None:
    store = Listing()
    fill(store, 5)
    directory = ConsumerDirectory(store, FakeClock(), refresh_s=60, lookups_per_s=2, failures_per_minute=10**6)
    for _ in range(10):
        with pytest.raises(InvalidKey):
            await directory.authenticate(new_key())


async def test_failed_reloads_are_retried_after_growing_jittered_pauses() -> None:
    store = Listing()
    keys = fill(store, 5)
    clock = FakeClock()
    directory = ConsumerDirectory(store, clock, refresh_s=60, check_s=1.0)
    await directory.authenticate(keys[0])
    store.busy = True
    store.writes += 1  # a change: every check now asks for a reload, which the throttled store refuses
    for _ in range(1200):  # 120 s of requests, one every 0.1 s
        clock.advance(0.1)
        await directory.authenticate(keys[0])
        await settle(directory)
    # A retry every 2 s would be 60 listings; doubling from 2 s (jittered, at most 60 s) is under a dozen.
    assert 3 <= store.listings - 1 <= 12, store.listings


async def test_the_periodic_full_reload_is_stretched_with_the_rows_and_jittered() -> None:
    store = Listing()
    keys = fill(store, 10_000)
    clock = FakeClock()
    directory = ConsumerDirectory(store, clock, refresh_s=60, check_s=1.0)
    await directory.authenticate(keys[0])
    for _ in range(600):  # ten minutes: every minute before (with refresh_s 60)
        clock.advance(1.0)
        await directory.authenticate(keys[0])
        await settle(directory)
    assert store.listings == 1
    period = directory._due_at - directory._loaded_at
    assert 0.8 * 10_000 / LIST_ROWS_PER_S <= period <= 1.2 * 10_000 / LIST_ROWS_PER_S


async def test_a_change_with_many_rows_spreads_the_instances_reloads_and_each_reloads_once() -> None:
    store = Listing()
    keys = fill(store, 10_000)
    clock = FakeClock()
    directories = [ConsumerDirectory(store, clock, refresh_s=60, check_s=1.0) for _ in range(20)]
    for d in directories:
        await d.authenticate(keys[0])
    store.consumers["c1"] = replace(store.consumers["c1"], enabled=False)
    store.writes += 1
    reloaded_at: dict[int, float] = {}
    spread = 10_000 / MARKER_ROWS_PER_S
    for step in range(int(spread / 0.1) + 30):
        clock.advance(0.1)
        for i, d in enumerate(directories):
            before = d.reloads
            await d.authenticate(keys[0])
            await settle(d)
            if d.reloads > before:
                assert i not in reloaded_at, "reloaded twice for one change"
                reloaded_at[i] = step * 0.1
    assert len(reloaded_at) == len(directories)  # every instance has the change within the spread and a check
    assert max(reloaded_at.values()) <= spread + 1.5
    assert len({round(t) for t in reloaded_at.values()}) >= 5  # not all in the same second
    for d in directories:
        with pytest.raises(ConsumerDisabled):
            await d.authenticate(keys[1])  # c1 disabled: refused everywhere
