"""Who is calling: a gateway key, or an Entra ID access token mapped to a consumer. Both end in the same Consumer, so
limits, quotas, allowed deployments and metrics do not care which way a caller came in."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from shared.edge.consumers import ConsumerDirectory, key_from_headers
from shared.edge.entra import TokenRefused, TokenValidator, looks_like_jwt
from shared.outcomes import InvalidToken
from shared.records.consumers import Consumer
from shared.telemetry.protocol import Telemetry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Caller:
    consumer: Consumer
    user_id: str | None = None  # from the token's configured claim; None: the User ID header applies
    person: str | None = None  # the object id of the person an Entra ID token speaks for (not an application's)


class Identifier:
    def __init__(
        self, directory: ConsumerDirectory, telemetry: Telemetry, validator: TokenValidator | None, accept_keys: bool
    ) -> None:
        self._directory = directory
        self._telemetry = telemetry
        self._validator = validator
        self._accept_keys = accept_keys

    async def identify(self, headers: Mapping[str, str], repeated: frozenset[str], client: str = "") -> Caller:
        credential = key_from_headers(headers, repeated)
        if looks_like_jwt(credential):
            return await self._token(credential, client)
        if not self._accept_keys:
            self._telemetry.auth_refused("keys_disabled")
            raise InvalidToken("keys_disabled", "This gateway accepts Entra ID access tokens only.")
        return Caller(await self._directory.authenticate(credential, client))

    async def _token(self, token: str, client: str) -> Caller:
        if self._validator is None:
            self._telemetry.auth_refused("entra_disabled")
            raise InvalidToken("entra_disabled", "This gateway does not accept Entra ID access tokens; send a gateway key.")
        try:
            principal = await self._validator.validate(token)
        except TokenRefused as refusal:
            # The reason, never the token: a log line must not hand anyone a credential.
            log.info("access token refused: %s", refusal.reason)
            self._telemetry.auth_refused(refusal.reason)
            raise self._refused(client, InvalidToken(refusal.reason, refusal.message)) from None
        consumer = await self._directory.for_principal(principal)
        if consumer is None or not consumer.enabled:
            reason = "no_consumer" if consumer is None else "consumer_disabled"
            log.info("access token for app %s (object %s, tenant %s) refused: %s",
                     principal.app_id, principal.object_id, principal.tenant, reason)
            self._telemetry.auth_refused(reason)
            raise self._refused(client, InvalidToken(reason))
        return Caller(consumer, principal.user_id or None,
                      principal.object_id if principal.person and principal.object_id else None)

    def _refused(self, client: str, refusal: InvalidToken) -> Exception:
        """A token that admits no one counts against its address like a made-up key: past the address's budget of
        failures the answer is 429 (a token that maps to a consumer keeps working from the same address). Checking a
        token costs no store read, only the signature check and the bounded key fetches, so it needs no lookup budget."""
        self._directory.check_throttle(client)
        return self._directory.refuse(client, refusal)

    async def close(self) -> None:
        if self._validator is not None:
            await self._validator.close()
