"""The cache's two layers: entries in memory on this instance (least recently used first out, bounded in bytes), in
front of the shared store (Blob Storage) that every instance reads.

A lookup reads memory, then the store (one read); what the store returns is kept in memory for the next time. A write
goes into memory at once and into a bounded queue that a background task writes to the store: the answer it belongs to
never waits for it, and when the store is slow the queue drops new writes (counted) instead of growing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass

from shared.background import keep_running
from shared.cache.entry import BadEntry, CachedAnswer, decode, encode
from shared.clock import Clock
from shared.storage.protocols import AnswerStore

log = logging.getLogger(__name__)

PENDING_WRITES_BYTES = 16 * 1024 * 1024  # entries waiting for the store; beyond this, new writes are dropped
CLOSE_FLUSH_S = 5.0


@dataclass
class CacheStats:
    memory_hits: int = 0
    store_hits: int = 0
    misses: int = 0
    store_errors: int = 0
    writes: int = 0
    writes_dropped: int = 0
    too_large: int = 0
    evicted: int = 0


class AnswerCache:
    def __init__(
        self, store: AnswerStore | None, clock: Clock, *, memory_bytes: int, max_entry_bytes: int,
        pending_bytes: int = PENDING_WRITES_BYTES, background: bool = True,
    ) -> None:
        self._store = store
        self._clock = clock
        self._memory_bytes = memory_bytes
        self.max_entry_bytes = max_entry_bytes
        self._pending_limit = pending_bytes
        self._memory: OrderedDict[str, CachedAnswer] = OrderedDict()
        self.memory_used = 0
        self._pending: deque[CachedAnswer] = deque()
        self._pending_used = 0
        self._background = background
        self._task: asyncio.Task[None] | None = None
        self.stats = CacheStats()

    async def get(self, key: str, scope: str, ttl_s: float) -> CachedAnswer | None:
        """The fresh entry under `key` that belongs to `scope`, or None. (The key is a digest of the scope; the scope is
        checked again so that even a collision of SHA-256 could not hand one scope's answer to another.)"""
        now = self._clock.now()
        answer = self._memory.get(key)
        if answer is not None:
            if answer.scope != scope or answer.key != key:
                self.stats.misses += 1
                return None
            if answer.fresh(now, ttl_s):
                self._memory.move_to_end(key)
                self.stats.memory_hits += 1
                return answer
            self._forget(key)
        if self._store is not None:
            answer = await self._read(key)
            if answer is not None and answer.scope == scope and answer.key == key and answer.fresh(now, ttl_s):
                self._remember(answer)
                self.stats.store_hits += 1
                return answer
        self.stats.misses += 1
        return None

    async def _read(self, key: str) -> CachedAnswer | None:
        assert self._store is not None
        try:
            data = await self._store.get(key)
        except Exception as exc:  # the store's errors are mapped already: a store that fails is a miss
            self.stats.store_errors += 1
            if self.stats.store_errors == 1 or self.stats.store_errors % 100 == 0:
                log.warning("could not read the response cache (%s, %d times)", type(exc).__name__, self.stats.store_errors)
            return None
        if data is None:
            return None
        try:
            return decode(data)
        except BadEntry:
            return None

    def put(self, answer: CachedAnswer) -> bool:
        """Keep an answer (in memory now, in the store soon); False when it is over the size cap per entry."""
        if answer.size > self.max_entry_bytes:
            self.stats.too_large += 1
            return False
        self._remember(answer)
        self.stats.writes += 1
        if self._store is not None:
            if self._pending_used + answer.size > self._pending_limit:
                self.stats.writes_dropped += 1
            else:
                self._pending.append(answer)
                self._pending_used += answer.size
                if self._background:
                    self._task = keep_running(self._task, self.flush)
        return True

    def _remember(self, answer: CachedAnswer) -> None:
        if answer.size > self._memory_bytes:
            return
        self._forget(answer.key)
        self._memory[answer.key] = answer
        self.memory_used += answer.size
        while self.memory_used > self._memory_bytes:
            _, oldest = self._memory.popitem(last=False)
            self.memory_used -= oldest.size
            self.stats.evicted += 1

    def _forget(self, key: str) -> None:
        old = self._memory.pop(key, None)
        if old is not None:
            self.memory_used -= old.size

    def clear_memory(self) -> None:
        self._memory.clear()
        self.memory_used = 0

    @property
    def entries(self) -> int:
        return len(self._memory)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> None:
        """Write every queued entry to the store, one at a time (the background task; at shutdown)."""
        store = self._store
        while self._pending and store is not None:
            answer = self._pending.popleft()
            self._pending_used -= answer.size
            try:
                await store.put(answer.key, encode(answer))
            except Exception as exc:
                self.stats.store_errors += 1
                log.warning("could not write to the response cache (%s); the entry stays in memory only",
                            type(exc).__name__)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        try:
            async with asyncio.timeout(CLOSE_FLUSH_S):
                await self.flush()
        except TimeoutError:
            pass
        close = getattr(self._store, "close", None)
        if close is not None:
            await close()
