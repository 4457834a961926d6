"""Gateway settings, parsed once from a mapping of app settings and validated.

Everything the gateway reads from its environment is read here, so a bad value fails at start-up with the name of the
setting (and, for backends, the index and field) instead of at the first request.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from shared.catalog import FAMILIES, Catalog, DeploymentSpec
from shared.records.prices import PriceError, PriceTable, parse_prices
from shared.records.safety import PolicyError, SafetyPolicy, parse_policies, valid_name

AuthKind = Literal["key", "identity", "none"]
ApiStyle = Literal["azure", "openai"]
FailMode = Literal["open", "closed"]
# What of a caller's address and user id telemetry may carry (shared/telemetry/privacy.py).
IpMode = Literal["truncated", "raw", "omit"]
UserIdMode = Literal["capped", "hashed", "raw", "omit"]

DEFAULT_METRIC_DIMENSIONS = (
    "Subscription ID",
    "Client IP",
    "API ID",
    "Operation ID",
    "User ID",
    "Backend ID",
    "Location",
    "Deployment",
    "Model",
    "Team",
)
ALL_METRIC_DIMENSIONS = DEFAULT_METRIC_DIMENSIONS + ("Gateway ID", "Stream")
MAX_METRIC_DIMENSIONS = 10

# Every name check matches the whole string (fullmatch): `$` alone would let a trailing newline through.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEPLOYMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
API_VERSION = re.compile(r"[0-9A-Za-z.-]{1,40}")
TOKEN_SCOPE = re.compile(r"(https|api)://[^\s?#/]+(/[^\s?#]*)?/\.default")
# Azure OpenAI's scope; Azure AI Foundry project endpoints need their own (https://ai.azure.com/.default).
AZURE_OPENAI_SCOPE = "https://cognitiveservices.azure.com/.default"


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names it."""


@dataclass(frozen=True)
class BreakerRule:
    """When a backend is taken out of rotation, and for how long."""

    statuses: frozenset[int] = frozenset([429, *range(500, 600)])
    failures: int = 1
    interval_s: float = 60.0
    trip_s: float = 10.0
    accept_retry_after: bool = True
    max_trip_s: float = 300.0
    # A request that outruns the read timeout may be the caller's doing (a huge generation), not the backend's: timeouts
    # trip the breaker only as a rate, this many within the interval from at least `timeout_callers` consumers.
    timeout_failures: int = 3
    timeout_callers: int = 2


@dataclass(frozen=True)
class Backend:
    id: str
    endpoint: str
    region: str
    deployments: Mapping[str, str]
    priority: int = 1
    weight: int = 1
    ptu: bool = False
    api: ApiStyle = "azure"
    auth: AuthKind = "key"
    api_key: str | None = field(default=None, repr=False)
    api_key_setting: str | None = None
    api_version: str | None = None
    timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    reserve_tokens: int = 0
    breaker: BreakerRule = BreakerRule()
    token_scope: str | None = None  # the Entra ID scope of this backend's tokens (auth "identity" only)
    allow_insecure_http: bool = False  # a credential over plain http:// only when the backend says so explicitly
    # A PTU's stated capacity per deployment, tokens (prompt + completion) a minute: paced to before any 429 taught it
    # (ptu_tokens_per_minute, or ptu_units x ptu_tokens_per_unit).
    ptu_tokens_per_minute: Mapping[str, int] = field(default_factory=dict)

    def serves(self, deployment: str) -> bool:
        return deployment in self.deployments


@dataclass(frozen=True)
class EntraSettings:
    """Entra ID callers: which tenants and audiences the gateway accepts tokens from."""

    tenants: tuple[str, ...]
    audiences: tuple[str, ...]
    authority: str = "https://login.microsoftonline.com"
    required_roles: tuple[str, ...] = ()
    required_scopes: tuple[str, ...] = ()
    user_id_claim: str | None = None
    clock_skew_s: float = 120.0
    keys_min_refresh_s: float = 30.0
    keys_max_age_s: float = 12 * 3600.0


@dataclass(frozen=True)
class SafetySettings:
    """Safety policies (docs/safety.md) and the services they call: Azure AI Content Safety, Azure AI Language."""

    policies: Mapping[str, SafetyPolicy] = field(default_factory=dict)
    default_policy: str | None = None  # for consumers whose record (and team) names none
    content_safety_endpoint: str | None = None
    content_safety_key: str | None = field(default=None, repr=False)  # else the gateway's managed identity
    language_endpoint: str | None = None
    language_key: str | None = field(default=None, repr=False)
    verdict_ttl_s: float = 300.0  # a verdict on a text is reused this long (by the text's digest)
    timeout_s: float = 5.0
    audit_memory_bytes: int = 16 * 1024 * 1024  # audit records waiting for Blob Storage, per worker
    audit_flush_s: float = 5.0


