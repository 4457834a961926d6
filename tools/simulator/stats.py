"""What a region has served: the ground truth that tests compare a gateway's accounting against."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

_BLANK = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def _add(counter: Counter[str], prompt: int, completion: int) -> None:
    counter["prompt_tokens"] += prompt
    counter["completion_tokens"] += completion
    counter["total_tokens"] += prompt + completion


@dataclass
class Stats:
    requests: int = 0
    by_status: Counter[str] = field(default_factory=Counter)  # "reset" for connections dropped without a response
    usage: Counter[str] = field(default_factory=Counter)  # exactly the usage reported to callers (bodies, usage chunks)
    usage_by_deployment: dict[str, Counter[str]] = field(default_factory=dict)
    billed: Counter[str] = field(default_factory=Counter)  # prompt + delivered tokens of everything served, reported or not
    streams_cut: int = 0  # by the "cut" fault, streamed or not
    delivered_in_cut: int = 0
    streams_abandoned: int = 0  # the caller went away mid-stream
    unreported: Counter[str] = field(default_factory=Counter)  # prompt + delivered tokens of answers cut or abandoned
    # Prompts read and never answered (a timeout fault held them past the caller's patience; a caller that left before
    # the answer): nothing billed, while a gateway that timed out charges the prompt. Kept apart from `billed`.
    unanswered: Counter[str] = field(default_factory=Counter)
    throttled: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=5000))  # (unix time, retry-after s)
    # Provisioned deployments: (unix time a call finished, deployment, tokens it used), what utilisation is made of.
    provisioned: deque[tuple[float, str, int]] = field(default_factory=lambda: deque(maxlen=100_000))

    def reported(self, deployment: str, prompt: int, completion: int) -> None:
        per = self.usage_by_deployment.get(deployment)
        if per is None:
            per = self.usage_by_deployment[deployment] = Counter()
        _add(self.usage, prompt, completion)
        _add(per, prompt, completion)
        _add(self.billed, prompt, completion)

    def served_unreported(self, prompt: int, completion: int) -> None:
        """A complete answer whose usage the caller did not ask for (a stream without include_usage)."""
        _add(self.billed, prompt, completion)

    def cut(self, prompt: int, delivered: int, streamed: bool) -> None:
        self.streams_cut += 1
        if streamed:
            self.delivered_in_cut += delivered
        _add(self.unreported, prompt, delivered)
        _add(self.billed, prompt, delivered)

    def abandoned(self, prompt: int, delivered: int) -> None:
        self.streams_abandoned += 1
        _add(self.unreported, prompt, delivered)
        _add(self.billed, prompt, delivered)

    def unanswered_prompt(self, prompt: int) -> None:
        _add(self.unanswered, prompt, 0)
        self.unanswered["requests"] += 1

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_status": dict(self.by_status),
            "usage": {**_BLANK, **self.usage},
            "usage_by_deployment": {d: {**_BLANK, **c} for d, c in self.usage_by_deployment.items()},
            "streams_cut": self.streams_cut,
            "delivered_completion_tokens_in_cut_streams": self.delivered_in_cut,
            "streams_abandoned": self.streams_abandoned,
            "unreported": {**_BLANK, **self.unreported},
            "billed": {**_BLANK, **self.billed},
            "unanswered": {**_BLANK, "requests": 0, **self.unanswered},
            "throttled": [[round(t, 3), round(r, 3)] for t, r in self.throttled],
            "provisioned": [[round(t, 3), d, n] for t, d, n in self.provisioned],
        }
