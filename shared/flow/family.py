"""A request body, as a deployment of another family takes it: only what that family would refuse is changed.

Applied only when the deployment that serves is not the one the client named (a fallback, or an alias's entry): a
client that names a deployment gets its body sent as written. Azure OpenAI's reasoning models (o-series, gpt-5) take
`max_completion_tokens` and refuse `max_tokens` and the sampling parameters; chat models refuse `reasoning_effort`
(Responses: `reasoning`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.catalog import Family
from shared.flow.translate import Operation

# What a reasoning model refuses (Microsoft Learn, "Azure OpenAI reasoning models": not supported parameters).
REASONING_REFUSES = {
    Operation.CHAT: frozenset(
        {"temperature", "top_p", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "logit_bias"}
    ),
    Operation.RESPONSES: frozenset({"temperature", "top_p"}),
}
CHAT_REFUSES = {Operation.CHAT: frozenset({"reasoning_effort"}), Operation.RESPONSES: frozenset({"reasoning"})}


def for_family(body: Mapping[str, Any], operation: Operation, family: Family) -> Mapping[str, Any]:
    """The body a deployment of `family` accepts; `body` itself when nothing must change."""
    refused = (REASONING_REFUSES if family == "reasoning" else CHAT_REFUSES).get(operation, frozenset())
    rename = family == "reasoning" and operation is Operation.CHAT and "max_tokens" in body
    if not rename and refused.isdisjoint(body):
        return body
    changed = {name: value for name, value in body.items() if name not in refused}
    if rename:
        changed["max_completion_tokens"] = changed.pop("max_tokens")
    return changed
