"""The books: whatever an answer and the attempts before it cost, the consumer's ticket, its usage rows and the token
metrics get the same numbers, from one function."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.clock import FakeClock
from shared.config import Backend
from shared.flow.exchange import Checked, Exchange, LostAttempt, Served
from shared.flow.settlement import Books
from shared.flow.translate import CallShape, Operation, Route
from shared.records.consumers import Consumer
from shared.records.usage import TokenUsage
from shared.storage.memory import MemoryUsageStore
from shared.telemetry.protocol import NULL_TRACE
from shared.telemetry.usage_rows import UsageRecorder
from tests.fakes.gateway import gateway_request
from tests.fakes.telemetry import RecordingTelemetry

PRIMARY = Backend(id="ptu", endpoint="https://ptu.example", region="uksouth", deployments={"d": "d"}, ptu=True)
SECOND = Backend(id="paygo", endpoint="https://paygo.example", region="sweden", deployments={"d": "d"})


class Ticket:
    def __init__(self) -> None:
        self.settled: list[int] = []

    @property
    def headers(self) -> dict[str, str]:
        return {}

    def settle(self, actual_tokens: int) -> None:
        self.settled.append(actual_tokens)


def exchange(ticket: Ticket, lost: list[LostAttempt]) -> Exchange:
    checked = Checked(
        Route("openai-v1", Operation.CHAT, "d"), Consumer("app", "app", "h", "gw-"), {"messages": []},
        CallShape("d", False, False, None), None,
    )
    return Exchange(gateway_request("POST", "/v1/chat/completions", "k", {}), checked, 0.0, NULL_TRACE, "", ticket, 0,
                    lost=lost)


usages = st.builds(
    lambda p, c, reported: TokenUsage(p, c, p + c, reported=reported),
    st.integers(0, 10_000), st.integers(0, 10_000), st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(answer=st.none() | usages, lost=st.lists(st.integers(0, 5_000), max_size=4), stream=st.booleans())
async def test_charged_recorded_and_emitted_are_the_same_tokens(
    answer: TokenUsage | None, lost: list[int], stream: bool
) -> None:
    clock, telemetry, ticket = FakeClock(), RecordingTelemetry(), Ticket()
    store = MemoryUsageStore()
    recorder = UsageRecorder(store, clock, instance_id="i", background=False)
    books = Books(clock, recorder, telemetry)
    attempts = [LostAttempt(PRIMARY, TokenUsage(n, 0, n, reported=False), i + 1, 1.0) for i, n in enumerate(lost)]
    charged = books.settle(exchange(ticket, attempts), Served(SECOND, 200, answer, "m", len(lost) + 1))
    await recorder.flush()
    expected = sum(lost) + (answer.total if answer else 0)
    assert charged == expected
    assert ticket.settled == [expected]  # charged, once
    assert sum(row.total for row in store.rows.values()) == expected  # recorded
    assert telemetry.tokens_emitted() == expected  # emitted
    assert [r.backend_id for r in telemetry.spent] == ["ptu"] * len(lost)  # each lost attempt under its backend
    assert len(telemetry.requests) == 1 and telemetry.requests[0].backend_id == "paygo"


async def test_a_request_nobody_answered_is_charged_only_what_broken_attempts_cost() -> None:
    clock, telemetry, ticket = FakeClock(), RecordingTelemetry(), Ticket()
    store = MemoryUsageStore()
    recorder = UsageRecorder(store, clock, instance_id="i", background=False)
    books = Books(clock, recorder, telemetry)
    books.unanswered(exchange(ticket, []))
    assert ticket.settled == [0] and telemetry.spent == [] and telemetry.requests == []
    ticket = Ticket()
    books.unanswered(exchange(ticket, [LostAttempt(PRIMARY, TokenUsage(12, 0, 12, reported=False), 1, 3.0)]))
    await recorder.flush()
    assert ticket.settled == [12] and telemetry.tokens_emitted() == 12
    assert sum(row.total for row in store.rows.values()) == 12
    assert telemetry.spent[0].duration_ms == 3.0 and telemetry.spent[0].status == 502
