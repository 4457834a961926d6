"""Entra ID callers: an access token checked against its tenant's signing keys, then mapped to a consumer.

Verification is PyJWT's; this module decides what to trust. The tenant is read from the unverified token only to
choose which allowed tenant's keys to check it with: a tenant that is not allowed costs no fetch. Keys come from the
tenant's OpenID metadata, are cached, and are fetched again on an unknown `kid` at most once per refresh interval, so
a caller inventing key ids cannot turn requests into fetches. A verified token is cached by its digest until it
expires; a refused one for a short while, so neither kind costs the signature check twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from shared.clock import Clock
from shared.config import EntraSettings
from shared.outcomes import MAX_USER_ID_CHARS

log = logging.getLogger(__name__)

ALGORITHMS = ("RS256",)  # what Entra ID signs access tokens with; pinned, never read from the token
V1_ISSUER = "https://sts.windows.net/{tenant}/"
NEGATIVE_TTL_S = 60.0
MAX_NEGATIVE = 10_000
# Refusals that the same token can never outgrow; others (not yet valid, unknown key) may pass later.
_FINAL_REASONS = frozenset({"malformed", "alg_not_allowed", "wrong_tenant", "wrong_issuer", "wrong_audience",
                            "bad_signature", "missing_claim", "expired", "missing_role", "not_access_token"})
# Claims only an ID token carries (OpenID Connect's nonce and hashes of the code or access token it came with).
_ID_TOKEN_CLAIMS = ("nonce", "at_hash", "c_hash")


class TokenRefused(Exception):
    """The token does not admit its bearer. `reason` is for logs and metrics; `message` is what the client reads."""

    def __init__(self, reason: str, message: str = "The access token is not valid.") -> None:
        super().__init__(reason)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for."""

    tenant: str
    app_id: str
    object_id: str
    roles: tuple[str, ...]
    groups: tuple[str, ...]
    expires: float
    user_id: str = ""
    home: bool = False
    # A person signed in (a delegated token: it carries scopes, or idtyp "user"), not an application on its own.
    person: bool = False  # the token is from the first allowed tenant, where mappings that name no tenant apply

    def identifiers(self) -> list[tuple[str, ...]]:
        """Consumer mapping keys, most specific first: the object, the application, then its roles and groups.

        Every key names the token's tenant (`app:<id>@<tenant>`): the same application id, role name or group id in
        another allowed tenant is another caller. A mapping that names no tenant means the home tenant."""
        tiers: list[tuple[str, ...]] = []
        if self.object_id:
            tiers.append(self._keys("oid", (self.object_id,)))
        if self.app_id:
            tiers.append(self._keys("app", (self.app_id,)))
        claims = self._keys("role", self.roles) + self._keys("group", self.groups)
        if claims:
            tiers.append(claims)
        return tiers

    def _keys(self, kind: str, values: tuple[str, ...]) -> tuple[str, ...]:
        keys = tuple(f"{kind}:{v}@{self.tenant}" for v in values)
        return keys + tuple(f"{kind}:{v}" for v in values) if self.home else keys


MAPPING_KINDS = ("oid", "app", "role", "group")


_TENANT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def mapping_key(kind: str, value: str, tenant: str | None = None) -> str:
    """`app`, `oid`, `role` or `group` and its value, as stored on a consumer; ids are compared lower-case. With a
    tenant (`app:<id>@<tenant>`) the mapping admits tokens of that tenant only; without, of the home tenant only."""
    if kind not in MAPPING_KINDS:
        raise ValueError(f"unknown Entra mapping kind {kind!r}; expected one of {', '.join(MAPPING_KINDS)}")
    value = value.strip()
    if not value or len(value) > 256 or any(c.isspace() or ord(c) < 32 for c in value):
        raise ValueError(f"bad Entra {kind} value {value!r}")
    key = f"{kind}:{value.lower() if kind in ('oid', 'app', 'group') else value}"
    if tenant is None:
        return key
    tenant = tenant.strip().lower()
    if not _TENANT.fullmatch(tenant):
        raise ValueError(f"bad Entra tenant id {tenant!r}; expected a GUID")
    return f"{key}@{tenant}"


class JsonFetcher(Protocol):
    async def get_json(self, url: str) -> Mapping[str, Any]: ...


