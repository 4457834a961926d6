"""The consumer change feed (issue 32): a change reaches every instance at the next marker check at the cost of a
point read per row it names, not a read of the whole listing; whenever an instance cannot follow the feed from where
its copy is (more changes than the feed holds, a bulk creation, a marker from an older version, a corrupt or
oversized feed row) it reads the whole listing, and a change whose feed entry was never written is seen at the
periodic full reload."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import pytest

from shared.adminops.operations import Actor, AdminOperations, OperationError
from shared.clock import FakeClock
from shared.edge.consumers import FEED_ROWS_PER_S, ConsumerDirectory, hash_key, key_prefix, new_key
from shared.outcomes import ConsumerDisabled, InvalidKey
from shared.records.consumer_feed import (
    CONSUMER,
    EVERYTHING,
    FEED_ENTRIES,
    FEED_FORMAT,
    TEAM,
    Change,
    ChangeFeed,
    appended,
    parse,
    parse_marker,
)
from shared.records.consumers import Consumer, Limits, Team
from shared.storage.memory import MemoryChangeLogStore, MemoryConsumerStore
from shared.storage.protocols import ChangeNotAnnounced, StoreBusy

ADMIN = Actor("test")


class Store(MemoryConsumerStore):
    """Counts what the instances read; can serve a marker row of its own (corrupt, oversized), throttle point reads,
    and fail to record the feed after writing a row."""

    def __init__(self) -> None:
        super().__init__()
        self.listings = 0
        self.point_reads = 0
        self.row: dict[str, Any] | None = None
        self.busy_reads = False
        self.feed_fails = False

    async def list_all(self):  # type: ignore[no-untyped-def]
        self.listings += 1
        return await super().list_all()

    async def get(self, consumer_id: str) -> Consumer | None:
        self.point_reads += 1
        if self.busy_reads:
            raise StoreBusy("503 ServerBusy")
        return await super().get(consumer_id)

    async def get_team(self, team_id: str) -> Team | None:
        self.point_reads += 1
        return await super().get_team(team_id)

    async def change_marker(self) -> ChangeFeed:
        if self.row is not None:
            return parse_marker(f"own-{self.writes}", self.row)
        return await super().change_marker()

    async def change_feed(self) -> ChangeFeed:
        if self.row is not None:
            return parse(f"own-{self.writes}", self.row)
        return await super().change_feed()

    def mark(self, changed: list[tuple[str, str]]) -> None:
        if self.feed_fails:  # (as TableConsumerStore: the row is written first, then the feed)
            raise ChangeNotAnnounced("written, but not recorded in the change feed")
        super().mark(changed)


def fill(store: Store, count: int) -> list[str]:
    keys = []
    for i in range(count):
        key = new_key()
        store.consumers[f"c{i}"] = Consumer(id=f"c{i}", name=f"c{i}", key_hash=hash_key(key), key_prefix=key_prefix(key),
                                            limits=Limits(tokens_per_minute=100_000))
        store.etags[f"c{i}"] = f"e{i}"
        keys.append(key)
    store.mark([(EVERYTHING, "")])
    return keys


async def warm(store: Store, clock: FakeClock, count: int = 1) -> list[ConsumerDirectory]:
    directories = [ConsumerDirectory(store, clock, refresh_s=60, check_s=1.0) for _ in range(count)]
    for d in directories:
        await d.reload()
    store.listings = store.point_reads = 0
    return directories


async def settle(directory: ConsumerDirectory) -> None:
    for _ in range(3):
        await asyncio.sleep(0)
    if directory._reloading is not None:
        await directory._reloading


# ---- the feed itself -----------------------------------------------------------------------------------------------


def feed_after(*changes: tuple[str, str], start: ChangeFeed | None = None) -> ChangeFeed:
    return parse("t", appended(start or ChangeFeed(None), changes))


def test_a_feed_is_followed_only_from_a_sequence_it_still_holds_in_the_same_epoch() -> None:
    one = feed_after((CONSUMER, "a"))
    two = feed_after((CONSUMER, "b"), (TEAM, "t"), start=one)
    assert two.epoch == one.epoch and two.seq == 3
    assert two.after(one.epoch, one.seq) == (Change(2, CONSUMER, "b"), Change(3, TEAM, "t"))
    assert two.after(one.epoch, 3) == ()
    assert two.after("other", one.seq) is None  # another epoch: a feed started again
    assert two.after(one.epoch, 4) is None  # a sequence ahead of the feed: it was started again
    long = one
    for i in range(FEED_ENTRIES + 5):
        long = feed_after((CONSUMER, f"x{i}"), start=long)
    assert len(long.changes) == FEED_ENTRIES
    assert long.after(one.epoch, one.seq) is None  # more changes than the feed holds since: the whole listing
    assert long.after(one.epoch, long.seq - FEED_ENTRIES) is not None


def test_a_bulk_change_is_one_entry_that_sends_everyone_to_the_listing() -> None:
    start = feed_after((CONSUMER, "a"))
    bulk = feed_after(*((CONSUMER, f"b{i}") for i in range(FEED_ENTRIES)), start=start)
    assert bulk.seq == start.seq + 1 and bulk.changes[-1].kind == EVERYTHING
    assert bulk.after(start.epoch, start.seq) is None


def test_the_largest_feed_fits_a_table_property() -> None:
    feed = ChangeFeed(None)
    for i in range(FEED_ENTRIES * 3):
        feed = feed_after((CONSUMER, f"{i:063d}"), start=feed)
    row = appended(feed, [(TEAM, "z" * 63)])
    assert len(row["feed"]) < 32_000  # a string property: 64 KiB, in UTF-16
    assert parse("t", row).seq == feed.seq + 1


GOOD = appended(ChangeFeed(None), [(CONSUMER, "a"), (CONSUMER, "b")])


@pytest.mark.parametrize("row", [
    {},  # an older version's marker: no feed at all
    {**GOOD, "feed_format": FEED_FORMAT + 1},  # a newer format this version does not know
    {**GOOD, "epoch": ""},
    {**GOOD, "seq": "2"},
    {**GOOD, "seq": True},
    {**GOOD, "seq": -1},
    {**GOOD, "seq": 7},  # the entries do not run to the sequence
    {**GOOD, "feed": "{not json"},
    {**GOOD, "feed": json.dumps({"1": "a"})},
    {**GOOD, "feed": json.dumps([[1, "c", "a"], [3, "c", "b"]])},  # a gap
    {**GOOD, "feed": json.dumps([[1, "x", "a"], [2, "c", "b"]])},  # an unknown kind
    {**GOOD, "feed": json.dumps([[1, "c", 5], [2, "c", "b"]])},
    {**GOOD, "feed": json.dumps([[1, "c", "a' or PartitionKey ne '"], [2, "c", "b"]])},  # not an id: never read
    {**GOOD, "feed": json.dumps([[1, "t", "../x"], [2, "c", "b"]])},
    {**GOOD, "feed": json.dumps([[1, "c"], [2, "c", "b"]])},
    {**GOOD, "feed": json.dumps([[i, "c", "a"] for i in range(1, FEED_ENTRIES + 2)]), "seq": FEED_ENTRIES + 1},
    {**GOOD, "feed": "[" + " " * 40_000 + "]"},  # too big for a property: not ours
])
def test_a_marker_row_whose_feed_does_not_parse_strictly_is_a_feed_nobody_follows(row: dict[str, Any]) -> None:
    feed = parse("t", row)
    assert feed.epoch == "" and feed.after("", 0) is None
    restarted = parse("t2", appended(feed, [(CONSUMER, "c")]))  # a writer starts it again, in a new epoch
    assert restarted.epoch and restarted.seq == 1


# ---- instances following it ----------------------------------------------------------------------------------------


async def test_a_revoked_key_is_refused_on_every_instance_at_its_next_check_for_one_read_each() -> None:
    store, clock = Store(), FakeClock()
    keys = fill(store, 2_000)
    directories = await warm(store, clock, 20)
    for d in directories:
        await d.authenticate(keys[1])
    ops = AdminOperations(store, None, clock)
    await ops.set_enabled("c1", False, ADMIN)
    await ops.change("c2", lambda c: replace(c, limits=replace(c.limits, tokens_per_minute=1_000)), ADMIN)
    clock.advance(1.0)
    for d in directories:
        await d.authenticate(keys[1])  # this request is served from the copy; the check it starts runs beside it
        await settle(d)
        with pytest.raises(ConsumerDisabled):
            await d.authenticate(keys[1])
        assert (await d.authenticate(keys[2])).limits.tokens_per_minute == 1_000
        assert (await d.authenticate(keys[3])).enabled  # the others as they were
    assert store.listings == 0  # no instance read the listing
    assert store.point_reads == 2 * len(directories)  # two rows named, one read each per instance


async def test_a_deleted_consumer_and_a_rotated_key_are_refused_without_a_listing() -> None:
    store, clock = Store(), FakeClock()
    keys = fill(store, 50)
    [d] = await warm(store, clock)
    ops = AdminOperations(store, None, clock)
    await ops.delete("c4", ADMIN)
    _, new = await ops.rotate("c5", 0, ADMIN)
    store.point_reads = 0  # (the admin's own reads)
    await d.check()
    d.budget = type(d.budget)(0, clock)  # no lookups: only the copy decides
    with pytest.raises(InvalidKey):
        await d.authenticate(keys[4])
    with pytest.raises(InvalidKey):
        await d.authenticate(keys[5])  # rotated with no grace: the old key is gone
    assert (await d.authenticate(new)).id == "c5"
    assert store.listings == 0 and store.point_reads == 2


async def test_a_consumer_created_since_the_listing_is_known_from_the_feed() -> None:
    store, clock = Store(), FakeClock()
    fill(store, 10)
    [d] = await warm(store, clock)
    key = new_key()
    await AdminOperations(store, None, clock).create(
        Consumer(id="late", name="late", key_hash=hash_key(key), key_prefix=key_prefix(key)), ADMIN)
    await d.check()
    d.budget = type(d.budget)(0, clock)
    assert (await d.authenticate(key)).id == "late"
    assert store.listings == 0


async def test_a_team_change_reaches_its_members_and_a_team_deleted_leaves_them_nothing() -> None:
    store, clock = Store(), FakeClock()
    keys = fill(store, 10)
    store.teams["t"] = Team("t", "T", Limits(tokens_per_minute=10_000), frozenset({"gpt-4o", "gpt-4o-mini"}), "high")
    store.team_etags["t"] = "t0"
    store.consumers["c1"] = replace(store.consumers["c1"], team="t", priority="high")
    store.mark([(EVERYTHING, "")])
    [d] = await warm(store, clock)
    assert (await d.authenticate(keys[1])).deployments == frozenset({"gpt-4o", "gpt-4o-mini"})
    ops = AdminOperations(store, None, clock)
    await ops.change_team("t", lambda t: replace(t, deployments=frozenset({"gpt-4o"}), priority="normal"), ADMIN)
    await d.check()
    member = await d.authenticate(keys[1])
    assert member.deployments == frozenset({"gpt-4o"}) and member.priority == "normal"
    assert member.team_record is not None and member.team_record.deployments == frozenset({"gpt-4o"})
    assert (await d.authenticate(keys[2])).deployments is None  # not a member: unchanged
    del store.teams["t"]  # as if deleted with its member still in it (the admin refuses that; a hand edit may not)
    store.mark([(TEAM, "t")])
    await d.check()
    assert (await d.authenticate(keys[1])).deployments == frozenset()  # a missing team: nothing, never more
    assert store.listings == 0 and store.point_reads == 2


async def test_more_changes_than_the_feed_holds_between_checks_mean_a_full_reload() -> None:
    store, clock = Store(), FakeClock()
    keys = fill(store, 200)
    [d] = await warm(store, clock)
    ops = AdminOperations(store, None, clock)
    for i in range(FEED_ENTRIES + 1):
        await ops.set_enabled(f"c{i}", False, ADMIN)
    await d.check()
    assert store.listings == 1 and store.point_reads == 0
    with pytest.raises(ConsumerDisabled):
        await d.authenticate(keys[0])  # the oldest change, no longer in the feed, is in the listing
    await ops.set_enabled("c0", True, ADMIN)
    await d.check()  # and from there the feed again
    assert (await d.authenticate(keys[0])).enabled and store.listings == 1 and store.point_reads == 1


async def test_a_bulk_creation_sends_every_instance_to_the_listing() -> None:
    store, clock = Store(), FakeClock()
    fill(store, 10)
    [d] = await warm(store, clock)
    created = [Consumer(id=f"bulk{i}", name="b", key_hash=hash_key(f"gw-b{i}"), key_prefix="gw-b") for i in range(100)]
    await AdminOperations(store, None, clock).create_many(created, ADMIN)
    await d.check()
    assert store.listings == 1 and store.point_reads == 0


@pytest.mark.parametrize("row", [
    {"PartitionKey": "marker", "RowKey": "consumers"},  # replaced by an older version's admin command
    {**GOOD, "feed": "[" + "[1,\"c\",\"a\"]," * 5_000 + "]"},  # too big
    {**GOOD, "feed": "[[1, \"c\", \"c1\"], [2, \"c\"]]"},  # corrupt
])
async def test_a_marker_row_this_version_cannot_follow_means_a_full_reload(row: dict[str, Any]) -> None:
    store, clock = Store(), FakeClock()
    keys = fill(store, 10)
    [d] = await warm(store, clock)
    store.consumers["c1"] = replace(store.consumers["c1"], enabled=False)
    store.row = row
    await d.check()
    assert store.listings == 1 and store.point_reads == 0
    with pytest.raises(ConsumerDisabled):
        await d.authenticate(keys[1])
    await d.check()
    assert store.listings == 1  # once per change of the row, not at every check


@pytest.mark.parametrize("feed", ["[" + " " * 40_000 + "]", "[[1, \"c\"]]", "{}", "[[1, \"c\", \"c1\"]]"])
async def test_a_feed_that_does_not_parse_behind_a_good_marker_means_a_full_reload(feed: str) -> None:
    """The check reads the marker's epoch and sequence alone: they may say "followable" while the entries, read
    next, are corrupt, oversized or do not run to the sequence."""
    store, clock = Store(), FakeClock()
    keys = fill(store, 10)
    [d] = await warm(store, clock)
    current = await store.change_feed()
    store.consumers["c1"] = replace(store.consumers["c1"], enabled=False)
    store.row = {"feed_format": FEED_FORMAT, "epoch": current.epoch, "seq": current.seq + 1, "feed": feed}
    assert (await store.change_marker()).may_follow(current.epoch, current.seq)
    await d.check()
    assert store.listings == 1 and store.point_reads == 0
    with pytest.raises(ConsumerDisabled):
        await d.authenticate(keys[1])


async def test_the_check_every_second_reads_the_marker_alone_and_the_feed_once_per_change() -> None:
    store, clock = Store(), FakeClock()
    keys = fill(store, 100)
    [d] = await warm(store, clock)
    feeds = []
    original = store.change_feed

    async def counted() -> ChangeFeed:
        feeds.append(1)
        return await original()

    store.change_feed = counted  # type: ignore[method-assign]
    for _ in range(5):
        await d.check()
    assert feeds == []  # nothing changed: only the marker's few properties
    ops = AdminOperations(store, None, clock)
    for i in range(30):  # 30 rows: read at a random moment of the next 6 s
        await ops.set_enabled(f"c{i}", False, ADMIN)
    for _ in range(80):
        clock.advance(0.1)
        await d.check()
    assert len(feeds) == 1 and store.point_reads == 30
    with pytest.raises(ConsumerDisabled):
        await d.authenticate(keys[29])


async def test_in_a_rolling_deploy_an_older_writer_costs_full_reloads_and_the_feed_resumes_after() -> None:
    store, clock = Store(), FakeClock()
    keys = fill(store, 10)
    [d] = await warm(store, clock)
    store.consumers["c1"] = replace(store.consumers["c1"], enabled=False)
    store.writes += 1  # an older version's write: the marker replaced, with no feed
    await d.check()
    assert store.listings == 1
    ops = AdminOperations(store, None, clock)
    await ops.set_enabled("c2", False, ADMIN)  # this version's writer finds no feed: a new epoch
    await d.check()
    assert store.listings == 2  # the new epoch is not followed from the old one: one listing more
    await ops.set_enabled("c3", False, ADMIN)
    await d.check()
    assert store.listings == 2 and store.point_reads == 1  # and the feed from there
    for key in keys[1:4]:
        with pytest.raises(ConsumerDisabled):
            await d.authenticate(key)


async def test_a_change_whose_feed_entry_failed_is_refused_at_the_periodic_reload() -> None:
    """The row is written, recording it in the feed fails: the admin is told, the instances do not see it at their
    checks, and the periodic full reload (the safety net) brings it."""
    store, clock = Store(), FakeClock()
    keys = fill(store, 10)
    [d] = await warm(store, clock)
    store.feed_fails = True
    audit = MemoryChangeLogStore()
    with pytest.raises(OperationError) as refused:
        await AdminOperations(store, audit, clock).set_enabled("c1", False, ADMIN)
    assert refused.value.status == 503 and refused.value.code == "change_not_announced"
    assert "full reload" in refused.value.message and "again" in refused.value.message
    assert store.consumers["c1"].enabled is False  # written
    assert [e.action for e in await audit.recent(10, 0)] == ["consumers.disable"]  # and recorded as done
    store.feed_fails = False
    for _ in range(59):
        clock.advance(1.0)
        assert (await d.authenticate(keys[1])).enabled  # not seen through the feed
        await settle(d)
    clock.advance(1.5)
    await d.authenticate(keys[2])
    await settle(d)  # refresh_s 60: the full reload
    with pytest.raises(ConsumerDisabled):
        await d.authenticate(keys[1])
    assert store.listings == 1


async def test_a_change_naming_many_rows_is_read_at_a_random_moment_of_its_spread() -> None:
    store, clock = Store(), FakeClock()
    keys = fill(store, 100)
    directories = await warm(store, clock, 10)
    ops = AdminOperations(store, None, clock)
    for i in range(40):
        await ops.set_enabled(f"c{i}", False, ADMIN)
    spread = 40 / FEED_ROWS_PER_S
    applied_at: list[float] = []
    for step in range(int(spread / 0.1) + 20):
        clock.advance(0.1)
        for d in directories:
            before = d.feed_reads
            await d.authenticate(keys[50])
            await settle(d)
            if d.feed_reads > before:
                applied_at.append(step * 0.1)
    assert len(applied_at) == len(directories)  # each read the rows once
    assert max(applied_at) <= spread + 1.5 and len({round(t) for t in applied_at}) >= 3
    assert store.listings == 0 and store.point_reads == 40 * len(directories)
    for d in directories:
        with pytest.raises(ConsumerDisabled):
            await d.authenticate(keys[39])


async def test_point_reads_refused_are_tried_again_after_a_pause_not_at_every_check() -> None:
    store, clock = Store(), FakeClock()
    keys = fill(store, 10)
    [d] = await warm(store, clock)
    await AdminOperations(store, None, clock).set_enabled("c1", False, ADMIN)
    store.busy_reads = True
    for _ in range(30):
        clock.advance(1.0)
        await d.authenticate(keys[2])
        await settle(d)
    assert 2 <= store.point_reads <= 6  # pauses doubling from 2 s, not 30 reads
    store.busy_reads = False
    for _ in range(70):
        clock.advance(1.0)
        await d.authenticate(keys[2])
        await settle(d)
    with pytest.raises(ConsumerDisabled):
        await d.authenticate(keys[1])
    assert store.listings <= 1  # (the periodic reload may come due meanwhile; the feed needed none)


async def test_a_created_or_rotated_key_reaches_the_caller_even_when_the_feed_fails() -> None:
    """A key is shown once: an operation that wrote it returns it, feed or not; the gateways find a key they do not
    have yet by one lookup."""
    store, clock = Store(), FakeClock()
    fill(store, 5)
    [d] = await warm(store, clock)
    store.feed_fails = True
    ops = AdminOperations(store, None, clock)
    key = new_key()
    await ops.create(Consumer(id="fresh", name="fresh", key_hash=hash_key(key), key_prefix=key_prefix(key)), ADMIN)
    _, rotated_key = await ops.rotate("c1", 0, ADMIN)
    assert (await d.authenticate(key)).id == "fresh"
    assert (await d.authenticate(rotated_key)).id == "c1"
    with pytest.raises(OperationError, match="change is written"):
        await ops.delete("c2", ADMIN)
    assert "c2" not in store.consumers


async def test_the_first_request_after_an_idle_spell_is_judged_by_a_confirmed_copy() -> None:
    """An instance that served nothing for a while has checked nothing: its first request waits for the check it
    starts, so a key revoked meanwhile is refused at once, not once more from a copy minutes old."""
    store, clock = Store(), FakeClock()
    keys = fill(store, 10)
    [d] = await warm(store, clock)
    await d.authenticate(keys[1])
    await AdminOperations(store, None, clock).set_enabled("c1", False, ADMIN)
    clock.advance(30.0)
    with pytest.raises(ConsumerDisabled):
        await d.authenticate(keys[1])
    assert store.listings == 0 and store.point_reads == 1


async def test_a_slow_store_costs_the_first_request_after_an_idle_spell_a_bounded_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from shared.edge import consumers

    monkeypatch.setattr(consumers, "CONFIRM_WAIT_S", 0.01)
    store, clock = Store(), FakeClock()
    keys = fill(store, 10)
    [d] = await warm(store, clock)
    never = asyncio.Event()

    async def hanging() -> ChangeFeed:
        await never.wait()
        raise AssertionError("unreachable")

    store.change_marker = hanging  # type: ignore[method-assign]
    clock.advance(30.0)
    assert (await d.authenticate(keys[1])).id == "c1"  # served from the copy once the wait is over
    assert d._reloading is not None and not d._reloading.done()  # the check goes on, not cancelled
    d._reloading.cancel()


async def test_requests_arriving_while_an_idle_instance_confirms_a_stale_copy_wait_for_it_too() -> None:
    """bench.scale many:10000:256 answered 11 valid keys 503: an instance idle for longer than max_stale_s got several
    requests at once; the first waited for the check it started, the others (the instance no longer looked idle: the
    check had started) were judged by the stale copy while the check that would confirm it was in flight. Every
    request that would be refused as stale waits for the check under way (at most CONFIRM_WAIT_S)."""
    store, clock = Store(), FakeClock()
    keys = fill(store, 10)
    d = ConsumerDirectory(store, clock, refresh_s=3600, check_s=1.0, max_stale_s=300)  # many rows: a long period
    await d.reload()
    store.listings = 0
    gate = asyncio.Event()
    read = store.change_marker

    async def slow() -> ChangeFeed:
        await gate.wait()
        return await read()

    store.change_marker = slow  # type: ignore[method-assign]
    clock.advance(d._max_stale_s + 10)  # idle for longer than the copy may be trusted unconfirmed
    first = asyncio.create_task(d.authenticate(keys[1]))
    await asyncio.sleep(0)
    others = [asyncio.create_task(d.authenticate(k)) for k in keys[2:6]]
    await asyncio.sleep(0)
    gate.set()
    assert [c.id for c in await asyncio.gather(first, *others)] == ["c1", "c2", "c3", "c4", "c5"]
    assert store.listings == 0


async def test_a_stale_copy_whose_check_fails_is_still_refused_with_503() -> None:
    """The fix above waits for the check; it does not serve a copy the store has not confirmed (fail mode closed)."""
    from shared.outcomes import AuthStoreUnavailable

    store, clock = Store(), FakeClock()
    keys = fill(store, 10)
    [d] = await warm(store, clock)
    store.unavailable = True
    clock.advance(d._max_stale_s + 10)
    results = await asyncio.gather(*(d.authenticate(k) for k in keys[:4]), return_exceptions=True)
    assert all(isinstance(r, AuthStoreUnavailable) for r in results)
