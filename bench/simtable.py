"""A simulated Azure Table Storage account for the scale bench (bench/scale.py), on a simulated clock.

The stores here satisfy the same protocols as shared/storage/memory.py (whose twins hold the rows and apply the
contract: ETag conditions, 409 on create, a newer breaker transition kept) and add what a real account does at scale:

- each operation takes a latency drawn from a log-normal distribution, and takes effect half-way through it (when the
  service processes it), so the read-modify-write cycles of concurrent instances interleave as they do over a network
  and a conditional write loses (412 -> Conflict) exactly when another landed between its read and its write;
- a partition serves about `partition_rate` entities a second and the account about `account_rate` requests a second
  (token buckets holding one second of each); an operation past either is answered `503 ServerBusy`, which the
  gateway sees as StoreBusy, a StoreUnavailable (shared/storage/tables.py maps it so, with no SDK retry);
- latency grows as a partition or the account nears its target (queueing: x 1 / (1 - utilisation), capped).

Time is the event loop's: `VirtualLoop` is an asyncio loop whose clock jumps to the next timer instead of sleeping,
so `asyncio.sleep` in the stores, the limiter's ticker and the routers' sync loops all run on simulated time.
"""

from __future__ import annotations

import asyncio
import math
import random
import selectors
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from shared.records.consumer_snapshot import read_chunks
from shared.storage.breaker_table import TableBreakerStore
from shared.storage.consumer_table import decode_snapshot
from shared.storage.memory import MemoryCapacityStore, MemoryConsumerStore, MemoryLedgerStore
from shared.storage.protocols import Conflict, StoreBusy, StoreUnavailable

if TYPE_CHECKING:
    from shared.records.capacity import CapacityReport, CapacitySummary
    from shared.records.consumer_feed import ChangeFeed
    from shared.records.consumer_snapshot import SnapshotHead
    from shared.records.consumers import Consumer, Team

T = TypeVar("T")
T0 = 1_700_000_000.0  # the simulated wall clock's start

# Azure's documented scalability targets for Table Storage (standard storage account): see docs/scale.md.
PARTITION_ENTITIES_PER_S = 2_000.0
ACCOUNT_REQUESTS_PER_S = 20_000.0


class _VirtualSelector(selectors.BaseSelector):
    """A real selector for the loop's own wake-up pipe, polled without waiting; a wait is a jump of simulated time."""

    def __init__(self) -> None:
        self._real = selectors.DefaultSelector()
        self.loop: VirtualLoop | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._real.select(0)
        if not ready and timeout is not None and timeout > 0 and self.loop is not None:
            self.loop.virtual += timeout
        return ready

    def close(self) -> None:
        self._real.close()

    def get_map(self) -> Any:
        return self._real.get_map()


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on simulated time: nothing ever sleeps, the clock jumps to the next scheduled callback."""

    def __init__(self) -> None:
        selector = _VirtualSelector()
        self.virtual = 0.0
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self.virtual


class SimClock:
    """The gateway's Clock (shared/clock.py) read from the virtual loop."""

    def __init__(self, loop: VirtualLoop) -> None:
        self._loop = loop

    def now(self) -> float:
        return T0 + self._loop.virtual

    def monotonic(self) -> float:
        return 1000.0 + self._loop.virtual


@dataclass
class _Bucket:
    rate: float
    tokens: float
    at: float = 0.0

    def take(self, n: float, now: float) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens <= 0:  # a large query may take the bucket below zero: what follows waits for it to refill
            return False
        self.tokens -= n
        return True

    def utilisation(self) -> float:
        return 1.0 - max(0.0, self.tokens) / self.rate