class SigningKeys:
    """Each allowed tenant's signing keys, from its OpenID metadata and JWKS, refreshed on an unknown `kid` at most
    once per `min_refresh_s` and at least every `max_age_s`."""

    def __init__(self, settings: EntraSettings, fetcher: JsonFetcher, clock: Clock) -> None:
        self._settings = settings
        self._fetcher = fetcher
        self._clock = clock
        self._keys: dict[str, dict[str, Any]] = {}
        self._issuer: dict[str, str] = {}
        self._fetched_at: dict[str, float] = {}
        self._pending: dict[str, asyncio.Task[None]] = {}
        self.fetches = 0

    async def close(self) -> None:
        close = getattr(self._fetcher, "close", None)
        if close is not None:
            await close()

    def v2_issuer(self, tenant: str) -> str | None:
        return self._issuer.get(tenant)

    async def key(self, tenant: str, kid: str) -> Any:
        now = self._clock.monotonic()
        fetched = self._fetched_at.get(tenant)
        if (
            fetched is None
            or now - fetched >= self._settings.keys_max_age_s
            or (kid not in self._keys.get(tenant, {}) and now - fetched >= self._settings.keys_min_refresh_s)
        ):
            await self._refresh(tenant)
        key = self._keys.get(tenant, {}).get(kid)
        if key is None:
            raise TokenRefused("unknown_kid")
        return key

    async def _refresh(self, tenant: str) -> None:
        task = self._pending.get(tenant)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._fetch(tenant))
            self._pending[tenant] = task
        await asyncio.shield(task)

    async def _fetch(self, tenant: str) -> None:
        # Counted as an attempt whatever the outcome, so a failing endpoint is not asked on every request either.
        self._fetched_at[tenant] = self._clock.monotonic()
        self.fetches += 1
        try:
            metadata = await self._fetcher.get_json(
                f"{self._settings.authority}/{tenant}/v2.0/.well-known/openid-configuration")
            jwks_uri = metadata.get("jwks_uri")
            issuer = metadata.get("issuer")
            if not isinstance(jwks_uri, str) or not isinstance(issuer, str):
                raise ValueError("OpenID metadata without jwks_uri or issuer")
            jwks = await self._fetcher.get_json(jwks_uri)
            import jwt  # loaded only where Entra ID callers are configured (PyJWT with cryptography: ~9 MB)

            keys = {}
            for jwk in jwks.get("keys", []):
                if not isinstance(jwk, dict) or jwk.get("kty") != "RSA" or jwk.get("use", "sig") != "sig":
                    continue
                kid = jwk.get("kid")
                if isinstance(kid, str):
                    keys[kid] = jwt.PyJWK(jwk, algorithm="RS256").key
        except Exception as exc:
            # Keep the keys we had: a metadata outage must not log out every caller whose key is still cached.
            log.warning("could not fetch Entra signing keys for tenant %s (%s)", tenant, type(exc).__name__)
            return
        self._keys[tenant] = keys
        self._issuer[tenant] = issuer.replace("{tenantid}", tenant)


