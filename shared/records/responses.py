"""Where a stored response lives (shared/flow/pinning.py keeps it; the response store holds it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StoredResponse:
    response_id: str
    backend_id: str
    consumer_id: str
    deployment: str
    expires: float  # unix time
    # What continuing this response adds to the next input (its own input and output), for admission's estimate;
    # 0 while unknown (a background response still running).
    context_tokens: int = 0
    # A background response is answered "queued", without usage: `charged` (the estimate) holds the consumer's limits
    # until a follow-up reads the finished response and its usage is settled, once, by whichever instance reads it.
    unsettled: bool = False
    charged: int = 0
    # Where `charged` is held (limits.tickets.Held): until this bucket (ms; 0 for a record written before holds were
    # kept), in these places (its encoding: the ledger, scopes and quota period of each level admitted).
    held_until_ms: int = 0
    held_places: str = ""

    def expired(self, now: float) -> bool:
        return now >= self.expires
