"""The limiter's contract with the request flow (the distributed implementation lives in limiter.py)."""

from __future__ import annotations

from typing import Protocol

from shared.edge.consumers import Consumer


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


class UnlimitedTicket:
    __slots__ = ()

    @property
    def headers(self) -> dict[str, str]:
        return {}

    def progress(self, tokens_so_far: int) -> None:
        pass

    def settle(self, actual_tokens: int) -> None:
        pass


class NoLimits:
    def needs_estimate(self, consumer: Consumer, deployment: str, user: str | None = None) -> bool:
        return False

    def precheck(self, consumer: Consumer, deployment: str, at_least: int = 0, user: str | None = None) -> None:
        pass

    def room(self, consumer: Consumer, deployment: str, user: str | None = None) -> int | None:
        return None

    async def admit(self, consumer: Consumer, deployment: str, reserve: int, user: str | None = None) -> Ticket:
        return UnlimitedTicket()
