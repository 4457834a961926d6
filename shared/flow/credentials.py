"""The backend's own credential: an api-key from settings, or an Entra ID token refreshed before it expires."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from shared.clock import Clock
from shared.config import Backend
from shared.flow.backend_api import api_of

log = logging.getLogger(__name__)

COGNITIVE_SCOPE = "https://cognitiveservices.azure.com/.default"
# Refresh this long before expiry, in the background; a request only waits for a token when none is valid at all.
REFRESH_MARGIN_S = 300.0


class TokenCredential(Protocol):
    async def get_token(self, *scopes: str) -> Any: ...  # returns an object with .token and .expires_on


class CachedToken:
    """One scope's token, fetched once and refreshed ahead of expiry by a single task."""

    def __init__(self, credential: TokenCredential, scope: str, clock: Clock) -> None:
        self._credential = credential
        self._scope = scope
        self._clock = clock
        self._token: str | None = None
        self._expires_on = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    async def get(self) -> str:
        now = self._clock.now()
        if self._token is not None and now < self._expires_on - REFRESH_MARGIN_S:
            return self._token
        if self._token is not None and now < self._expires_on - 5:
            self._refresh_in_background()
            return self._token
        self._refresh_in_background()
        assert self._refreshing is not None
        await asyncio.shield(self._refreshing)
        if self._token is None:
            raise RuntimeError("no token for the backend could be obtained")
        return self._token

    def _refresh_in_background(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            access = await self._credential.get_token(self._scope)
        except Exception:
            log.exception("could not obtain an Entra ID token for the backends")
            return
        self._token = access.token
        self._expires_on = float(access.expires_on)


class BackendAuth:
    """Headers that authenticate the gateway to each backend. The consumer's key is never among them."""

    def __init__(
        self,
        backends: tuple[Backend, ...],
        clock: Clock,
        credential_factory: Callable[[], TokenCredential] | None = None,
    ) -> None:
        self._static: dict[str, Mapping[str, str]] = {}
        self._token: CachedToken | None = None
        self._identity_backends: dict[str, Backend] = {}
        for backend in backends:
            if backend.auth == "key" and backend.api_key:
                self._static[backend.id] = api_of(backend).key_headers(backend.api_key)
            elif backend.auth == "identity":
                self._identity_backends[backend.id] = backend
            else:
                self._static[backend.id] = {}
        if self._identity_backends:
            if credential_factory is None:
                raise ValueError("a backend uses identity auth but no credential factory was given")
            self._token = CachedToken(credential_factory(), COGNITIVE_SCOPE, clock)

    async def headers(self, backend: Backend) -> Mapping[str, str]:
        static = self._static.get(backend.id)
        if static is not None:
            return static
        assert self._token is not None
        return {"authorization": f"Bearer {await self._token.get()}"}


def default_credential_factory(client_id: str | None) -> Callable[[], TokenCredential]:
    def make() -> TokenCredential:
        from azure.identity.aio import DefaultAzureCredential

        credential: TokenCredential = DefaultAzureCredential(managed_identity_client_id=client_id)
        return credential

    return make