@dataclass
class Counts:
    """What the account served, by second and partition."""

    ops: int = 0
    entities: int = 0
    busy: int = 0  # 503 ServerBusy answers
    busy_by_partition: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    conflicts: int = 0  # 412/409 answers
    per_second: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    per_partition_second: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    latencies_ms: list[float] = field(default_factory=list)

    def peak_account_per_s(self, start: int = 0) -> int:
        return max((n for s, n in self.per_second.items() if s >= start), default=0)

    def peak_partition_per_s(self, start: int = 0) -> tuple[str, int]:
        best = ("", 0)
        for (p, s), n in self.per_partition_second.items():
            if s >= start and n > best[1]:
                best = (p, n)
        return best

    def partition_peak(self, partition: str, start: int = 0) -> int:
        return max((n for (p, s), n in self.per_partition_second.items() if s >= start and p == partition), default=0)

    def partition_group_peak(self, prefix: str, start: int = 0) -> int:
        return max((n for (p, s), n in self.per_partition_second.items() if s >= start and p.startswith(prefix)),
                   default=0)


class SimAccount:
    """One storage account: latency, throttling and counts for every operation of every store on it."""

    def __init__(self, seed: int = 1, *, median_ms: float = 6.0, sigma: float = 0.5, timeout_s: float = 1.0,
                 partition_rate: float = PARTITION_ENTITIES_PER_S, account_rate: float = ACCOUNT_REQUESTS_PER_S) -> None:
        self._rng = random.Random(seed)
        self._mu = math.log(median_ms / 1000)
        self._sigma = sigma
        self.timeout_s = timeout_s
        self.partition_rate = partition_rate
        self.account = _Bucket(account_rate, account_rate)
        self._partitions: dict[str, _Bucket] = {}
        self.counts = Counts()
        self.keep_latencies = False
        self.metered = True  # False: operations take effect at once, uncounted and never throttled (a warm start)

    def _latency(self, partition: _Bucket) -> float:
        base = self._rng.lognormvariate(self._mu, self._sigma)
        load = max(partition.utilisation(), self.account.utilisation())
        return base * min(10.0, 1.0 / max(0.1, 1.0 - load))  # queueing near the target, bounded

    async def op(self, kind: str, partition: str, apply: Callable[[], Awaitable[T]], entities: int = 1) -> T:
        """Run `apply` (the twin's operation) as the service would: after half the latency, unless throttled."""
        if not self.metered:
            return await apply()
        loop = asyncio.get_running_loop()
        bucket = self._partitions.get(partition)
        if bucket is None:
            bucket = self._partitions[partition] = _Bucket(self.partition_rate, self.partition_rate, loop.time())
        latency = self._latency(bucket)
        if latency >= self.timeout_s:  # the gateway's store timeout (GATEWAY_STORE_TIMEOUT_S) ends the call first
            await asyncio.sleep(self.timeout_s)
            raise StoreUnavailable("timeout")
        await asyncio.sleep(latency / 2)
        now = loop.time()
        second = int(now)
        c = self.counts
        c.ops += 1
        c.by_kind[kind] += 1
        c.per_second[second] += max(1, math.ceil(entities / 1000))
        c.per_partition_second[(partition, second)] += max(1, entities)
        if self.keep_latencies:
            c.latencies_ms.append(latency * 1000)
        pages = max(1, math.ceil(entities / 1000))  # a query answers 1,000 entities a page, a request each
        if not self.account.take(pages, now) or not bucket.take(max(1, entities), now):
            c.busy += 1
            c.busy_by_partition[partition] += 1
            await asyncio.sleep(latency / 2)
            raise StoreBusy("503 ServerBusy")
        c.entities += max(1, entities)
        try:
            result = await apply()
        except Conflict:
            c.conflicts += 1
            await asyncio.sleep(latency / 2)
            raise
        await asyncio.sleep(latency / 2)
        return result


# Told of every ledger write stored: (writer, ledger key, the row before, the row written, simulated time).
WriteObserver = Callable[[str, str, "Mapping[str, object] | None", "Mapping[str, object]", float], None]


