"""What a request costs: a price table per deployment, per million input, cached input and output tokens.

Prices come from the `GATEWAY_PRICES` setting (JSON) or the file `GATEWAY_PRICES_FILE` names, in one currency:

    {"currency": "USD",
     "deployments": {"gpt-4o": {"input": 2.50, "cached_input": 1.25, "output": 10.00, "cache_hit": 0}},
     "ptu_hourly": {"uksouth-ptu": 2.00},
     "tools": {"web_search": 0.01, "file_search": 0.0025, "code_interpreter": 0.03}}

A request answered by a provisioned (PTU) backend costs nothing at the margin: its capacity is paid by the hour
whether used or not, so its cost is 0 here and the hourly figure (`ptu_hourly`, per backend) is shared out by the
chargeback query in proportion to the tokens each consumer had served by that backend. Reasoning tokens are part of
the completion tokens and billed as output; cached prompt tokens are billed at the cached-input price.

`tools` prices the built-in tools per call (per container for code interpreter, per image for image generation), in
the same currency, whatever the backend: a PTU covers tokens, not tool calls. A tool left out costs 0 (its calls are
still counted in the usage rows and the Tool Calls metric).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.records.usage import TOOLS, TokenUsage

PER = 1_000_000
_CURRENCY_RE = re.compile(r"^[A-Z]{3}$")


class PriceError(ValueError):
    """The price table is malformed; the message names the field."""


@dataclass(frozen=True)
class Price:
    input: float
    cached_input: float
    output: float
    cache_hit: float = 0.0  # per million tokens a response-cache hit saved (0: hits are free)


@dataclass(frozen=True)
class PriceTable:
    currency: str = "USD"
    deployments: Mapping[str, Price] = field(default_factory=dict)
    ptu_hourly: Mapping[str, float] = field(default_factory=dict)
    tools: Mapping[str, float] = field(default_factory=dict)  # per call

    def cost(self, deployment: str, ptu: bool, usage: TokenUsage | None, saved: TokenUsage | None = None) -> float:
        """The marginal cost of one answer, in the table's currency: its tokens (0 on PTU backends and unpriced
        deployments) and its built-in tool calls; an answer served by the response cache (`saved`: what it cost the
        backend once) at the deployment's cache_hit price."""
        if saved is not None:
            price = self.deployments.get(deployment)
            return 0.0 if price is None else saved.total * price.cache_hit / PER
        if usage is None:
            return 0.0
        calls = sum(self.tools.get(name, 0.0) * n for name, n in usage.tools) if usage.tools else 0.0
        price = self.deployments.get(deployment)
        if price is None or ptu:
            return calls
        cached = min(usage.cached, usage.prompt)
        return (
            (usage.prompt - cached) * price.input + cached * price.cached_input + usage.completion * price.output
        ) / PER + calls

    def priced(self, deployment: str) -> bool:
        return deployment in self.deployments


def _amount(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PriceError(f"{where}: expected a price of 0 or more, got {value!r}")
    return float(value)


def parse_prices(text: str, where: str = "GATEWAY_PRICES") -> PriceTable:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PriceError(f"{where}: invalid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(raw, dict):
        raise PriceError(f"{where}: expected an object with currency, deployments, ptu_hourly")
    unknown = set(raw) - {"currency", "deployments", "ptu_hourly", "tools"}
    if unknown:
        raise PriceError(f"{where}.{sorted(unknown)[0]}: unknown field")
    currency = raw.get("currency", "USD")
    if not isinstance(currency, str) or not _CURRENCY_RE.match(currency):
        raise PriceError(f"{where}.currency: expected an ISO 4217 code like USD, got {currency!r}")
    deployments: dict[str, Price] = {}
    entries = raw.get("deployments", {})
    if not isinstance(entries, dict):
        raise PriceError(f"{where}.deployments: expected an object")
    for name, entry in entries.items():
        at = f"{where}.deployments.{name}"
        if not isinstance(entry, dict) or set(entry) - {"input", "cached_input", "output", "cache_hit"} or "input" not in entry:
            raise PriceError(f"{at}: expected {{input, cached_input, output, cache_hit}} per million tokens")
        price_in = _amount(entry["input"], f"{at}.input")
        deployments[str(name)] = Price(
            price_in,
            _amount(entry.get("cached_input", price_in), f"{at}.cached_input"),
            _amount(entry.get("output", 0), f"{at}.output"),
            _amount(entry.get("cache_hit", 0), f"{at}.cache_hit"),
        )
    hourly = raw.get("ptu_hourly", {})
    if not isinstance(hourly, dict):
        raise PriceError(f"{where}.ptu_hourly: expected an object {{backend id: price per hour}}")
    tools = raw.get("tools", {})
    if not isinstance(tools, dict):
        raise PriceError(f"{where}.tools: expected an object {{tool: price per call}}")
    for name in tools:
        if name not in TOOLS:
            raise PriceError(f"{where}.tools.{name}: unknown tool; known: {', '.join(sorted(TOOLS))}")
    return PriceTable(
        currency,
        deployments,
        {str(k): _amount(v, f"{where}.ptu_hourly.{k}") for k, v in hourly.items()},
        {str(k): _amount(v, f"{where}.tools.{k}") for k, v in tools.items()},
    )
