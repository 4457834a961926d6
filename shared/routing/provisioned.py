"""The capacity models of every PTU backend and deployment of one instance, shared with the other instances.

Two channels, at two speeds; a store that does not answer only delays what is learnt from the others: each instance
keeps learning from its own 429s, and paces with what it knew last.

- **Reports** (what the rate and the shares are computed from): each instance upserts its report for each PTU
  deployment it has touched (its charges, instants and demand: one row of its own) and, while nobody makes the
  fleet's figures (below), queries everyone's. The rows
  are one partition and every instance reads all of them, N squared entities (issue 32: past about 31 instances at
  0.5 s it passed Table Storage's 2,000 entities/s), so the interval grows with the rows read: with R rows (about one
  per instance and PTU deployment) the instances together read about R x R / interval, kept under ROWS_PER_S
  (jittered; doubling after a failed sync). A few instances still sync every `sync_s`; 64 about every 8 s, 256 about every 130 s.
- **News** (what must reach everyone fast: the instants the PTU named, the newest rate): one summary row per PTU
  deployment, in its own partition. Every instance point-reads it every max(`sync_s`, instances / SUMMARY_READS_PER_S)
  seconds (1 entity a read: 0.5 s up to 250 instances, 2 s at 1,000), takes in what it says, and writes it over, with
  an ETag condition on the version it just read, only when it knows something the row does not (PtuModel.news: an
  instant a second newer than the row's newest, a rate with a newer basis). Writes scale with news, not with N: a
  flood of 429s on many instances is the first writer's instant, and the others find theirs already told. A write
  that loses the race is decided again on a fresh read after a short jittered pause (no news is lost: it stays news
  until the row holds it or it expires); a throttled or absent store means a pause doubling to SUMMARY_MAX_PAUSE_S
  (jittered; at least the store's Retry-After), not a retry at once. An instance the PTU refuses exchanges at once
  (`told`) rather than at its next interval, so a 429 reaches everyone within their one interval.

- **The fleet's figures** (what the rate and the shares are computed from, added up): about every
  max(FLEET_EVERY_S, rows / ROWS_PER_S) seconds one instance reads every report and writes into each summary row the
  rate learnt from everyone's charges (`rate_complete`), their demand added up, and how many they are; every other
  instance takes the rate and its share from there, so both are exact at any number of instances, where each instance
  alone could read only a part of the reports fresh. The instance that made them last makes them again (one write an
  interval, no claim); another claims the job (a write on the row's ETag) only when they are FLEET_ORPHANED intervals
  old. While they are made, each instance publishes its report every max(`sync_s`, rows / ROWS_PER_S) seconds and
  queries nobody's: the reports' partition serves about 2 x ROWS_PER_S entities a second at any number of instances
  (the publishes, and one query of every row an interval), not R x R / interval.

Gateways of an earlier version (during a rolling deploy) read and write only the reports: they see a new instance's
instants there as before (new instances keep publishing them), and new instances relay the old ones' instants into the
summary when the reports show them (news includes instants read in others' reports; the fleet's maker reads every
report). Their rows count in the fleet's figures while fresh (published within 15 s), which at their own slow interval
they seldom are: during the deploy the rate is learnt without most of their charges (lower than the PTU's, so paced
below it) and the shares are computed without their demand, as an instance of their version computes both from a part
of the fleet. Gateways of the version before the figures write the summary row without them: the rate they write is
not taken over one learnt from everyone (`rate_complete`), and the figures are made again within a few intervals.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from dataclasses import replace
from typing import Any

from shared.background import keep_running
from shared.clock import Clock
from shared.config import Backend
from shared.records.capacity import CapacityReport
from shared.routing.capacity import COALESCE_S, FLEET_FRESH_S, FRESH_S, PtuModel, merge_summary
from shared.storage.protocols import CapacityStore, Conflict

log = logging.getLogger(__name__)

# Entities a second all instances' reads may ask of the capacity partition together, on average: a quarter of Table
# Storage's 2,000 per partition, because the reads come in lumps (each query is every row: 256 entities at 256
# instances), a few in the same second now and then (at 1,000 a second on average, bench.scale's 256 instances asked
# 2,300-3,000 in their busiest second), and with room for the publishes and the rows of instances gone lately. Since
# the news travels in the summary rows, the reports may come this slowly: they carry the charges and demand only.
ROWS_PER_S = 500.0
JITTER = 0.2  # each interval is drawn from +-20 % of its value
MAX_BACKOFF_S = 60.0  # after failed syncs, the pause doubles up to this (or 16 intervals, if longer)
# Point reads a second all instances may ask of one deployment's summary row (its own partition): a quarter of the
# partition's 2,000 entities/s, because the instances are counted by their rows, and an instance publishes its first
# only at its first query of them (a fleet just started has about half as many rows as instances: bench.scale's 1,000
# instances had 500-600); the rest is for the writes and their lost races.
SUMMARY_READS_PER_S = 500.0
SUMMARY_MAX_PAUSE_S = 10.0  # after failed summary reads or writes, the pause doubles up to this
# A summary row's count of per-instance rows is trusted this long (instances gone leave theirs for STALE_S, 600 s);
# a count half this old is told again by the next instance that reads the rows.
ROWS_TRUSTED_S = 600.0
RACE_PAUSE_S = 0.1  # after a lost race, decide again after about this (doubling with races in a row, jittered)
# The fleet's figures: about every max(FLEET_EVERY_S, rows / ROWS_PER_S) seconds one instance (the first to find them
# that old in the summary row, which it claims first) reads every per-instance row and writes what they add up to;
# every instance publishes its own row every max(sync_s, rows / ROWS_PER_S) seconds, so that each is fresh then.
FLEET_EVERY_S = 1.0
# The instance that made the figures last makes them again when due, without a claim; another claims only when they are
# this many intervals old (that one has gone, or cannot reach the store).
FLEET_ORPHANED = 3.0


def fleet_interval(rows: int) -> float:
    """How often one instance reads every row for the fleet's figures: about ROWS_PER_S entities a second."""
    return max(FLEET_EVERY_S, rows / ROWS_PER_S)


