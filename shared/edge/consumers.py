"""Consumers: who may call the gateway, with which key, for which deployments, under which limits.

Keys are 256-bit random secrets shown once; only their SHA-256 is stored. A fast hash is enough because the secret has
full entropy (nothing to brute-force from a dictionary); comparison of the stored and computed digests is constant-time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import secrets
from collections.abc import Mapping
from dataclasses import replace

from shared.clock import Clock
from shared.edge.entra import Principal, PrincipalIndex
from shared.edge.keyguard import FailureThrottle, LookupBudget, UnknownKeys
from shared.outcomes import (
    AuthStoreUnavailable,
    AuthThrottled,
    ConsumerDisabled,
    InvalidKey,
    KeyProblem,
    Refusal,
)
from shared.records.consumer_feed import CONSUMER, FEED_ENTRIES, Change, ChangeFeed
from shared.records.consumer_snapshot import BadSnapshot, SnapshotGone, SnapshotHead
from shared.records.consumers import Consumer, Team, with_team
from shared.storage.protocols import Conflict, ConsumerStore
from shared.waits import whole_seconds

log = logging.getLogger(__name__)

KEY_PREFIX = "gw-"
RELOAD_RETRY_S = 2.0  # the first retry of a failed reload; it doubles (jittered) up to MAX_RELOAD_RETRY_S
MAX_RELOAD_RETRY_S = 60.0
# The full listing reads every consumer row, and every instance reads it (issue 32: 10,000 consumers x 64 instances
# asked more of the partition than its 2,000 entities/s). Each instance's periodic reloads average at most this many
# rows a second, and a reload after a change (the marker) is spread over rows / MARKER_ROWS_PER_S seconds, at random,
# so the instances do not read the listing together.
LIST_ROWS_PER_S = 5.0
MARKER_ROWS_PER_S = 1_000.0
RELOAD_JITTER = 0.2
# A change the feed names costs each instance a point read per row named: up to this many rows at the check that sees
# them, more spread over rows / FEED_ROWS_PER_S seconds (at random), so that N instances ask the consumer partition
# for at most about N x FEED_ROWS_PER_S rows a second (256 instances: 1,280) however many rows one change names.
FEED_ROWS_PER_S = 5.0
# A request that finds the copy unconfirmed for more than two checks (an idle instance) waits for the check it starts,
# at most this long, so that the first request after an idle spell is not judged by a copy minutes old.
CONFIRM_WAIT_S = 0.5
# The listing's snapshot (records/consumer_snapshot.py): an instance that has just read the whole listing rewrites it
# when it is this many changes behind the marker read before that listing, or this old, or absent or unusable; a cold
# instance reads it (a few entities) instead of the listing when the feed can bring it to the marker.
SNAPSHOT_BEHIND = 20
SNAPSHOT_MAX_AGE_S = 600.0


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def key_prefix(key: str) -> str:
    """A short, non-secret handle for a key, safe to show in logs and listings (9 of ~46 characters)."""
    return key[:9]


def key_from_headers(headers: Mapping[str, str], repeated: frozenset[str]) -> str:
    """The consumer key from `api-key` or `Authorization: Bearer`; InvalidKey when absent or ambiguous."""
    if "api-key" in repeated or "authorization" in repeated:
        raise InvalidKey(KeyProblem.REPEATED)
    api_key = headers.get("api-key")
    bearer = None
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise InvalidKey(KeyProblem.NOT_BEARER)
        bearer = value.strip()
    if api_key is not None and bearer is not None and api_key != bearer:
        raise InvalidKey(KeyProblem.CONFLICTING)
    key = api_key if api_key is not None else bearer
    if not key:
        raise InvalidKey(KeyProblem.MISSING)
    return key


class ConsumerDirectory:
    """Every consumer, cached in memory and kept current in the background, so authentication costs no I/O.

    Every `check_s` the directory reads the store's change marker (one point read; every write through the admin
    command, API or console replaces it) and, when it changed, reads the consumers and teams its change feed names
    (a point read each; records/consumer_feed.py): a consumer created, disabled, rotated or deleted, or a team changed,
    is seen within about `check_s` (a change naming more than FEED_ROWS_PER_S rows: within rows / FEED_ROWS_PER_S
    more), whatever the number of consumers. When the feed cannot be followed from where this copy is (more changes
    than it holds, a bulk creation, a marker written by an older version, a feed that does not parse) the whole
    listing is reloaded instead (with more than a thousand consumers and teams, at a random moment of the next
    rows / MARKER_ROWS_PER_S seconds: the instances' reloads are spread). A full reload every `refresh_s` (or, with
    many rows, rows / LIST_ROWS_PER_S; jittered) whatever the marker says catches rows edited by other means, and a
    change whose feed entry could not be written. A reload, or a read of the rows named, that fails is tried again
    after a pause doubling from RELOAD_RETRY_S, jittered. The checks run when requests come: the first request after
    an idle spell (no check for two `check_s`) waits for the check it starts, at most CONFIRM_WAIT_S.

    A key not in the cache (a consumer created since the last reload) is looked up by a point read on its hash, within
    a per-instance budget of `lookups_per_s`; the store's "unknown" is remembered (bounded), and an address whose
    authentications keep failing is throttled before any lookup. A spray of made-up keys therefore costs the store at
    most `lookups_per_s` reads a second per instance, plus the regular reload.

    The cached copy is trusted for at most `max_stale_s` after the last successful reload: past that, with fail mode
    "closed", every key is refused with 503 until the store answers again (revocations cannot be missed for longer).
    """

    def __init__(
        self,
        store: ConsumerStore,
        clock: Clock,
        refresh_s: float,
        *,
        check_s: float = 1.0,
        max_stale_s: float = 300.0,
        fail_closed: bool = True,
        lookups_per_s: float = 2.0,
        failures_per_minute: int = 20,
        snapshots: bool = True,
    ) -> None:
        self._store = store
        self._snapshots = snapshots
        self._clock = clock
        self._refresh_s = refresh_s
        self._check_s = min(check_s, refresh_s)
        self._max_stale_s = max_stale_s
        self._fail_closed = fail_closed
        self._by_hash: dict[str, Consumer] = {}
        self._by_id: dict[str, Consumer] = {}  # for Entra principals, mapped to consumer ids
        self._raw: dict[str, Consumer] = {}  # as stored (no team attached): what a team's change is applied to
        self._teams: dict[str, Team] = {}
        # A digest the store did not know stays unknown until a reload brings it: a 256-bit key is not guessed.
        self.unknown = UnknownKeys(clock, ttl_s=max(refresh_s * 4, 60.0))
        self.budget = LookupBudget(lookups_per_s, clock)
        self.throttle = FailureThrottle(failures_per_minute, clock)
        self._principals = PrincipalIndex(())
        self._loaded_at = float("-inf")
        self._checked_at = float("-inf")
        self._marker: str | None = None  # the change marker's token as of the last reload or feed read
        self._epoch = ""  # the change feed's epoch and sequence this copy is current to ("": none to follow)
        self._seq = 0
        self._apply_at: float | None = None  # monotonic: when to read the rows the feed names (spread, or paused)
        self._pending: ChangeFeed | None = None  # the feed read, until its rows are
        self.feed_reads = 0  # rows read because the feed named them
        self._fresh_at = clock.monotonic()  # the last time the store confirmed the cache (or the start)
        self._reloading: asyncio.Task[None] | None = None
        self._stale_logged = False
        self.reload_failures = 0
        self.reloads = 0
        self._rows = 0  # consumers and teams at the last reload
        self._due_at = float("-inf")  # monotonic: the next full reload
        self._rng = random.Random()
        self._writing: asyncio.Task[None] | None = None  # a snapshot being written after a listing
        self._snapshot_broken = ""  # the generation of a snapshot whose chunks did not verify
        self.snapshot_loads = 0  # cold starts served by the snapshot
        self.snapshot_fallbacks = 0  # cold starts that found it absent or unusable and read the listing
        self.snapshot_writes = 0

    def _index(self, consumers: list[Consumer], teams: list[Team]) -> None:
        self._raw = {c.id: c for c in consumers}
        self._teams = {t.id: t for t in teams}
        consumers = [with_team(c, self._teams) for c in consumers]
        by_hash: dict[str, Consumer] = {}
        for consumer in consumers:
            by_hash[consumer.key_hash] = consumer
            if consumer.previous_key_hash:
                by_hash[consumer.previous_key_hash] = consumer
            self.unknown.discard(consumer.key_hash)
        self._by_hash = by_hash
        self._by_id = {c.id: c for c in consumers}
        self._principals = PrincipalIndex((c.id, key) for c in consumers for key in c.entra)

    async def reload(self) -> None:
        try:
            if self.reloads == 0 and self._snapshots and await self._from_snapshot():
                return  # a cold start from the snapshot; the next check follows the feed from its stamp
            # The marker first: a write that lands while the list is read changes it again, and the next check reads it.
            feed = await self._store.change_marker()
            consumers, teams = await self._store.list_all()
        except Exception as exc:  # the store's own errors are already mapped; keep serving the cached copy
            pause = self._pause()
            if self.reload_failures == 1 or self.reload_failures % 20 == 0:
                log.warning("could not reload consumers (%s, %d times); serving the cached copy",
                            type(exc).__name__, self.reload_failures)
            now = self._clock.monotonic()
            self._loaded_at = now - self._refresh_s + pause
            self._due_at = now + pause
            self._checked_at = now - self._check_s + min(self._check_s, pause)
            return
        self._took(feed, consumers, teams, (1 - RELOAD_JITTER, 1 + RELOAD_JITTER))
        if self._snapshots and feed.epoch and (self._writing is None or self._writing.done()):
            self._writing = asyncio.get_running_loop().create_task(self._refresh_snapshot(feed, consumers, teams))

    async def _from_snapshot(self) -> bool:
        """A cold start from the listing's snapshot, when the change feed can bring it to the marker read first: the
        copy is then the snapshot at its stamp, and the check that follows at once reads the rows changed since (as
        for any copy behind the feed). False (read the listing) when there is none, or it is from another epoch, more
        changes behind than the feed holds, behind a change the feed cannot name (a bulk creation), or does not verify.

        Why it is never older than the marker it is followed to: the snapshot's writer read the marker (epoch e,
        sequence s) before it read the listing, and every write records its feed entry after its row; so every change
        numbered up to s was in the rows it read, and every change after s (written during its listing or since) is
        named by the feed after s, whose rows this instance reads before it takes its copy as current."""
        marker = await self._store.change_marker()
        for _ in range(2):  # a snapshot replaced while its chunks were read: its head once more
            head, _ = await self._store.snapshot_head()
            reason = _unusable(head, marker)
            feed: ChangeFeed | None = None
            changes: tuple[Change, ...] = ()
            if reason is None and head is not None and marker.seq > head.seq:
                feed = await self._store.change_feed()
                after = feed.after(head.epoch, head.seq)
                if after is None:
                    reason = "the feed cannot bring it to the marker"
                changes = after or ()
            if reason is not None or head is None:
                log.info("consumer listing snapshot not used (%s): reading the listing", reason)
                self.snapshot_fallbacks += 1
                return False
            try:
                consumers, teams = await self._store.read_snapshot(head)
            except SnapshotGone:
                continue
            except BadSnapshot as problem:
                log.warning("consumer listing snapshot not used (%s): reading the listing", problem)
                self.snapshot_fallbacks += 1
                self._snapshot_broken = head.generation  # its head looks current: the listing replaces it anyway
                return False
            # Every row changed since the stamp, read before the copy is taken (all of them, at once: a cold copy
            # is never served older than the marker read above).
            named = list(dict.fromkeys((c.kind, c.id) for c in changes))
            changed, changed_teams = await self._read_named(named)
            self.feed_reads += len(named)
            raw, all_teams = _merged({c.id: c for c in consumers}, {t.id: t for t in teams}, changed, changed_teams)
            self._loaded_from(feed or ChangeFeed(None, head.epoch, head.seq), list(raw.values()), list(all_teams.values()))
            return True
        self.snapshot_fallbacks += 1
        return False

    def _loaded_from(self, stamp: ChangeFeed, consumers: list[Consumer], teams: list[Team]) -> None:
        self.snapshot_loads += 1
        # Current to the feed read (its token: the next check reads only the marker), or to the snapshot's stamp when
        # the marker was not ahead of it (no token: the next check reads the marker and adopts its token). Instances
        # started together from one snapshot read their first full listing (which catches rows edited by other means
        # than the store) spread over the whole period, not together.
        self._took(stamp, consumers, teams, (0.1, 1.0))

    def _took(self, stamp: ChangeFeed, consumers: list[Consumer], teams: list[Team], drawn: tuple[float, float]) -> None:
        """The copy is now these rows, current to `stamp`; the next full listing is due after the period the rows
        need, times a factor drawn from `drawn` (short periods are not drawn: nothing to spread)."""
        self.reload_failures = 0
        self.reloads += 1
        self._follow(stamp)
        self._index(consumers, teams)
        self._loaded_at = self._checked_at = self._fresh_at = self._clock.monotonic()
        self._rows = len(consumers) + len(teams)
        period = max(self._refresh_s, self._rows / LIST_ROWS_PER_S)
        if period > self._refresh_s:
            period *= self._rng.uniform(*drawn)
        self._due_at = self._loaded_at + period
        self._stale_logged = False

    async def _refresh_snapshot(self, feed: ChangeFeed, consumers: list[Consumer], teams: list[Team]) -> None:
        """After a full listing: write it as the snapshot, stamped with the marker read before it, when the one there
        is absent, unusable, from another epoch, SNAPSHOT_BEHIND changes behind or SNAPSHOT_MAX_AGE_S old; on the
        head's ETag, so of the instances that find it stale together one writes it."""
        try:
            head, etag = await self._store.snapshot_head()
            if head is not None and head.epoch == feed.epoch and feed.seq - head.seq <= SNAPSHOT_BEHIND \
                    and self._clock.now() - head.written_at < SNAPSHOT_MAX_AGE_S \
                    and head.generation != self._snapshot_broken:
                return
            await self._store.write_snapshot(consumers, teams, feed.epoch, feed.seq, self._clock.now(), etag, head)
            self.snapshot_writes += 1
        except Conflict:
            pass  # another instance wrote it first
        except Exception as exc:  # a snapshot not written costs the next cold start a listing, nothing more
            log.warning("could not write the consumer listing snapshot (%s: %s)", type(exc).__name__, exc)

    def _follow(self, feed: ChangeFeed) -> None:
        self._marker, self._epoch, self._seq, self._apply_at = feed.token, feed.epoch, feed.seq, None
        self._pending = None

    def _pause(self) -> float:
        """After a failure: try again in a little while, not on every request while the store is away (or throttles),
        and later each time: the instances that failed together do not come back together."""
        self.reload_failures += 1
        ceiling = min(MAX_RELOAD_RETRY_S, RELOAD_RETRY_S * 2 ** min(self.reload_failures - 1, 8))
        return min(self._refresh_s, self._rng.uniform(ceiling / 2, ceiling))

    async def check(self) -> None:
        """One small point read of the change marker; when it moved, the feed (one more point read) and the rows it
        names, or (when the feed cannot be followed from this copy) the whole listing."""
        now = self._checked_at = self._clock.monotonic()
        try:
            marker = await self._store.change_marker()
            if marker.token == self._marker:
                self.reload_failures = 0
                self._fresh_at = now
                self._stale_logged = False
                return
            if marker.epoch and (marker.epoch, marker.seq) == (self._epoch, self._seq) and self._pending is None:
                # No change since this copy's stamp (a copy from the snapshot has no token yet): nothing to read.
                self._marker, self.reload_failures, self._fresh_at, self._stale_logged = marker.token, 0, now, False
                return
            feed = None
            if marker.may_follow(self._epoch, self._seq):
                pending = self._pending
                feed = pending if pending is not None and pending.token == marker.token else \
                    await self._store.change_feed()
        except Exception as exc:  # as for a reload: keep serving the cached copy, within max_stale_s
            self.reload_failures += 1
            if self.reload_failures == 1 or self.reload_failures % 20 == 0:
                log.warning("could not check consumers for changes (%s, %d times); serving the cached copy",
                            type(exc).__name__, self.reload_failures)
            return
        changes = None if feed is None else feed.after(self._epoch, self._seq)
        if feed is not None and changes is not None:
            named = list(dict.fromkeys((c.kind, c.id) for c in changes))
            spread = len(named) / FEED_ROWS_PER_S
            if self._apply_at is None and spread > 1.0:
                self._apply_at = now + self._rng.uniform(0, spread)
            if self._apply_at is None or now >= self._apply_at:
                await self._apply(feed, named)
            else:
                self._pending = feed  # read once: the checks until then read only the marker
            return
        spread = self._rows / MARKER_ROWS_PER_S
        if self.reload_failures and now < self._due_at:
            pass  # the last reload failed: the next is tried when its pause ends, not at every check
        elif spread <= 1.0:
            await self.reload()
        elif self._due_at > now + spread:
            # Many rows: this instance reloads at a random moment of the spread, not with every other instance
            # (once: the checks until then see the same change and leave the moment alone).
            self._due_at = now + self._rng.uniform(0, spread)

    async def _apply(self, feed: ChangeFeed, named: list[tuple[str, str]]) -> None:
        """Read the rows the feed names (every write is recorded after its row, so each is read as written or newer)
        and apply them to the cached copy; a row gone (or one that does not parse) is a consumer or team gone."""
        try:
            consumers, teams = await self._read_named(named)
        except Exception as exc:
            pause = self._pause()
            if self.reload_failures == 1 or self.reload_failures % 20 == 0:
                log.warning("could not read the changed consumers (%s, %d times); serving the cached copy",
                            type(exc).__name__, self.reload_failures)
            self._apply_at = self._clock.monotonic() + pause
            return
        self.feed_reads += len(named)
        raw, all_teams = _merged(self._raw, self._teams, consumers, teams)
        self._index(list(raw.values()), list(all_teams.values()))  # a team's members get its change with it
        self._follow(feed)
        self.reload_failures = 0
        self._rows = len(raw) + len(all_teams)
        self._fresh_at = self._clock.monotonic()
        self._stale_logged = False

    async def _read_named(self, named: list[tuple[str, str]]) -> tuple[dict[str, Consumer | None], dict[str, Team | None]]:
        """The rows the feed names, as stored now (None: gone, or a team row that does not parse)."""
        consumers: dict[str, Consumer | None] = {}
        teams: dict[str, Team | None] = {}
        for kind, name in named:
            if kind == CONSUMER:
                consumers[name] = await self._store.get(name)
            else:
                try:
                    teams[name] = await self._store.get_team(name)
                except ValueError:  # a team row that does not parse: left out, as a full reload leaves it out
                    teams[name] = None
        return consumers, teams

    async def _current(self) -> None:
        if self._loaded_at == float("-inf"):
            # A cold instance: every request waits for the one first load (the snapshot or the listing), not a load
            # of its own (the requests that came together multiplied the reads of a cold start).
            if self._reloading is None or self._reloading.done():
                self._reloading = asyncio.get_running_loop().create_task(self.reload())
            with contextlib.suppress(Exception):
                await asyncio.shield(self._reloading)
            return
        now = self._clock.monotonic()
        idle = now - self._checked_at >= 2 * self._check_s
        # A copy past max_stale_s would be refused: a request waits for the check under way even when another request
        # started it (bench.scale many:10000:256 answered 11 valid keys 503 that way: an instance idle for minutes got
        # several requests at once, and only the first waited for the check that confirmed its copy).
        stale = now - self._fresh_at > self._max_stale_s
        self._reload_if_due()
        task = self._reloading
        if (idle or stale) and task is not None and not task.done():
            # shield: a request given up on does not cancel the check; wait_for: a slow store costs at most this
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), CONFIRM_WAIT_S)

    def _reload_if_due(self) -> None:
        if self._reloading is not None and not self._reloading.done():
            return
        now = self._clock.monotonic()
        if now >= self._due_at:
            self._reloading = asyncio.get_running_loop().create_task(self.reload())
        elif now - self._checked_at >= self._check_s:
            self._reloading = asyncio.get_running_loop().create_task(self.check())

    def _check_fresh(self) -> None:
        age = self._clock.monotonic() - self._fresh_at
        if age <= self._max_stale_s:
            return
        if not self._stale_logged:
            self._stale_logged = True
            log.error("consumers not reloaded for more than %gs; %s", self._max_stale_s,
                      "refusing every key until the store answers" if self._fail_closed else "still serving the cached copy")
        if self._fail_closed:
            raise AuthStoreUnavailable()

    def refuse(self, client: str, refusal: Refusal) -> Refusal:
        """Count a failed authentication against the client's address and log why; every such refusal is rendered as
        the same 401, so only logs and metrics tell a disabled consumer from a made-up key."""
        self.throttle.failed(client)
        match refusal:
            case ConsumerDisabled(consumer_id=consumer_id):
                log.info("authentication refused: consumer disabled (consumer %s)", consumer_id)
            case InvalidKey(problem=problem, consumer_id=consumer_id) if consumer_id:
                log.info("authentication refused: %s key (consumer %s)", problem.value, consumer_id)
            case InvalidKey(problem=problem):
                log.info("authentication refused: %s key", problem.value)
        return refusal

    def check_throttle(self, client: str) -> None:
        retry = self.throttle.retry_after(client)
        if retry is not None:
            raise AuthThrottled(whole_seconds(retry))

    async def authenticate(self, key: str, client: str = "") -> Consumer:
        await self._current()
        self._check_fresh()
        digest = hash_key(key)
        consumer = self._by_hash.get(digest)
        if consumer is None:
            self.check_throttle(client)
            consumer = await self._lookup(digest)
            if consumer is None:
                raise self.refuse(client, InvalidKey(KeyProblem.UNKNOWN))
        if consumer.key_hash != digest:
            # The previous key of a rotated consumer, valid only during its grace period.
            if not (
                consumer.previous_key_hash
                and hmac.compare_digest(consumer.previous_key_hash, digest)
                and self._clock.now() < consumer.previous_key_expires
            ):
                raise self.refuse(client, InvalidKey(KeyProblem.EXPIRED, consumer.id))
        elif not hmac.compare_digest(consumer.key_hash, digest):
            raise self.refuse(client, InvalidKey(KeyProblem.UNKNOWN))
        if not consumer.enabled:
            raise self.refuse(client, ConsumerDisabled(consumer.id))
        return consumer

    async def _lookup(self, digest: str) -> Consumer | None:
        """One point read for a key the cache does not know, if the budget allows; None for unknown (or not looked up:
        a key created seconds ago then works at the next lookup the budget allows, or the next reload)."""
        if digest in self.unknown:
            return None
        if not self.budget.take():
            if self.reloads == 0:
                # No listing yet (a cold instance whose first reload was throttled): a key it cannot look up now is
                # not known to be wrong. 503 with Retry-After, never 401 for a key that may be valid.
                raise AuthStoreUnavailable()
            return None
        try:
            consumer = await self._store.find_by_key_hash(digest)
        except Exception as exc:
            # Not a verdict on the key: it is not remembered as unknown, and the client may retry.
            log.warning("consumer lookup failed (%s)", type(exc).__name__)
            raise AuthStoreUnavailable() from None
        if consumer is None:
            self.unknown.add(digest)
            return None
        self._raw[consumer.id] = consumer
        consumer = with_team(consumer, self._teams)
        self._by_hash[digest] = consumer
        self._by_id[consumer.id] = consumer
        return consumer


    async def for_principal(self, principal: Principal) -> Consumer | None:
        """The consumer an Entra ID principal is mapped to, trusting the cache for at most `max_stale_s` as for keys.
        It never forces a reload: a mapping added through the admin command is seen at the next marker check, so
        tokens that map to nothing cannot turn into store reads."""
        await self._current()
        self._check_fresh()
        consumer_id = self._principals.resolve(principal)
        return None if consumer_id is None else self._by_id.get(consumer_id)


