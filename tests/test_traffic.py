"""Traffic per backend per 10 s: counted in memory, written once per closed bucket per instance, merged across
instances; the store's work grows with instances and time, never with requests."""

from __future__ import annotations

from shared.clock import FakeClock
from shared.records.usage import TokenUsage
from shared.storage.memory import MemoryTrafficStore
from shared.telemetry.protocol import NullTelemetry, RequestRecord
from shared.telemetry.traffic import TrafficCounter, merge


def done(counter: TrafficCounter, backend: str = "ptu", tokens: int = 15) -> None:
    counter.request_done(RequestRecord("c", "", "chat", "chat", "", "gpt-4o", 200, 1.0, backend_id=backend, attempts=1,
                                       usage=TokenUsage(10, tokens - 10, tokens)))


async def test_many_instances_and_many_requests_cost_one_write_per_instance_per_bucket() -> None:
    clock, store = FakeClock(), MemoryTrafficStore()
    counters = [TrafficCounter(NullTelemetry(), store, clock, f"i{n}", background=False) for n in range(5)]
    for second in range(60):
        for n in range(200):
            done(counters[n % 5], "ptu" if second < 30 else "paygo")
        clock.advance(1)
        for counter in counters:
            await counter.flush()
    assert store.calls == 5 * 6  # 12,000 requests: one write per instance per 10 s
    last = int(clock.now() // 10) - 1
    merged = merge(await store.read(last - 5, last), ["ptu", "paygo"], last - 5, last)
    by_id = {b["id"]: b for b in merged["backends"]}
    assert merged["instances"] == 5
    assert by_id["ptu"]["requests"] == [2000, 2000, 2000, 0, 0, 0]  # the overflow moved, as the picture shows it
    assert by_id["paygo"]["requests"] == [0, 0, 0, 2000, 2000, 2000]
    assert sum(by_id["ptu"]["tokens"]) == 6000 * 15


async def test_an_idle_instance_writes_nothing_and_a_failed_write_is_retried_whole() -> None:
    clock, store = FakeClock(), MemoryTrafficStore()
    counter = TrafficCounter(NullTelemetry(), store, clock, "i", background=False)
    clock.advance(100)
    await counter.flush()
    assert store.calls == 0
    done(counter)
    clock.advance(10)
    store.unavailable = True
    await counter.flush()
    store.unavailable = False
    done(counter)
    await counter.flush()
    rows = await store.read(0, 10**9)
    assert sum(r.counts["ptu"][0] for r in rows) == 1  # the closed bucket kept; the open one not written yet
    assert [r.counts["ptu"][0] for r in counter.pending()] == [1]


async def test_429s_failures_and_failovers_are_counted_on_the_backend_they_happened_on() -> None:
    clock, store = FakeClock(), MemoryTrafficStore()
    counter = TrafficCounter(NullTelemetry(), store, clock, "i", background=False)
    trace = counter.begin("POST", "chat")
    trace.attempt("ptu", "uksouth", "url", 1).end(429)
    counter.failover("ptu", "paygo", "throttled")
    trace.attempt("paygo", "sweden", "url", 2).end(None, "timeout")
    trace.attempt("paygo", "sweden", "url", 3).end(200)
    counts = {k: v for k, v in counter.pending()[0].counts.items()}
    assert counts["ptu"] == (0, 0, 1, 0, 1) and counts["paygo"] == (0, 0, 0, 1, 0)


async def test_an_instance_deletes_its_own_rows_after_an_hour() -> None:
    clock, store = FakeClock(), MemoryTrafficStore()
    counter = TrafficCounter(NullTelemetry(), store, clock, "i", background=False, keep_s=60)
    for _ in range(30):
        done(counter)
        clock.advance(10)
        await counter.flush()
    assert len(store.rows) <= 8  # at most keep_s of buckets, plus the one being written


def test_the_inner_telemetry_gets_its_own_trace_back_so_the_log_record_joins_its_span() -> None:
    seen: list[object] = []

    class Inner(NullTelemetry):
        def request_done(self, record: RequestRecord, trace: object = None) -> None:
            seen.append(trace)

    inner = Inner()
    counter = TrafficCounter(inner, MemoryTrafficStore(), FakeClock(), "i", background=False)
    trace = counter.begin("POST", "chat")
    own = trace.inner  # type: ignore[attr-defined]
    counter.request_done(RequestRecord("c", "", "chat", "chat", "", "gpt-4o", 200, 1.0), trace)
    assert seen == [own] and own is not trace  # the wrapper would carry no span context (operation_Id all zeros)


async def test_model_fallbacks_are_counted_per_deployment_written_with_their_bucket_and_merged() -> None:
    clock, store = FakeClock(), MemoryTrafficStore()
    counters = [TrafficCounter(NullTelemetry(), store, clock, f"i{n}", background=False) for n in range(2)]
    first = int(clock.now() // 10)
    for counter in counters:
        counter.model_fallback("gpt-4.1", "gpt-4o", "throttled")
    counters[0].model_fallback("gpt-4o", "o3-mini", "open")
    clock.advance(10)
    counters[1].model_fallback("gpt-4.1", "gpt-4o", "throttled")  # a bucket with fallbacks only: written too
    assert counters[1].pending()[-1].fallbacks == {"gpt-4.1": 1} and counters[1].pending()[-1].counts == {}
    clock.advance(10)
    for counter in counters:
        await counter.flush()
    assert all(not c.pending() for c in counters) and store.calls == 2
    merged = merge(await store.read(first, first + 2), ["ptu"], first, first + 2)
    assert merged["deployments"] == [{"id": "gpt-4.1", "fallbacks": [2, 1, 0]}, {"id": "gpt-4o", "fallbacks": [1, 0, 0]}]
    assert merged["backends"] == [{"id": "ptu", "requests": [0, 0, 0], "tokens": [0, 0, 0], "throttled": [0, 0, 0],
                                   "failures": [0, 0, 0], "failovers": [0, 0, 0], "deployment_tokens": {}}]
    seen: list[tuple[str, str, str]] = []

    class Inner(NullTelemetry):
        def model_fallback(self, from_deployment: str, to_deployment: str, reason: str) -> None:
            seen.append((from_deployment, to_deployment, reason))

    TrafficCounter(Inner(), store, clock, "i", background=False).model_fallback("a", "b", "throttled")
    assert seen == [("a", "b", "throttled")]  # the metric and log still get it


async def test_tokens_are_also_kept_per_deployment_of_each_backend_for_its_capacity() -> None:
    """A PTU's capacity is per deployment; one PTU backend often serves several: its utilisation is the deployment's
    tokens against the deployment's capacity, not the backend's tokens."""
    clock, store = FakeClock(), MemoryTrafficStore()
    counters = [TrafficCounter(NullTelemetry(), store, clock, f"i{n}", background=False) for n in range(2)]
    first = int(clock.now() // 10)
    for counter in counters:
        counter.request_done(RequestRecord("c", "", "chat", "chat", "", "gpt-4o", 200, 1.0, backend_id="ptu",
                                           attempts=1, usage=TokenUsage(100, 20, 120)))
        counter.request_done(RequestRecord("c", "", "embeddings", "embeddings", "", "text-embedding-3-small", 200, 1.0,
                                           backend_id="ptu", attempts=1, usage=TokenUsage(7, 0, 7)))
    counters[0].request_done(RequestRecord("c", "", "chat", "chat", "", "gpt-4o", 200, 1.0, backend_id="paygo",
                                           attempts=1, usage=TokenUsage(1, 1, 2)))
    clock.advance(10)
    for counter in counters:
        await counter.flush()
    merged = merge(await store.read(first, first), ["ptu", "paygo"], first, first)
    by_id = {b["id"]: b for b in merged["backends"]}
    assert by_id["ptu"]["tokens"] == [254]
    assert by_id["ptu"]["deployment_tokens"] == {"gpt-4o": [240], "text-embedding-3-small": [14]}
    assert by_id["paygo"]["deployment_tokens"] == {"gpt-4o": [2]}
