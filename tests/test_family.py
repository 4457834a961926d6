"""Translation for a deployment's family: a table of bodies in, bodies out."""

from __future__ import annotations

from typing import Any

import pytest

from shared.catalog import Family
from shared.flow.family import for_family
from shared.flow.translate import Operation

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT, RESPONSES, EMBEDDINGS = Operation.CHAT, Operation.RESPONSES, Operation.EMBEDDINGS


@pytest.mark.parametrize(
    ("operation", "family", "body", "sent"),
    [
        # To a reasoning model: the cap renamed, sampling parameters dropped, everything else as written.
        (CHAT, "reasoning", {"messages": MESSAGES, "max_tokens": 50, "temperature": 0.2, "top_p": 1, "seed": 7},
         {"messages": MESSAGES, "max_completion_tokens": 50, "seed": 7}),
        (CHAT, "reasoning", {"messages": MESSAGES, "presence_penalty": 1, "frequency_penalty": 1, "logprobs": True,
                             "top_logprobs": 2, "logit_bias": {"1": 2}, "stream": True, "tools": []},
         {"messages": MESSAGES, "stream": True, "tools": []}),
        (CHAT, "reasoning", {"messages": MESSAGES, "max_completion_tokens": 50, "reasoning_effort": "low"},
         {"messages": MESSAGES, "max_completion_tokens": 50, "reasoning_effort": "low"}),
        (RESPONSES, "reasoning", {"input": "hi", "temperature": 1, "max_output_tokens": 9},
         {"input": "hi", "max_output_tokens": 9}),
        # To a chat model: only what it refuses.
        (CHAT, "chat", {"messages": MESSAGES, "max_completion_tokens": 50, "reasoning_effort": "high"},
         {"messages": MESSAGES, "max_completion_tokens": 50}),
        (CHAT, "chat", {"messages": MESSAGES, "max_tokens": 50, "temperature": 0.5},
         {"messages": MESSAGES, "max_tokens": 50, "temperature": 0.5}),
        (RESPONSES, "chat", {"input": "hi", "reasoning": {"effort": "low"}, "temperature": 1},
         {"input": "hi", "temperature": 1}),
        # Operations without family differences pass as written.
        (EMBEDDINGS, "reasoning", {"input": "x", "temperature": 1}, {"input": "x", "temperature": 1}),
        (Operation.COMPLETIONS, "reasoning", {"prompt": "x", "max_tokens": 5}, {"prompt": "x", "max_tokens": 5}),
    ],
)
def test_for_family(operation: Operation, family: Family, body: dict[str, Any], sent: dict[str, Any]) -> None:
    assert for_family(body, operation, family) == sent


@pytest.mark.parametrize("family", ["chat", "reasoning"])
def test_a_body_with_nothing_to_change_is_the_same_object_and_the_input_is_never_mutated(family: Family) -> None:
    body = {"messages": MESSAGES, "max_completion_tokens": 5}
    assert for_family(body, CHAT, family) is body
    hostile = {"messages": MESSAGES, "max_tokens": 5, "temperature": 1, "reasoning_effort": "low"}
    before = dict(hostile)
    for_family(hostile, CHAT, family)
    assert hostile == before
