"""The response cache's admin options: consumers and teams turn it on, set its TTL, scope and tools; bad values are
refused before anything is written."""

from __future__ import annotations

import io
import json

import pytest

from shared.admin.cli import Admin, _deployments, parser
from shared.admin.teams import TeamAdmin
from shared.records.cache import CachePolicy
from shared.storage.memory import MemoryConsumerStore


async def run(store: MemoryConsumerStore, *argv: str) -> tuple[int, dict[str, object]]:
    out = io.StringIO()
    args = parser().parse_args(list(argv))
    if args.command == "teams":
        code = await TeamAdmin(store, out, _deployments).run(args)
    elif args.action == "create":
        code = await Admin(store, out).create(args)  # type: ignore[arg-type]
    else:
        code = await Admin(store, out).update(args)  # type: ignore[arg-type]
    return code, json.loads(out.getvalue().split("\nStore this key")[0])


async def test_a_consumer_turns_the_cache_on_sets_its_ttl_scope_and_tools_and_off_again() -> None:
    store = MemoryConsumerStore()
    code, shown = await run(store, "consumers", "create", "Indexer", "--all-deployments", "--cache", "on")
    assert code == 0 and shown["cache"] == {"on": True, "ttl_s": 3600, "scope": "consumer", "tools": False}
    assert store.consumers["indexer"].cache == CachePolicy(enabled=True)
    await run(store, "consumers", "set", "indexer", "--cache-ttl", "600", "--cache-scope", "gateway",
              "--cache-tools", "on")
    assert store.consumers["indexer"].cache == CachePolicy(True, 600, "gateway", True)
    await run(store, "consumers", "set", "indexer", "--tpm", "5000")  # other changes keep the cache as it was
    assert store.consumers["indexer"].cache == CachePolicy(True, 600, "gateway", True)
    await run(store, "consumers", "set", "indexer", "--cache", "off")
    assert store.consumers["indexer"].cache == CachePolicy(False, 600, "gateway", True)


async def test_a_team_turns_the_cache_on_for_its_members() -> None:
    store = MemoryConsumerStore()
    code, shown = await run(store, "teams", "create", "Search", "--all-deployments", "--cache", "on",
                            "--cache-scope", "team")
    assert code == 0 and shown["cache"] == {"on": True, "ttl_s": 3600, "scope": "team", "tools": False}
    await run(store, "teams", "set", "search", "--cache-ttl", "120")
    assert store.teams["search"].cache == CachePolicy(True, 120, "team")


@pytest.mark.parametrize("argv", [
    ["consumers", "create", "x", "--all-deployments", "--cache", "yes"],
    ["consumers", "create", "x", "--all-deployments", "--cache-scope", "everyone"],
    ["consumers", "create", "x", "--all-deployments", "--cache-ttl", "1h"],
])
def test_bad_cache_options_are_refused_by_the_parser(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(argv)


@pytest.mark.parametrize("ttl", ["0", "-5", "86401"])
async def test_a_ttl_out_of_range_is_refused_and_nothing_written(ttl: str) -> None:
    store = MemoryConsumerStore()
    with pytest.raises(SystemExit, match="--cache-ttl"):
        await run(store, "consumers", "create", "x", "--all-deployments", "--cache", "on", "--cache-ttl", ttl)
    assert store.consumers == {}
