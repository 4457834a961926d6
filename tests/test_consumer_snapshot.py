"""The consumer listing's snapshot (issue 32): a cold instance reads a few entities instead of every consumer row, and
never a view the change feed cannot bring to the marker. The store contract (chunks through Azurite, a corrupt or old
snapshot, a change between the stamp and the listing) is in tests/test_stores.py; here the codec, the reader's choices
and the writer's."""

from __future__ import annotations

import asyncio
import json
import zlib
from dataclasses import replace

import pytest

from shared.adminops.operations import Actor, AdminOperations
from shared.clock import FakeClock
from shared.edge import consumers as directory_module
from shared.edge.consumers import SNAPSHOT_BEHIND, ConsumerDirectory, hash_key, key_prefix, new_key
from shared.outcomes import ConsumerDisabled
from shared.records.consumer_feed import FEED_ENTRIES
from shared.records.consumer_snapshot import (
    CHUNK_BYTES,
    BadSnapshot,
    SnapshotHead,
    pack,
    parse_head,
    unpack,
)
from shared.records.consumers import Consumer, Limits, Team
from shared.storage.consumer_table import SNAPSHOT_SCHEMA, decode_snapshot, encode_snapshot
from shared.storage.memory import MemoryConsumerStore

ADMIN = Actor("test")


class Store(MemoryConsumerStore):
    def __init__(self) -> None:
        super().__init__()
        self.listings = 0
        self.point_reads = 0

    async def list_all(self):  # type: ignore[no-untyped-def]
        self.listings += 1
        return await super().list_all()

    async def get(self, consumer_id: str) -> Consumer | None:
        self.point_reads += 1
        return await super().get(consumer_id)


async def filled(count: int) -> tuple[Store, list[str], FakeClock]:
    store, clock = Store(), FakeClock()
    keys = [new_key() for _ in range(count)]
    await store.create_many([Consumer(id=f"c{i}", name=f"c{i}", key_hash=hash_key(k), key_prefix=key_prefix(k),
                                      limits=Limits(tokens_per_minute=1_000)) for i, k in enumerate(keys)])
    return store, keys, clock


async def written(store: Store, clock: FakeClock) -> ConsumerDirectory:
    """A warm instance's listing, and the snapshot it writes after it."""
    d = ConsumerDirectory(store, clock, refresh_s=60)
    await d.reload()
    if d._writing is not None:
        await d._writing
    return d


def head_of(encoded_head: dict[str, object]) -> SnapshotHead:
    return parse_head(encoded_head, None, SNAPSHOT_SCHEMA)


def test_the_snapshot_holds_key_hashes_and_prefixes_never_a_key() -> None:
    keys = [new_key() for _ in range(50)]
    rows = [Consumer(id=f"c{i}", name=f"c{i}", key_hash=hash_key(k), key_prefix=key_prefix(k),
                     previous_key_hash=hash_key(k + "old"), previous_key_expires=5.0) for i, k in enumerate(keys)]
    encoded = encode_snapshot(rows, [Team("t", "T")], "abc", 3, 1.0)
    raw = zlib.decompress(b"".join(encoded.chunks)).decode()
    assert not any(k in raw or k[9:] in raw for k in keys)
    assert all(hash_key(k) in raw for k in keys)
    consumers, teams = decode_snapshot(head_of(encoded.head), encoded.chunks)
    assert consumers == rows and teams == [Team("t", "T")]


