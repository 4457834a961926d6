"""The consumer listing's snapshot (issue 32): every consumer and team row, serialised and compressed into a few Table
entities, stamped with the change feed's epoch and sequence it is consistent with, so that an instance starting cold
reads a few entities and follows the feed from there instead of reading every consumer row.

Layout (in the consumers table, beside the rows; no query of the consumer or team partitions returns it):
- the head, ("snapshot", "head"): format, schema, epoch, seq, generation, chunk count, size, SHA-256, written_at;
- chunk k of a generation, ("snapshot-<k>", <generation>): one binary property of at most CHUNK_BYTES. Each chunk in a
  partition of its own, so that N instances starting together ask each partition for N chunks, not N x chunks.

A writer writes its generation's chunks, then the head (created, or replaced on the ETag it read: of two writers one
wins, the other deletes its chunks), then deletes the generation it replaced. A reader verifies every chunk's
generation, the size and the SHA-256 of the whole before it decompresses (at most MAX_ROWS_BYTES) and parses each row
as strictly as a row read from the table. Anything else (no head, another format or schema, a chunk gone or corrupt,
too large) is a snapshot that is not used: the reader reads the whole listing, as without one.

The rows are those of the table (consumer_to_entity): key hashes and 9-character key prefixes, never a key.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
import secrets
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

SNAPSHOT_FORMAT = 1
HEAD_PK, HEAD_RK = "snapshot", "head"
CHUNK_PK = "snapshot-{}"
CHUNK_BYTES = 16_000  # one binary property holds 64 KiB; smaller chunks spread a cold start over more partitions
MAX_CHUNKS = 1_000  # 16 MB compressed (about 250,000 consumers); a larger listing gets no snapshot
MAX_ROWS_BYTES = 256 * 1024 * 1024  # what a snapshot may decompress to (a compression bomb is refused)
READ_PARALLEL = 8  # chunks read at once by one instance
BUSY_TRIES, BUSY_PAUSE_S = 5, 0.2  # a throttled chunk read: tried again after 0.1-0.2, 0.2-0.4, ... 1.6 s
_GENERATION = re.compile(r"[0-9a-f]{16}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_EPOCH = re.compile(r"[0-9a-f]{1,64}")


class BadSnapshot(ValueError):
    """A snapshot that cannot be used (its reason is the message); the reader reads the listing instead."""


class SnapshotGone(BadSnapshot):
    """A chunk of the head's generation is not there: a writer replaced the snapshot meanwhile (read the head again)."""


@dataclass(frozen=True, slots=True)
class SnapshotHead:
    epoch: str
    seq: int
    generation: str
    chunks: int
    size: int
    sha256: str
    written_at: float
    etag: str | None = None


def parse_head(row: Mapping[str, Any], etag: str | None, schema: str) -> SnapshotHead:
    """The head, strictly: BadSnapshot for another format or row schema (consumer_table.SNAPSHOT_SCHEMA: the row
    fields this version writes), or anything out of shape."""
    if row.get("format") != SNAPSHOT_FORMAT or row.get("schema") != schema:
        raise BadSnapshot("another version's snapshot")
    epoch, seq, generation = row.get("epoch"), row.get("seq"), row.get("generation")
    chunks, size, digest, written_at = row.get("chunks"), row.get("size"), row.get("sha256"), row.get("written_at")
    if not (isinstance(epoch, str) and _EPOCH.fullmatch(epoch) and isinstance(generation, str)
            and _GENERATION.fullmatch(generation) and isinstance(digest, str) and _HEX64.fullmatch(digest)):
        raise BadSnapshot("head out of shape")
    for value in (seq, chunks, size):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadSnapshot("head out of shape")
    assert isinstance(seq, int) and isinstance(chunks, int) and isinstance(size, int)
    if not 1 <= chunks <= MAX_CHUNKS or not (chunks - 1) * CHUNK_BYTES < size <= chunks * CHUNK_BYTES:
        raise BadSnapshot("head's size and chunks out of bounds")
    if isinstance(written_at, bool) or not isinstance(written_at, (int, float)) or not math.isfinite(written_at):
        raise BadSnapshot("head out of shape")
    return SnapshotHead(epoch, seq, generation, chunks, size, digest, float(written_at), etag)


