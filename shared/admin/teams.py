"""The admin command's teams: consumers that share limits.

    python -m shared.admin teams create NAME [--id ID] [--tpm N] [--quota N --quota-period P] [--budget X
                                             [--budget-period P]] [--deployments a,b | --all-deployments]
                                             [--priority high|normal|low]
    python -m shared.admin teams set ID [the same options] | list [--json] | show ID | delete ID

A consumer joins with `consumers create|set ... --team ID` (and leaves with `--team ''`). A team with members is not
deleted. Every write replaces the consumers' change marker, so gateways see it within about a second.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from typing import Any

from shared.admin.cache_options import add_cache_arguments, cache_policy
from shared.admin.safety_options import add_safety_argument, safety_policy
from shared.adminops.describe import describe_team
from shared.adminops.operations import Actor, AdminOperations, CommandOperations
from shared.clock import SystemClock
from shared.records.cache import CachePolicy
from shared.records.consumers import PRIORITIES, QUOTA_PERIODS, Limits, Team, validate_consumer_id
from shared.storage.protocols import ConsumerStore
from shared.text import table

WRITE_TRIES = 5


def _team_limits(args: argparse.Namespace, base: Limits) -> Limits:
    quota = args.quota if args.quota is not None else base.quota
    quota_period = args.quota_period if args.quota_period is not None else base.quota_period
    if quota and quota_period not in QUOTA_PERIODS:
        raise SystemExit(f"--quota needs --quota-period, one of {', '.join(QUOTA_PERIODS)}")
    budget = args.budget if args.budget is not None else base.budget
    if budget < 0 or budget != budget or budget == float("inf"):
        raise SystemExit("--budget: expected an amount of 0 or more (0: no budget)")
    budget_period = args.budget_period if args.budget_period is not None else base.budget_period
    return Limits(
        tokens_per_minute=args.tpm if args.tpm is not None else base.tokens_per_minute,
        quota=quota,
        quota_period=quota_period if quota else None,
        budget=budget,
        budget_period=budget_period if budget else None,
    )


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:63] or "team"


class TeamAdmin:
    def __init__(self, store: ConsumerStore, out: Any, deployments: Any, json_mode: bool = False,
                 policies: frozenset[str] = frozenset(), ops: CommandOperations | None = None,
                 actor: Actor | None = None) -> None:
        self.store = store
        self.policies = policies  # the names of GATEWAY_SAFETY_POLICIES
        self.ops = ops or CommandOperations(AdminOperations(store, None, SystemClock()))
        self.actor = actor or Actor("cli")
        self.json_mode = json_mode
        self.out = out
        self._deployments = deployments  # (args, base) -> frozenset | None, the consumers' own rule

    def print(self, text: str) -> None:
        print(text, file=self.out)

    async def _members(self, team_id: str) -> list[str]:
        return sorted(c.id for c in await self.store.list_consumers() if c.team == team_id)

    async def _existing(self, team_id: str) -> Team:
        team = await self.store.get_team(team_id)
        if team is None:
            raise SystemExit(f"no team with id {team_id!r}")
        return team

    async def run(self, args: argparse.Namespace) -> int:
        action = args.action
        if action == "create":
            if args.deployments is None and not args.all_deployments:
                raise SystemExit("say which deployments the team may use: --deployments a,b or --all-deployments")
            team = Team(
                id=validate_consumer_id(args.id or _slug(args.name)),
                name=args.name,
                limits=_team_limits(args, Limits()),
                deployments=self._deployments(args, None),
                priority=args.priority or "normal",
                cache=cache_policy(args, CachePolicy()),
                safety=safety_policy(args, None, self.policies),
            )
            try:
                await self.ops.create_team(team, self.actor)
            except SystemExit as refused:
                self.print(str(refused.code))
                return 1
            self.print(json.dumps(describe_team(team, []), indent=2))
            return 0
        if action == "set":
            # On the version read (If-Match): a concurrent `teams set` is never undone, the change is made again on it.
            changed = await self.ops.change_team(args.id, lambda team: replace(
                team,
                name=args.name or team.name,
                limits=_team_limits(args, team.limits),
                deployments=self._deployments(args, team.deployments),
                priority=args.priority or team.priority,
                cache=cache_policy(args, team.cache),
                safety=safety_policy(args, team.safety, self.policies),
                version=team.version + 1,
            ), self.actor)
            self.print(json.dumps(describe_team(changed, await self._members(args.id)), indent=2))
            return 0
        if action == "list":
            teams = sorted(await self.store.list_teams(), key=lambda t: t.id)
            consumers = await self.store.list_consumers()
            rows = [describe_team(t, sorted(c.id for c in consumers if c.team == t.id)) for t in teams]
            if args.json or self.json_mode:
                self.print(json.dumps(rows, indent=2))
            else:
                columns = ["id", "name", "priority", "tokens_per_minute", "quota", "quota_period", "budget", "deployments",
                           "members"]
                for row in rows:
                    row["deployments"] = ",".join(row["deployments"]) if isinstance(row["deployments"], list) else "*"
                    row["members"] = len(row["members"])
                self.print(table(columns, [[row[c] for c in columns] for row in rows],
                                 numeric=("tokens_per_minute", "quota", "budget", "members")))
            return 0
        if action == "show":
            team = await self._existing(args.id)
            self.print(json.dumps(describe_team(team, await self._members(team.id)), indent=2))
            return 0
        if action == "delete":
            await self._existing(args.id)
            await self.ops.delete_team(args.id, self.actor)
            self.print(f"{args.id}: deleted")
            return 0
        raise SystemExit(f"unknown action {action}")


def add_parser(commands: Any, whole: Any) -> None:
    teams = commands.add_parser("teams", help="teams: consumers that share limits").add_subparsers(dest="action",
                                                                                                   required=True)

    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tpm", type=whole, help="tokens per minute for the whole team (0: unlimited)")
        parser.add_argument("--quota", type=whole, help="token quota per period for the whole team (0: none)")
        parser.add_argument("--quota-period", choices=QUOTA_PERIODS)
        parser.add_argument("--budget", type=float, help="the team's spend per budget period (0: none)")
        parser.add_argument("--budget-period", choices=QUOTA_PERIODS, help="default monthly")
        parser.add_argument("--deployments", help="comma-separated deployments the team's consumers may use")
        parser.add_argument("--all-deployments", action="store_true", help="allow every deployment")
        parser.add_argument("--priority", choices=PRIORITIES)
        add_cache_arguments(parser, "the team's consumers (a member's own --cache on takes precedence)")
        add_safety_argument(parser, "the team's consumers whose own record names none")

    create = teams.add_parser("create")
    create.add_argument("name")
    create.add_argument("--id")
    options(create)
    update = teams.add_parser("set")
    update.add_argument("id")
    update.add_argument("--name")
    options(update)
    listing = teams.add_parser("list")
    listing.add_argument("--json", action="store_true")
    for action in ("show", "delete"):
        teams.add_parser(action).add_argument("id")