@dataclass(frozen=True)
class Settings:
    backends: tuple[Backend, ...]
    table_connection_string: str | None = field(default=None, repr=False)
    table_endpoint: str | None = None
    table_prefix: str = "gateway"
    # GATEWAY_LEDGER_ACCOUNTS: the consumers' ledgers spread over these storage accounts (table endpoints, reached with
    # the managed identity, or connection strings), each ledger in the one its key hashes to; empty: with the tables
    ledger_accounts: tuple[str, ...] = field(default=(), repr=False)
    managed_identity_client_id: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    default_max_tokens: int = 1024
    user_id_header: str = "x-user-id"
    store_timeout_s: float = 1.0
    limit_fail_mode: FailMode = "open"
    instance_count: int = 1
    consumer_refresh_s: float = 60.0  # the full reload; changes through the admin command are seen every check
    consumer_check_s: float = 1.0
    breaker_sync_s: float = 0.5
    usage_flush_s: float = 60.0
    max_attempts: int = 0
    appinsights_connection_string: str | None = field(default=None, repr=False)
    metric_namespace: str = "openai"
    metric_dimensions: tuple[str, ...] = DEFAULT_METRIC_DIMENSIONS
    prices: PriceTable = field(default_factory=PriceTable)
    request_log: bool = True
    request_log_sampling: float = 1.0
    console_log: bool = False  # one line per request on standard output (scripts/run turns it on)
    # App Service Authentication (Easy Auth) is in front of /console: only then is X-MS-CLIENT-PRINCIPAL believed.
    console_easy_auth: bool = False
    budget_refresh_s: float = 5.0
    client_ip_mode: IpMode = "truncated"  # truncated (/24, /48) | raw | omit
    user_id_mode: UserIdMode = "capped"  # capped (validated, <= 64) | hashed (keyed) | raw | omit
    user_id_hash_key: str | None = field(default=None, repr=False)
    metric_series_max: int = 5000
    metric_series_idle_s: float = 600.0
    trace_sampling: float | None = None  # a share of requests to trace; None: at most traces_per_second
    traces_per_second: float = 10.0
    gc_tuning: bool = True
    gateway_id: str = "gateway"
    lease_lifetime_s: float = 2.0
    end_users_max: int = 20_000  # end users with limiting state on one instance at once
    entra: EntraSettings | None = None  # None: Entra ID callers are not accepted
    accept_keys: bool = True
    # The gateway's default for consumers whose record does not say (see Limits.output_cap): on, off, or reasoning (on
    # for deployments of reasoning models only, whose hidden reasoning makes an uncapped request's use unforeseeable).
    output_cap: str = "reasoning"
    timeout_replays: int = 1  # a request that timed out is sent to at most this many other backends
    stream_settle_s: float = 5.0  # a limited consumer's stream is charged what it delivered this often
    abandoned_drain_s: float = 2.0  # how long an abandoned stream is read on, unseen, for the backend's usage
    consumer_max_stale_s: float = 300.0
    auth_fail_mode: FailMode = "closed"
    unknown_key_lookups_per_s: float = 2.0
    body_memory_mb: int = 512  # per worker: memory that large request bodies (over 64 KiB) may take at once, estimated
    response_reads_per_s: float = 20.0  # per consumer per instance: follow-ups and continuations of stored responses
    auth_failures_per_minute: int = 20
    reveal_deployments: bool = False
    admin_key_sha256: str | None = field(default=None, repr=False)
    api_versions: frozenset[str] | None = None  # None: any well-formed api-version
    forwarded_hops: int = 0
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # The response cache (docs/cache.md): entries in Blob Storage in the tables' account, a bounded layer in memory.
    blob_endpoint: str | None = None  # with an identity; a connection string names its own
    cache_memory_bytes: int = 64 * 1024 * 1024
    cache_max_entry_bytes: int = 1024 * 1024
    cache_seed: bool = False  # a `seed` makes a request with a temperature cacheable
    admit_on_bound: bool = True  # a large prompt with room to spare is admitted on its upper bound, uncounted
    catalog: Catalog = field(default_factory=Catalog)  # fallbacks, windows, families, aliases (GATEWAY_DEPLOYMENTS, _ALIASES)
    safety: SafetySettings = field(default_factory=SafetySettings)

    def deployments(self) -> frozenset[str]:
        return frozenset(d for b in self.backends for d in b.deployments)


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float, maximum: float) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name}: must be between {minimum:g} and {maximum:g}, got {value:g}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int) -> int:
    value = _number(env, name, default, minimum=minimum, maximum=maximum)
    if value != int(value):
        raise ConfigError(f"{name}: expected a whole number, got {value:g}")
    return int(value)


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = (_get(env, name) or default).lower()
    if value not in allowed:
        raise ConfigError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


def _output_cap(env: Mapping[str, str]) -> str:
    raw = (_get(env, "GATEWAY_OUTPUT_CAP") or _DEFAULT.output_cap).lower()
    if raw in ("1", "true", "yes", "on"):
        return "on"
    if raw in ("0", "false", "no", "off"):
        return "off"
    if raw == "reasoning":
        return raw
    raise ConfigError(f"GATEWAY_OUTPUT_CAP: expected on, off or reasoning, got {raw!r}")


def _boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _get(env, name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def parse_status_rule(text: str, where: str) -> frozenset[int]:
    """`"429,500-599"` -> the set of statuses."""
    statuses: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        try:
            start, end = int(low), int(high or low)
        except ValueError:
            raise ConfigError(f"{where}: bad status range {part!r}") from None
        if not 100 <= start <= end <= 599:
            raise ConfigError(f"{where}: bad status range {part!r}")
        statuses.update(range(start, end + 1))
    if not statuses:
        raise ConfigError(f"{where}: no statuses given")
    return frozenset(statuses)


class _Fields:
    """Typed access to one backend's JSON object, naming `GATEWAY_BACKENDS[i].field` in every error."""

    def __init__(self, raw: Mapping[str, Any], where: str) -> None:
        self.raw = raw
        self.where = where

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.where}.{name}: {problem}")

    def text(self, name: str, default: str | None = None) -> str:
        value = self.raw.get(name, default)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(name, "required text" if value is None else f"expected text, got {value!r}")
        return value.strip()

    def number(self, name: str, default: float, minimum: float, maximum: float) -> float:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(name, f"expected a number, got {value!r}")
        if not minimum <= value <= maximum:
            raise self.fail(name, f"must be between {minimum:g} and {maximum:g}, got {value!r}")
        return float(value)

    def integer(self, name: str, default: int, minimum: int, maximum: int) -> int:
        value = self.number(name, default, minimum, maximum)
        if value != int(value):
            raise self.fail(name, f"expected a whole number, got {value!r}")
        return int(value)

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, f"expected true or false, got {value!r}")
        return value


_BACKEND_FIELDS = frozenset(
    {
        "id", "endpoint", "region", "deployments", "priority", "weight", "ptu", "api", "auth", "api_key",
        "api_key_setting", "api_version", "timeout_s", "connect_timeout_s", "reserve_tokens", "breaker",
        "token_scope", "allow_insecure_http", "ptu_tokens_per_minute", "ptu_units", "ptu_tokens_per_unit",
    }
)
_BREAKER_FIELDS = frozenset(
    {"statuses", "failures", "interval_s", "trip_s", "accept_retry_after", "max_trip_s", "timeout_failures",
     "timeout_callers"}
)


