"""Per-deployment capacity like Azure OpenAI's, in its two kinds.

Pay-as-you-go (Standard): tokens (and optionally requests) per minute over a sliding 60 s window. Azure charges a
request on admission with its prompt plus its max_tokens (or a default) and answers 429 with the time until the window
has room for it. A sliding window, unlike a fixed minute, allows no double burst at a minute boundary. A request
larger than the whole limit never fits: Azure answers it 429 all the same, with a Retry-After of up to a day
(NEVER_FITS_S) while its remaining-tokens figure still shows the room the window has.

Provisioned (PTU): utilisation-based admission, "a variation of the leaky bucket algorithm" (Microsoft Learn, "What is
provisioned throughput?", section "How does the service decide when to send a 429?"): a call is refused with 429 and
`retry-after-ms` (the time until utilisation is below 100 %) while utilisation is above 100 %; otherwise it is
admitted and its prompt plus max_tokens are added; when it finishes, the charge is corrected to what it really used;
and utilisation drains continuously at the deployment's provisioned rate. A call may take utilisation just over 100 %.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

WINDOW_S = 60.0
NEVER_FITS_S = 86_400.0  # the Retry-After of a request larger than the whole tokens-per-minute limit
UNLIMITED_REQUESTS = 1_000_000  # what x-ratelimit-remaining-requests says when no RPM is configured

Clock = Callable[[], float]


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    retry_after_s: float  # 0 when admitted; else the exact time until this request would fit
    remaining_tokens: int
    remaining_requests: int
    limited_by: Literal["tokens", "requests"] | None = None
    utilization: float | None = None  # provisioned only: after this call, 1.0 = 100 %


class Admission(Protocol):
    """What the region asks of a deployment's capacity, whichever kind it is."""

    tpm: int
    rpm: int | None

    @property
    def used_tokens(self) -> int: ...

    def admit(self, tokens: int) -> Verdict: ...

    def settle(self, charged: int, actual: int) -> None: ...

    def resize(self, tpm: int, rpm: int | None) -> None: ...

    def clear(self) -> None: ...


class SlidingWindow:
    """Admission against tokens-per-minute and requests-per-minute; `clock` returns monotonic seconds."""

    def __init__(self, tpm: int, rpm: int | None, clock: Clock) -> None:
        self.tpm = tpm
        self.rpm = rpm
        self._clock = clock
        self._entries: deque[tuple[float, int]] = deque()  # (admitted at, tokens charged), oldest first
        self._tokens = 0

    @property
    def used_tokens(self) -> int:
        self._expire(self._clock())
        return self._tokens

    def _expire(self, now: float) -> None:
        entries = self._entries
        horizon = now - WINDOW_S
        while entries and entries[0][0] <= horizon:
            self._tokens -= entries.popleft()[1]

    def _wait_for(self, tokens_needed: int, requests_needed: int, now: float) -> float:
        """Seconds until `tokens_needed` more tokens and `requests_needed` more requests have left the window."""
        freed = 0
        for count, (at, tokens) in enumerate(self._entries, start=1):
            freed += tokens
            if freed >= tokens_needed and count >= requests_needed:
                return at + WINDOW_S - now
        return WINDOW_S

    def admit(self, tokens: int) -> Verdict:
        now = self._clock()
        self._expire(now)
        over_tokens = self._tokens + tokens - self.tpm
        over_requests = 0 if self.rpm is None else len(self._entries) + 1 - self.rpm
        if over_tokens > 0 or over_requests > 0:
            if tokens > self.tpm:
                wait = NEVER_FITS_S  # never fits; Azure still answers 429 (not 400), asking for up to a day
            else:
                wait = self._wait_for(max(0, over_tokens), max(0, over_requests), now)
            return Verdict(
                False, max(wait, 0.001), max(0, self.tpm - self._tokens), self._requests_left(),
                "tokens" if over_tokens > 0 else "requests",
            )
        self._entries.append((now, tokens))
        self._tokens += tokens
        return Verdict(True, 0.0, self.tpm - self._tokens, self._requests_left())

    def _requests_left(self) -> int:
        return UNLIMITED_REQUESTS if self.rpm is None else max(0, self.rpm - len(self._entries))

    def settle(self, charged: int, actual: int) -> None:
        """Pay-as-you-go keeps the admission charge: what was reserved stays in the window."""

    def resize(self, tpm: int, rpm: int | None) -> None:
        """New limits apply at once to what the window already holds (as when Azure's quota is edited)."""
        self.tpm = tpm
        self.rpm = rpm

    def clear(self) -> None:
        self._entries.clear()
        self._tokens = 0


# Utilisation at or below 100 % within this many tokens counts as "not above": float drain must not refuse a call
# at the very instant the 429 said it would be accepted.
_SLACK_TOKENS = 1e-6


class LeakyBucket:
    """A provisioned deployment's utilisation: `tpm` tokens a minute drain continuously; 100 % is `burst_s` seconds of
    that drain held at once (how much burst an idle deployment absorbs). `clock` returns monotonic seconds."""

    rpm: int | None = None  # a provisioned deployment has no request limit

    def __init__(self, tpm: int, clock: Clock, burst_s: float = 60.0) -> None:
        if burst_s <= 0:
            raise ValueError("burst_s must be positive")
        self.tpm = tpm
        self.burst_s = burst_s
        self._clock = clock
        self._level = 0.0  # tokens charged and not yet drained
        self._at = clock()

    @property
    def drain_per_s(self) -> float:
        return self.tpm / 60.0

    @property
    def full(self) -> float:
        """The level that is 100 % utilisation."""
        return self.drain_per_s * self.burst_s

    def _drain(self) -> None:
        now = self._clock()
        if now > self._at:
            self._level = max(0.0, self._level - (now - self._at) * self.drain_per_s)
        self._at = max(self._at, now)

    @property
    def utilization(self) -> float:
        self._drain()
        return self._level / self.full

    @property
    def used_tokens(self) -> int:
        self._drain()
        return round(self._level)

    def admit(self, tokens: int) -> Verdict:
        self._drain()
        over = self._level - self.full
        if over > _SLACK_TOKENS:
            # Refused fast, and not charged: the wait is exactly until utilisation is back at 100 %.
            return Verdict(False, over / self.drain_per_s, 0, UNLIMITED_REQUESTS, "tokens", self._level / self.full)
        self._level += tokens
        remaining = max(0, int(self.full - self._level))
        return Verdict(True, 0.0, remaining, UNLIMITED_REQUESTS, None, self._level / self.full)

    def settle(self, charged: int, actual: int) -> None:
        """The call finished: correct its admission charge to what it really used (up or down)."""
        self._drain()
        self._level = max(0.0, self._level + actual - charged)

    def resize(self, tpm: int, rpm: int | None) -> None:
        """A new PTU count: what is held drains at the new rate from now on, against the new 100 %."""
        if rpm is not None:
            raise ValueError("a provisioned deployment has no requests-per-minute limit")
        self._drain()
        self.tpm = tpm

    def clear(self) -> None:
        self._level = 0.0
        self._at = self._clock()
