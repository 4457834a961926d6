"""What the operator says about deployments beyond where they are served (GATEWAY_DEPLOYMENTS, GATEWAY_ALIASES): each
one's fallback chain, context window, largest output and parameter family, and the names clients may use for a list of
deployments. Values only; shared/config.py parses and validates them at start-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

# Where request parameters differ: a reasoning model (o-series, gpt-5) takes max_completion_tokens and refuses the
# sampling parameters; a chat model takes both cap fields and refuses reasoning_effort.
Family = Literal["chat", "reasoning"]
FAMILIES: tuple[Family, ...] = ("chat", "reasoning")


@dataclass(frozen=True)
class DeploymentSpec:
    fallback: tuple[str, ...] = ()  # tried in order when every region of this deployment failed the request
    context_window: int | None = None  # prompt + output tokens the model holds; None: not checked
    max_output_tokens: int | None = None  # the most a request may ask it to generate; None: not checked
    family: Family = "chat"


NO_SPEC = DeploymentSpec()


@dataclass(frozen=True)
class Catalog:
    specs: Mapping[str, DeploymentSpec] = field(default_factory=dict)
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def spec(self, deployment: str) -> DeploymentSpec:
        return self.specs.get(deployment, NO_SPEC)

    def chain(self, name: str) -> tuple[str, ...]:
        """The deployments a request for `name` may be served by, in order: an alias's list, each entry followed by its
        own fallbacks (depth first, each deployment once); a deployment, then its fallbacks. Start-up refuses cycles,
        so this ends."""
        order: list[str] = []

        def visit(deployment: str) -> None:
            if deployment in order:
                return
            order.append(deployment)
            for nxt in self.spec(deployment).fallback:
                visit(nxt)

        for first in self.aliases.get(name, (name,)):
            visit(first)
        return tuple(order)

    def fits(self, deployment: str, prompt: int, output: int) -> bool:
        """Whether the deployment can hold the prompt plus the requested output (and generate that much)."""
        spec = self.spec(deployment)
        if spec.max_output_tokens is not None and output > spec.max_output_tokens:
            return False
        return spec.context_window is None or prompt + output <= spec.context_window
