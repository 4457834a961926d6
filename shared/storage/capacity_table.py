"""Shared PTU capacity in Table Storage: one row per instance, backend and deployment (partition `capacity`, all read
in one query), and one summary row per backend and deployment (its own partition, `capacity|<backend>|<deployment>`,
read with a point read and written with ETag conditions; shared/routing/provisioned.py says who writes it when)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from azure.core.exceptions import (
    ResourceNotFoundError,
)
from azure.data.tables import UpdateMode

from shared.storage.protocols import StoreUnavailable
from shared.storage.tables import Tables, collect, entity_etag, replace_if_unchanged

log = logging.getLogger(__name__)


_CAPACITY_PK = "capacity"
_SUMMARY_RK = "summary"


def summary_partition(backend_id: str, deployment: str) -> str:
    """A summary row's partition: one per deployment, so each has a partition's throughput to itself, and the query of
    the per-instance rows (`PartitionKey eq 'capacity'`, also by gateways of earlier versions) never returns it."""
    return f"{_CAPACITY_PK}|{backend_id}|{deployment}"
_PROPERTY_CHARS = 30_000  # a string property holds 64 KiB of UTF-16: 32K characters, with room to spare


def _compact_charges(charges: Any, t0: float) -> str:
    """[[milliseconds after t0, tokens], ...] as JSON. A busy instance's minute can hold thousands of charges: then
    neighbours are summed into ever wider time buckets (1, 2, 4 ... ms) until the text fits one Table property; what
    is learnt from them only needs them to the nearest few milliseconds."""
    width = 1
    while True:
        buckets: dict[int, float] = {}
        for t, n in charges:
            key = int(round((t - t0) * 1000)) // width * width
            buckets[key] = buckets.get(key, 0.0) + n
        text = json.dumps([[ms, round(n, 1)] for ms, n in sorted(buckets.items()) if n], separators=(",", ":"))
        if len(text) <= _PROPERTY_CHARS:
            return text
        width *= 2


class TableCapacityStore:
    """One row per instance, backend and deployment, replaced on every sync; all rows read in one query. Rows of
    instances gone for a while are ignored by the readers (their `at` is old) and deleted by whoever sees them."""

    STALE_S = 600.0

    def __init__(self, tables: Tables, clock: Callable[[], float] | None = None) -> None:
        self._tables = tables
        self._clock = clock or time.time

    async def publish(self, report: Any) -> None:
        t0 = report.charges[0][0] if report.charges else report.at
        entity = {
            "PartitionKey": _CAPACITY_PK,
            "RowKey": f"{report.backend_id}|{report.deployment}|{report.instance}",
            "backend": report.backend_id,
            "deployment": report.deployment,
            "instance": report.instance,
            "at": float(report.at),
            "t0": float(t0),
            "charges": _compact_charges(report.charges, t0),
            "ready": json.dumps(sorted({round(t, 3) for t in report.ready})),
            "demand": float(report.demand),
            "rate": float(report.rate) if report.rate is not None else -1.0,
        }
        await self._tables.call("capacity", lambda t: t.upsert_entity(entity, mode=UpdateMode.REPLACE))

    async def load(self) -> list[Any]:
        from shared.records.capacity import CapacityReport

        entities = await self._tables.call(
            "capacity", lambda t: collect(t.query_entities(f"PartitionKey eq '{_CAPACITY_PK}'"))
        )
        reports = []
        now = self._clock()
        for e in entities:
            try:
                t0 = float(e["t0"])
                report = CapacityReport(
                    e["backend"], e["deployment"], e["instance"], float(e["at"]),
                    tuple((t0 + ms / 1000, float(n)) for ms, n in json.loads(e["charges"])),
                    tuple(float(t) for t in json.loads(e["ready"])),
                    float(e["demand"]), float(e["rate"]) if float(e["rate"]) > 0 else None,
                )
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("ignored a malformed capacity row (%s)", type(exc).__name__)
                continue
            if now - report.at > self.STALE_S:
                await self._forget(e)
                continue
            reports.append(report)
        return reports

    async def _forget(self, entity: dict[str, Any]) -> None:
        try:
            await self._tables.call("capacity", lambda t: t.delete_entity(_CAPACITY_PK, entity["RowKey"]))
        except (StoreUnavailable, ResourceNotFoundError):
            pass

    async def read_summary(self, backend_id: str, deployment: str) -> tuple[Any, str | None]:
        from shared.records.capacity import CapacitySummary

        partition = summary_partition(backend_id, deployment)
        try:
            e = await self._tables.call("capacity", lambda t: t.get_entity(partition, _SUMMARY_RK))
        except ResourceNotFoundError:
            return None, None
        try:
            summary = CapacitySummary(
                backend_id, deployment, float(e["at"]), tuple(float(t) for t in json.loads(e["ready"])),
                float(e["rate"]) if float(e["rate"]) > 0 else None, float(e["rate_from"]), bool(e["rate_learnt"]),
                str(e.get("by", "")), int(e.get("rows", 0)), float(e.get("rows_at", 0.0)),
                # The fleet's figures: absent from a row an earlier version wrote (then none are known).
                bool(e.get("rate_complete", False)), float(e.get("fleet_at", 0.0)), str(e.get("fleet_by", "")),
                int(e.get("members", 0)), float(e.get("demand", 0.0)), int(e.get("demanders", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignored a malformed capacity summary (%s)", type(exc).__name__)
            return None, entity_etag(e)  # overwritten (over its ETag) by the next instance with news
        return summary, entity_etag(e)

    async def write_summary(self, summary: Any, etag: str | None) -> None:
        entity = {
            "PartitionKey": summary_partition(summary.backend_id, summary.deployment),
            "RowKey": _SUMMARY_RK,
            "at": float(summary.at),
            "ready": json.dumps([round(t, 3) for t in summary.ready]),
            "rate": float(summary.rate) if summary.rate is not None else -1.0,
            "rate_from": float(summary.rate_from),
            "rate_learnt": bool(summary.rate_learnt),
            "by": summary.by,
            "rows": int(summary.rows),
            "rows_at": float(summary.rows_at),
            "rate_complete": bool(summary.rate_complete),
            "fleet_at": float(summary.fleet_at),
            "fleet_by": summary.fleet_by,
            "members": int(summary.members),
            "demand": float(summary.demand),
            "demanders": int(summary.demanders),
        }
        if etag is None:
            await self._tables.call("capacity", lambda t: t.create_entity(entity))
        else:
            await self._tables.call("capacity", replace_if_unchanged(entity, etag))