def _parse_deployments(f: _Fields) -> dict[str, str]:
    raw = f.raw.get("deployments")
    if isinstance(raw, list):
        raw = {name: name for name in raw}
    if not isinstance(raw, dict) or not raw:
        raise f.fail("deployments", "expected a non-empty list of names or an object {public name: backend name}")
    mapping: dict[str, str] = {}
    for public, upstream in raw.items():
        if not isinstance(public, str) or not DEPLOYMENT_NAME.fullmatch(public):
            raise f.fail("deployments", f"bad deployment name {public!r}")
        if not isinstance(upstream, str) or not DEPLOYMENT_NAME.fullmatch(upstream):
            raise f.fail(f"deployments.{public}", f"bad backend deployment name {upstream!r}")
        mapping[public] = upstream
    return mapping


def _parse_breaker(f: _Fields) -> BreakerRule:
    raw = f.raw.get("breaker", {})
    if not isinstance(raw, dict):
        raise f.fail("breaker", "expected an object")
    b = _Fields(raw, f"{f.where}.breaker")
    unknown = set(raw) - _BREAKER_FIELDS
    if unknown:
        raise b.fail(sorted(unknown)[0], "unknown field")
    statuses = raw.get("statuses")
    if "statuses" in raw and not isinstance(statuses, str):
        raise b.fail("statuses", 'expected text like "429,500-599"')
    default = _BACKEND.breaker
    return BreakerRule(
        statuses=parse_status_rule(statuses, f"{b.where}.statuses") if isinstance(statuses, str) else default.statuses,
        failures=b.integer("failures", default.failures, 1, 1000),
        interval_s=b.number("interval_s", default.interval_s, 0.1, 3600),
        trip_s=b.number("trip_s", default.trip_s, 0.1, 86400),
        accept_retry_after=b.flag("accept_retry_after", default.accept_retry_after),
        max_trip_s=b.number("max_trip_s", default.max_trip_s, 0.1, 86400),
        timeout_failures=b.integer("timeout_failures", default.timeout_failures, 1, 1000),
        timeout_callers=b.integer("timeout_callers", default.timeout_callers, 1, 1000),
    )


def _per_deployment(f: _Fields, name: str, deployments: Mapping[str, str]) -> dict[str, int]:
    """A number for every deployment of the backend, or {deployment: number} for some of them."""
    raw = f.raw[name]
    values = {d: raw for d in deployments} if not isinstance(raw, dict) else raw
    parsed: dict[str, int] = {}
    for deployment, value in values.items():
        if deployment not in deployments:
            raise f.fail(f"{name}.{deployment}", "not a deployment of this backend")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10**9:
            raise f.fail(name if not isinstance(raw, dict) else f"{name}.{deployment}",
                         f"expected a whole number between 1 and 1e9, got {value!r}")
        parsed[deployment] = value
    return parsed


def _stated_capacity(f: _Fields, ptu: bool, deployments: Mapping[str, str]) -> dict[str, int]:
    """ptu_tokens_per_minute, or ptu_units x ptu_tokens_per_unit: only on a PTU backend, one form or the other."""
    # An empty object states nothing (what a template writes for a backend it was given no figures for).
    named = [n for n in ("ptu_tokens_per_minute", "ptu_units", "ptu_tokens_per_unit") if f.raw.get(n, {}) != {}]
    if not named:
        return {}
    if not ptu:
        raise f.fail(named[0], "only a PTU backend (\"ptu\": true) states its capacity")
    if "ptu_tokens_per_minute" in f.raw:
        if len(named) > 1:
            raise f.fail(named[1], "give ptu_tokens_per_minute or ptu_units with ptu_tokens_per_unit, not both")
        return _per_deployment(f, "ptu_tokens_per_minute", deployments)
    if len(named) < 2:
        missing = "ptu_tokens_per_unit" if named == ["ptu_units"] else "ptu_units"
        raise f.fail(missing, f"{named[0]} needs {missing} (tokens a minute = units x tokens per unit)")
    units = _per_deployment(f, "ptu_units", deployments)
    per_unit = _per_deployment(f, "ptu_tokens_per_unit", deployments)
    for deployment in units.keys() ^ per_unit.keys():
        raise f.fail("ptu_units", f"{deployment}: give both ptu_units and ptu_tokens_per_unit")
    return {d: units[d] * per_unit[d] for d in units}


def parse_backend(raw: Any, index: int, env: Mapping[str, str], setting: str = "GATEWAY_BACKENDS") -> Backend:
    where = f"{setting}[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected an object")
    f = _Fields(raw, where)
    unknown = set(raw) - _BACKEND_FIELDS
    if unknown:
        raise f.fail(sorted(unknown)[0], "unknown field")
    backend_id = f.text("id")
    if not _ID_RE.fullmatch(backend_id):
        raise f.fail("id", "use letters, digits, '.', '_' or '-' (at most 64)")
    endpoint = f.text("endpoint").rstrip("/")
    if not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", endpoint):
        raise f.fail("endpoint", "expected an http(s) URL without query")
    api = f.text("api", _BACKEND.api)
    if api not in ("azure", "openai"):
        raise f.fail("api", f"expected 'azure' or 'openai', got {api!r}")
    auth, api_key, key_setting = _backend_key(f, env)
    api_version = raw.get("api_version")
    if api_version is not None and (not isinstance(api_version, str) or not API_VERSION.fullmatch(api_version)):
        raise f.fail("api_version", f"bad api-version {api_version!r}")
    weight = f.integer("weight", _BACKEND.weight, 0, 1000)
    token_scope = _token_scope(f, auth, api)
    allow_insecure_http = f.flag("allow_insecure_http", _BACKEND.allow_insecure_http)
    if endpoint.startswith("http://") and auth != "none" and not allow_insecure_http:
        raise f.fail("endpoint", "http:// would send the backend's key or token in clear text; use https:// "
                                 "(or set allow_insecure_http: true for a backend on a trusted local network)")
    deployments = _parse_deployments(f)
    ptu = f.flag("ptu", _BACKEND.ptu)
    return Backend(
        id=backend_id,
        endpoint=endpoint,
        region=f.text("region"),
        deployments=deployments,
        priority=f.integer("priority", _BACKEND.priority, 0, 1000),
        weight=weight,
        ptu=ptu,
        ptu_tokens_per_minute=_stated_capacity(f, ptu, deployments),
        api=api,  # type: ignore[arg-type]
        auth=auth,  # type: ignore[arg-type]
        api_key=api_key,
        api_key_setting=key_setting,
        api_version=api_version,
        timeout_s=f.number("timeout_s", _BACKEND.timeout_s, 0.05, 3600),
        connect_timeout_s=f.number("connect_timeout_s", _BACKEND.connect_timeout_s, 0.05, 120),
        reserve_tokens=f.integer("reserve_tokens", _BACKEND.reserve_tokens, 0, 10**9),
        breaker=_parse_breaker(f),
        token_scope=token_scope,
        allow_insecure_http=allow_insecure_http,
    )


