"""Per-deployment capacity like Azure OpenAI's: tokens (and optionally requests) per minute over a sliding 60 s window.

Azure charges a request on admission with its prompt plus its max_tokens (or a default) and answers 429 with the time
until the window has room for it. A sliding window, unlike a fixed minute, allows no double burst at a minute boundary.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

WINDOW_S = 60.0
UNLIMITED_REQUESTS = 1_000_000  # what x-ratelimit-remaining-requests says when no RPM is configured

Clock = Callable[[], float]


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    retry_after_s: float  # 0 when admitted; else the exact time until this request would fit
    remaining_tokens: int
    remaining_requests: int
    limited_by: Literal["tokens", "requests"] | None = None


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
                wait = WINDOW_S  # never fits; Azure still answers 429, not 400
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

    def resize(self, tpm: int, rpm: int | None) -> None:
        """New limits apply at once to what the window already holds (as when Azure's quota is edited)."""
        self.tpm = tpm
        self.rpm = rpm

    def clear(self) -> None:
        self._entries.clear()
        self._tokens = 0
