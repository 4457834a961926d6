"""An exact token counter in Python, without tiktoken's Rust core: what issue 25's RSS goal would have the gateway count
with instead, built so that bench.tokenizer_memory can measure its memory and CPU rather than guess them. Not used by
the gateway.

It counts the way tiktoken encodes: split the text with the encoding's own pattern, then merge each piece's bytes
pairwise, lowest rank first, until no adjacent pair is a token. The ranks are held in one of two forms:
- "dict": bytes -> rank, one entry per token (what tiktoken's Python side builds);
- "sorted": the tokens in one sorted list and their ranks in an array of 4-byte ints, looked up by bisection (no hash
  table, one object per token).
Pieces already counted are remembered (bounded), as a worker would.
"""

from __future__ import annotations

import array
import bisect
from collections.abc import Callable
from typing import Literal

import regex

from shared.flow import tokens

Form = Literal["dict", "sorted"]
PIECE_CACHE = 65_536


def ranks_lookup(name: str, form: Form) -> Callable[[bytes], int | None]:
    """The rank of a byte string, or None when it is no token of `name`."""
    ranks = tokens._bundled_ranks(name, None)
    if form == "dict":
        return ranks.get
    keys = sorted(ranks)
    values = array.array("I", (ranks[key] for key in keys))
    del ranks
    size = len(keys)

    def rank(piece: bytes) -> int | None:
        at = bisect.bisect_left(keys, piece)
        return values[at] if at < size and keys[at] == piece else None

    return rank


def merged_length(piece: bytes, rank: Callable[[bytes], int | None]) -> int:
    """How many tokens byte-pair merging leaves of `piece` (tiktoken's algorithm, without its speed-ups)."""
    if rank(piece) is not None:
        return 1
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best: int | None = None
        at = -1
        for i in range(len(parts) - 1):
            found = rank(parts[i] + parts[i + 1])
            if found is not None and (best is None or found < best):
                best, at = found, i
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return len(parts)


class Counter:
    def __init__(self, name: str, form: Form) -> None:
        self.rank = ranks_lookup(name, form)
        self.pattern = pattern_of(name)
        self.pieces: dict[str, int] = {}

    def count(self, text: str) -> int:
        total = 0
        pieces = self.pieces
        for piece in self.pattern.findall(text):
            found = pieces.get(piece)
            if found is None:
                found = merged_length(piece.encode("utf-8", "surrogatepass"), self.rank)
                if len(pieces) >= PIECE_CACHE:
                    pieces.clear()
                pieces[piece] = found
            total += found
        return total


# The split patterns, taken from tiktoken's constructors without building tiktoken's tables (whose memory is what the
# counter is measured without).
_PATTERNS: dict[str, regex.Pattern[str]] = {}


def pattern_of(name: str) -> regex.Pattern[str]:
    """The encoding's split pattern (compiled once)."""
    pattern = _PATTERNS.get(name)
    if pattern is None:
        pattern = _PATTERNS[name] = regex.compile(tokens.encoding_spec(name, with_ranks=False)["pat_str"])
    return pattern
