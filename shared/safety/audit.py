"""The audit trail (docs/safety.md): for consumers whose policy says `audit`, what was asked and answered, written to
Blob Storage off the request path as JSON Lines, one append blob per consumer, hour and instance:

    {container}/{consumer}/{yyyy}/{mm}/{dd}/{hh}/{instance}.jsonl

Records wait in memory, bounded in bytes; a flush every few seconds appends each blob's lines in one block. A block
that fails is kept and retried (with the next records, up to MAX_TRIES flushes); a record that does not fit in memory,
or whose block failed every try, is lost and counted (the Audit Records Lost metric). Never Application Insights.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from shared.clock import Clock
from shared.storage.protocols import AuditStore, StoreUnavailable

log = logging.getLogger(__name__)

MAX_TRIES = 5


@dataclass(slots=True)
class _Pending:
    lines: list[bytes] = field(default_factory=list)
    size: int = 0
    tries: int = 0


class AuditTrail:
    def __init__(self, store: AuditStore, clock: Clock, instance: str, *, memory_bytes: int, flush_s: float,
                 lost: Callable[[int], None], background: bool = True) -> None:
        self._store = store
        self._clock = clock
        self._instance = instance
        self._memory = memory_bytes
        self._flush_s = flush_s
        self._lost = lost
        self._background = background
        self._pending: dict[str, _Pending] = {}
        self._size = 0
        self._task: asyncio.Task[None] | None = None
        self._failing = False  # the last append failed: a policy with `audit: required` refuses meanwhile
        self.written = 0
        self.lost = 0

    def ready(self, room: int = 64 * 1024) -> bool:
        """Whether a record is likely to be kept: Blob Storage took the last block, and there is room in memory."""
        return not self._failing and self._size + min(room, self._memory // 4) <= self._memory

    def offer(self, record: dict[str, Any]) -> bool:
        """Queue a record; False (and counted lost) when memory is full. Never waits."""
        line = orjson.dumps(record) + b"\n"
        if self._size + len(line) > self._memory:
            self._count_lost(1)
            return False
        now = self._clock.now()
        stamp = time.strftime("%Y/%m/%d/%H", time.gmtime(now))
        name = f"{record.get('consumer') or '_'}/{stamp}/{self._instance}.jsonl"
        pending = self._pending.setdefault(name, _Pending())
        pending.lines.append(line)
        pending.size += len(line)
        self._size += len(line)
        if self._background and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run())
        return True

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(self._flush_s)
            await self.flush()

    async def flush(self) -> None:
        """Append what is waiting, blob by blob."""
        for name in list(self._pending):
            pending = self._pending.pop(name)
            try:
                await self._store.append(name, b"".join(pending.lines))
            except StoreUnavailable as problem:
                self._failing = True
                pending.tries += 1
                if pending.tries >= MAX_TRIES:
                    log.error("audit records lost after %d tries: %s", pending.tries, problem)
                    self._size -= pending.size
                    self._count_lost(len(pending.lines))
                else:
                    # Kept (ahead of anything newer for the same blob) for the next flush.
                    newer = self._pending.pop(name, None)
                    if newer is not None:
                        pending.lines += newer.lines
                        pending.size += newer.size
                    self._pending[name] = pending
                continue
            self._failing = False
            self._size -= pending.size
            self.written += len(pending.lines)

    def _count_lost(self, count: int) -> None:
        self.lost += count
        self._lost(count)

    async def close(self) -> None:
        """At shutdown: one last try for what waits."""
        if self._task is not None:
            self._task.cancel()
        if self._pending:
            await self.flush()
        close = getattr(self._store, "close", None)
        if close is not None:
            await close()
