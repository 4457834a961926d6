"""The audit table's record: one admin change, who made it, and the record before and after (never a key)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: float  # epoch seconds
    actor: str  # "key:admin", "entra:<oid or appid>", "easyauth:<name>", "cli:<user>"
    role: str  # Gateway.Admin (every writer holds it)
    action: str  # e.g. consumers.create, consumers.rotate, teams.set
    target: str  # the consumer's or team's id
    before: str  # JSON of the record before ("" when it did not exist)
    after: str  # JSON of the record after ("" when deleted)
    id: str = ""  # unique, sortable newest first in the table
