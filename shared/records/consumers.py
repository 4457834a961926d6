"""Consumers and teams as the consumer store holds them: who may call the gateway, for which deployments,
under which limits. The directory that authenticates them is shared/edge/consumers.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from shared.records.cache import OFF, CachePolicy
from shared.records.safety import resolve

QUOTA_PERIODS = ("hourly", "daily", "weekly", "monthly", "yearly")


# `low` was offered once and routed exactly as `normal`: it is gone from the command, and a stored `low` reads as normal.
PRIORITIES = ("high", "normal")


RETIRED_PRIORITIES = {"low": "normal"}


# Request features a consumer gets only when its record names them (shared/flow/gates.py checks each request): each
# makes a backend act for the caller with the backend's identity, or spend beyond tokens.
DATA_SOURCES = "data_sources"  # Azure "On Your Data": the backend calls the data stores the caller names


WEB_SEARCH = "web_search"  # the web-search tool and chat's web_search_options: billed per call


FILE_SEARCH = "file_search"  # searches the vector stores the caller names, in the backend's resource: billed per call


CODE_INTERPRETER = "code_interpreter"  # runs code in a container: billed per container


IMAGE_GENERATION = "image_generation"  # calls an image model: billed per image


COMPUTER_USE = "computer_use"  # the computer-use tool, its calls and their screenshots


MCP = "mcp"  # the backend calls an MCP server at a URL the caller chooses, with headers the caller chooses


FILES = "files"  # content that references files (file_id, file_url): files in the backend's resource, or fetched


PROMPTS = "prompts"  # Responses `prompt`: a prompt template stored in the backend's resource


CAPABILITIES = frozenset(
    {DATA_SOURCES, WEB_SEARCH, FILE_SEARCH, CODE_INTERPRETER, IMAGE_GENERATION, COMPUTER_USE, MCP, FILES, PROMPTS}
)


_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # fullmatch: `$` would accept a trailing newline


@dataclass(frozen=True, slots=True)
class Limits:
    tokens_per_minute: int = 0  # 0: no limit
    deployment_tokens_per_minute: Mapping[str, int] = field(default_factory=dict)
    quota: int = 0  # 0: no quota
    quota_period: str | None = None
    budget: float = 0.0  # in the price table's currency per budget period; 0: no budget
    budget_period: str | None = None  # one of QUOTA_PERIODS; None: monthly
    # The gateway sets the output cap itself when a request asks none, or more than this consumer may have in a
    # minute: True/False for this consumer, None for the gateway's default (GATEWAY_OUTPUT_CAP).
    output_cap: bool | None = None


# Where a consumer's end users are identified, in this order: the Entra caller's object id when the caller is a
# person, the request body's `user` field, the `x-gateway-user` header.
USER_SOURCES = ("entra", "field", "header")


@dataclass(frozen=True, slots=True)
class UserLimits:
    """What each end user of one consumer may have (0: no limit); which sources name the end user, and whether a
    request must name one."""

    tokens_per_minute: int = 0
    quota: int = 0
    quota_period: str | None = None
    sources: tuple[str, ...] = USER_SOURCES
    required: bool = False

    @property
    def limited(self) -> bool:
        return self.tokens_per_minute > 0 or (self.quota > 0 and self.quota_period is not None)


@dataclass(frozen=True, slots=True)
class Team:
    """Consumers that share limits: tokens per minute, a quota and a budget per period, the deployments they may use
    and a priority. A member's own settings only narrow these (its limits apply in addition)."""

    id: str
    name: str
    limits: Limits = Limits()
    deployments: frozenset[str] | None = None  # None: every deployment
    priority: str = "normal"
    version: int = 0
    cache: CachePolicy = OFF  # the response cache for every member whose own record does not turn it on
    safety: str | None = None  # the safety policy of members whose own record names none (GATEWAY_SAFETY_POLICIES)


def narrower_priority(a: str, b: str) -> str:
    return a if PRIORITIES.index(a) >= PRIORITIES.index(b) else b


@dataclass(frozen=True, slots=True)
class Consumer:
    id: str
    name: str
    key_hash: str
    key_prefix: str
    enabled: bool = True
    deployments: frozenset[str] | None = None  # None: every deployment
    limits: Limits = Limits()
    priority: str = "normal"
    previous_key_hash: str | None = None
    previous_key_expires: float = 0.0
    version: int = 0
    entra: frozenset[str] = frozenset()  # Entra ID mapping keys: "app:<id>", "oid:<id>", "role:<name>", "group:<id>"
    capabilities: frozenset[str] = frozenset()  # request features beyond the basics, e.g. "data_sources"
    fallback: bool = True  # False: never served by another deployment than the one asked for (GATEWAY_DEPLOYMENTS)
    team: str | None = None  # the team's id
    users: UserLimits = UserLimits()
    # The team's record as the directory resolved it (not stored with the consumer); `deployments` and `priority` of a
    # resolved consumer are already narrowed to the team's.
    team_record: Team | None = field(default=None, compare=False)
    cache: CachePolicy = OFF  # the response cache (docs/cache.md): off unless the admin command turns it on
    safety: str | None = None  # a policy of GATEWAY_SAFETY_POLICIES, or `none` (docs/safety.md)

    def may_use(self, deployment: str) -> bool:
        return self.deployments is None or deployment in self.deployments

    @property
    def cache_policy(self) -> CachePolicy:
        """The response cache for this consumer: its own policy when it turns the cache on, else its team's."""
        if self.cache.enabled or self.team_record is None:
            return self.cache
        return self.team_record.cache

    def safety_policy(self, default: str | None) -> str | None:
        """The name of the safety policy for this consumer: its own, else its team's, else the gateway's default."""
        return resolve(self.safety, self.team_record.safety if self.team_record else None, default)


def with_team(consumer: Consumer, teams: Mapping[str, Team]) -> Consumer:
    """The consumer as the request path sees it: its team's record attached, its deployments intersected with the
    team's, its priority the lower of the two. A consumer whose team is missing may use nothing (never more)."""
    if consumer.team is None:
        return consumer
    team = teams.get(consumer.team)
    if team is None:
        return replace(consumer, deployments=frozenset(), team_record=None)
    deployments = consumer.deployments
    if team.deployments is not None:
        deployments = team.deployments if deployments is None else deployments & team.deployments
    return replace(consumer, deployments=deployments, priority=narrower_priority(consumer.priority, team.priority),
                   team_record=team)


def validate_consumer_id(consumer_id: str) -> str:
    if not _ID_RE.fullmatch(consumer_id):
        raise ValueError("consumer id: lower-case letters, digits and '-', at most 63, starting with a letter or digit")
    return consumer_id
