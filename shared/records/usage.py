"""Token usage as a backend reports it (or the gateway counts it), and the usage rows the books keep per consumer,
deployment and hour (shared/telemetry/usage_rows.py writes them; reports read them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class TokenUsage:
    prompt: int
    completion: int
    total: int
    cached: int = 0
    reasoning: int = 0
    # False when the backend never reported usage and the figures were counted by the gateway (a cut stream).
    reported: bool = True
    # Built-in tool calls the service bills per call (or per container, per image), by tool: (("web_search", 2),).
    tools: tuple[tuple[str, int], ...] = ()


def combined(first: TokenUsage | None, second: TokenUsage | None) -> TokenUsage | None:
    """The sum of two usages (either may be None); reported only if both were."""
    if first is None or second is None:
        return first if second is None else second
    return TokenUsage(
        first.prompt + second.prompt,
        first.completion + second.completion,
        first.total + second.total,
        first.cached + second.cached,
        first.reasoning + second.reasoning,
        first.reported and second.reported,
        add_tools(first.tools, second.tools),
    )


# Output items of the built-in tools, by the name the price table, the usage rows and the metrics use (the capability
# that lets the tool through, shared/flow/gates.py). Each item is one billed call; code interpreter is billed per
# container, so its calls are counted once per container they ran in.
TOOL_ITEMS = {
    "web_search_call": "web_search",
    "file_search_call": "file_search",
    "code_interpreter_call": "code_interpreter",
    "image_generation_call": "image_generation",
    "computer_call": "computer_use",
    "mcp_call": "mcp",
}


TOOLS = frozenset(TOOL_ITEMS.values())


def add_tools(first: tuple[tuple[str, int], ...], second: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
    if not first or not second:
        return first or second
    counts = dict(first)
    for name, calls in second:
        counts[name] = counts.get(name, 0) + calls
    return tuple(sorted(counts.items()))


@dataclass(frozen=True)
class UsageRow:
    consumer: str
    hour: str  # UTC, "2026-11-26T17"
    deployment: str
    instance: str
    requests: int = 0
    prompt: int = 0
    completion: int = 0
    total: int = 0
    cached: int = 0
    reasoning: int = 0
    # Of `total`, the tokens the gateway counted itself because no backend reported them (a stream cut off or
    # abandoned, a backend that sends no usage): the books say which figures are the service's own.
    counted: int = 0
    # Built-in tool calls, by tool: (("web_search", 3),)
    tools: tuple[tuple[str, int], ...] = ()
    # Requests the response cache answered (no backend tokens: none of the figures above), and what they saved.
    cache_hits: int = 0
    saved: int = 0
    # What these answers cost at the price table's marginal prices, in billionths of its currency (PTU answers: 0).
    cost_nanos: int = 0
    # When the store last wrote this row (epoch seconds; 0 in memory): how fresh a report is.
    written_s: float = field(default=0.0, compare=False)

    def plus(self, usage: TokenUsage | None, requests: int = 1, saved: TokenUsage | None = None,
             cost_nanos: int = 0) -> UsageRow:
        if saved is not None:
            return replace(self, requests=self.requests + requests, cache_hits=self.cache_hits + requests,
                           saved=self.saved + saved.total, cost_nanos=self.cost_nanos + cost_nanos)
        if usage is None:
            return replace(self, requests=self.requests + requests, cost_nanos=self.cost_nanos + cost_nanos)
        # Built directly, not with replace(): once per request, and replace() looks the fields up every time.
        return UsageRow(
            self.consumer, self.hour, self.deployment, self.instance,
            requests=self.requests + requests,
            prompt=self.prompt + usage.prompt,
            completion=self.completion + usage.completion,
            total=self.total + usage.total,
            cached=self.cached + usage.cached,
            reasoning=self.reasoning + usage.reasoning,
            counted=self.counted + (0 if usage.reported else usage.total),
            tools=add_tools(self.tools, usage.tools) if usage.tools else self.tools,
            cache_hits=self.cache_hits,
            saved=self.saved,
            cost_nanos=self.cost_nanos + cost_nanos,
            written_s=self.written_s,
        )
