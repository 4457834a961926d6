"""Usage rows: writes grow with consumers x minutes, never with requests or with how often the flush runs."""

from __future__ import annotations

from shared.clock import FakeClock
from shared.records.usage import TokenUsage, UsageRow
from shared.storage.memory import MemoryUsageStore
from shared.telemetry.usage_rows import UsageRecorder

T0 = 1_700_000_400.0  # 20 minutes into an hour: the run below stays inside it


class CountingStore(MemoryUsageStore):
    def __init__(self) -> None:
        super().__init__()
        self.rows_written = 0

    async def save(self, rows: list[UsageRow]) -> None:
        self.rows_written += len(rows)
        await super().save(rows)


async def test_rows_are_written_at_most_once_a_minute_however_many_requests_and_flushes() -> None:
    clock = FakeClock(start=T0)
    store = CountingStore()
    recorder = UsageRecorder(store, clock, instance_id="i1", background=False, flush_s=60)
    consumers = 100
    minutes = 5
    requests = 0
    for second in range(minutes * 60):
        clock.advance(1)
        for n in range(consumers):
            if (second + n) % 2 == 0:  # every consumer: one request every 2 s
                recorder.record(f"c{n}", "gpt-4o", TokenUsage(prompt=200, completion=50, total=250))
                requests += 1
        await recorder.flush()  # as often as anyone likes
    await recorder.close()  # at shutdown everything goes out
    assert requests == consumers * minutes * 30
    assert store.rows_written <= consumers * (minutes + 2), store.rows_written
    # Nothing lost: the stored rows hold every request and token.
    stored = await store.query(None, "0000", "9999")
    assert sum(r.requests for r in stored) == requests and sum(r.total for r in stored) == 250 * requests


async def test_a_new_row_goes_out_at_the_next_flush_and_a_failed_save_is_carried_by_the_next() -> None:
    clock = FakeClock(start=T0)
    store = CountingStore()
    recorder = UsageRecorder(store, clock, instance_id="i1", background=False, flush_s=60)
    recorder.record("a", "gpt-4o", TokenUsage(prompt=1, completion=1, total=2))
    store.unavailable = True
    await recorder.flush()
    assert recorder.failures == 1
    store.unavailable = False
    recorder.record("a", "gpt-4o", TokenUsage(prompt=1, completion=1, total=2))
    await recorder.flush()
    assert [(r.requests, r.total) for r in await store.query("a", "0000", "9999")] == [(2, 4)]
    recorder.record("a", "gpt-4o", None)
    clock.advance(59)
    await recorder.flush()
    assert [r.requests for r in await store.query("a", "0000", "9999")] == [2]  # not due yet
    clock.advance(1)
    await recorder.flush()
    assert [r.requests for r in await store.query("a", "0000", "9999")] == [3]