class SimLedgerStore:
    """LedgerStore: one entity per ledger, partition = the ledger's key (as ledger_table.py). `writer` and `observer`
    (optional): each instance may get its own view of one shared store (`twin`), so that an observer (the bench's
    oracle) learns who wrote what."""

    def __init__(self, account: SimAccount, twin: MemoryLedgerStore | None = None, writer: str = "",
                 observer: WriteObserver | None = None) -> None:
        self._a = account
        self.twin = twin if twin is not None else MemoryLedgerStore()
        self._writer = writer
        self._observer = observer

    async def read(self, consumer_id: str) -> tuple[dict[str, object] | None, str | None]:
        return await self._a.op("ledger.read", f"ledger/{consumer_id}", lambda: self.twin.read(consumer_id))

    async def write(self, consumer_id: str, row: Mapping[str, object], etag: str | None) -> str:
        return await self._a.op("ledger.write", f"ledger/{consumer_id}", lambda: self._write(consumer_id, row, etag))

    async def _write(self, consumer_id: str, row: Mapping[str, object], etag: str | None) -> str:
        stored = self.twin.ledgers.get(consumer_id)
        new_etag = await self.twin.write(consumer_id, row, etag)
        if self._observer is not None:
            self._observer(self._writer, consumer_id, stored[0] if stored else None, row,
                           asyncio.get_running_loop().time())
        return new_etag


class SimBreakerTable:
    """The breaker store's table (shared/storage/breaker_table.py's BreakerTable): queries, point reads and ETag
    writes of rows, each partition `breakers/<partition>` of the account. The store itself is the real one."""

    def __init__(self, account: SimAccount) -> None:
        self._a = account
        self.rows: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
        self._version = 0

    async def query(self, partition: str) -> list[dict[str, Any]]:
        found = [dict(e) for (p, _), (e, _) in self.rows.items() if p == partition]

        async def answer() -> list[dict[str, Any]]:
            return found

        return await self._a.op("breakers.query", f"breakers/{partition}", answer, entities=len(found))

    async def read(self, partition: str, row: str) -> tuple[dict[str, Any] | None, str | None]:
        async def answer() -> tuple[dict[str, Any] | None, str | None]:
            found = self.rows.get((partition, row))
            return (dict(found[0]), found[1]) if found else (None, None)

        return await self._a.op("breakers.read", f"breakers/{partition}", answer)

    async def write(self, entity: dict[str, Any], etag: str | None) -> None:
        key = (str(entity["PartitionKey"]), str(entity["RowKey"]))

        async def apply() -> None:
            current = self.rows.get(key)
            if (etag is None) != (current is None) or (current is not None and current[1] != etag):
                raise Conflict("412" if etag else "409")
            self._version += 1
            self.rows[key] = (dict(entity), f"v{self._version}")

        await self._a.op("breakers.write", f"breakers/{key[0]}", apply)


class SimBreakerStore(TableBreakerStore):
    """The real breaker store (one per instance: it keeps its own read schedule) over the simulated account's table."""

    def __init__(self, account: SimAccount, seed: int = 0, table: SimBreakerTable | None = None) -> None:
        self.account = account
        self.table = table or SimBreakerTable(account)
        super().__init__(self.table, random.Random(seed))

    def another(self, seed: int) -> SimBreakerStore:
        """Another instance's store over the same table."""
        return SimBreakerStore(self.account, seed, self.table)


class SimCapacityStore:
    """CapacityStore: one partition, one row per instance, backend and deployment, read in one query; and one summary
    row per backend and deployment in a partition of its own, point-read and written on its ETag (as
    capacity_table.py)."""

    def __init__(self, account: SimAccount) -> None:
        self._a = account
        self.twin = MemoryCapacityStore()

    async def publish(self, report: CapacityReport) -> None:
        await self._a.op("capacity.publish", "capacity", lambda: self.twin.publish(report))

    async def load(self) -> list[CapacityReport]:
        return await self._a.op("capacity.load", "capacity", self.twin.load, entities=len(self.twin.reports))

    async def read_summary(self, backend_id: str, deployment: str) -> tuple[CapacitySummary | None, str | None]:
        return await self._a.op("capacity.summary_read", f"capacity|{backend_id}|{deployment}",
                                lambda: self.twin.read_summary(backend_id, deployment))

    async def write_summary(self, summary: CapacitySummary, etag: str | None) -> None:
        await self._a.op("capacity.summary_write", f"capacity|{summary.backend_id}|{summary.deployment}",
                         lambda: self.twin.write_summary(summary, etag))