def _merged(raw: Mapping[str, Consumer], teams: Mapping[str, Team], consumers: Mapping[str, Consumer | None],
            changed_teams: Mapping[str, Team | None]) -> tuple[dict[str, Consumer], dict[str, Team]]:
    """A copy with the rows read applied: each as read now, or gone (None)."""
    all_raw, all_teams = dict(raw), dict(teams)
    for name, consumer in consumers.items():
        if consumer is None:
            all_raw.pop(name, None)
        else:
            all_raw[name] = consumer
    for name, team in changed_teams.items():
        if team is None:
            all_teams.pop(name, None)
        else:
            all_teams[name] = team
    return all_raw, all_teams


def _unusable(head: SnapshotHead | None, marker: ChangeFeed) -> str | None:
    """Why a cold instance cannot start from this snapshot with this marker (None: it can, if the feed names every
    change between them)."""
    if head is None:
        return "none, or another version's"
    if not marker.epoch or head.epoch != marker.epoch:
        return "another epoch of the change feed"
    if marker.seq - head.seq > FEED_ENTRIES:
        return "more changes behind than the feed holds"
    return None


def rotated(consumer: Consumer, key: str, grace_s: float, now: float) -> Consumer:
    """The consumer with a new key; the old one keeps working for `grace_s` seconds (0: not at all)."""
    return replace(
        consumer,
        key_hash=hash_key(key),
        key_prefix=key_prefix(key),
        previous_key_hash=consumer.key_hash if grace_s > 0 else None,
        previous_key_expires=now + grace_s if grace_s > 0 else 0.0,
        version=consumer.version + 1,
    )