@dataclass(frozen=True, slots=True)
class Encoded:
    head: dict[str, Any]  # the head's properties (no keys)
    chunks: list[bytes]
    generation: str


def pack(rows: Mapping[str, list[dict[str, Any]]], schema: str, epoch: str, seq: int, written_at: float) -> Encoded:
    """The rows ({"consumers": [...], "teams": [...]}, each a table row's properties) as one compressed document cut
    into chunks; BadSnapshot when it would need more than MAX_CHUNKS."""
    data = zlib.compress(json.dumps(rows, separators=(",", ":")).encode(), 6)
    chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
    if len(chunks) > MAX_CHUNKS:
        raise BadSnapshot(f"the listing needs {len(chunks)} chunks, more than {MAX_CHUNKS}")
    generation = secrets.token_hex(8)
    head = {"format": SNAPSHOT_FORMAT, "schema": schema, "epoch": epoch, "seq": seq, "generation": generation,
            "chunks": len(chunks), "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "written_at": float(written_at)}
    return Encoded(head, chunks, generation)


def unpack(head: SnapshotHead, chunks: list[bytes]) -> dict[str, list[dict[str, Any]]]:
    """The rows of a snapshot whose chunks were all read; BadSnapshot unless every byte is what the head says."""
    data = b"".join(chunks)
    if len(data) != head.size or hashlib.sha256(data).hexdigest() != head.sha256:
        raise BadSnapshot("the chunks do not match the head (size or SHA-256)")
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(data, MAX_ROWS_BYTES)
    except zlib.error as exc:
        raise BadSnapshot("not zlib") from exc
    if inflate.unconsumed_tail or not inflate.eof:
        raise BadSnapshot("larger than MAX_ROWS_BYTES, or cut short")
    try:
        rows = json.loads(raw)
    except ValueError as exc:
        raise BadSnapshot("not JSON") from exc
    if not isinstance(rows, dict) or not isinstance(rows.get("consumers"), list) or not isinstance(rows.get("teams"), list):
        raise BadSnapshot("not a listing")
    if not all(isinstance(r, dict) for r in rows["consumers"] + rows["teams"]):
        raise BadSnapshot("not a listing")
    return {"consumers": rows["consumers"], "teams": rows["teams"]}


def check_chunk(head: SnapshotHead, entity: Mapping[str, Any] | None) -> bytes:
    """Chunk k's bytes as read (None: not there); BadSnapshot when out of shape."""
    if entity is None:
        raise SnapshotGone("a chunk is gone: the snapshot was replaced")
    data = entity.get("data")
    if isinstance(data, bytearray):
        data = bytes(data)
    if not isinstance(data, bytes) or len(data) > CHUNK_BYTES:
        raise BadSnapshot("a chunk out of shape")
    return data


async def read_chunks(head: SnapshotHead, read: Callable[[int], Awaitable[bytes]],
                      busy: Callable[[Exception], bool] = lambda _: False) -> list[bytes]:
    """Every chunk of the head's generation, READ_PARALLEL at a time; a read the store throttles (`busy`) is tried
    again after a jittered pause doubling from BUSY_PAUSE_S, BUSY_TRIES times in all (instances starting together
    ask each chunk's partition at once: a cold start waiting a second beats one that fails and reads again)."""
    gate = asyncio.Semaphore(READ_PARALLEL)
    rng = random.Random()

    async def one(k: int) -> bytes:
        for attempt in range(BUSY_TRIES):
            try:
                async with gate:
                    return await read(k)
            except Exception as exc:
                if attempt == BUSY_TRIES - 1 or not busy(exc):
                    raise
            await asyncio.sleep(rng.uniform(0.5, 1.0) * BUSY_PAUSE_S * 2 ** attempt)
        raise AssertionError("unreachable")

    return list(await asyncio.gather(*(one(k) for k in range(head.chunks))))


__all__ = [
    "CHUNK_BYTES", "CHUNK_PK", "HEAD_PK", "HEAD_RK", "MAX_CHUNKS", "SNAPSHOT_FORMAT", "BadSnapshot", "Encoded",
    "SnapshotGone", "SnapshotHead", "check_chunk", "pack", "parse_head", "read_chunks", "unpack",
]