class SimConsumerStore:
    """The part of ConsumerStore a running gateway reads: the change marker with its feed (a point read), the rows the
    feed names (point reads) and the full listing."""

    def __init__(self, account: SimAccount) -> None:
        self._a = account
        self.twin = MemoryConsumerStore()

    async def change_marker(self) -> ChangeFeed:
        return await self._a.op("consumers.marker", "marker", self.twin.change_marker)

    async def change_feed(self) -> ChangeFeed:
        return await self._a.op("consumers.feed", "marker", self.twin.change_feed)

    async def list_all(self) -> tuple[list[Consumer], list[Team]]:
        """A query answers 1,000 entities a page, each page a request read one after the other (the SDK follows the
        continuation); a page refused (ServerBusy) fails the whole listing, as the SDK with no retries does."""
        rows = len(self.twin.consumers) + len(self.twin.teams)

        async def nothing() -> None:
            return None

        for _ in range(1000, rows, 1000):  # every page but the last
            await self._a.op("consumers.list_page", "consumer", nothing, entities=1000)
            # A page of 1,000 entities is half a second of the partition's 2,000 a second: the service takes that
            # long to serve the next one (back to back, one reader alone would otherwise exceed the target).
            await asyncio.sleep(1000 / self._a.partition_rate)
        return await self._a.op("consumers.list", "consumer", self.twin.list_all, entities=rows - 1000 * ((rows - 1) // 1000))

    async def snapshot_head(self) -> tuple[SnapshotHead | None, str | None]:
        return await self._a.op("consumers.snapshot_head", "snapshot", self.twin.snapshot_head)

    async def read_snapshot(self, head: SnapshotHead) -> tuple[list[Consumer], list[Team]]:
        """A point read per chunk, each in its partition, counted as its size in 1 KiB entities against the partition's
        2,000 a second (the documented target is for 1 KiB entities; a 60 KB chunk is taken to cost 59 of them)."""
        async def chunk(k: int) -> bytes:
            data = self.twin.snapshot_chunk(head, k)

            async def read() -> bytes:
                return self.twin.snapshot_chunk(head, k)

            return await self._a.op("consumers.snapshot_chunk", f"snapshot-{k}", read, entities=math.ceil(len(data) / 1024))

        return decode_snapshot(head, await read_chunks(head, chunk, lambda exc: isinstance(exc, StoreBusy)))

    async def write_snapshot(self, consumers: list[Consumer], teams: list[Team], epoch: str, seq: int,
                             written_at: float, etag: str | None, previous: SnapshotHead | None) -> None:
        await self._a.op("consumers.snapshot_write", "snapshot", lambda: self.twin.write_snapshot(
            consumers, teams, epoch, seq, written_at, etag, previous))

    async def find_by_key_hash(self, key_hash: str) -> Consumer | None:
        return await self._a.op("consumers.lookup", "keyhash", lambda: self.twin.find_by_key_hash(key_hash))

    async def get(self, consumer_id: str) -> Consumer | None:
        return await self._a.op("consumers.get", "consumer", lambda: self.twin.get(consumer_id))

    async def get_team(self, team_id: str) -> Team | None:
        return await self._a.op("consumers.get_team", "team", lambda: self.twin.get_team(team_id))

    def __getattr__(self, name: str) -> Any:  # the admin's operations: not part of the load, served by the twin
        return getattr(self.twin, name)