def publish_interval(sync_s: float, rows: int) -> float:
    """How often each instance publishes its row while the fleet's figures are made: `rows` writes per interval,
    about ROWS_PER_S a second together."""
    return max(sync_s, rows / ROWS_PER_S)


def _by_deployment(reports: list[CapacityReport]) -> dict[tuple[str, str], list[CapacityReport]]:
    grouped: dict[tuple[str, str], list[CapacityReport]] = {}
    for report in reports:
        grouped.setdefault((report.backend_id, report.deployment), []).append(report)
    return grouped


def sync_interval(sync_s: float, rows: int) -> float:
    """How long to wait between syncs when the last read returned `rows` rows: `sync_s`, or longer so that about
    `rows` instances reading `rows` rows each stay under ROWS_PER_S."""
    return max(sync_s, rows * (rows + 1) / ROWS_PER_S)


def summary_interval(sync_s: float, instances: int) -> float:
    """How often to read a summary row when about `instances` instances read it: `sync_s`, or longer so that they
    stay under SUMMARY_READS_PER_S together."""
    return max(sync_s, instances / SUMMARY_READS_PER_S)


class ProvisionedCapacity:
    def __init__(
        self, backends: tuple[Backend, ...], clock: Clock, store: CapacityStore | None = None, instance: str = "local",
        sync_s: float = 0.5,
    ) -> None:
        self._clock = clock
        self._store = store
        self._sync_s = sync_s
        self.instance = instance
        self._models = {
            (b.id, d): PtuModel(b.id, d, instance, b.reserve_tokens, stated=_per_second(b.ptu_tokens_per_minute.get(d)))
            for b in backends if b.ptu for d in b.deployments
        }
        self._task: asyncio.Task[None] | None = None
        self._news_task: asyncio.Task[None] | None = None
        self.sync_failures = 0
        self.rows = 0  # rows the last read returned
        self._failed_in_row = 0
        self.summary_failures = 0  # summary reads or writes that failed (throttled, away)
        self.summary_writes = 0
        self.summary_races = 0  # summary writes that lost to another writer
        self._summary_failed_in_row = 0
        self._races_in_row = 0
        self.summary_rows = 0  # the per-instance rows the summary rows say there are
        self.fleet_reads = 0  # reads of every row this instance made for the fleet's figures
        self.fleet_writes = 0  # summary writes of the fleet's figures, and claims to make them (not news)
        self._fleet_seen = -math.inf  # wall clock of the newest fleet figures heard (fleet_at)
        self._wake: asyncio.Event | None = None  # set to exchange at once (`told`), inside the running loop
        self._woken_at = -math.inf
        self._rows_at = 0.0
        self._rows_news: set[tuple[str, str]] = set()  # summary rows not yet told this instance's latest count
        self._rng = random.Random()

    def model(self, backend_id: str, deployment: str) -> PtuModel | None:
        return self._models.get((backend_id, deployment))

    def health(self, backend_id: str, deployment: str) -> dict[str, Any] | None:
        model = self._models.get((backend_id, deployment))
        if model is None or (model.rate is None and model.stated is None):
            return None
        if model.rate is None or not model.learnt:
            stated = model.stated or 0.0
            return {"stated_tokens_per_minute": round(stated * 60),
                    "instance_share_tokens_per_minute": round((model.share or stated) * 60), "diverted": model.diverted}
        return {
            "learnt_tokens_per_minute": round(model.rate * 60),
            "instance_share_tokens_per_minute": round((model.share or 0.0) * 60),
            "diverted": model.diverted,
            # Forgotten (and the PTU sent everything) once this passes a minute with no newer 429.
            "last_429_age_s": round(max(0.0, self._clock.now() - model.evidence_at), 1),
        }

    def start(self) -> None:
        """Start sharing (from the first request, inside the running loop): the summary rows at once; the reports
        after the first summary read (`_exchange_forever`)."""
        if self._store is not None and self._models:
            self._news_task = keep_running(self._news_task, self._exchange_forever)

    def known_rows(self) -> int:
        """About how many per-instance rows there are: what this instance's last query returned, or what a summary
        row says another's did (a newcomer knows it before its first query)."""
        return max(self.rows, self.summary_rows)

    def interval(self) -> float:
        """The pause before the next sync (see the module's docstring), jittered."""
        return self._paused(sync_interval(self._sync_s, self.known_rows()))

    def fleet_alive(self) -> bool:
        """Whether an instance makes the fleet's figures (fresh ones were heard lately): then this one only publishes
        its row, and reads them all only when it is its turn (`exchange`)."""
        return self._clock.now() - self._fleet_seen <= FLEET_FRESH_S

    async def _sync_forever(self) -> None:
        # Past a few dozen instances the first query comes at a random moment of the interval the summary's count of
        # rows says, not at once: instances starting together (a scale-out, a deployment) would otherwise all read
        # every row in the same second.
        alive = self.fleet_alive()
        first = publish_interval(self._sync_s, self.known_rows()) if alive else sync_interval(self._sync_s, self.known_rows())
        if first > self._sync_s or alive:
            await asyncio.sleep(self._rng.uniform(0, first))
        while True:
            if self.fleet_alive():
                await self.publish()
                base = publish_interval(self._sync_s, self.known_rows())
                await asyncio.sleep(self._paused(base))
            else:
                await self.sync()
                await asyncio.sleep(self.interval())

    async def publish(self) -> None:
        """Publish this instance's reports (its row per PTU deployment), without reading anyone's."""
        if self._store is not None:
            await self._share(self._store, read=False)

    async def _share(self, store: CapacityStore, read: bool) -> list[CapacityReport] | None:
        """Publish this instance's reports and, with `read`, take everyone's; None when the store failed (counted, and
        the next exchange pauses longer)."""
        now, mono = self._clock.now(), self._clock.monotonic()
        try:
            for model in self._models.values():
                if model.charges or model.ready or model.rate is not None:
                    await store.publish(model.report(now, mono))
            reports = await store.load() if read else []
        except Exception as exc:
            self.sync_failures += 1
            self._failed_in_row += 1
            log.warning("could not share PTU capacity (%s)", type(exc).__name__)
            return None
        self._failed_in_row = 0
        return reports

    def _paused(self, base: float) -> float:
        """`base`, the pause between exchanges with the rows, after the failures in a row and jittered."""
        if self._failed_in_row:
            # Throttled or away: ask it less, not again at once; doubling, to a minute, or to 16 times the interval
            # when the count of rows is large (a fleet that started at once may have more rows than any count said:
            # its queries are refused until the pauses are long enough for some to be answered and tell it).
            base = min(max(MAX_BACKOFF_S, 16 * base), base * 2.0 ** min(self._failed_in_row, 10))
        return max(self._sync_s, base * self._rng.uniform(1 - JITTER, 1 + JITTER)) if base > self._sync_s else base

    async def sync(self) -> None:
        """Publish this instance's reports, then take in everyone's."""
        if self._store is None:
            return
        reports = await self._share(self._store, read=True)
        if reports is None:
            return
        self.rows = len(reports)
        self._rows_at = self._clock.now()
        self._rows_news = set(self._models)  # a count to tell in each summary row, if it differs from what it says
        now, mono = self._clock.now(), self._clock.monotonic()
        grouped = _by_deployment(reports)
        for key, model in self._models.items():
            model.merge(grouped.get(key, ()), now, mono)

    # ---- the summary rows (news) -------------------------------------------------------------------------------

    def instances(self) -> int:
        """About how many instances read each summary row: the per-instance rows, per deployment."""
        return max(1, math.ceil(self.known_rows() / max(1, len(self._models))))

    def told(self, backend_id: str, deployment: str) -> None:
        """A PTU's 429 named an instant here: exchange now rather than at the next interval (at 1,000 instances the
        interval is 2 s, and the others read the row that often too: the 429 reaches them in one interval, not two).
        At most once every COALESCE_S (closer instants are no news), and never while the summary is failing."""
        model = self._models.get((backend_id, deployment))
        if model is None or not model.own_instant_is_news():
            return
        now = self._clock.monotonic()
        if self._wake is not None and now - self._woken_at >= COALESCE_S and not self._summary_failed_in_row:
            self._woken_at = now
            self._wake.set()

    async def _exchange_forever(self) -> None:
        self._wake = asyncio.Event()
        while True:
            self._wake.clear()
            pause = await self.exchange()
            self._task = keep_running(self._task, self._sync_forever)  # the reports, once the summary said how many
            try:
                await asyncio.wait_for(self._wake.wait(), pause)
            except TimeoutError:
                pass

    async def exchange(self) -> float:
        """Read each PTU deployment's summary row, take in what it says, and write it over (on the ETag just read)
        where this instance has news. Returns the pause before the next exchange."""
        if self._store is None:
            return self._sync_s
        base = summary_interval(self._sync_s, self.instances())
        raced = False
        claimed: list[tuple[str, str]] = []
        for key, model in self._models.items():
            try:
                summary, etag = await self._store.read_summary(*key)
                now, mono = self._clock.now(), self._clock.monotonic()
                told = summary.rows if summary is not None and now - summary.rows_at <= ROWS_TRUSTED_S else 0
                self.summary_rows = told
                model.hear(summary, now, mono)
                if summary is not None:  # figures made, or claimed to be made (a fleet starting: none yet)
                    self._fleet_seen = max(self._fleet_seen, summary.fleet_at)
                news = model.news(summary, now)
                every = fleet_interval(self.known_rows())
                age = now - summary.fleet_at if summary is not None else math.inf
                claim = False
                if age > every and summary is not None and summary.fleet_by == self.instance:
                    claimed.append(key)  # this instance made them last: it makes them again
                elif age > FLEET_ORPHANED * every:
                    # Nobody makes the fleet's figures: this instance will, if its claim (the row, on its ETag) wins.
                    claim = True
                    plain = news is None
                    news = replace(news or merge_summary(summary, *key, (), None, 0.0, False, self.instance, now),
                                   fleet_at=now, fleet_by=self.instance)
                told_at = summary.rows_at if summary is not None else 0.0
                if key in self._rows_news and (self.rows > 2 * told + 2 or told_at and now - told_at > ROWS_TRUSTED_S / 2):
                    # A count of rows more than twice the row's, or the row's getting old: news, once after each query
                    # of them. So a growing fleet tells it a few times (log2 of the growth), not once per instance,
                    # and a steady one about every ROWS_TRUSTED_S / 2; a fleet that shrank tells it within that.
                    news = news or merge_summary(summary, *key, (), None, 0.0, False, self.instance, now)
                if news is not None and self._rows_at > told_at:  # what is written anyway carries the newer count
                    news = replace(news, rows=self.rows, rows_at=self._rows_at)
                if news is not None:
                    await self._store.write_summary(news, etag)
                    if claim:
                        claimed.append(key)
                        self._fleet_seen = max(self._fleet_seen, now)
                    if claim and plain:
                        self.fleet_writes += 1
                    else:
                        self.summary_writes += 1
                self._rows_news.discard(key)  # told (or not news); after a lost race, decided again on a fresh read
            except Conflict:
                self.summary_races += 1
                raced = True
            except Exception as exc:
                self.summary_failures += 1
                self._summary_failed_in_row += 1
                log.warning("could not share PTU news (%s)", type(exc).__name__)
                # Throttled or away: ask it less, not again at once (doubling; at least what the store asked for).
                pause = min(SUMMARY_MAX_PAUSE_S, base * 2.0 ** min(self._summary_failed_in_row, 6))
                pause *= self._rng.uniform(0.5, 1.0)
                return max(pause, getattr(exc, "retry_after_s", None) or 0.0)
        self._summary_failed_in_row = 0
        if claimed:
            await self._make_fleet(claimed)
        if raced:  # decide again soon, on a fresh read: the news may be told already (then there is nothing to write)
            self._races_in_row += 1
            return min(base, RACE_PAUSE_S * 2.0 ** min(self._races_in_row - 1, 4)) * self._rng.uniform(0.5, 1.0)
        self._races_in_row = 0
        return base if base <= self._sync_s else max(self._sync_s, base * self._rng.uniform(1 - JITTER, 1 + JITTER))

    async def _make_fleet(self, keys: list[tuple[str, str]]) -> None:
        """Read every per-instance row and write the fleet's figures into the claimed summary rows: the rate learnt
        from everyone's charges (exact at any number of instances, where each instance alone reads only a part of
        the rows fresh), their demand added up, and how many they are. Failures leave the figures to the next claim."""
        assert self._store is not None
        try:
            await self.publish()
            reports = await self._store.load()
        except Exception as exc:
            self.sync_failures += 1
            log.warning("could not read the PTU capacity rows (%s)", type(exc).__name__)
            return
        self.fleet_reads += 1
        now, mono = self._clock.now(), self._clock.monotonic()
        self.rows = len(reports)
        self._rows_at = now
        grouped = _by_deployment(reports)
        for key in keys:
            model = self._models[key]
            model.merge(grouped.get(key, ()), now, mono)
            fresh = [r for r in grouped.get(key, ()) if r.instance != self.instance and now - r.at <= FLEET_FRESH_S]
            mine = model.demand(mono)
            made_at = now
            members, demand = len(fresh) + 1, sum(r.demand for r in fresh) + mine
            demanders = sum(1 for r in fresh if r.demand > 0) + (1 if mine > 0 else 0)
            for _ in range(3):
                try:
                    summary, etag = await self._store.read_summary(*key)
                    now = self._clock.now()
                    if summary is not None and summary.fleet_by != self.instance:
                        break  # claimed again meanwhile (this instance was too slow): the other one tells it
                    news = model.news(summary, now) or merge_summary(summary, *key, (), None, 0.0, False,
                                                                     self.instance, now)
                    # The rate as learnt from everyone's charges (not the probe's steps above it since: each
                    # instance probes on its own, from the learnt rate).
                    basis, learnt = model.basis, model.basis_rate
                    complete = news.rate_complete  # the row's own, unless this instance's is newer
                    if learnt is not None and basis is not None and now - basis[0] <= FRESH_S and (
                            news.rate is None or basis[0] >= news.rate_from):
                        news = replace(news, rate=learnt, rate_from=basis[0], rate_learnt=basis[1])
                        complete = model.rate_complete
                    news = replace(news, rate_complete=complete, fleet_at=made_at,
                                   fleet_by=self.instance, members=members, demand=demand, demanders=demanders,
                                   rows=self.rows, rows_at=made_at)
                    await self._store.write_summary(news, etag)
                    self.fleet_writes += 1
                    self._fleet_seen = max(self._fleet_seen, now)
                    model.hear(news, now, self._clock.monotonic())
                    break
                except Conflict:
                    self.summary_races += 1
                    continue
                except Exception as exc:
                    self.summary_failures += 1
                    log.warning("could not share the PTU fleet's figures (%s)", type(exc).__name__)
                    break

    async def close(self) -> None:
        for task in (self._task, self._news_task):
            if task is not None:
                task.cancel()


def _per_second(tokens_per_minute: int | None) -> float | None:
    return tokens_per_minute / 60 if tokens_per_minute else None
