"""Teams as records: a member's settings only narrow its team's; the directory resolves them and sees a change
within a marker check; the admin command refuses what would leave a consumer in no team or a team without its
members."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest

from shared.admin.cli import Admin, parser
from shared.admin.teams import TeamAdmin
from shared.clock import FakeClock
from shared.edge.consumers import ConsumerDirectory, hash_key, key_prefix, new_key
from shared.records.consumers import Consumer, Limits, Team, with_team
from shared.storage.memory import MemoryConsumerStore


def member(consumer_id: str = "app", **changes: object) -> tuple[Consumer, str]:
    key = new_key()
    base = Consumer(id=consumer_id, name=consumer_id, key_hash=hash_key(key), key_prefix=key_prefix(key))
    return replace(base, **changes), key  # type: ignore[arg-type]


TEAM = Team("search", "Search", Limits(tokens_per_minute=1000), frozenset({"gpt-4o", "gpt-4o-mini"}), "normal")


@pytest.mark.parametrize(
    ("own", "team", "allowed"),
    [
        (None, frozenset({"gpt-4o", "gpt-4o-mini"}), {"gpt-4o", "gpt-4o-mini"}),
        (frozenset({"gpt-4o", "embeddings"}), frozenset({"gpt-4o", "gpt-4o-mini"}), {"gpt-4o"}),
        (frozenset({"embeddings"}), None, {"embeddings"}),
        (None, None, None),
    ],
)
def test_a_members_deployments_are_the_intersection_with_its_teams(
    own: frozenset[str] | None, team: frozenset[str] | None, allowed: set[str] | None
) -> None:
    consumer, _ = member(deployments=own, team="search")
    resolved = with_team(consumer, {"search": replace(TEAM, deployments=team)})
    assert resolved.deployments == (None if allowed is None else frozenset(allowed))
    for name in ("gpt-4o", "gpt-4o-mini", "embeddings"):
        assert resolved.may_use(name) == (allowed is None or name in allowed)


@pytest.mark.parametrize(("own", "team", "effective"),
                         [("high", "normal", "normal"), ("normal", "high", "normal"), ("high", "high", "high")])
def test_a_members_priority_is_the_lower_of_the_two(own: str, team: str, effective: str) -> None:
    consumer, _ = member(priority=own, team="search")
    assert with_team(consumer, {"search": replace(TEAM, priority=team)}).priority == effective


def test_a_member_of_a_missing_team_may_use_nothing() -> None:
    consumer, _ = member(team="gone")
    resolved = with_team(consumer, {"search": TEAM})
    assert resolved.team_record is None and not resolved.may_use("gpt-4o")


async def test_the_directory_resolves_teams_and_sees_a_lowered_team_limit_at_the_next_check() -> None:
    store = MemoryConsumerStore()
    clock = FakeClock()
    consumer, key = member(team="search")
    await store.create_team(TEAM)
    await store.put(consumer)
    directory = ConsumerDirectory(store, clock, refresh_s=60, check_s=1.0)
    seen = await directory.authenticate(key)
    assert seen.team_record == TEAM and seen.deployments == TEAM.deployments
    await store.put_team(replace(TEAM, limits=Limits(tokens_per_minute=10), version=1))
    clock.advance(1.0)
    await directory.check()
    seen = await directory.authenticate(key)
    assert seen.team_record is not None and seen.team_record.limits.tokens_per_minute == 10


async def run(store: MemoryConsumerStore, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    args = parser().parse_args(list(argv))
    if args.command == "teams":
        from shared.admin.cli import _deployments

        code = await TeamAdmin(store, out, _deployments).run(args)
    elif args.action == "create":
        code = await Admin(store, out).create(args)  # type: ignore[arg-type]
    else:
        code = await Admin(store, out).update(args)  # type: ignore[arg-type]
    return code, out.getvalue()


async def test_admin_teams_create_set_show_list_and_delete_only_when_empty() -> None:
    store = MemoryConsumerStore()
    code, out = await run(store, "teams", "create", "Search Team", "--tpm", "5000", "--quota", "100000",
                          "--quota-period", "daily", "--deployments", "gpt-4o", "--priority", "high")
    assert code == 0 and json.loads(out)["id"] == "search-team"
    assert (await store.get_team("search-team")) == Team(
        "search-team", "Search Team", Limits(5000, {}, 100000, "daily"), frozenset({"gpt-4o"}), "high")
    code, _ = await run(store, "consumers", "create", "Bot", "--all-deployments", "--team", "search-team",
                        "--user-tpm", "300", "--user-sources", "field,header", "--user-required", "yes")
    assert code == 0
    bot = store.consumers["bot"]
    assert bot.team == "search-team" and bot.users.tokens_per_minute == 300
    assert bot.users.sources == ("field", "header") and bot.users.required
    code, out = await run(store, "teams", "set", "search-team", "--tpm", "4000")
    assert json.loads(out)["members"] == ["bot"] and store.teams["search-team"].limits.tokens_per_minute == 4000
    assert store.teams["search-team"].limits.quota == 100000  # what was not said is kept
    with pytest.raises(SystemExit, match="has members"):
        await run(store, "teams", "delete", "search-team")
    assert "search-team" in store.teams
    await run(store, "consumers", "set", "bot", "--team", "")
    assert store.consumers["bot"].team is None
    code, _ = await run(store, "teams", "delete", "search-team")
    assert code == 0 and "search-team" not in store.teams


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["consumers", "create", "x", "--all-deployments", "--team", "nobody"], "no team with id"),
        (["consumers", "create", "x", "--all-deployments", "--user-quota", "5"], "--user-quota-period"),
        (["consumers", "create", "x", "--all-deployments", "--user-sources", "cookie"], "--user-sources"),
        (["teams", "create", "t"], "--all-deployments"),
        (["teams", "create", "t", "--all-deployments", "--quota", "5"], "--quota-period"),
        (["teams", "delete", "nobody"], "no team"),
    ],
)
async def test_admin_refuses_what_would_leave_a_consumer_in_no_team(argv: list[str], message: str) -> None:
    store = MemoryConsumerStore()
    with pytest.raises(SystemExit, match=message):
        await run(store, *argv)
    assert not store.consumers and not store.teams


def test_the_usage_report_sums_per_team_by_each_consumers_team() -> None:
    from shared.admin.usage_report import by_team, format_report
    from shared.adminops.usage import UsageTotal

    totals = [UsageTotal("a", "gpt-4o", 2, 10, 5, 15, 0, {}, 0.5), UsageTotal("b", "gpt-4o", 1, 4, 1, 5, 0, {}, 0.25),
              UsageTotal("a", "mini", 1, 1, 1, 2, 0, {}, 0.0), UsageTotal("loner", "gpt-4o", 3, 3, 3, 6, 0, {}, 1.0)]
    teams = by_team(totals, {"a": "search", "b": "search", "loner": None})
    assert [(t.consumer, t.requests, t.total, t.cost) for t in teams] == [("(no team)", 3, 6, 1.0), ("search", 4, 22, 0.75)]
    assert format_report("daily", teams, "EUR", "team").splitlines()[1].split()[0] == "team"


async def test_teams_set_writes_on_the_version_read_and_never_undoes_a_concurrent_change() -> None:
    store = MemoryConsumerStore()
    await run(store, "teams", "create", "Search", "--all-deployments", "--tpm", "1000")
    real_put = store.put_team
    raced = [False]

    async def put_after_another(team: Team, if_match: str | None = None) -> None:
        if not raced[0]:  # another admin's `teams set --quota ...` lands between this command's read and its write
            raced[0] = True
            current = store.teams["search"]
            await real_put(replace(current, limits=replace(current.limits, quota=500, quota_period="daily")))
        await real_put(team, if_match)

    store.put_team = put_after_another  # type: ignore[method-assign]
    code, _ = await run(store, "teams", "set", "search", "--tpm", "2000")
    assert code == 0
    limits = store.teams["search"].limits
    assert (limits.tokens_per_minute, limits.quota) == (2000, 500)  # both changes kept
