"""The response cache's options of `consumers create|set` and `teams create|set` (docs/cache.md)."""

from __future__ import annotations

import argparse

from shared.records.cache import MAX_TTL_S, SCOPES, CachePolicy


def add_cache_arguments(parser: argparse.ArgumentParser, who: str) -> None:
    parser.add_argument("--cache", choices=("on", "off"),
                        help=f"answer repeated deterministic requests of {who} from the response cache (default off)")
    parser.add_argument("--cache-ttl", type=int, metavar="SECONDS",
                        help=f"how long a cached answer is served (1 to {MAX_TTL_S}; default 3600)")
    parser.add_argument("--cache-scope", choices=SCOPES,
                        help="whose answers are shared: the consumer's own (default), its team's, or the whole "
                        "gateway's")
    parser.add_argument("--cache-tools", choices=("on", "off"),
                        help="also cache requests with tools whose results depend on the moment (web or file search, "
                        "code interpreter, On Your Data); default off")


def cache_policy(args: argparse.Namespace, base: CachePolicy) -> CachePolicy:
    ttl = base.ttl_s if getattr(args, "cache_ttl", None) is None else args.cache_ttl
    if not 1 <= ttl <= MAX_TTL_S:
        raise SystemExit(f"--cache-ttl: expected 1 to {MAX_TTL_S} seconds, got {ttl}")
    enabled = base.enabled if getattr(args, "cache", None) is None else args.cache == "on"
    tools = base.tools if getattr(args, "cache_tools", None) is None else args.cache_tools == "on"
    scope = getattr(args, "cache_scope", None) or base.scope
    return CachePolicy(enabled, ttl, scope, tools)