def test_a_compression_bomb_is_refused_before_it_is_inflated(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.records import consumer_snapshot

    monkeypatch.setattr(consumer_snapshot, "MAX_ROWS_BYTES", 1_000_000)  # (256 MB as shipped: the same code path)
    bomb = zlib.compress(b"[" + b" " * (consumer_snapshot.MAX_ROWS_BYTES + 10) + b"]", 9)
    encoded = pack({"consumers": [], "teams": []}, SNAPSHOT_SCHEMA, "abc", 1, 1.0)
    import hashlib

    head = replace(head_of(encoded.head), size=len(bomb), sha256=hashlib.sha256(bomb).hexdigest(),
                   chunks=-(-len(bomb) // CHUNK_BYTES))
    chunks = [bomb[i : i + CHUNK_BYTES] for i in range(0, len(bomb), CHUNK_BYTES)]
    with pytest.raises(BadSnapshot, match="larger than"):
        unpack(head, chunks)


@pytest.mark.parametrize("change", [
    {"schema": "another"}, {"format": 2}, {"seq": -1}, {"seq": True}, {"chunks": 0}, {"chunks": 10_000},
    {"size": 10 ** 9}, {"generation": "../x"}, {"sha256": "z" * 64}, {"epoch": ""}, {"written_at": float("nan")},
])
def test_a_head_out_of_shape_is_not_used(change: dict[str, object]) -> None:
    encoded = pack({"consumers": [], "teams": []}, SNAPSHOT_SCHEMA, "abc", 1, 1.0)
    head_of(encoded.head)
    with pytest.raises(BadSnapshot):
        head_of({**encoded.head, **change})


def test_rows_that_do_not_parse_are_left_out_as_the_listing_leaves_them_out() -> None:
    good = Consumer(id="ok", name="ok", key_hash=hash_key("k"), key_prefix="gw-k")
    encoded = encode_snapshot([good], [], "abc", 1, 1.0)
    rows = json.loads(zlib.decompress(b"".join(encoded.chunks)))
    rows["consumers"].append({**rows["consumers"][0], "RowKey": "bad", "enabled": "true"})  # a string: refused
    again = pack(rows, SNAPSHOT_SCHEMA, "abc", 1, 1.0)
    assert decode_snapshot(head_of(again.head), again.chunks)[0] == [good]


async def test_a_cold_instance_starts_from_the_snapshot_with_a_few_reads_and_no_listing() -> None:
    store, keys, clock = await filled(500)
    await written(store, clock)
    store.listings = store.calls = 0
    cold = ConsumerDirectory(store, clock, refresh_s=60)
    assert (await cold.authenticate(keys[42])).id == "c42"
    assert store.listings == 0 and cold.snapshot_loads == 1 and store.calls <= 5  # marker, head, chunk, marker


async def test_changes_after_the_snapshot_are_read_before_the_first_answer() -> None:
    store, keys, clock = await filled(50)
    await written(store, clock)
    ops = AdminOperations(store, None, clock)
    await ops.set_enabled("c1", False, ADMIN)
    await ops.change("c2", lambda c: replace(c, limits=Limits(tokens_per_minute=7), version=c.version + 1), ADMIN)
    store.listings = store.point_reads = 0
    cold = ConsumerDirectory(store, clock, refresh_s=60)
    with pytest.raises(ConsumerDisabled):
        await cold.authenticate(keys[1])
    assert (await cold.authenticate(keys[2])).limits.tokens_per_minute == 7
    assert store.listings == 0 and store.point_reads == 2


async def test_a_snapshot_more_changes_behind_than_the_feed_holds_is_not_used() -> None:
    store, keys, clock = await filled(20)
    await written(store, clock)
    ops = AdminOperations(store, None, clock)
    for i in range(FEED_ENTRIES + 1):
        await ops.set_enabled(f"c{i % 20}", i % 2 == 1, ADMIN)
    store.listings = 0
    cold = ConsumerDirectory(store, clock, refresh_s=60)
    assert (await cold.authenticate(keys[3])).id == "c3"
    assert (store.listings, cold.snapshot_loads, cold.snapshot_fallbacks) == (1, 0, 1)


async def test_a_bulk_creation_after_the_snapshot_is_not_followed_from_it() -> None:
    """A bulk creation is one 'everything' entry: the feed cannot name its rows, so the snapshot before it is not used
    (its new consumers would be missing), though it is only one change behind."""
    store, keys, clock = await filled(20)
    await written(store, clock)
    more = [new_key() for _ in range(60)]
    await store.create_many([Consumer(id=f"n{i}", name="n", key_hash=hash_key(k), key_prefix=key_prefix(k))
                             for i, k in enumerate(more)])
    store.listings = 0
    cold = ConsumerDirectory(store, clock, refresh_s=60, lookups_per_s=0.001)
    cold.budget.take()  # no lookups: the key must come from the copy
    assert (await cold.authenticate(more[59])).id == "n59"
    assert (store.listings, cold.snapshot_loads) == (1, 0)


async def test_the_snapshot_is_rewritten_only_when_stale_and_of_writers_at_once_one_wins() -> None:
    store, _, clock = await filled(20)
    first = await written(store, clock)
    assert first.snapshot_writes == 1 and store.snapshot_writes == 1
    await written(store, clock)  # fresh: left as it is
    assert store.snapshot_writes == 1
    ops = AdminOperations(store, None, clock)
    for i in range(SNAPSHOT_BEHIND + 1):
        await ops.set_enabled(f"c{i % 20}", i % 2 == 1, ADMIN)
    writers = [ConsumerDirectory(store, clock, refresh_s=60, snapshots=True) for _ in range(5)]
    for w in writers:
        w.reloads = 1  # warm instances: a periodic listing, not a cold start
    await asyncio.gather(*(w.reload() for w in writers))
    await asyncio.gather(*(w._writing for w in writers if w._writing is not None))
    assert store.snapshot_writes == 2 and sum(w.snapshot_writes for w in writers) == 1
    head, _ = await store.snapshot_head()
    assert head is not None and head.seq == (await store.change_marker()).seq
    chunk_rows = [key for key in store.snapshot_rows if key[0] != "snapshot"]
    assert len(chunk_rows) == head.chunks  # the losers' chunks and the replaced generation's are gone
    clock.advance(directory_module.SNAPSHOT_MAX_AGE_S + 1)
    cold = await written(store, clock)  # a cold start reads it, old or not (the feed says it is current) ...
    assert cold.snapshot_loads == 1 and store.snapshot_writes == 2
    writers[0]._due_at = 0.0
    await writers[0].check()  # ... and the next listing after it is old rewrites it though no change came
    writers[0]._reload_if_due()
    assert writers[0]._reloading is not None
    await writers[0]._reloading
    assert writers[0]._writing is not None
    await writers[0]._writing
    assert store.snapshot_writes == 3


async def test_without_snapshots_a_cold_instance_reads_the_listing_and_writes_none() -> None:
    store, keys, clock = await filled(20)
    d = ConsumerDirectory(store, clock, refresh_s=60, snapshots=False)
    assert (await d.authenticate(keys[0])).id == "c0"
    assert d._writing is None and store.snapshot_rows == {}


async def test_requests_at_a_cold_start_share_one_load() -> None:
    """Requests arriving together at a cold instance wait for one load, not one each (which multiplied the reads of
    instances starting together)."""
    store, keys, clock = await filled(100)
    await written(store, clock)
    store.calls = 0
    cold = ConsumerDirectory(store, clock, refresh_s=60)
    found = await asyncio.gather(*(cold.authenticate(k) for k in keys[:20]))
    assert [c.id for c in found] == [f"c{i}" for i in range(20)]
    assert cold.snapshot_loads == 1 and store.calls <= 5


async def test_a_throttled_chunk_read_is_tried_again_after_a_pause_not_failed() -> None:
    from shared.storage.protocols import StoreBusy

    store, keys, clock = await filled(100)
    await written(store, clock)
    store.listings = 0
    refusals = [2]
    chunk = store.snapshot_chunk

    def throttled(head: SnapshotHead, k: int) -> bytes:
        if refusals[0]:
            refusals[0] -= 1
            raise StoreBusy("503 ServerBusy")
        return chunk(head, k)

    store.snapshot_chunk = throttled  # type: ignore[method-assign]
    cold = ConsumerDirectory(store, clock, refresh_s=60)
    assert (await cold.authenticate(keys[7])).id == "c7"
    assert (cold.snapshot_loads, cold.reload_failures, store.listings, refusals[0]) == (1, 0, 0, 0)


async def test_a_cold_copy_has_every_change_since_the_snapshot_however_many_before_its_first_answer() -> None:
    """More changes since the stamp than a warm copy reads at once (FEED_ROWS_PER_S): a cold copy still reads them all
    before it answers; a consumer created and mapped since is found (found by the e2e tests: the spread left a new
    consumer's Entra mapping out of a cold copy for seconds)."""
    from shared.edge.entra import Principal

    store, keys, clock = await filled(40)
    await written(store, clock)
    ops = AdminOperations(store, None, clock)
    for i in range(30):
        await ops.set_enabled(f"c{i}", False, ADMIN)
    fresh = Consumer(id="fresh", name="fresh", key_hash=hash_key("kf"), key_prefix="gw-", entra=frozenset({"app:42"}))
    await store.create(fresh)
    store.listings = store.point_reads = 0
    cold = ConsumerDirectory(store, clock, refresh_s=60)
    principal = Principal(tenant="t", app_id="42", object_id="o", roles=(), groups=(), expires=0.0, home=True)
    found = await cold.for_principal(principal)
    assert found is not None and found.id == "fresh"
    for i in (0, 17, 29):
        with pytest.raises(ConsumerDisabled):
            await cold.authenticate(keys[i])
    assert store.listings == 0 and store.point_reads == 31 and cold.snapshot_loads == 1
