"""Per-deployment capacity like Azure OpenAI's: tokens (and optionally requests) per minute over a sliding 60 s window.

Azure charges a request on admission with its prompt plus its max_tokens (or a default) and answers 429 with the time
until the window has room for it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 60.0


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    retry_after_s: float  # 0 when admitted
    remaining_tokens: int
    remaining_requests: int


class SlidingWindow:
    def __init__(self, tpm: int, rpm: int | None, clock: Callable[[], float]) -> None:
        self.tpm = tpm
        self.rpm = rpm
        self._clock = clock
        self._entries: deque[tuple[float, int]] = deque()
        self._tokens = 0

    def _expire(self, now: float) -> None:
        while self._entries and self._entries[0][0] <= now - WINDOW_S:
            _, tokens = self._entries.popleft()
            self._tokens -= tokens

    def _wait_for(self, tokens_needed: int, requests_needed: int, now: float) -> float:
        """Seconds until `tokens_needed` more tokens and `requests_needed` more requests fit."""
        freed_tokens = 0
        for index, (at, tokens) in enumerate(self._entries):
            freed_tokens += tokens
            if freed_tokens >= tokens_needed and index + 1 >= requests_needed:
                return max(0.0, at + WINDOW_S - now)
        return WINDOW_S

    def admit(self, tokens: int) -> Verdict:
        now = self._clock()
        self._expire(now)
        rpm = self.rpm if self.rpm is not None else math.inf
        over_tokens = self._tokens + tokens - self.tpm
        over_requests = 0 if self.rpm is None else len(self._entries) + 1 - self.rpm
        if tokens > self.tpm or over_tokens > 0 or over_requests > 0:
            wait = WINDOW_S if tokens > self.tpm else self._wait_for(max(0, over_tokens), max(0, over_requests), now)
            return Verdict(False, max(wait, 0.001), max(0, self.tpm - self._tokens), self._requests_left(rpm))
        self._entries.append((now, tokens))
        self._tokens += tokens
        return Verdict(True, 0.0, self.tpm - self._tokens, self._requests_left(rpm))

    def _requests_left(self, rpm: float) -> int:
        return int(rpm - len(self._entries)) if rpm != math.inf else 1_000_000

    def resize(self, tpm: int, rpm: int | None) -> None:
        self.tpm = tpm
        self.rpm = rpm

    def clear(self) -> None:
        self._entries.clear()
        self._tokens = 0
