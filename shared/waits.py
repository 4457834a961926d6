"""Waits as HTTP states them: the one a service names (Retry-After and its relatives), read in one place; the one
the gateway names, rounded in one place."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from email.utils import parsedate_to_datetime


def whole_seconds(seconds: float) -> int:
    """A wait as a Retry-After states it: whole seconds, rounded up, at least 1 (0 would invite an immediate retry)."""
    return max(1, math.ceil(seconds))


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def _duration_s(text: str) -> float | None:
    """'5', '2.5', '1m30s', '20ms', '6m0s' -> seconds."""
    text = text.strip().lower()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        value, unit = float(match.group(1)), match.group(2)
        total += value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        position = match.end()
    return total if position == len(text) and position > 0 else None


def retry_after_s(headers: Mapping[str, str], now_s: float) -> float | None:
    """How long the backend asked us to wait: retry-after-ms, Retry-After (seconds or HTTP date), then the
    x-ratelimit-reset-requests / -tokens durations. None when it did not say."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            ms = float(value)
            if ms >= 0 and math.isfinite(ms):
                return ms / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is not None:
        seconds = _duration_s(value)
        if seconds is not None and math.isfinite(seconds) and seconds >= 0:
            return seconds
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - now_s)
        except (TypeError, ValueError, IndexError, OverflowError):
            pass
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        value = headers.get(name)
        if value is not None:
            seconds = _duration_s(value)
            if seconds is not None and math.isfinite(seconds) and seconds >= 0:
                return seconds
    return None