def _backend_key(f: _Fields, env: Mapping[str, str]) -> tuple[str, str | None, str | None]:
    """(auth, the key, the app setting it came from): a key backend's key, inline or from the setting it names."""
    auth = f.text("auth", _BACKEND.auth)
    if auth not in ("key", "identity", "none"):
        raise f.fail("auth", f"expected 'key', 'identity' or 'none', got {auth!r}")
    if auth != "key":
        return auth, None, None
    if "api_key" in f.raw:
        return auth, f.text("api_key"), None
    if "api_key_setting" not in f.raw:
        raise f.fail("api_key_setting", "auth 'key' needs api_key_setting (the app setting holding the key)")
    key_setting = f.text("api_key_setting")
    api_key = _get(env, key_setting)
    if api_key is None:
        raise f.fail("api_key_setting", f"app setting {key_setting} is not set")
    return auth, api_key, key_setting


def _token_scope(f: _Fields, auth: str, api: str) -> str | None:
    """The Entra ID scope an identity backend's tokens are asked for; None for other backends."""
    if auth != "identity":
        if "token_scope" in f.raw:
            raise f.fail("token_scope", "only backends with auth 'identity' get a token")
        return None
    # A token is sent only where a scope was configured for it: Azure OpenAI's by default for Azure backends, and
    # nothing implicit for OpenAI-compatible ones (often third parties that must never see an Entra token).
    default_scope = AZURE_OPENAI_SCOPE if api == "azure" else None
    token_scope = f.text("token_scope", default_scope) if (default_scope or "token_scope" in f.raw) else None
    if token_scope is None:
        raise f.fail("token_scope", "auth 'identity' on an OpenAI-compatible backend needs token_scope (e.g. https://ai.azure.com/.default)")
    if not TOKEN_SCOPE.fullmatch(token_scope):
        raise f.fail("token_scope", f"expected a scope like https://cognitiveservices.azure.com/.default, got {token_scope!r}")
    return token_scope


def parse_backends(text: str | None, env: Mapping[str, str], setting: str = "GATEWAY_BACKENDS") -> tuple[Backend, ...]:
    if text is None:
        raise ConfigError(
            "GATEWAY_BACKENDS: not set; expected a JSON array of backends, or GATEWAY_BACKENDS_FILE naming a file that "
            "holds one (see README)"
        )
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{setting}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{setting}: expected a non-empty JSON array")
    backends = tuple(parse_backend(item, i, env, setting) for i, item in enumerate(raw))
    seen: set[str] = set()
    for i, backend in enumerate(backends):
        if backend.id in seen:
            raise ConfigError(f"{setting}[{i}].id: duplicate id {backend.id!r}")
        seen.add(backend.id)
    return backends


_SPEC_FIELDS = frozenset({"fallback", "context_window", "max_output_tokens", "family"})


def _names(raw: Any, where: str, served: frozenset[str]) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: expected a non-empty list of deployment names")
    for name in raw:
        if not isinstance(name, str) or name not in served:
            raise ConfigError(f"{where}: {name!r} is not a deployment any backend serves")
    if len(set(raw)) != len(raw):
        raise ConfigError(f"{where}: a deployment is named twice")
    return tuple(raw)


def _json_object(env: Mapping[str, str], name: str) -> dict[str, Any]:
    text = _get(env, name)
    if text is None:
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name}: invalid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a JSON object")
    return raw


def parse_catalog(env: Mapping[str, str], backends: tuple[Backend, ...]) -> Catalog:
    """GATEWAY_DEPLOYMENTS and GATEWAY_ALIASES, checked against what the backends serve: every name served, no cycle
    of fallbacks, no alias shadowing a deployment."""
    served = frozenset(d for b in backends for d in b.deployments)
    specs: dict[str, DeploymentSpec] = {}
    for deployment, raw in _json_object(env, "GATEWAY_DEPLOYMENTS").items():
        where = f"GATEWAY_DEPLOYMENTS.{deployment}"
        if deployment not in served:
            raise ConfigError(f"{where}: not a deployment any backend serves")
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected an object")
        f = _Fields(raw, where)
        unknown = set(raw) - _SPEC_FIELDS
        if unknown:
            raise f.fail(sorted(unknown)[0], "unknown field")
        fallback = _names(raw["fallback"], f"{where}.fallback", served) if "fallback" in raw else ()
        if deployment in fallback:
            raise f.fail("fallback", "a deployment cannot fall back to itself")
        family = f.text("family", "chat")
        if family not in FAMILIES:
            raise f.fail("family", f"expected one of {', '.join(FAMILIES)}, got {family!r}")
        specs[deployment] = DeploymentSpec(
            fallback=fallback,
            context_window=f.integer("context_window", 0, 1, 10**8) if "context_window" in raw else None,
            max_output_tokens=f.integer("max_output_tokens", 0, 1, 10**8) if "max_output_tokens" in raw else None,
            family=family,
        )
    _refuse_cycles(specs)
    aliases: dict[str, tuple[str, ...]] = {}
    for alias, raw in _json_object(env, "GATEWAY_ALIASES").items():
        where = f"GATEWAY_ALIASES.{alias}"
        if not DEPLOYMENT_NAME.fullmatch(alias):
            raise ConfigError(f"{where}: bad alias name")
        if alias in served:
            raise ConfigError(f"{where}: a deployment has this name; an alias must not hide it")
        aliases[alias] = _names(raw, where, served)
    return Catalog(specs, aliases)


