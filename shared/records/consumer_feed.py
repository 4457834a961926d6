"""The consumer change feed: the ids of the last changes to consumers and teams, with a sequence number, held in the
change-marker row every write through the consumer store replaces (issue 32).

An instance that has read the feed up to sequence `s` and sees it at `s + k` (k <= FEED_ENTRIES, same epoch) reads only
the k rows named (point reads) instead of the whole listing. Anything else (an older sequence, another epoch, a row
without a feed, a feed that does not parse, a change of more rows than the feed holds) means: read the whole listing.
So a reader never trusts a feed it cannot follow from where it is, and a writer that cannot read the feed it finds
starts a new epoch (every reader then reads the listing once).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

FEED_FORMAT = 1  # the row's "feed_format"; a reader that does not know the format reads the whole listing
FEED_ENTRIES = 100  # changes the row keeps: at most ~100 x (63-character id + 12) characters, ~7.5 KiB
MAX_FEED_CHARS = 32_000  # a Table string property holds 64 KiB (32K UTF-16 characters); longer is not ours
CONSUMER, TEAM, EVERYTHING = "c", "t", "*"  # EVERYTHING: more rows changed than the feed holds (a bulk creation)
_KINDS = (CONSUMER, TEAM, EVERYTHING)
_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # a consumer's or team's id (records/consumers.py); nothing else is read


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    kind: str  # CONSUMER, TEAM or EVERYTHING
    id: str  # the consumer's or team's id ("" for EVERYTHING)


@dataclass(frozen=True, slots=True)
class ChangeFeed:
    """What one read of the marker row says. `token` changes whenever the row is replaced (its ETag; None: no row);
    `epoch` is "" when the row holds no feed this version can follow."""

    token: str | None
    epoch: str = ""
    seq: int = 0
    changes: tuple[Change, ...] = ()

    def may_follow(self, epoch: str, seq: int) -> bool:
        """Whether a feed with this marker might hold every change since `seq` (worth reading its entries)."""
        return bool(self.epoch) and epoch == self.epoch and seq <= self.seq <= seq + FEED_ENTRIES

    def after(self, epoch: str, seq: int) -> tuple[Change, ...] | None:
        """The changes since `seq` when this feed holds every one of them, else None (read the whole listing)."""
        if not self.epoch or epoch != self.epoch or seq > self.seq:
            return None
        wanted = tuple(c for c in self.changes if c.seq > seq)
        if [c.seq for c in wanted] != list(range(seq + 1, self.seq + 1)):
            return None  # older changes than the feed keeps, or a gap
        if any(c.kind == EVERYTHING for c in wanted):
            return None
        return wanted


def new_epoch() -> str:
    return secrets.token_hex(6)


MARKER_FIELDS = ("feed_format", "epoch", "seq")  # what the check every second reads of the row (a projection)


def parse_marker(token: str | None, row: Mapping[str, Any] | None) -> ChangeFeed:
    """The marker's token, epoch and sequence without the feed's entries (read every second by every instance, so the
    row's up to 7.5 KiB of ids is read only when the sequence moved)."""
    if row is None:
        return ChangeFeed(token)
    epoch, seq = row.get("epoch"), row.get("seq")
    if row.get("feed_format") != FEED_FORMAT or not isinstance(epoch, str) or not epoch:
        return ChangeFeed(token)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        return ChangeFeed(token)
    return ChangeFeed(token, epoch, seq)


def parse(token: str | None, row: Mapping[str, Any] | None) -> ChangeFeed:
    """The feed in a marker row; a row without one, or one that does not parse strictly, is a feed nobody can follow."""
    if row is None:
        return ChangeFeed(token)
    try:
        return _parse(token, row)
    except (ValueError, TypeError):
        return ChangeFeed(token)


def _parse(token: str | None, row: Mapping[str, Any]) -> ChangeFeed:
    epoch, seq, raw = row.get("epoch"), row.get("seq"), row.get("feed")
    if row.get("feed_format") != FEED_FORMAT or not isinstance(epoch, str) or not epoch or not isinstance(raw, str):
        raise ValueError("no feed")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0 or len(raw) > MAX_FEED_CHARS:
        raise ValueError("bad feed")
    entries = json.loads(raw)
    if not isinstance(entries, list) or len(entries) > FEED_ENTRIES:
        raise ValueError("bad feed")
    changes = []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise ValueError("bad entry")
        number, kind, name = entry
        if isinstance(number, bool) or not isinstance(number, int) or kind not in _KINDS or not isinstance(name, str):
            raise ValueError("bad entry")
        if not (_ID.fullmatch(name) or (kind == EVERYTHING and name == "")):
            raise ValueError("not an id")
        changes.append(Change(number, kind, name))
    if changes and (changes[-1].seq != seq or any(b.seq != a.seq + 1 for a, b in pairwise(changes))):
        raise ValueError("the feed's numbers do not run to its sequence")
    return ChangeFeed(token, epoch, seq, tuple(changes))


def appended(current: ChangeFeed, changed: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The marker row's properties with `changed` ((kind, id) pairs) recorded after what `current` holds; a feed that
    cannot be followed is started again in a new epoch. More distinct rows than the feed holds are one EVERYTHING."""
    epoch, seq, kept = (current.epoch, current.seq, list(current.changes)) if current.epoch else (new_epoch(), 0, [])
    distinct = list(dict.fromkeys(changed))
    if len(distinct) > FEED_ENTRIES // 2:
        distinct = [(EVERYTHING, "")]
    for kind, name in distinct:
        seq += 1
        kept.append(Change(seq, kind, name))
    kept = kept[-FEED_ENTRIES:]
    feed = json.dumps([[c.seq, c.kind, c.id] for c in kept], separators=(",", ":"))
    return {"feed_format": FEED_FORMAT, "epoch": epoch, "seq": seq, "feed": feed}
