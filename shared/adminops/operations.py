"""Each admin operation once: the admin command and the HTTP admin API both call these.

A write reads the record with its ETag, applies the change and writes on that ETag (a write that came in between is
never undone: the change is made again on the newer record), then records who, what, when, before and after in the
audit table. A refused write changes nothing and records nothing. Keys are returned to the caller once and never
stored or recorded (the record holds their SHA-256; the audit entry holds neither).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from shared.adminops.describe import describe_consumer, describe_team
from shared.clock import Clock
from shared.edge.consumers import new_key, rotated
from shared.records.audit import AuditEntry
from shared.records.consumers import Consumer, Team
from shared.storage.protocols import ChangeLogStore, ChangeNotAnnounced, Conflict, ConsumerStore

log = logging.getLogger(__name__)

WRITE_TRIES = 5  # a record changed by this many other writes while one operation runs: give up, say so
ADMIN_ROLE = "Gateway.Admin"
READER_ROLE = "Gateway.Reader"


class OperationError(Exception):
    """A refused operation: an HTTP status, an error code, the message, and the field at fault when there is one."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asks: a name for the audit table (never a secret) and the role it holds."""

    name: str
    role: str = ADMIN_ROLE

    @property
    def may_write(self) -> bool:
        return self.role == ADMIN_ROLE


def not_announced(target: str) -> OperationError:
    """A change written whose change-feed entry failed: done, and the audit table has it, but the gateways keep the
    record they had until their next full reload. Running the operation again records it."""
    return OperationError(503, "change_not_announced", f"{target}: the change is written, but Table Storage failed "
                          "before the gateways were told: they apply it at their next full reload of the consumers "
                          "(GATEWAY_CONSUMER_REFRESH_S, or consumers / 5 seconds if longer). Run the same change again "
                          "to tell them at once")


def unserved(served: frozenset[str] | None, deployments: frozenset[str] | None) -> list[str]:
    """The names no configured backend serves (a consumer allowed only those gets 404 on every call)."""
    if deployments is None or served is None:
        return []
    return sorted(deployments - served)


