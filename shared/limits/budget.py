"""Budgets in currency per consumer, enforced at admission like quotas (403 `budget_exceeded`).

A consumer's spend in a period (monthly unless its record says otherwise) is the sum of what every gateway instance
charged it: each instance keeps its own cumulative figure in memory, adds each answer's cost (the price table's
marginal cost, so PTU answers add nothing), and writes it to its own Table Storage row every few seconds (no two
instances write the same row, so no write conflicts and nothing counted twice). At admission the book reads the other
instances' rows at most every `refresh_s` seconds per consumer. Like API Management's quota, the check happens before
the request and the charge after the answer, so concurrent requests and the refresh interval can overshoot a budget
by what is in flight; after that every request is refused until the period ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from shared.background import keep_running
from shared.clock import Clock
from shared.limits.ledger import period_bounds
from shared.limits.tickets import Held, Limiter, Ticket
from shared.outcomes import BudgetExceeded
from shared.records.consumers import Consumer
from shared.records.prices import PriceTable
from shared.records.spend import SpendRow
from shared.storage.protocols import BudgetStore
from shared.telemetry.protocol import ForwardingTelemetry, RequestRecord, Telemetry, Trace

log = logging.getLogger(__name__)

# Spend is summed in billionths of the currency unit: integers add exactly, and rounding each answer to a billionth
# cannot add up to anything a bill shows (in millionths, the half-unit rounding of each answer did, measurably).
NANOS = 1_000_000_000
FLUSH_INTERVAL_S = 5.0  # at most; a shorter refresh interval saves as often as it reads


@dataclass(slots=True)
class _Account:
    own: int = 0  # this instance's spend in the period, in nanos
    others: int = 0  # the other instances' spend at the last read
    read_at: float = float("-inf")


def team_account(team_id: str) -> str:
    return f"team|{team_id}"  # beside consumer ids (which have no '|') in the same spend rows


class BudgetBook:
    def __init__(
        self, store: BudgetStore, clock: Clock, prices: PriceTable, instance: str, *,
        refresh_s: float = 5.0, flush_s: float | None = None, background: bool = True,
    ) -> None:
        self._store = store
        self._clock = clock
        self.prices = prices
        self.instance = instance
        self.refresh_s = refresh_s
        self.flush_s = min(refresh_s, FLUSH_INTERVAL_S) if flush_s is None else flush_s
        self._accounts: dict[tuple[str, str], _Account] = {}
        self._periods: dict[str, str] = {}  # consumer -> budget period, for consumers with a budget
        self._dirty: set[tuple[str, str]] = set()
        self._background = background
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

    def _key(self, consumer_id: str, period: str) -> tuple[str, str]:
        return consumer_id, period_bounds(period, self._clock.now())[0]

    async def check(self, consumer: Consumer) -> None:
        """Refuse a consumer whose spend in the period has reached its budget, or whose team's has reached the team's
        (403 naming the level)."""
        await self._check(consumer.id, consumer.limits.budget, consumer.limits.budget_period, "consumer")
        team = consumer.team_record
        if team is not None:
            await self._check(team_account(team.id), team.limits.budget, team.limits.budget_period, "team")

    async def _check(self, account_id: str, budget: float, budget_period: str | None, level: str) -> None:
        if budget <= 0:
            self._periods.pop(account_id, None)
            return
        period = budget_period or "monthly"
        self._periods[account_id] = period
        key = self._key(account_id, period)
        account = self._accounts.get(key)
        if account is None:
            account = self._accounts[key] = _Account()
        if self._clock.monotonic() - account.read_at >= self.refresh_s:
            await self._refresh(key, account)
        if account.own + account.others >= round(budget * NANOS):
            spent = (account.own + account.others) / NANOS
            raise BudgetExceeded(period=period, spent=spent, budget=budget, currency=self.prices.currency, level=level)

    async def _refresh(self, key: tuple[str, str], account: _Account) -> None:
        try:
            rows = await self._store.read(*key)
        except Exception as exc:  # the store is down: decide with what was read last (fail open, like the limiter)
            self.failures += 1
            log.warning("could not read budget spend (%s)", type(exc).__name__)
            account.read_at = self._clock.monotonic()
            return
        account.others = sum(r.nanos for r in rows if r.instance != self.instance)
        account.read_at = self._clock.monotonic()

    def spend(self, record: RequestRecord) -> None:
        """Charge an answer's cost to its consumer and its team (synchronous: also runs when the client went away)."""
        accounts = [(a, p) for a in (record.consumer_id, team_account(record.team) if record.team else "")
                    if a and (p := self._periods.get(a)) is not None]
        if not accounts:
            return
        nanos = round(self.prices.cost(record.deployment, record.ptu, record.usage, record.saved) * NANOS)
        if nanos <= 0:
            return
        for account_id, period in accounts:
            self._charge(account_id, period, nanos)

    def _charge(self, account_id: str, period: str, nanos: int) -> None:
        key = self._key(account_id, period)
        account = self._accounts.get(key)
        if account is None:
            account = self._accounts[key] = _Account()
        account.own += nanos
        self._dirty.add(key)
        if self._background:
            self._task = keep_running(self._task, self._flush_forever)

    def spent(self, consumer_id: str, period: str = "monthly") -> float:
        account = self._accounts.get(self._key(consumer_id, period))
        return 0.0 if account is None else (account.own + account.others) / NANOS

    async def flush(self) -> None:
        if not self._dirty:
            return
        keys = list(self._dirty)
        self._dirty.clear()
        rows = [SpendRow(c, p, self.instance, self._accounts[(c, p)].own) for c, p in keys]
        try:
            await self._store.save(rows)
        except Exception as exc:
            self._dirty.update(keys)  # cumulative rows: the next save carries these too
            self.failures += 1
            log.warning("could not save budget spend (%s); will retry", type(exc).__name__)

    async def _flush_forever(self) -> None:
        while self._dirty:
            await asyncio.sleep(self.flush_s)
            await self.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.flush()


