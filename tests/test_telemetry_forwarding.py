"""ForwardingTelemetry hands every call of the Telemetry protocol to its inner sink, and so does each wrapper built on it
(spend, the console line, the traffic counter): a call a wrapper forgot would be lost to the sinks behind it."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from shared.clock import FakeClock
from shared.limits.budget import BudgetBook, SpendingTelemetry
from shared.records.prices import PriceTable
from shared.storage.memory import MemoryBudgetStore, MemoryTrafficStore
from shared.telemetry.console import ConsoleTelemetry
from shared.telemetry.protocol import NULL_TRACE, ForwardingTelemetry, RequestRecord, Telemetry
from shared.telemetry.traffic import TrafficCounter

PROTOCOL_METHODS = sorted(
    name for name, member in vars(Telemetry).items() if inspect.isfunction(member) and not name.startswith("_")
)


class Recorder:
    """Answers every call and remembers its name and arguments (a trace for `begin`)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> Any:
            self.calls.append((name, args))
            return NULL_TRACE if name == "begin" else None

        return call


def arguments(name: str) -> tuple[Any, ...]:
    record = RequestRecord(consumer_id="c", client_ip="127.0.0.1", api="chat", operation="create", user_id="",
                           deployment="d", status=200, duration_ms=1.0)
    values = {"record": record, "count": 3, "trace": None}
    parameters = list(inspect.signature(getattr(Telemetry, name)).parameters)[1:]
    return tuple(values.get(p, f"{name}:{p}") for p in parameters)


def wrappers(inner: Telemetry) -> list[Telemetry]:
    clock = FakeClock()
    book = BudgetBook(MemoryBudgetStore(), clock, PriceTable(), "i", background=False)
    return [
        ForwardingTelemetry(inner),
        SpendingTelemetry(inner, book),
        ConsoleTelemetry(inner, PriceTable(), write=lambda line: None),
        TrafficCounter(inner, MemoryTrafficStore(), clock, "i", background=False),
    ]


def test_the_protocol_has_the_calls_this_test_knows() -> None:
    assert {"begin", "request_done", "tokens_spent", "throttled", "audit_lost"} <= set(PROTOCOL_METHODS)


@pytest.mark.parametrize("index", range(4), ids=["forwarding", "spending", "console", "traffic"])
@pytest.mark.parametrize("name", PROTOCOL_METHODS)
def test_every_call_reaches_the_inner_sink_with_its_arguments(index: int, name: str) -> None:
    inner = Recorder()
    wrapper = wrappers(inner)[index]  # type: ignore[arg-type]
    args = arguments(name)
    getattr(wrapper, name)(*args)
    assert [call[0] for call in inner.calls] == [name]
    assert inner.calls[0][1] == args


def test_the_traffic_counter_hands_the_inner_sink_its_own_trace_back() -> None:
    """The counter wraps the trace to count attempts; the sink behind it joins the log record to the span through the
    trace it made (a lost span gave every request's log record operation_Id zero)."""
    made: list[object] = []

    class Sink(Recorder):
        def begin(self, method: str, route: str) -> Any:
            made.append(object())
            return made[-1]

    inner = Sink()
    counter = TrafficCounter(inner, MemoryTrafficStore(), FakeClock(), "i", background=False)  # type: ignore[arg-type]
    trace = counter.begin("POST", "chat")
    counter.request_done(arguments("request_done")[0], trace)
    assert inner.calls[-1] == ("request_done", (arguments("request_done")[0], made[0]))