class AdminOperations:
    def __init__(self, store: ConsumerStore, audit: ChangeLogStore | None, clock: Clock) -> None:
        self.store = store
        self.audit = audit
        self.clock = clock

    # ---- reading ---------------------------------------------------------------------------------------------------

    async def consumers(self) -> list[Consumer]:
        return sorted(await self.store.list_consumers(), key=lambda c: c.id)

    async def consumer(self, consumer_id: str) -> Consumer:
        consumer = await self.store.get(consumer_id)
        if consumer is None:
            raise OperationError(404, "not_found", f"no consumer with id {consumer_id!r}")
        return consumer

    async def teams(self) -> list[tuple[Team, list[str]]]:
        teams, consumers = sorted(await self.store.list_teams(), key=lambda t: t.id), await self.store.list_consumers()
        return [(t, sorted(c.id for c in consumers if c.team == t.id)) for t in teams]

    async def team(self, team_id: str) -> tuple[Team, list[str]]:
        team = await self.store.get_team(team_id)
        if team is None:
            raise OperationError(404, "not_found", f"no team with id {team_id!r}")
        return team, await self.members(team_id)

    async def members(self, team_id: str) -> list[str]:
        return sorted(c.id for c in await self.store.list_consumers() if c.team == team_id)

    # ---- consumers -------------------------------------------------------------------------------------------------

    async def check_team(self, team: str | None) -> None:
        if team is not None and await self.store.get_team(team) is None:
            raise OperationError(400, "invalid_value", f"team: no team with id {team!r} (create the team first)", "team")

    async def check_mappings_free(self, consumer: Consumer) -> None:
        """One Entra ID mapping, one consumer: the gateway admits none of the consumers that share one."""
        if not consumer.entra:
            return
        for other in await self.store.list_consumers():
            shared = other.entra & consumer.entra
            if other.id != consumer.id and shared:
                raise OperationError(409, "mapping_taken",
                                     f"{', '.join(sorted(shared))}: already mapped to consumer {other.id!r}", "entra")

    async def create(self, consumer: Consumer, actor: Actor) -> Consumer:
        await self.check_team(consumer.team)
        await self.check_mappings_free(consumer)
        try:
            await self.store.create(consumer)
        except Conflict:
            raise OperationError(409, "already_exists", f"a consumer with id {consumer.id!r} exists already", "id") from None
        except ChangeNotAnnounced:
            # Not a failure: a key the gateways do not have yet costs them one lookup and works at once; the key must
            # still reach the caller.
            log.warning("consumer %s created; the change feed did not record it", consumer.id)
        await self._record(actor, "consumers.create", consumer.id, None, describe_consumer(consumer))
        return consumer

    async def create_many(self, consumers: list[Consumer], actor: Actor) -> None:
        """Consumers of a file, a hundred per round trip (no Entra mappings or teams: the file has neither)."""
        try:
            await self.store.create_many(consumers)  # type: ignore[attr-defined]
        except ChangeNotAnnounced:
            log.warning("%d consumers created; the change feed did not record them", len(consumers))
        except Conflict:
            raise OperationError(409, "already_exists", "nothing created by the batch holding an id created meanwhile; "
                                 "run again without it") from None
        for consumer in consumers:
            await self._record(actor, "consumers.create", consumer.id, None, describe_consumer(consumer))

    async def change(self, consumer_id: str, change: Callable[[Consumer], Consumer], actor: Actor,
                     action: str = "consumers.set") -> Consumer:
        """Read, change and write one consumer on the version read (If-Match on its ETag)."""
        for _ in range(WRITE_TRIES):
            found = await self.store.get_versioned(consumer_id)
            if found is None:
                raise OperationError(404, "not_found", f"no consumer with id {consumer_id!r}")
            consumer, etag = found
            changed = change(consumer)
            if changed.team != consumer.team:
                await self.check_team(changed.team)
            if changed.entra != consumer.entra:
                await self.check_mappings_free(changed)
            announced = True
            try:
                await self.store.put(changed, if_match=etag)
            except Conflict:
                continue
            except ChangeNotAnnounced:
                announced = False
            if action:
                await self._record(actor, action, consumer_id, describe_consumer(consumer), describe_consumer(changed))
            if not announced:
                if action == "consumers.rotate":  # the new key must reach the caller: it works at once (a lookup)
                    log.error("consumer %s rotated; the change feed did not record it: its previous key works on "
                              "the gateways until their next full reload", consumer_id)
                else:
                    raise not_announced(consumer_id)
            return changed
        raise OperationError(409, "write_conflict", f"{consumer_id}: changed by other writers {WRITE_TRIES} times while "
                             "this operation ran; nothing written by it. Try again")

    async def rotate(self, consumer_id: str, grace_s: float, actor: Actor) -> tuple[Consumer, str]:
        key = new_key()
        now = self.clock.now()
        consumer = await self.change(consumer_id, lambda c: rotated(c, key, grace_s, now), actor, "consumers.rotate")
        return consumer, key

    async def set_enabled(self, consumer_id: str, enabled: bool, actor: Actor) -> Consumer:
        return await self.change(consumer_id, lambda c: replace(c, enabled=enabled, version=c.version + 1), actor,
                                 "consumers.enable" if enabled else "consumers.disable")

    async def delete(self, consumer_id: str, actor: Actor) -> None:
        before = await self.store.get(consumer_id)
        if before is None:
            raise OperationError(404, "not_found", f"no consumer with id {consumer_id!r}")
        try:
            deleted = await self.store.delete(consumer_id)
        except ChangeNotAnnounced:
            await self._record(actor, "consumers.delete", consumer_id, describe_consumer(before), None)
            raise not_announced(consumer_id) from None
        if not deleted:
            raise OperationError(404, "not_found", f"no consumer with id {consumer_id!r}")
        await self._record(actor, "consumers.delete", consumer_id, describe_consumer(before), None)

    # ---- teams -----------------------------------------------------------------------------------------------------

    async def create_team(self, team: Team, actor: Actor) -> Team:
        try:
            await self.store.create_team(team)
        except Conflict:
            raise OperationError(409, "already_exists", f"a team with id {team.id!r} exists already", "id") from None
        except ChangeNotAnnounced:
            log.warning("team %s created; the change feed did not record it", team.id)  # no member yet: nothing to tell
        await self._record(actor, "teams.create", team.id, None, describe_team(team))
        return team

    async def change_team(self, team_id: str, change: Callable[[Team], Team], actor: Actor) -> Team:
        """Read, change and write one team on the version read (If-Match), as for consumers."""
        for _ in range(WRITE_TRIES):
            found = await self.store.get_team_versioned(team_id)
            if found is None:
                raise OperationError(404, "not_found", f"no team with id {team_id!r}")
            team, etag = found
            changed = change(team)
            announced = True
            try:
                await self.store.put_team(changed, if_match=etag)
            except Conflict:
                continue
            except ChangeNotAnnounced:
                announced = False
            await self._record(actor, "teams.set", team_id, describe_team(team), describe_team(changed))
            if not announced:
                raise not_announced(team_id)
            return changed
        raise OperationError(409, "write_conflict", f"{team_id}: changed by other writers {WRITE_TRIES} times while "
                             "this operation ran; nothing written by it. Try again")

    async def delete_team(self, team_id: str, actor: Actor) -> None:
        team, members = await self.team(team_id)
        if members:
            raise OperationError(409, "team_has_members", f"team {team_id!r} has members ({', '.join(members[:20])}): "
                                 "move them first (consumers set ID --team OTHER, or --team '')")
        try:
            await self.store.delete_team(team_id)
        except ChangeNotAnnounced:
            log.warning("team %s deleted; the change feed did not record it", team_id)  # no members: nothing to tell
        await self._record(actor, "teams.delete", team_id, describe_team(team), None)

    # ---- the audit table -------------------------------------------------------------------------------------------

    async def _record(self, actor: Actor, action: str, target: str, before: dict[str, Any] | None,
                      after: dict[str, Any] | None) -> None:
        if self.audit is None:
            return
        entry = AuditEntry(
            at=self.clock.now(), actor=actor.name, role=actor.role, action=action, target=target,
            before="" if before is None else json.dumps(before, sort_keys=True),
            after="" if after is None else json.dumps(after, sort_keys=True), id=uuid.uuid4().hex[:12],
        )
        try:
            await self.audit.append(entry)
        except Exception as exc:
            # The change is written and cannot be taken back; say so loudly rather than fail a done write.
            log.error("admin change %s of %s by %s is written but its audit entry is not (%s)", action, target,
                      actor.name, type(exc).__name__)

    async def audit_entries(self, limit: int, since: float) -> list[AuditEntry]:
        if self.audit is None:
            return []
        return await self.audit.recent(limit, since)


class CommandOperations:
    """The operations as the admin command calls them: a refusal is the command's refusal (SystemExit with the message,
    exit code 1), the way every other refusal of the command is."""

    def __init__(self, ops: AdminOperations) -> None:
        self.inner = ops

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return await method(*args, **kwargs)
            except OperationError as error:
                raise SystemExit(error.message) from None

        return call