class TokenValidator:
    """Verifies Entra ID access tokens for the gateway's audience; the result is cached by the token's digest."""

    def __init__(self, settings: EntraSettings, keys: SigningKeys, clock: Clock, cache_size: int = 50_000) -> None:
        self._settings = settings
        self._keys = keys
        self._clock = clock
        self._cache_size = cache_size
        self._valid: OrderedDict[bytes, Principal] = OrderedDict()
        self._refused: OrderedDict[bytes, tuple[float, TokenRefused]] = OrderedDict()
        self._tenants = frozenset(t.lower() for t in settings.tenants)
        self._home = settings.tenants[0].lower() if settings.tenants else ""

    async def validate(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        principal = self._valid.get(digest)
        if principal is not None:
            if self._clock.now() < principal.expires + self._settings.clock_skew_s:
                return principal
            del self._valid[digest]
            raise TokenRefused("expired", "The access token has expired.")
        refused = self._refused.get(digest)
        if refused is not None:
            if self._clock.monotonic() < refused[0]:
                raise refused[1]
            del self._refused[digest]
        try:
            principal = await self._verify(token)
        except TokenRefused as refusal:
            if refusal.reason in _FINAL_REASONS:
                self._refused[digest] = (self._clock.monotonic() + NEGATIVE_TTL_S, refusal)
                if len(self._refused) > MAX_NEGATIVE:
                    self._refused.popitem(last=False)
            raise
        self._valid[digest] = principal
        if len(self._valid) > self._cache_size:
            self._valid.popitem(last=False)
        return principal

    async def close(self) -> None:
        await self._keys.close()

    async def _verify(self, token: str) -> Principal:
        import jwt  # see SigningKeys: not loaded by a gateway that accepts keys only

        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise TokenRefused("malformed") from None
        if header.get("alg") not in ALGORITHMS:
            raise TokenRefused("alg_not_allowed")
        kid = header.get("kid")
        tenant = unverified.get("tid")
        if not isinstance(kid, str) or not isinstance(tenant, str):
            raise TokenRefused("malformed")
        tenant = tenant.lower()
        if tenant not in self._tenants:
            raise TokenRefused("wrong_tenant")
        key = await self._keys.key(tenant, kid)
        issuers = [V1_ISSUER.format(tenant=tenant)]
        v2 = self._keys.v2_issuer(tenant)
        if v2 is not None:
            issuers.append(v2)
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=list(ALGORITHMS),
                audience=list(self._settings.audiences),
                issuer=issuers,
                # Times are checked below against the injected clock, not the library's own reading of it.
                options={"require": ["exp", "iss", "aud", "tid"], "verify_exp": False, "verify_nbf": False,
                         "verify_iat": False},
            )
        except jwt.InvalidAudienceError:
            raise TokenRefused("wrong_audience") from None
        except jwt.InvalidIssuerError:
            raise TokenRefused("wrong_issuer") from None
        except jwt.InvalidSignatureError:
            raise TokenRefused("bad_signature") from None
        except jwt.MissingRequiredClaimError:
            raise TokenRefused("missing_claim") from None
        except jwt.InvalidAlgorithmError:
            raise TokenRefused("alg_not_allowed") from None
        except jwt.PyJWTError:
            raise TokenRefused("malformed") from None
        self._check_times(claims)
        if any(name in claims for name in _ID_TOKEN_CLAIMS) or not (claims.get("azp") or claims.get("appid")):
            # An ID token proves a sign-in to the app named in its `aud`; it authorises nothing. Every access token
            # names the client that asked for it (`azp` in v2, `appid` in v1); an ID token names none.
            raise TokenRefused("not_access_token", "An ID token is not an access token: ask for a token for the gateway's API.")
        return self._principal(tenant, claims)

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now, skew = self._clock.now(), self._settings.clock_skew_s
        expires, not_before = claims.get("exp"), claims.get("nbf")
        if not isinstance(expires, (int, float)) or isinstance(expires, bool) or (
            not_before is not None and not _is_number(not_before)
        ):
            raise TokenRefused("malformed")
        if now > expires + skew:
            raise TokenRefused("expired", "The access token has expired.")
        if not_before is not None and now + skew < not_before:
            raise TokenRefused("not_yet_valid", "The access token is not valid yet.")

    def _principal(self, tenant: str, claims: Mapping[str, Any]) -> Principal:
        roles = _strings(claims.get("roles"))
        scopes = tuple(str(claims.get("scp", "")).split())
        required_roles = self._settings.required_roles
        required_scopes = self._settings.required_scopes
        if (required_roles or required_scopes) and not (
            set(required_roles) & set(roles) or set(required_scopes) & set(scopes)
        ):
            raise TokenRefused("missing_role", "The access token does not carry a role or scope this gateway requires.")
        app_id = claims.get("azp") or claims.get("appid")
        user_claim = self._settings.user_id_claim
        return Principal(
            tenant=tenant,
            app_id=str(app_id).lower(),
            object_id=str(claims.get("oid", "")).lower(),
            roles=roles,
            groups=tuple(g.lower() for g in _strings(claims.get("groups"))),
            expires=float(claims["exp"]),
            user_id=str(claims.get(user_claim, ""))[:MAX_USER_ID_CHARS] if user_claim else "",
            home=tenant == self._home,
            person=bool(scopes) or claims.get("idtyp") == "user",
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


class PrincipalIndex:
    """Consumers by Entra mapping key. A key claimed by two consumers maps to neither (and says so in the log):
    an ambiguous mapping must never pick one consumer's limits by accident."""

    def __init__(self, mappings: Iterable[tuple[str, str]]) -> None:
        owners: dict[str, set[str]] = {}
        for consumer_id, key in mappings:
            owners.setdefault(key, set()).add(consumer_id)
        self._owner: dict[str, str] = {}
        for key, ids in owners.items():
            if len(ids) == 1:
                self._owner[key] = next(iter(ids))
            else:
                log.error("Entra mapping %s is claimed by consumers %s; it admits none of them", key, sorted(ids))

    def resolve(self, principal: Principal) -> str | None:
        for tier in principal.identifiers():
            found = {self._owner[k] for k in tier if k in self._owner}
            if len(found) == 1:
                return found.pop()
            if len(found) > 1:
                log.warning("token for app %s matches several consumers by role/group (%s); refused",
                            principal.app_id, sorted(found))
                return None
        return None


def looks_like_jwt(credential: str) -> bool:
    """A compact JWS: three base64url parts, the first a JSON object (`eyJ` is `{"` encoded)."""
    return credential.startswith("eyJ") and credential.count(".") == 2


class HttpJsonFetcher:
    """The JSON fetcher for OpenID metadata and JWKS: one client per worker, short timeouts, no redirects followed."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        import httpx

        self._client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)

    async def get_json(self, url: str) -> Mapping[str, Any]:
        response = await self._client.get(url, headers={"accept": "application/json"})
        response.raise_for_status()
        data = response.json()
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return data

    async def close(self) -> None:
        await self._client.aclose()


def build_validator(settings: EntraSettings | None, clock: Clock) -> TokenValidator | None:
    if settings is None:
        return None
    return TokenValidator(settings, SigningKeys(settings, HttpJsonFetcher(), clock), clock)