class BudgetedLimiter:
    """The limiter with the budget checked first: the request flow sees one Limiter, as before."""

    def __init__(self, inner: Limiter, book: BudgetBook) -> None:
        self._inner = inner
        self.book = book

    def needs_estimate(self, consumer: Consumer, deployment: str, user: str | None = None) -> bool:
        return self._inner.needs_estimate(consumer, deployment, user)

    def precheck(self, consumer: Consumer, deployment: str, at_least: int = 0, user: str | None = None) -> None:
        self._inner.precheck(consumer, deployment, at_least, user)

    def room(self, consumer: Consumer, deployment: str, user: str | None = None) -> int | None:
        return self._inner.room(consumer, deployment, user)

    async def admit(self, consumer: Consumer, deployment: str, reserve: int, user: str | None = None) -> Ticket:
        await self.book.check(consumer)
        return await self._inner.admit(consumer, deployment, reserve, user)

    def release(self, held: Held, used: int) -> None:
        self._inner.release(held, used)

    def extend(self, held: Held, until_s: float) -> Held:
        return self._inner.extend(held, until_s)

    async def close(self) -> None:
        close: Callable[[], object] | None = getattr(self._inner, "close", None)
        try:
            if close is not None:
                result = close()
                if asyncio.iscoroutine(result):
                    await result
        finally:
            await self.book.close()


class SpendingTelemetry(ForwardingTelemetry):
    """The request flow's telemetry, with every answer also charged to its consumer's budget: the records telemetry
    receives are exactly what was charged (the answer, and attempts whose body broke off), so spend and the Cost
    metric cannot drift apart."""

    def __init__(self, inner: Telemetry, book: BudgetBook) -> None:
        super().__init__(inner)
        self.book = book

    def request_done(self, record: RequestRecord, trace: Trace | None = None) -> None:
        self.book.spend(record)
        self._inner.request_done(record, trace)

    def tokens_spent(self, record: RequestRecord) -> None:
        self.book.spend(record)
        self._inner.tokens_spent(record)