def _refuse_cycles(specs: Mapping[str, DeploymentSpec]) -> None:
    done: set[str] = set()

    def visit(deployment: str, path: list[str]) -> None:
        if deployment in path:
            cycle = " -> ".join([*path[path.index(deployment):], deployment])
            raise ConfigError(f"GATEWAY_DEPLOYMENTS: the fallbacks form a cycle ({cycle})")
        if deployment in done:
            return
        spec = specs.get(deployment)
        for nxt in spec.fallback if spec is not None else ():
            visit(nxt, [*path, deployment])
        done.add(deployment)

    for deployment in sorted(specs):
        visit(deployment, [])


def _dimensions(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = _get(env, "GATEWAY_METRIC_DIMENSIONS")
    if raw is None:
        return DEFAULT_METRIC_DIMENSIONS
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    for name in names:
        if name not in ALL_METRIC_DIMENSIONS:
            raise ConfigError(f"GATEWAY_METRIC_DIMENSIONS: unknown dimension {name!r}; known: {', '.join(ALL_METRIC_DIMENSIONS)}")
    if len(names) > MAX_METRIC_DIMENSIONS:
        raise ConfigError(f"GATEWAY_METRIC_DIMENSIONS: Azure Monitor allows at most {MAX_METRIC_DIMENSIONS} dimensions, got {len(names)}")
    return names


def _prices(env: Mapping[str, str]) -> PriceTable:
    text = _get(env, "GATEWAY_PRICES")
    path = _get(env, "GATEWAY_PRICES_FILE")
    if text is not None and path is not None:
        raise ConfigError("GATEWAY_PRICES and GATEWAY_PRICES_FILE: set one, not both")
    where = "GATEWAY_PRICES"
    if path is not None:
        where = f"GATEWAY_PRICES_FILE ({path})"
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read ({exc.strerror})") from None
    if text is None:
        return PriceTable()
    try:
        return parse_prices(text, where)
    except PriceError as exc:
        raise ConfigError(str(exc)) from None


def backends_text(env: Mapping[str, str]) -> tuple[str | None, str]:
    """The backends' JSON and the setting it came from: GATEWAY_BACKENDS, or the file GATEWAY_BACKENDS_FILE names (so a
    real list need not be JSON escaped inside a JSON settings file)."""
    text = _get(env, "GATEWAY_BACKENDS")
    path = _get(env, "GATEWAY_BACKENDS_FILE")
    if text is not None and path is not None:
        raise ConfigError("GATEWAY_BACKENDS and GATEWAY_BACKENDS_FILE: set one, not both")
    if path is None:
        return text, "GATEWAY_BACKENDS"
    where = f"GATEWAY_BACKENDS_FILE ({path})"
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read(), where
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read ({exc.strerror})") from None


def _api_versions(env: Mapping[str, str]) -> frozenset[str] | None:
    raw = _get(env, "GATEWAY_API_VERSIONS")
    if raw is None:
        return None
    versions = frozenset(v.strip() for v in raw.split(",") if v.strip())
    for version in versions:
        if not API_VERSION.fullmatch(version):
            raise ConfigError(f"GATEWAY_API_VERSIONS: bad api-version {version!r}")
    if not versions:
        raise ConfigError("GATEWAY_API_VERSIONS: no api-version given")
    return versions


def _trusted_proxies(env: Mapping[str, str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    raw = _get(env, "GATEWAY_TRUSTED_PROXIES")
    if raw is None:
        return ()
    networks = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"GATEWAY_TRUSTED_PROXIES: not an address or network: {part!r}") from None
    return tuple(networks)


def _admin_key_hash(env: Mapping[str, str]) -> str | None:
    raw = _get(env, "GATEWAY_ADMIN_KEY_SHA256")
    if raw is None:
        return None
    if not re.fullmatch(r"[0-9a-f]{64}", raw.lower()):
        raise ConfigError("GATEWAY_ADMIN_KEY_SHA256: expected the SHA-256 of the admin key, 64 hex digits")
    return raw.lower()


def _fail_mode(env: Mapping[str, str], name: str, default: str) -> str:
    mode = (_get(env, name) or default).lower()
    if mode not in ("open", "closed"):
        raise ConfigError(f"{name}: expected 'open' or 'closed', got {mode!r}")
    return mode


def local_environment(settings_file: str | None = "local.settings.json") -> dict[str, str]:
    """The process environment over local.settings.json's `Values`, as `func start` presents them to the app."""
    import os

    values: dict[str, str] = {}
    if settings_file and os.path.isfile(settings_file):
        with open(settings_file, encoding="utf-8") as handle:
            raw = json.load(handle).get("Values", {})
        values = {str(k): str(v) for k, v in raw.items()}
    values.update(os.environ)
    return values


# The defaults, written once (in the dataclasses above): load_settings and parse_backend fall back to these, and
# tests that build settings or backends by hand get the same ones.
_DEFAULT = Settings(backends=())
_BACKEND = Backend(id="", endpoint="", region="", deployments={})
_SAFETY = SafetySettings()
_ENTRA = EntraSettings(tenants=(), audiences=())
_MIB = 1024 * 1024


def _table_storage(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(connection string, endpoint) of the tables: the gateway's settings, else the Functions host's storage."""
    connection = _get(env, "GATEWAY_TABLE_CONNECTION_STRING")
    endpoint = _get(env, "GATEWAY_TABLE_ENDPOINT")
    if connection is None and endpoint is None:
        storage = _get(env, "AzureWebJobsStorage")
        if storage is not None:
            connection = storage
        else:
            account = _get(env, "AzureWebJobsStorage__accountName")
            endpoint = _get(env, "AzureWebJobsStorage__tableServiceUri") or (
                f"https://{account}.table.core.windows.net" if account else None
            )
    if connection is None and endpoint is None:
        raise ConfigError("GATEWAY_TABLE_CONNECTION_STRING or GATEWAY_TABLE_ENDPOINT: one must be set")
    if endpoint is not None and not re.fullmatch(r"https?://[^\s?#]+", endpoint):
        raise ConfigError(f"GATEWAY_TABLE_ENDPOINT: expected an http(s) URL, got {endpoint!r}")
    return connection, endpoint


MAX_LEDGER_ACCOUNTS = 32


def _ledger_accounts(env: Mapping[str, str]) -> tuple[str, ...]:
    """GATEWAY_LEDGER_ACCOUNTS: table endpoints or connection strings, separated by spaces, commas or new lines."""
    text = _get(env, "GATEWAY_LEDGER_ACCOUNTS")
    if text is None:
        return ()
    entries = tuple(e for e in re.split(r"[\s,]+", text) if e)
    if len(entries) > MAX_LEDGER_ACCOUNTS:
        raise ConfigError(f"GATEWAY_LEDGER_ACCOUNTS: at most {MAX_LEDGER_ACCOUNTS} accounts, got {len(entries)}")
    for n, entry in enumerate(entries, 1):
        url = re.fullmatch(r"https?://[^\s?#;]+", entry) is not None
        connection = "=" in entry  # never echoed: it may hold an account key
        if not (url or connection):
            raise ConfigError(f"GATEWAY_LEDGER_ACCOUNTS: entry {n} is neither a table endpoint (http(s) URL) nor a "
                              "connection string")
    if len(set(entries)) != len(entries):
        raise ConfigError("GATEWAY_LEDGER_ACCOUNTS: an account is listed twice")
    return entries


def load_settings(env: Mapping[str, str], *, require_backends: bool = True) -> Settings:
    """Parse and validate every gateway setting; raise ConfigError naming the first bad one."""
    connection, endpoint = _table_storage(env)
    prefix = _get(env, "GATEWAY_TABLE_PREFIX") or _DEFAULT.table_prefix
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,29}", prefix):
        raise ConfigError("GATEWAY_TABLE_PREFIX: letters and digits, starting with a letter, at most 30")
    fail_mode = _fail_mode(env, "GATEWAY_LIMIT_FAIL_MODE", _DEFAULT.limit_fail_mode)
    user_header = (_get(env, "GATEWAY_USER_ID_HEADER") or _DEFAULT.user_id_header).lower()
    if not re.fullmatch(r"[a-z0-9-]{1,64}", user_header):
        raise ConfigError(f"GATEWAY_USER_ID_HEADER: not a header name: {user_header!r}")
    gateway_id = _get(env, "GATEWAY_ID") or _get(env, "WEBSITE_SITE_NAME") or _DEFAULT.gateway_id
    if _boolean(env, "GATEWAY_RECORD_CONTENT", False):
        raise ConfigError(
            "GATEWAY_RECORD_CONTENT: removed; prompts and completions are never recorded (the per-request log "
            "records counts, costs and identifiers only)"
        )
    ip_mode = _choice(env, "GATEWAY_CLIENT_IP", _DEFAULT.client_ip_mode, get_args(IpMode))
    user_mode = _choice(env, "GATEWAY_USER_ID", _DEFAULT.user_id_mode, get_args(UserIdMode))
    hash_key = _get(env, "GATEWAY_USER_ID_HASH_KEY")
    if user_mode == "hashed" and (hash_key is None or len(hash_key) < 16):
        raise ConfigError("GATEWAY_USER_ID_HASH_KEY: GATEWAY_USER_ID=hashed needs a secret of at least 16 characters")
    text, setting = backends_text(env)
    backends = parse_backends(text, env, setting) if require_backends or text is not None else ()
    return Settings(
        backends=backends,
        catalog=parse_catalog(env, backends),
        table_connection_string=connection,
        table_endpoint=endpoint if connection is None else None,
        table_prefix=prefix,
        ledger_accounts=_ledger_accounts(env),
        managed_identity_client_id=_get(env, "AZURE_CLIENT_ID"),
        max_body_bytes=_integer(env, "GATEWAY_MAX_BODY_BYTES", _DEFAULT.max_body_bytes, minimum=1024, maximum=100 * 1024 * 1024),
        default_max_tokens=_integer(env, "GATEWAY_DEFAULT_MAX_TOKENS", _DEFAULT.default_max_tokens, minimum=1, maximum=10**7),
        user_id_header=user_header,
        store_timeout_s=_number(env, "GATEWAY_STORE_TIMEOUT_S", _DEFAULT.store_timeout_s, minimum=0.01, maximum=30),
        limit_fail_mode=fail_mode,  # type: ignore[arg-type]
        instance_count=_integer(env, "GATEWAY_INSTANCE_COUNT", _DEFAULT.instance_count, minimum=1, maximum=1000),
        consumer_refresh_s=_number(env, "GATEWAY_CONSUMER_REFRESH_S", _DEFAULT.consumer_refresh_s, minimum=0.1, maximum=3600),
        consumer_check_s=_number(env, "GATEWAY_CONSUMER_CHECK_S", _DEFAULT.consumer_check_s, minimum=0.1, maximum=60),
        breaker_sync_s=_number(env, "GATEWAY_BREAKER_SYNC_S", _DEFAULT.breaker_sync_s, minimum=0.05, maximum=60),
        usage_flush_s=_number(env, "GATEWAY_USAGE_FLUSH_S", _DEFAULT.usage_flush_s, minimum=0.5, maximum=3600),
        max_attempts=_integer(env, "GATEWAY_MAX_ATTEMPTS", _DEFAULT.max_attempts, minimum=0, maximum=30),
        appinsights_connection_string=_get(env, "APPLICATIONINSIGHTS_CONNECTION_STRING"),
        metric_namespace=_get(env, "GATEWAY_METRIC_NAMESPACE") or _DEFAULT.metric_namespace,
        metric_dimensions=_dimensions(env),
        prices=_prices(env),
        request_log=_boolean(env, "GATEWAY_REQUEST_LOG", _DEFAULT.request_log),
        request_log_sampling=_number(env, "GATEWAY_REQUEST_LOG_SAMPLING", _DEFAULT.request_log_sampling, minimum=0.0001, maximum=1.0),
        console_log=_boolean(env, "GATEWAY_CONSOLE_LOG", _DEFAULT.console_log),
        console_easy_auth=_boolean(env, "GATEWAY_CONSOLE_EASY_AUTH", _DEFAULT.console_easy_auth),
        budget_refresh_s=_number(env, "GATEWAY_BUDGET_REFRESH_S", _DEFAULT.budget_refresh_s, minimum=0.1, maximum=3600),
        client_ip_mode=ip_mode,  # type: ignore[arg-type]
        user_id_mode=user_mode,  # type: ignore[arg-type]
        user_id_hash_key=hash_key,
        metric_series_max=_integer(env, "GATEWAY_METRIC_SERIES_MAX", _DEFAULT.metric_series_max, minimum=10, maximum=1_000_000),
        metric_series_idle_s=_number(env, "GATEWAY_METRIC_SERIES_IDLE_S", _DEFAULT.metric_series_idle_s, minimum=1, maximum=86400),
        trace_sampling=(
            _number(env, "GATEWAY_TRACE_SAMPLING", 1.0, minimum=0.0, maximum=1.0)
            if _get(env, "GATEWAY_TRACE_SAMPLING") is not None
            else None
        ),
        traces_per_second=_number(env, "GATEWAY_TRACES_PER_SECOND", _DEFAULT.traces_per_second, minimum=0.0, maximum=100_000),
        gc_tuning=_boolean(env, "GATEWAY_GC_TUNING", _DEFAULT.gc_tuning),
        gateway_id=gateway_id,
        lease_lifetime_s=_number(env, "GATEWAY_LEASE_LIFETIME_S", _DEFAULT.lease_lifetime_s, minimum=0.1, maximum=30),
        end_users_max=_integer(env, "GATEWAY_END_USERS_MAX", _DEFAULT.end_users_max, minimum=1, maximum=1_000_000),
        output_cap=_output_cap(env),
        timeout_replays=_integer(env, "GATEWAY_TIMEOUT_REPLAYS", _DEFAULT.timeout_replays, minimum=0, maximum=30),
        stream_settle_s=_number(env, "GATEWAY_STREAM_SETTLE_S", _DEFAULT.stream_settle_s, minimum=0.5, maximum=60),
        abandoned_drain_s=_number(env, "GATEWAY_ABANDONED_STREAM_DRAIN_S", _DEFAULT.abandoned_drain_s, minimum=0, maximum=60),
        admit_on_bound=_boolean(env, "GATEWAY_ADMIT_ON_BOUND", _DEFAULT.admit_on_bound),
        entra=_entra(env),
        accept_keys=_boolean(env, "GATEWAY_ACCEPT_KEYS", _DEFAULT.accept_keys),
        consumer_max_stale_s=_number(env, "GATEWAY_CONSUMER_MAX_STALE_S", _DEFAULT.consumer_max_stale_s, minimum=1, maximum=86400),
        auth_fail_mode=_fail_mode(env, "GATEWAY_AUTH_FAIL_MODE", _DEFAULT.auth_fail_mode),  # type: ignore[arg-type]
        unknown_key_lookups_per_s=_number(env, "GATEWAY_UNKNOWN_KEY_LOOKUPS_PER_S", _DEFAULT.unknown_key_lookups_per_s, minimum=0, maximum=100),
        auth_failures_per_minute=_integer(env, "GATEWAY_AUTH_FAILURES_PER_MINUTE", _DEFAULT.auth_failures_per_minute, minimum=1, maximum=100_000),
        body_memory_mb=_integer(env, "GATEWAY_BODY_MEMORY_MB", _DEFAULT.body_memory_mb, minimum=16, maximum=65_536),
        response_reads_per_s=_number(env, "GATEWAY_RESPONSE_READS_PER_S", _DEFAULT.response_reads_per_s, minimum=0.1, maximum=100_000),
        reveal_deployments=_boolean(env, "GATEWAY_REVEAL_DEPLOYMENTS", _DEFAULT.reveal_deployments),
        admin_key_sha256=_admin_key_hash(env),
        api_versions=_api_versions(env),
        # On Azure the platform's front end appends the caller's address to X-Forwarded-For: one hop to trust there.
        forwarded_hops=_integer(env, "GATEWAY_FORWARDED_HOPS", 1 if _get(env, "WEBSITE_SITE_NAME") else 0,
                                minimum=0, maximum=10),
        trusted_proxies=_trusted_proxies(env),
        blob_endpoint=_blob_endpoint(env, endpoint if connection is None else None),
        cache_memory_bytes=_integer(env, "GATEWAY_CACHE_MEMORY_MB", _DEFAULT.cache_memory_bytes // _MIB, minimum=0, maximum=16_384) * _MIB,
        cache_max_entry_bytes=_integer(env, "GATEWAY_CACHE_MAX_ENTRY_BYTES", _DEFAULT.cache_max_entry_bytes, minimum=1024,
                                       maximum=64 * 1024 * 1024),
        cache_seed=_boolean(env, "GATEWAY_CACHE_SEED", _DEFAULT.cache_seed),
        safety=_safety(env),
    )


# http:// only to this machine (the local stand-in); a credential never leaves it unencrypted.
_SERVICE_URL = re.compile(r"https://[^/\s?#]+/?|http://(127\.0\.0\.1|localhost|\[::1\])(:[0-9]{1,5})?/?")


def _service_endpoint(env: Mapping[str, str], name: str) -> str | None:
    endpoint = _get(env, name)
    if endpoint is None:
        return None
    if not _SERVICE_URL.fullmatch(endpoint):
        raise ConfigError(f"{name}: expected https://<resource>.cognitiveservices.azure.com (http:// only for "
                          f"127.0.0.1 or localhost), got {endpoint!r}")
    return endpoint.rstrip("/")


def _safety(env: Mapping[str, str]) -> SafetySettings:
    raw = _json_object(env, "GATEWAY_SAFETY_POLICIES")
    try:
        policies = parse_policies(raw)
    except PolicyError as problem:
        raise ConfigError(f"GATEWAY_SAFETY_POLICIES: {problem}") from None
    default = _get(env, "GATEWAY_SAFETY_DEFAULT_POLICY")
    if default is not None and (not valid_name(default) or default not in policies):
        raise ConfigError(f"GATEWAY_SAFETY_DEFAULT_POLICY: {default!r} is not a policy of GATEWAY_SAFETY_POLICIES "
                          f"({', '.join(sorted(policies)) or 'none defined'})")
    content_safety = _service_endpoint(env, "GATEWAY_CONTENT_SAFETY_ENDPOINT")
    language = _service_endpoint(env, "GATEWAY_LANGUAGE_ENDPOINT")
    for policy in policies.values():
        if policy.content_safety and content_safety is None:
            raise ConfigError(f"GATEWAY_CONTENT_SAFETY_ENDPOINT: policy {policy.name!r} checks prompts with Azure AI "
                              "Content Safety (shield_prompt, categories or blocklists): set the endpoint")
        if policy.pii.mode != "off" and language is None:
            raise ConfigError(f"GATEWAY_LANGUAGE_ENDPOINT: policy {policy.name!r} has pii {policy.pii.mode}: set the "
                              "Azure AI Language endpoint")
    return SafetySettings(
        policies=policies,
        default_policy=default,
        content_safety_endpoint=content_safety,
        content_safety_key=_get(env, "GATEWAY_CONTENT_SAFETY_KEY"),
        language_endpoint=language,
        language_key=_get(env, "GATEWAY_LANGUAGE_KEY"),
        verdict_ttl_s=_number(env, "GATEWAY_SAFETY_VERDICT_TTL_S", _SAFETY.verdict_ttl_s, minimum=0, maximum=86_400),
        timeout_s=_number(env, "GATEWAY_SAFETY_TIMEOUT_S", _SAFETY.timeout_s, minimum=0.1, maximum=60),
        audit_memory_bytes=_integer(env, "GATEWAY_AUDIT_MEMORY_MB", _SAFETY.audit_memory_bytes // _MIB, minimum=1, maximum=4096) * _MIB,
        audit_flush_s=_number(env, "GATEWAY_AUDIT_FLUSH_S", _SAFETY.audit_flush_s, minimum=0.1, maximum=600),
    )


def _blob_endpoint(env: Mapping[str, str], table_endpoint: str | None) -> str | None:
    """Where the cache's blobs are when the gateway signs in with an identity: the setting, the host's blob URI, or the
    tables' account with .blob. for .table. (None with a connection string: it names its own)."""
    endpoint = _get(env, "GATEWAY_BLOB_ENDPOINT") or _get(env, "AzureWebJobsStorage__blobServiceUri")
    if endpoint is None and table_endpoint is not None and ".table." in table_endpoint:
        endpoint = table_endpoint.replace(".table.", ".blob.", 1)
    if endpoint is not None and not re.fullmatch(r"https?://[^\s?#]+", endpoint):
        raise ConfigError(f"GATEWAY_BLOB_ENDPOINT: expected an http(s) URL, got {endpoint!r}")
    return endpoint


_GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = _get(env, name)
    return tuple(part.strip() for part in raw.split(",") if part.strip()) if raw else ()


def _entra(env: Mapping[str, str]) -> EntraSettings | None:
    tenants = _list(env, "GATEWAY_ENTRA_TENANT_IDS")
    audiences = _list(env, "GATEWAY_ENTRA_AUDIENCES")
    if not tenants and not audiences:
        return None
    if not tenants or not audiences:
        raise ConfigError("GATEWAY_ENTRA_TENANT_IDS and GATEWAY_ENTRA_AUDIENCES: set both to accept Entra ID callers")
    for tenant in tenants:
        if not _GUID_RE.fullmatch(tenant):
            raise ConfigError(f"GATEWAY_ENTRA_TENANT_IDS: expected tenant ids (GUIDs), got {tenant!r}")
    authority = (_get(env, "GATEWAY_ENTRA_AUTHORITY") or _ENTRA.authority).rstrip("/")
    if not re.fullmatch(r"https://[^/\s?#]+|http://(127\.0\.0\.1|localhost)(:[0-9]+)?", authority):
        raise ConfigError(f"GATEWAY_ENTRA_AUTHORITY: expected an https URL without a path, got {authority!r}")
    user_claim = _get(env, "GATEWAY_ENTRA_USER_ID_CLAIM")
    if user_claim is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", user_claim):
        raise ConfigError(f"GATEWAY_ENTRA_USER_ID_CLAIM: not a claim name: {user_claim!r}")
    return EntraSettings(
        tenants=tuple(t.lower() for t in tenants),
        audiences=audiences,
        authority=authority,
        required_roles=_list(env, "GATEWAY_ENTRA_REQUIRED_ROLES"),
        required_scopes=_list(env, "GATEWAY_ENTRA_REQUIRED_SCOPES"),
        user_id_claim=user_claim,
        clock_skew_s=_number(env, "GATEWAY_ENTRA_CLOCK_SKEW_S", _ENTRA.clock_skew_s, minimum=0, maximum=600),
        keys_min_refresh_s=_number(env, "GATEWAY_ENTRA_KEYS_MIN_REFRESH_S", _ENTRA.keys_min_refresh_s, minimum=0.1, maximum=86400),
    )
