"""Who is calling the admin API, and with which role.

Three ways in, tried in this order:

- App Service Authentication (Easy Auth) in front of the app: its `X-MS-CLIENT-PRINCIPAL` header, believed only when
  GATEWAY_CONSOLE_EASY_AUTH says Easy Auth is there (it then removes any such header a client sends and writes its
  own). Without that setting the header is ignored, so a forged one gets nothing (401 when nothing else is sent).
- An Entra ID access token for the gateway's API (the validator of the Entra callers) carrying the app role
  Gateway.Admin or Gateway.Reader.
- The gateway admin key (its SHA-256 is GATEWAY_ADMIN_KEY_SHA256) as `Authorization: Bearer <key>`: an admin.

The gateway reads and sets no cookies and takes no credential from a URL. Easy Auth's sign-in does ride on its own
cookie, so a change made with it must also carry a header no cross-site form can add (CONSOLE_HEADER). A failed credential counts against the client's address like a failed key.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from collections.abc import Mapping
from typing import Any

from shared.adminops.operations import ADMIN_ROLE, READER_ROLE, Actor, OperationError
from shared.edge.consumers import ConsumerDirectory, hash_key
from shared.edge.entra import TokenRefused, TokenValidator, looks_like_jwt
from shared.outcomes import InvalidKey, KeyProblem

log = logging.getLogger(__name__)

EASY_AUTH_HEADER = "x-ms-client-principal"
CONSOLE_HEADER = ("x-requested-with", "gateway-console")  # the page sends it; a cross-site form cannot
MAX_PRINCIPAL_BYTES = 16_384
ROLES = (ADMIN_ROLE, READER_ROLE)


def _role(roles: tuple[str, ...] | list[str]) -> str | None:
    """The strongest console role among a principal's roles."""
    return ADMIN_ROLE if ADMIN_ROLE in roles else READER_ROLE if READER_ROLE in roles else None


def easy_auth_principal(header: str) -> tuple[str, list[str]]:
    """(name, roles) from Easy Auth's X-MS-CLIENT-PRINCIPAL: base64 of {"claims": [{"typ", "val"}], "name_typ",
    "role_typ"}. Raises ValueError when it is not that."""
    if len(header) > MAX_PRINCIPAL_BYTES:
        raise ValueError("too large")
    try:
        document = json.loads(base64.b64decode(header, validate=True))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise ValueError("not base64 JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("claims"), list):
        raise ValueError("no claims")
    role_typ = str(document.get("role_typ") or "roles")
    name_typ = str(document.get("name_typ") or "name")
    roles: list[str] = []
    names: dict[str, str] = {}
    for claim in document["claims"]:
        if not isinstance(claim, dict) or not isinstance(claim.get("typ"), str) or not isinstance(claim.get("val"), str):
            continue
        typ, val = claim["typ"], claim["val"]
        if typ in (role_typ, "roles", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"):
            roles.append(val)
        names.setdefault(typ, val)
    name = (names.get(name_typ) or names.get("preferred_username") or names.get("name")
            or names.get("http://schemas.microsoft.com/identity/claims/objectidentifier") or "unknown")
    return "".join(c for c in name if c.isprintable())[:128], roles


def _refused(status: int, code: str, message: str) -> OperationError:
    return OperationError(status, code, message)


class ConsoleAuth:
    def __init__(self, admin_key_sha256: str | None, validator: TokenValidator | None, directory: ConsumerDirectory,
                 trust_easy_auth: bool) -> None:
        self._admin_key = admin_key_sha256
        self._validator = validator
        self._directory = directory
        self._trust_easy_auth = trust_easy_auth

    def ambient(self, headers: Mapping[str, str]) -> bool:
        """The credential is Easy Auth's, which rides on the browser's sign-in cookie: a page on another site could
        make the browser send it (cross-site request forgery), so a change must also carry CONSOLE_HEADER, which no
        other site can add without this origin's consent (the gateway gives none: no CORS)."""
        return self._trust_easy_auth and EASY_AUTH_HEADER in headers

    async def actor(self, headers: Mapping[str, str], client_ip: str) -> Actor:
        """The caller as an Actor with a console role; OperationError 401 (no or bad credential), 403 (no console
        role), or the directory's own refusal (429) when this address failed too often."""
        if self._trust_easy_auth and EASY_AUTH_HEADER in headers:
            try:
                name, roles = easy_auth_principal(headers[EASY_AUTH_HEADER])
            except ValueError:
                raise _refused(401, "invalid_principal", "The sign-in header is not valid.") from None
            role = _role(roles)
            if role is None:
                raise _refused(403, "no_role", f"{name} is signed in but has neither app role {ADMIN_ROLE} nor "
                               f"{READER_ROLE}: an administrator assigns one in Entra ID (docs/deploy.md).")
            return Actor(f"easyauth:{name}", role)
        authorization = headers.get("authorization", "")
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise _refused(401, "unauthenticated", "Sign in: send the admin key or an Entra ID access token as "
                           "'Authorization: Bearer ...'.")
        self._directory.check_throttle(client_ip)
        if looks_like_jwt(credential):
            return await self._token(credential, client_ip)
        if self._admin_key is None or not hmac.compare_digest(hash_key(credential), self._admin_key):
            self._directory.refuse(client_ip, InvalidKey(KeyProblem.UNKNOWN))
            raise _refused(401, "invalid_credential", "The credential is not valid.")
        return Actor("key:admin", ADMIN_ROLE)

    async def _token(self, token: str, client_ip: str) -> Actor:
        if self._validator is None:
            raise _refused(401, "entra_disabled", "This gateway accepts no Entra ID tokens (GATEWAY_ENTRA_TENANT_IDS "
                           "is not set): send the admin key.")
        try:
            principal = await self._validator.validate(token)
        except TokenRefused as refusal:
            log.info("admin token refused: %s", refusal.reason)
            self._directory.refuse(client_ip, InvalidKey(KeyProblem.UNKNOWN))
            raise _refused(401, "invalid_token", refusal.message) from None
        who = principal.object_id or principal.app_id
        role = _role(principal.roles)
        if role is None:
            raise _refused(403, "no_role", f"The token of {who} carries neither app role {ADMIN_ROLE} nor {READER_ROLE}.")
        return Actor(f"entra:{who}", role)


def describe_actor(actor: Actor) -> dict[str, Any]:
    return {"name": actor.name, "role": actor.role, "may_write": actor.may_write}
