"""The limiter's contract with the request flow (the distributed implementation lives in limiter.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import orjson

from shared.records.consumers import Consumer


@dataclass(frozen=True, slots=True)
class Place:
    """Where a hold sits in one ledger: its key (a consumer, team|<id>, user|...), scopes and quota period."""

    ledger: str
    scopes: tuple[str, ...]
    quota_key: str | None = None


@dataclass(frozen=True, slots=True)
class Held:
    """Tokens an answered request still holds in its windows (one place per level it was admitted at) until
    `expiry_ms`: a background response, held at its prompt and output cap until its usage is known. Any instance can
    give them back from this value."""

    tokens: int
    expiry_ms: int
    places: tuple[Place, ...]
    credit: int = 0  # charged already while it streamed: its usage, when learnt, is charged less this

    def encode(self) -> str:
        places = [[p.ledger, list(p.scopes), p.quota_key] for p in self.places]
        return orjson.dumps({"places": places, "credit": self.credit}).decode()

    @classmethod
    def decode(cls, tokens: int, expiry_ms: int, encoded: str) -> Held:
        try:
            raw = orjson.loads(encoded or "[]")
            places, credit = (raw.get("places", []), int(raw.get("credit", 0))) if isinstance(raw, dict) else (raw, 0)
            return cls(tokens, expiry_ms, tuple(Place(str(p[0]), tuple(str(s) for s in p[1]), p[2]) for p in places),
                       credit)
        except (orjson.JSONDecodeError, TypeError, ValueError, IndexError, KeyError, AttributeError):
            return cls(tokens, expiry_ms, ())


class Ticket(Protocol):
    """An admitted request's reservation; settled exactly once with the tokens it really cost.

    What is learnt is charged to the window at the time it is learnt: `progress` while a stream runs (the tokens
    delivered so far, prompt included), `settle` once at the end. Neither refunds what an earlier call charged."""

    @property
    def headers(self) -> dict[str, str]:
        """The consumer's own rate-limit headers."""
        ...

    def progress(self, tokens_so_far: int) -> None: ...

    def settle(self, actual_tokens: int) -> None: ...

    def hold(self, tokens: int, until_s: float, spent: int = 0) -> Held | None:
        """Settle with `spent` now, and keep `tokens` in the window until `until_s` (None: nothing limited)."""
        ...


class Limiter(Protocol):
    def needs_estimate(self, consumer: Consumer, deployment: str, user: str | None = None) -> bool: ...

    def precheck(self, consumer: Consumer, deployment: str, at_least: int = 0, user: str | None = None) -> None:
        """Raise the refusal this instance already knows the consumer would get (its window is full, its quota used
        up, or the request needs at least `at_least` tokens, more than its whole minute), so that a request is refused
        before any expensive work; no I/O."""
        ...

    def room(self, consumer: Consumer, deployment: str, user: str | None = None) -> int | None:
        """The tokens the consumer may still be admitted, as this instance knows without I/O (what its
        x-ratelimit-remaining headers would say, the tightest of its scopes and its quota); None without limits."""
        ...

    async def admit(self, consumer: Consumer, deployment: str, reserve: int, user: str | None = None) -> Ticket:
        """Reserve `reserve` tokens at every level of the request (its end user `user`, the consumer, its team), or
        raise a Refusal (RateLimited, QuotaExhausted, ...) naming the level that refused."""
        ...

    def release(self, held: Held, used: int) -> None:
        """Give back what `held` holds and charge `used` now: the usage of a held request, learnt. Never refused (a
        consumer over its limit pays the correction like anyone); written with the next ledger write."""
        ...

    def extend(self, held: Held, until_s: float) -> Held:
        """Move what `held` holds to `until_s` (a background response still running when its hold nears its end)."""
        ...


class UnlimitedTicket:
    __slots__ = ()

    @property
    def headers(self) -> dict[str, str]:
        return {}

    def progress(self, tokens_so_far: int) -> None:
        pass

    def settle(self, actual_tokens: int) -> None:
        pass

    def hold(self, tokens: int, until_s: float, spent: int = 0) -> Held | None:
        return None


class NoLimits:
    def needs_estimate(self, consumer: Consumer, deployment: str, user: str | None = None) -> bool:
        return False

    def precheck(self, consumer: Consumer, deployment: str, at_least: int = 0, user: str | None = None) -> None:
        pass

    def room(self, consumer: Consumer, deployment: str, user: str | None = None) -> int | None:
        return None

    async def admit(self, consumer: Consumer, deployment: str, reserve: int, user: str | None = None) -> Ticket:
        return UnlimitedTicket()

    def release(self, held: Held, used: int) -> None:
        pass

    def extend(self, held: Held, until_s: float) -> Held:
        return held
