"""The safety policy option of `consumers create|set` and `teams create|set` (docs/safety.md)."""

from __future__ import annotations

import argparse
from collections.abc import Collection

from shared.records.safety import NONE


def add_safety_argument(parser: argparse.ArgumentParser, who: str) -> None:
    parser.add_argument("--safety-policy", metavar="NAME",
                        help=f"the safety policy of {who}: a name from GATEWAY_SAFETY_POLICIES, '{NONE}' for no policy "
                        "(not even the team's or the gateway's default), '' to inherit")


def safety_policy(args: argparse.Namespace, base: str | None, policies: Collection[str]) -> str | None:
    """The name to write: unchanged when the option is absent; an unknown name is refused, never written."""
    name: str | None = getattr(args, "safety_policy", None)
    if name is None:
        return base
    name = name.strip()
    if name == "":
        return None
    if name != NONE and name not in policies:
        known = ", ".join(sorted(policies)) or "none are defined here"
        raise SystemExit(f"--safety-policy: no policy {name!r} in GATEWAY_SAFETY_POLICIES ({known}); define it there "
                         "(the admin command reads the same settings as the gateway) or use one of those")
    return name
