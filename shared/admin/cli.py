"""The admin command: consumers, their keys and limits, usage reports, and App Insights queries.

    python -m shared.admin [--json] consumers create NAME [--tpm N] [--deployment-tpm DEPLOYMENT=N ...]
                                                 [--quota N --quota-period daily] [--deployments a,b | --all-deployments]
                                                 [--priority high|normal] [--id ID] [--force]
                                                 [--entra-app-id ID ...] [--entra-object-id ID ...]
                                                 [--entra-role ROLE ...] [--entra-group ID ...] [--entra-tenant TENANT_ID] [--no-key]
    python -m shared.admin consumers create-many FILE [--keys-out KEYS]   (JSON Lines, one consumer a line; see below)
    python -m shared.admin consumers list | show ID | rotate ID [--grace-seconds S] | disable ID | enable ID | delete ID
    python -m shared.admin consumers reindex
    python -m shared.admin consumers set ID [--tpm N] [--deployment-tpm D=N ...] [--quota N --quota-period P] ...
    python -m shared.admin consumers create|set ... [--team ID] [--user-tpm N] [--user-quota N --user-quota-period P]
                                                 [--user-sources entra,field,header] [--user-required yes|no]
    python -m shared.admin teams create|set|list|show|delete ...   (see shared/admin/teams.py)
    python -m shared.admin usage [--period daily|hourly|monthly|...] [--at ISO-DATE] [--consumer ID]
    python -m shared.admin query list | run NAME --resource-id ID [--timespan P1D]

A consumers file has one JSON object a line: {"name": "...", "id": "...", "tokens_per_minute": N,
"deployment_tokens_per_minute": {"gpt-4o": N}, "quota": N, "quota_period": "monthly", "deployments": ["gpt-4o"],
"priority": "normal"}; only "name" is required. The whole file is checked before anything is created; the consumers
are then created a hundred per round trip, and their keys written once, as JSON Lines, to KEYS (created with mode 0600,
never overwritten) or to standard output.

It talks to the same Table Storage as the gateway (settings from the environment, then local.settings.json). A new or
rotated key is printed once and never stored; every write replaces the consumers' change marker, which gateways read
every GATEWAY_CONSUMER_CHECK_S (1 s), so they pick up changes within about a second.

Standard output carries only the result; notes go to standard error. With --json (before the command) the result is
one JSON document (create-many: JSON Lines, one key a line), and a failure is {"error": {"message", "code"}} there
too. A failure is one line and a non-zero exit: 1 refused, 2 bad input or settings, 3 Table Storage unreachable
(Azurite not running), 4 not signed in or no role on the storage account (shared/admin/failures.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from shared.admin.cache_options import add_cache_arguments, cache_policy
from shared.admin.failures import explain
from shared.admin.safety_options import add_safety_argument, safety_policy
from shared.admin.teams import TeamAdmin
from shared.admin.teams import add_parser as add_teams_parser
from shared.adminops.describe import describe_consumer
from shared.adminops.operations import Actor, AdminOperations, CommandOperations
from shared.clock import SystemClock
from shared.config import DEPLOYMENT_NAME, Settings, load_settings, local_environment
from shared.edge.consumers import hash_key, key_prefix, new_key
from shared.edge.entra import mapping_key
from shared.records.cache import CachePolicy
from shared.records.consumers import (
    CAPABILITIES,
    PRIORITIES,
    QUOTA_PERIODS,
    RETIRED_PRIORITIES,
    USER_SOURCES,
    Consumer,
    Limits,
    UserLimits,
    validate_consumer_id,
)
from shared.storage.change_log_table import TableChangeLogStore
from shared.storage.consumer_table import TableConsumerStore
from shared.storage.protocols import ChangeLogStore
from shared.storage.tables import Tables
from shared.text import table


def _user() -> str:
    """Who runs the command, for the audit table: the login name, else the user id."""
    try:
        return os.getlogin()
    except OSError:
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:63]
    return slug or "consumer"


def _whole(text: str) -> int:
    """A whole number >= 0 for argparse: "-5" or "1e3" is an error, never "unlimited"."""
    if not re.fullmatch(r"[0-9]{1,12}", text.strip()):
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 <= value <= 30 * 86400:
        raise argparse.ArgumentTypeError("expected between 0 and 2592000 seconds (30 days)")
    return value


def _deployment(name: str, option: str) -> str:
    if not DEPLOYMENT_NAME.fullmatch(name):
        raise SystemExit(f"{option}: not a deployment name: {name!r}")
    return name


def _deployment_tpm(items: Sequence[str] | None) -> dict[str, int] | None:
    if items is None:
        return None
    result: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[0-9]{1,12}", value):
            raise SystemExit(f"--deployment-tpm: expected DEPLOYMENT=N with N >= 0, got {item!r}")
        result[_deployment(name, "--deployment-tpm")] = int(value)
    return result


def _capabilities(args: argparse.Namespace, base: frozenset[str]) -> frozenset[str]:
    raw = getattr(args, "capabilities", None)
    if raw is None:
        return base
    names = frozenset(c.strip() for c in raw.split(",") if c.strip())
    unknown = names - CAPABILITIES
    if unknown:
        raise SystemExit(f"--capabilities: unknown {', '.join(sorted(unknown))}; known: {', '.join(sorted(CAPABILITIES))}")
    return names


def _limits(args: argparse.Namespace, base: Limits) -> Limits:
    quota_period = args.quota_period if args.quota_period is not None else base.quota_period
    quota = args.quota if args.quota is not None else base.quota
    if quota and quota_period not in QUOTA_PERIODS:
        raise SystemExit(f"--quota needs --quota-period, one of {', '.join(QUOTA_PERIODS)}")
    per_deployment = _deployment_tpm(args.deployment_tpm)
    budget = args.budget if args.budget is not None else base.budget
    budget_period = args.budget_period if args.budget_period is not None else base.budget_period
    if budget < 0 or budget != budget or budget == float("inf"):
        raise SystemExit("--budget: expected an amount of 0 or more (0: no budget)")
    return Limits(
        tokens_per_minute=args.tpm if args.tpm is not None else base.tokens_per_minute,
        deployment_tokens_per_minute=base.deployment_tokens_per_minute if per_deployment is None else per_deployment,
        quota=quota,
        quota_period=quota_period if quota else None,
        budget=budget,
        budget_period=budget_period if budget else None,
        output_cap=base.output_cap if getattr(args, "output_cap", None) is None else
        {"on": True, "off": False, "default": None}[args.output_cap],
    )


def _deployments(args: argparse.Namespace, base: frozenset[str] | None) -> frozenset[str] | None:
    if getattr(args, "all_deployments", False):
        return None
    if args.deployments is not None:
        names = frozenset(_deployment(d.strip(), "--deployments") for d in args.deployments.split(",") if d.strip())
        if not names:
            raise SystemExit("--deployments: name at least one deployment (or use --all-deployments)")
        return names
    return base


_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_ENTRA_OPTIONS = (("entra_app_id", "app"), ("entra_object_id", "oid"), ("entra_role", "role"), ("entra_group", "group"))


def _entra(args: argparse.Namespace, base: frozenset[str]) -> frozenset[str]:
    """The Entra ID mappings after this command: the given ones added, or all replaced after --clear-entra."""
    keys = set() if getattr(args, "clear_entra", False) else set(base)
    tenant = getattr(args, "entra_tenant", None)
    if tenant is not None and not _GUID.fullmatch(tenant.strip()):
        raise SystemExit(f"--entra-tenant: expected a tenant id (a GUID), got {tenant!r}")
    for option, kind in _ENTRA_OPTIONS:
        for value in getattr(args, option, None) or ():
            if kind != "role" and not _GUID.fullmatch(value.strip()):
                raise SystemExit(f"--{option.replace('_', '-')}: expected a GUID, got {value!r}")
            try:
                keys.add(mapping_key(kind, value, tenant))
            except ValueError as error:
                raise SystemExit(f"--{option.replace('_', '-')}: {error}") from None
    return frozenset(keys)


def _users(args: argparse.Namespace, base: UserLimits) -> UserLimits:
    tpm = args.user_tpm if getattr(args, "user_tpm", None) is not None else base.tokens_per_minute
    quota = args.user_quota if getattr(args, "user_quota", None) is not None else base.quota
    period = args.user_quota_period if getattr(args, "user_quota_period", None) is not None else base.quota_period
    if quota and period not in QUOTA_PERIODS:
        raise SystemExit(f"--user-quota needs --user-quota-period, one of {', '.join(QUOTA_PERIODS)}")
    sources = base.sources
    raw = getattr(args, "user_sources", None)
    if raw is not None:
        sources = tuple(dict.fromkeys(x.strip() for x in raw.split(",") if x.strip()))
        unknown = [x for x in sources if x not in USER_SOURCES]
        if unknown or not sources:
            raise SystemExit(f"--user-sources: some of {', '.join(USER_SOURCES)}, comma-separated")
    required = base.required
    if getattr(args, "user_required", None) is not None:
        required = args.user_required == "yes"
    return UserLimits(tpm, quota, period if quota else None, sources, required)


describe = describe_consumer  # the name the command and its tests have always used


_SPEC_FIELDS = frozenset({"name", "id", "tokens_per_minute", "deployment_tokens_per_minute", "quota", "quota_period",
                          "deployments", "priority"})


def _count(spec: Mapping[str, Any], field: str) -> int:
    value = spec.get(field, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{field} must be a whole number >= 0")
    return int(value)


def consumer_from_spec(spec: Any) -> tuple[Consumer, str]:
    """One line of a consumers file -> a new consumer and its key (raises ValueError saying what is wrong)."""
    if not isinstance(spec, dict):
        raise ValueError("expected a JSON object")
    unknown = sorted(set(spec) - _SPEC_FIELDS)
    if unknown:
        raise ValueError(f"unknown fields {', '.join(unknown)}")
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError("name is required")
    per_deployment = spec.get("deployment_tokens_per_minute", {})
    if not isinstance(per_deployment, dict) or not all(
        isinstance(k, str) and DEPLOYMENT_NAME.fullmatch(k) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in per_deployment.items()
    ):
        raise ValueError("deployment_tokens_per_minute must map deployments to whole numbers >= 0")
    quota = _count(spec, "quota")
    period = spec.get("quota_period")
    if (quota or period is not None) and period not in QUOTA_PERIODS:
        raise ValueError(f"quota needs quota_period, one of {', '.join(QUOTA_PERIODS)}")
    # Access is never implied: a line says which deployments ("*" for all), like consumers create.
    deployments = spec.get("deployments")
    if deployments != "*" and not (
        isinstance(deployments, list) and deployments
        and all(isinstance(d, str) and DEPLOYMENT_NAME.fullmatch(d) for d in deployments)
    ):
        raise ValueError('deployments is required: a non-empty list of deployment names, or "*" for all')
    priority = spec.get("priority", "normal")
    if priority in RETIRED_PRIORITIES:
        raise ValueError(f"priority {priority!r} is retired (it routed exactly as normal): use normal")
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}")
    key = new_key()
    consumer = Consumer(
        id=validate_consumer_id(spec.get("id") or _slug(name)),
        name=name,
        key_hash=hash_key(key),
        key_prefix=key_prefix(key),
        deployments=None if deployments == "*" else frozenset(deployments),
        limits=Limits(
            tokens_per_minute=_count(spec, "tokens_per_minute"),
            deployment_tokens_per_minute=dict(per_deployment),
            quota=quota,
            quota_period=period if quota else None,
        ),
        priority=priority,
    )
    return consumer, key


def read_specs(lines: Sequence[str]) -> list[tuple[Consumer, str]]:
    """Every consumer of a file, or SystemExit listing every bad line (nothing is created then)."""
    made: list[tuple[Consumer, str]] = []
    errors: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            consumer, key = consumer_from_spec(json.loads(line))
        except ValueError as error:  # json.JSONDecodeError is a ValueError
            errors.append(f"line {number}: {error}")
            continue
        if consumer.id in seen:
            errors.append(f"line {number}: id {consumer.id!r} appears twice")
            continue
        seen.add(consumer.id)
        made.append((consumer, key))
    if errors:
        shown = errors[:20] + ([f"... and {len(errors) - 20} more"] if len(errors) > 20 else [])
        raise SystemExit("nothing created:\n" + "\n".join(shown))
    return made


def _read_lines(path: str) -> list[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    with open(path, encoding="utf-8") as handle:
        return handle.read().splitlines()


PRIORITY_HELP = (
    "high: may use the headroom a PTU backend keeps back (its reserve_tokens) and is paced last on it, so it keeps "
    "its share when the PTU is full; normal (the default): everyone else, sent onward to pay-as-you-go backends "
    "first when the PTU nears its reserve"
)


WRITE_TRIES = 5  # a consumer record changed by this many other writes while one command runs: give up, say so


class Admin:
    def __init__(self, store: TableConsumerStore, out: Any = None, *, err: Any = None, json_mode: bool = False,
                 served: frozenset[str] | None = None, force: bool = False,
                 spend: Callable[[Consumer], Awaitable[dict[str, Any]]] | None = None,
                 policies: frozenset[str] = frozenset(), audit: ChangeLogStore | None = None) -> None:
        self.store = store
        self.policies = policies  # the names of GATEWAY_SAFETY_POLICIES: a consumer may be given only one of these
        self.audit = audit
        self.actor = Actor(f"cli:{_user()}")
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.json_mode = json_mode
        self.served = served  # the deployments the configured backends serve (None: no backends configured here)
        self.force = force
        self.spend = spend  # this period's spend and how fresh it is, for `show`

    @property
    def ops(self) -> CommandOperations:
        """The shared operations on this command's store (a test may swap the store)."""
        return CommandOperations(AdminOperations(self.store, self.audit, SystemClock()))

    def print(self, text: str) -> None:
        print(text, file=self.out)

    def note(self, text: str) -> None:
        """A word for the person at the terminal: standard error, so standard output stays the result alone."""
        print(text, file=self.err)

    def result(self, data: Any, text: str | None = None) -> None:
        """The command's result: `text` for people, JSON with --json (or when there is no text form)."""
        self.print(json.dumps(data, indent=2) if self.json_mode or text is None else text)

    def check_served(self, deployments: frozenset[str] | None, force: bool = False) -> None:
        """A consumer allowed only names no backend serves gets 404 on every call: say so before saving it."""
        if deployments is None:
            return
        if self.served is None:
            self.note("note: GATEWAY_BACKENDS is not set here, so the deployment names were not checked")
            return
        unknown = sorted(deployments - self.served)
        if not unknown:
            return
        served = ", ".join(sorted(self.served)) or "none"
        message = (f"no configured backend serves {', '.join(unknown)} (GATEWAY_BACKENDS serves: {served}); "
                   "calls to it would get 404 DeploymentNotFound")
        if not (force or self.force):
            raise SystemExit(f"{message}. Use a served name, or --force to save it anyway")
        self.note(f"warning: {message}")

    async def create(self, args: argparse.Namespace) -> int:
        consumer_id = validate_consumer_id(args.id or _slug(args.name))
        if args.deployments is None and not args.all_deployments:
            # Access is never implied: which deployments a consumer may use is always said.
            raise SystemExit("say which deployments the consumer may use: --deployments a,b or --all-deployments")
        entra = _entra(args, frozenset())
        if args.no_key and not entra:
            raise SystemExit("--no-key: give the consumer an Entra ID mapping (--entra-app-id, ...) or a key")
        key = None if args.no_key else new_key()
        consumer = Consumer(
            id=consumer_id,
            name=args.name,
            key_hash=hash_key(key) if key else "",
            key_prefix=key_prefix(key) if key else "",
            deployments=_deployments(args, None),
            limits=_limits(args, Limits()),
            priority=args.priority or "normal",
            entra=entra,
            capabilities=_capabilities(args, frozenset()),
            team=await self._team(args, None),
            users=_users(args, UserLimits()),
            fallback=getattr(args, "fallback", None) != "off",
            cache=cache_policy(args, CachePolicy()),
            safety=safety_policy(args, None, self.policies),
        )
        self.check_served(consumer.deployments, getattr(args, "force", False))
        await self.ops.create(consumer, self.actor)
        self.result({**describe(consumer), **({"key": key} if key else {})})
        if key:
            self.note("Store this key now: it is shown once and cannot be recovered.")
        return 0

    async def create_many(self, args: argparse.Namespace) -> int:
        made = read_specs(await asyncio.to_thread(_read_lines, args.file))
        for consumer, _ in made:
            self.check_served(consumer.deployments, getattr(args, "force", False))
        taken = {c.id for c in await self.store.list_consumers()} & {c.id for c, _ in made}
        if taken:
            raise SystemExit(f"nothing created: these ids exist already: {', '.join(sorted(taken)[:20])}")
        out = self.out
        if args.keys_out:
            # The keys are shown once: the file is new (never overwritten) and readable by its owner only.
            try:
                out = os.fdopen(os.open(args.keys_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8")
            except FileExistsError:
                raise SystemExit(f"nothing created: {args.keys_out} exists (keys are never written over)") from None
        started = time.monotonic()
        await self.ops.create_many([c for c, _ in made], self.actor)
        with out if args.keys_out else contextlib.nullcontext(out):
            for consumer, key in made:
                print(json.dumps({"id": consumer.id, "key_prefix": consumer.key_prefix, "key": key}), file=out)
        self.note(f"created {len(made)} consumers in {time.monotonic() - started:.2f} s"
                  + (f"; keys in {args.keys_out} (shown once)" if args.keys_out else ""))
        return 0

    async def _team(self, args: argparse.Namespace, base: str | None) -> str | None:
        """The team after this command: --team ID (which must exist), --team '' for none, else unchanged."""
        team = getattr(args, "team", None)
        if team is None:
            return base
        if not team:
            return None
        await self.ops.check_team(team)
        return str(team)

    async def _existing(self, consumer_id: str) -> Consumer:
        consumer = await self.store.get(consumer_id)
        if consumer is None:
            raise SystemExit(f"no consumer with id {consumer_id!r}")
        return consumer

    async def list(self, args: argparse.Namespace) -> int:
        consumers = sorted(await self.store.list_consumers(), key=lambda c: c.id)
        if self.json_mode or args.json:
            self.print(json.dumps([describe(c) for c in consumers], indent=2))
        else:
            rows = [describe(c) for c in consumers]
            for row in rows:
                row["deployments"] = ",".join(row["deployments"]) if isinstance(row["deployments"], list) else "*"
            columns = ["id", "name", "key_prefix", "enabled", "priority", "tokens_per_minute", "quota", "quota_period", "deployments"]
            self.print(table(columns, [[row[c] for c in columns] for row in rows], numeric=("tokens_per_minute", "quota")))
        return 0

    async def show(self, args: argparse.Namespace) -> int:
        consumer = await self._existing(args.id)
        shown = describe(consumer)
        if self.spend is not None:
            shown["spend"] = await self.spend(consumer)
        self.print(json.dumps(shown, indent=2))
        return 0

    async def _change(self, consumer_id: str, change: Callable[[Consumer], Consumer], action: str = "consumers.set") -> Consumer:
        changed: Consumer = await self.ops.change(consumer_id, change, self.actor, action)
        return changed

    async def rotate(self, args: argparse.Namespace) -> int:
        consumer, key = await self.ops.rotate(args.id, args.grace_seconds, self.actor)
        self.result({"id": consumer.id, "key_prefix": key_prefix(key), "key": key})
        if args.grace_seconds:
            self.note(f"The previous key keeps working for {args.grace_seconds:g} seconds.")
        self.note("Store this key now: it is shown once and cannot be recovered.")
        return 0

    async def set_enabled(self, consumer_id: str, enabled: bool) -> int:
        await self.ops.set_enabled(consumer_id, enabled, self.actor)
        self.result({"id": consumer_id, "enabled": enabled}, f"{consumer_id}: {'enabled' if enabled else 'disabled'}")
        return 0

    async def update(self, args: argparse.Namespace) -> int:
        if args.deployments is not None:
            self.check_served(_deployments(args, None), getattr(args, "force", False))
        new_team = await self._team(args, None)
        safety_policy(args, None, self.policies)  # refused before anything is read or written

        def change(consumer: Consumer) -> Consumer:
            return replace(
                consumer,
                name=args.name or consumer.name,
                limits=_limits(args, consumer.limits),
                deployments=_deployments(args, consumer.deployments),
                priority=args.priority or consumer.priority,
                entra=_entra(args, consumer.entra),
                capabilities=_capabilities(args, consumer.capabilities),
                team=consumer.team if getattr(args, "team", None) is None else new_team,
                users=_users(args, consumer.users),
                fallback=consumer.fallback if getattr(args, "fallback", None) is None else args.fallback == "on",
                cache=cache_policy(args, consumer.cache),
                safety=safety_policy(args, consumer.safety, self.policies),
                version=consumer.version + 1,
            )

        self.result(describe(await self._change(args.id, change)))
        return 0

    async def reindex(self, args: argparse.Namespace) -> int:
        """Write the key-hash index rows of every consumer (for consumers created before the index existed)."""
        consumers = await self.store.list_consumers()
        for consumer in consumers:
            await self._change(consumer.id, lambda c: c, "")  # on the version read: a reindex never undoes a change
        self.result({"indexed": len(consumers)}, f"{len(consumers)} consumers indexed")
        return 0

    async def delete(self, args: argparse.Namespace) -> int:
        await self.ops.delete(args.id, self.actor)
        self.result({"id": args.id, "deleted": True}, f"{args.id}: deleted")
        return 0


def _limit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tpm", type=_whole, help="tokens per minute (0: unlimited)")
    parser.add_argument("--deployment-tpm", action="append", metavar="DEPLOYMENT=N", help="per-deployment tokens per minute")
    parser.add_argument("--quota", type=_whole, help="token quota per period (0: none)")
    parser.add_argument("--quota-period", choices=QUOTA_PERIODS)
    parser.add_argument("--budget", type=float, help="spend per budget period in the price table's currency (0: none)")
    parser.add_argument("--budget-period", choices=QUOTA_PERIODS, help="default monthly")
    parser.add_argument("--output-cap", choices=("on", "off", "default"),
                        help="set the output cap on requests that ask none or more than the key's minute (default: the gateway's setting)")
    parser.add_argument("--deployments", help="comma-separated deployments this consumer may use (names the "
                        "configured backends serve: others are refused unless --force)")
    parser.add_argument("--all-deployments", action="store_true", help="allow every deployment")
    parser.add_argument("--force", action="store_true", help="save --deployments names no configured backend serves")
    parser.add_argument("--priority", choices=PRIORITIES, help=PRIORITY_HELP)
    entra = "maps Entra ID callers to this consumer (repeatable): "
    parser.add_argument("--entra-app-id", action="append", metavar="ID", help=entra + "the application (client) id")
    parser.add_argument("--entra-object-id", action="append", metavar="ID", help=entra + "the object id (oid)")
    parser.add_argument("--entra-role", action="append", metavar="ROLE", help=entra + "an app role in the token")
    parser.add_argument("--entra-group", action="append", metavar="ID", help=entra + "a group id in the token")
    parser.add_argument("--entra-tenant", metavar="TENANT_ID",
                        help="the tenant of the Entra ID mappings given (default: the first of GATEWAY_ENTRA_TENANT_IDS)")
    parser.add_argument("--capabilities", help=f"comma-separated request features to allow ({', '.join(sorted(CAPABILITIES))}); '' for none")
    parser.add_argument("--team", metavar="ID", help="the team this consumer belongs to ('' for none)")
    parser.add_argument("--user-tpm", type=_whole, help="tokens per minute for each end user of this consumer (0: none)")
    parser.add_argument("--user-quota", type=_whole, help="token quota per period for each end user (0: none)")
    parser.add_argument("--user-quota-period", choices=QUOTA_PERIODS)
    parser.add_argument("--user-sources", metavar="LIST",
                        help=f"where the end user is named, in order: some of {','.join(USER_SOURCES)}")
    parser.add_argument("--user-required", choices=("yes", "no"), help="refuse (400) a request that names no end user")
    parser.add_argument("--fallback", choices=("on", "off"),
                        help="off: never served by another deployment than the one asked for (GATEWAY_DEPLOYMENTS "
                        "fallbacks); throttling answers 429 with the true Retry-After (default on)")
    add_cache_arguments(parser, "this consumer")
    add_safety_argument(parser, "this consumer (default: its team's, else GATEWAY_SAFETY_DEFAULT_POLICY)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m shared.admin", description="Manage the gateway's consumers.",
                                   epilog="exit codes: 0 done, 1 refused, 2 bad input or settings, 3 Table Storage "
                                   "unreachable (Azurite not running?), 4 not signed in or no role")
    root.add_argument("--settings", default="local.settings.json", help="local settings file read after the environment")
    root.add_argument("--json", dest="json_output", action="store_true",
                      help="print only JSON on standard output (results and failures), for scripts")
    commands = root.add_subparsers(dest="command", required=True)

    consumers = commands.add_parser("consumers", help="create, list, rotate, disable consumers").add_subparsers(dest="action", required=True)
    create = consumers.add_parser("create")
    create.add_argument("name")
    create.add_argument("--id")
    create.add_argument("--no-key", action="store_true", help="no gateway key: Entra ID callers only")
    _limit_arguments(create)
    many = consumers.add_parser("create-many", help="create the consumers of a JSON Lines file at once")
    many.add_argument("file", help='one JSON object a line (see the module help); "-" for standard input')
    many.add_argument("--keys-out", help="write the new keys here (a new file, mode 0600) instead of standard output")
    many.add_argument("--force", action="store_true", help="create consumers allowed deployments no backend serves")
    listing = consumers.add_parser("list")
    listing.add_argument("--json", action="store_true")
    for action in ("show", "disable", "enable", "delete"):
        consumers.add_parser(action).add_argument("id")
    consumers.add_parser("reindex", help="write the key-hash index rows of every consumer")
    rotate = consumers.add_parser("rotate")
    rotate.add_argument("id")
    rotate.add_argument("--grace-seconds", type=_seconds, default=0.0, help="how long the old key keeps working (at most 30 days)")
    update = consumers.add_parser("set")
    update.add_argument("id")
    update.add_argument("--name")
    update.add_argument("--clear-entra", action="store_true", help="replace the Entra ID mappings with those given")
    _limit_arguments(update)

    add_teams_parser(commands, _whole)

    usage = commands.add_parser("usage", help="tokens per consumer and deployment for a period")
    usage.add_argument("--period", default="daily", choices=QUOTA_PERIODS)
    usage.add_argument("--at", help="a time inside the period (ISO 8601, UTC); default now")
    usage.add_argument("--consumer")
    usage.add_argument("--by-team", action="store_true", help="sum per team (each consumer's current team)")
    usage.add_argument("--json", action="store_true")

    commands.add_parser("query", help="run a KQL query against Application Insights", add_help=False)
    return root


async def run(args: argparse.Namespace, settings: Settings) -> int:
    tables = Tables.from_settings(settings, timeout_s=max(settings.store_timeout_s, 10.0))
    try:
        if args.command == "usage":
            from shared.admin.usage_report import report

            args.json = args.json or args.json_output
            return await report(tables, args, sys.stdout, settings)
        served = settings.deployments() if settings.backends else None
        from shared.admin.spend import spend_summary
        from shared.storage.budget_table import TableBudgetStore
        from shared.storage.usage_table import TableUsageStore

        async def spend(consumer: Consumer) -> dict[str, Any]:
            return await spend_summary(consumer, TableBudgetStore(tables), TableUsageStore(tables), settings, time.time())

        policies = frozenset(settings.safety.policies)
        admin = Admin(TableConsumerStore(tables), json_mode=args.json_output, served=served, spend=spend,
                      policies=policies, audit=TableChangeLogStore(tables))
        if args.command == "teams":
            return await TeamAdmin(admin.store, admin.out, _deployments, json_mode=admin.json_mode,
                                   policies=policies, ops=admin.ops, actor=admin.actor).run(args)
        action = args.action
        if action == "create":
            return await admin.create(args)
        if action == "create-many":
            return await admin.create_many(args)
        if action == "list":
            return await admin.list(args)
        if action == "show":
            return await admin.show(args)
        if action == "rotate":
            return await admin.rotate(args)
        if action in ("disable", "enable"):
            return await admin.set_enabled(args.id, action == "enable")
        if action == "set":
            return await admin.update(args)
        if action == "delete":
            return await admin.delete(args)
        if action == "reindex":
            return await admin.reindex(args)
        raise SystemExit(f"unknown action {action}")
    finally:
        await tables.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["query"]:
        from shared.admin.queries import main as query_main

        return query_main(argv[1:])
    args = parser().parse_args(argv)
    json_mode = bool(args.json_output or getattr(args, "json", False))
    settings: Settings | None = None
    try:
        settings = load_settings(local_environment(args.settings), require_backends=False)
        return asyncio.run(run(args, settings))
    except BrokenPipeError:  # `... | head` closed standard output: nothing to say, and no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (Exception, SystemExit) as error:
        failure = explain(error, settings)
        if failure is None:
            raise
        print(failure.message, file=sys.stderr)
        if json_mode:
            print(json.dumps({"error": {"message": failure.message, "code": failure.code}}))
        return failure.exit_code


if __name__ == "__main__":
    sys.exit(main())
