"""Consumer rows in Table Storage (Azurite): strict parsing that never widens access, the key-hash index that makes an
uncached key one point read, and the admin command's input checks."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from azure.data.tables import UpdateMode

from shared.admin.cli import Admin, parser
from shared.config import load_settings
from shared.edge.consumers import hash_key, key_prefix, new_key, rotated
from shared.records.cache import CachePolicy
from shared.records.consumers import Consumer, Limits, Team, UserLimits
from shared.storage.consumer_table import (
    BadConsumerRecord,
    TableConsumerStore,
    consumer_from_entity,
    consumer_to_entity,
    team_from_entity,
    team_to_entity,
)
from shared.storage.tables import Tables
from tests.conftest import unique
from tools import stack

pytestmark = pytest.mark.e2e


@pytest.fixture
async def tables(azurite: stack.Child) -> AsyncIterator[Tables]:
    settings = load_settings({"GATEWAY_TABLE_CONNECTION_STRING": stack.table_connection_string(azurite.port),
                              "GATEWAY_TABLE_PREFIX": unique("t").replace("-", "")}, require_backends=False)
    tables = Tables.from_settings(settings, timeout_s=10)
    yield tables
    await tables.close()


def consumer(consumer_id: str = "team-a", **changes: Any) -> tuple[Consumer, str]:
    key = new_key()
    base = Consumer(id=consumer_id, name=consumer_id, key_hash=hash_key(key), key_prefix=key_prefix(key),
                    deployments=frozenset({"gpt-4o"}))
    return Consumer(**{**{f: getattr(base, f) for f in base.__dataclass_fields__}, **changes}), key


# ---- strict records --------------------------------------------------------------------------------------------


def test_a_record_round_trips() -> None:
    c, _ = consumer(capabilities=frozenset({"data_sources"}))
    assert consumer_from_entity(consumer_to_entity(c)) == c
    cached, _ = consumer(cache=CachePolicy(enabled=True, ttl_s=120, scope="gateway", tools=True))
    assert consumer_from_entity(consumer_to_entity(cached)) == cached
    c, _ = consumer(team="search", users=UserLimits(300, 5000, "daily", ("header",), True))
    assert consumer_from_entity(consumer_to_entity(c)) == c
    team = Team("search", "Search", Limits(1000, {}, 5000, "daily", 20.0, "monthly"), frozenset({"gpt-4o"}), "high", 3)
    assert team_from_entity(team_to_entity(team)) == team
    strict, _ = consumer(fallback=False)
    assert consumer_from_entity(consumer_to_entity(strict)).fallback is False
    cached_team = Team("cached", "Cached", cache=CachePolicy(enabled=True, ttl_s=60, scope="team"))
    assert team_from_entity(team_to_entity(cached_team)) == cached_team


def test_a_record_from_before_fallbacks_falls_back_as_the_gateway_does() -> None:
    entity = consumer_to_entity(consumer()[0])
    del entity["fallback"]
    assert consumer_from_entity(entity).fallback is True


def test_a_record_written_before_the_cache_has_it_off() -> None:
    entity = consumer_to_entity(consumer()[0])
    for name in ("cache", "cache_ttl_s", "cache_scope", "cache_tools"):
        del entity[name]
    assert consumer_from_entity(entity).cache == CachePolicy()


def test_a_row_written_before_teams_and_end_users_reads_as_neither() -> None:
    c, _ = consumer()
    entity = consumer_to_entity(c)
    for name in ("team", "user_tpm", "user_quota", "user_quota_period", "user_sources", "user_required"):
        del entity[name]
    assert consumer_from_entity(entity) == c


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"team": "Search Team"}, "team"),
        ({"user_tpm": -1}, "user_tpm"),
        ({"user_quota": 5}, "user_quota"),
        ({"user_sources": "cookie"}, "user_sources"),
        ({"user_sources": ""}, "user_sources"),
        ({"user_required": "yes"}, "user_required"),
    ],
)
def test_bad_team_and_end_user_fields_are_refused(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(BadConsumerRecord, match=problem):
        consumer_from_entity({**consumer_to_entity(consumer()[0]), **change})


async def test_teams_are_stored_beside_the_consumers_and_a_bad_row_is_left_out(
    tables: Tables, caplog: pytest.LogCaptureFixture
) -> None:
    store = TableConsumerStore(tables)
    team = Team("search", "Search", Limits(tokens_per_minute=1000), None, "normal")
    marker = (await store.change_feed()).token
    await store.create_team(team)
    assert (await store.change_feed()).token != marker
    with pytest.raises(Exception, match="Conflict|Exists"):
        await store.create_team(team)
    await store.put_team(Team("bad", "Bad"))
    await tables.call("consumers", lambda t: t.upsert_entity({**team_to_entity(Team("bad", "Bad")), "priority": "top"},
                                                              mode=UpdateMode.REPLACE))
    assert await store.list_teams() == [team]
    assert "team record 'bad' refused: priority" in caplog.text
    assert await store.list_consumers() == []  # teams are not consumers
    member, _ = consumer("member", team="search")
    await store.put(member)
    calls = tables.calls
    assert await store.list_all() == ([member], [team])
    assert tables.calls - calls == 1
    assert await store.delete_team("search") and not await store.delete_team("search")
    assert await store.get_team("search") is None


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"enabled": "false"}, "enabled"),
        ({"enabled": "False"}, "enabled"),
        ({"enabled": 0}, "enabled"),
        ({"deployments": None}, "deployments"),
        ({"deployments": ""}, "deployments"),
        ({"deployments": "gpt-4o"}, "deployments"),
        ({"deployments": '["gpt-4o\\n"]'}, "deployments"),
        ({"tpm": -5}, "tpm"),
        ({"tpm": "100"}, "tpm"),
        ({"tpm": True}, "tpm"),
        ({"quota": -1}, "quota"),
        ({"quota": 100, "quota_period": ""}, "quota"),
        ({"quota_period": "fortnightly"}, "quota_period"),
        ({"deployment_tpm": '{"gpt-4o": -1}'}, "deployment_tpm"),
        ({"deployment_tpm": "not json"}, "deployment_tpm"),
        ({"priority": "urgent"}, "priority"),
        ({"key_hash": "abc"}, "key_hash"),
        ({"capabilities": '["everything"]'}, "capabilities"),
        ({"fallback": "never"}, "fallback"),
        ({"fallback": False}, "fallback"),
        ({"RowKey": "Team A\n"}, "RowKey"),
        ({"cache": "yes"}, "cache"),
        ({"cache": "on", "cache_ttl_s": 0}, "cache_ttl_s"),
        ({"cache": "on", "cache_ttl_s": 86_401}, "cache_ttl_s"),
        ({"cache": "on", "cache_ttl_s": "60"}, "cache_ttl_s"),
        ({"cache": "on", "cache_scope": "everyone"}, "cache_scope"),
        ({"cache": "on", "cache_tools": "true"}, "cache_tools"),
    ],
)
def test_a_bad_record_is_refused_never_widened(change: dict[str, Any], problem: str) -> None:
    entity = {**consumer_to_entity(consumer()[0]), **change}
    entity = {k: v for k, v in entity.items() if v is not None}
    with pytest.raises(BadConsumerRecord, match=problem):
        consumer_from_entity(entity)


async def test_bad_records_in_the_table_refuse_that_consumer_and_name_it_in_the_log(
    tables: Tables, caplog: pytest.LogCaptureFixture
) -> None:
    store = TableConsumerStore(tables)
    good, _ = consumer("good")
    bad, bad_key = consumer("bad")
    await store.put(good)
    await store.put(bad)
    entity = {**consumer_to_entity(bad), "enabled": "false"}
    await tables.call("consumers", lambda t: t.upsert_entity(entity, mode=UpdateMode.REPLACE))
    assert [c.id for c in await store.list_consumers()] == ["good"]
    assert await store.find_by_key_hash(hash_key(bad_key)) is None
    assert await store.get("bad") is None
    assert "consumer record 'bad' refused: enabled" in caplog.text


# ---- the key-hash index ----------------------------------------------------------------------------------------


async def test_an_uncached_key_costs_one_point_read_and_unknown_keys_one(tables: Tables) -> None:
    store = TableConsumerStore(tables)
    c, key = consumer()
    await store.put(c)
    for i in range(30):  # consumers the old scan would have had to look through
        await store.put(consumer(f"other-{i}")[0])
    before = tables.calls
    assert (await store.find_by_key_hash(hash_key(key))) == c
    assert tables.calls - before == 2  # the index row, then the consumer row
    before = tables.calls
    assert await store.find_by_key_hash(hash_key(new_key())) is None
    assert tables.calls - before == 1


async def test_rotation_and_deletion_keep_the_index_in_step(tables: Tables) -> None:
    store = TableConsumerStore(tables)
    c, old = consumer()
    await store.create(c)
    new = new_key()
    await store.put(rotated(c, new, grace_s=60, now=0.0))
    assert (await store.find_by_key_hash(hash_key(old))) is not None  # the grace key is indexed (the directory checks expiry)
    newer = new_key()
    current = await store.get(c.id)
    assert current is not None
    await store.put(rotated(current, newer, grace_s=0, now=0.0))
    assert await store.find_by_key_hash(hash_key(old)) is None
    assert await store.find_by_key_hash(hash_key(new)) is None
    assert (await store.find_by_key_hash(hash_key(newer))) is not None
    assert await store.delete(c.id)
    assert await store.find_by_key_hash(hash_key(newer)) is None
    rows = await tables.call("consumers", lambda t: _all(t))
    assert [r for r in rows if r["PartitionKey"].startswith("keyhash")] == []


async def _all(table: Any) -> list[dict[str, Any]]:
    return [dict(e) async for e in table.list_entities()]


# ---- the admin command's input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["consumers", "create", "x", "--tpm", "-5", "--all-deployments"],
        ["consumers", "create", "x", "--tpm", "1e3", "--all-deployments"],
        ["consumers", "create", "x", "--quota", "-1", "--all-deployments"],
        ["consumers", "set", "x", "--tpm", "-1"],
        ["consumers", "rotate", "x", "--grace-seconds", "-10"],
        ["consumers", "rotate", "x", "--grace-seconds", "nan"],
    ],
)
def test_negative_or_odd_numbers_are_refused_by_the_parser(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["consumers", "create", "x"], "--deployments a,b or --all-deployments"),
        (["consumers", "create", "x", "--deployments", "gpt-4o,../x"], "not a deployment name"),
        (["consumers", "create", "x", "--deployments", " , "], "at least one deployment"),
        (["consumers", "create", "x", "--all-deployments", "--deployment-tpm", "gpt-4o=-5"], "N >= 0"),
        (["consumers", "create", "x", "--all-deployments", "--capabilities", "everything"], "unknown everything"),
    ],
)
async def test_admin_input_that_would_widen_access_is_refused(tables: Tables, argv: list[str], message: str) -> None:
    args = parser().parse_args(argv)
    with pytest.raises(SystemExit, match=message.replace("+", r"\+")):
        await Admin(TableConsumerStore(tables), io.StringIO()).create(args)
    assert await TableConsumerStore(tables).list_consumers() == []


async def test_admin_create_writes_what_was_asked(tables: Tables) -> None:
    out = io.StringIO()
    args = parser().parse_args(["consumers", "create", "Team B", "--deployments", "gpt-4o", "--tpm", "0",
                                "--capabilities", "data_sources"])
    assert await Admin(TableConsumerStore(tables), out).create(args) == 0
    shown = json.loads(out.getvalue().split("\nStore this key")[0])
    stored = await TableConsumerStore(tables).find_by_key_hash(hash_key(shown["key"]))
    assert stored is not None and stored.deployments == frozenset({"gpt-4o"})
    assert stored.capabilities == frozenset({"data_sources"}) and stored.limits.tokens_per_minute == 0


def test_parser_namespace_is_complete() -> None:
    assert isinstance(parser().parse_args(["consumers", "reindex"]), argparse.Namespace)
