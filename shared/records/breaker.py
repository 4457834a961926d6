"""A backend breaker's shared state (shared/routing/router.py keeps it; the breaker store holds it), and when a
transition is news to the state already shared.
"""

from __future__ import annotations

from dataclasses import dataclass

# A trip ending no more than this after the shared one adds nothing an instance would act on.
SAME_TRIP_S = 1.0


@dataclass(frozen=True)
class BreakerRecord:
    backend_id: str
    deployment: str
    state: str
    until: float
    since: float
    reason: str


def is_news(shared: BreakerRecord | None, record: BreakerRecord) -> bool:
    """Whether `record` should replace the `shared` transition of its breaker: it is newer (`since`; an older one,
    written late, never wins) and says something the shared one does not: a trip where the shared state is closed, or
    one ending later (by more than SAME_TRIP_S); a recovery where the shared state is a trip. So when every instance
    trips on the same outage, or recovers from it, the first to tell it writes and the rest find it told."""
    if shared is None:
        return True
    if shared.since >= record.since:
        return False
    if record.state == "open":
        return shared.state != "open" or record.until > shared.until + SAME_TRIP_S
    return shared.state == "open"
