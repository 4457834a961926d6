"""The backend's own credential: an api-key from settings, or an Entra ID token refreshed before it expires."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from shared.clock import Clock
from shared.config import AZURE_OPENAI_SCOPE, Backend
from shared.flow.backend_api import api_of

log = logging.getLogger(__name__)

COGNITIVE_SCOPE = AZURE_OPENAI_SCOPE
# Refresh this long before expiry, in the background; a request only waits for a token when none is valid at all.
REFRESH_MARGIN_S = 300.0


class TokenCredential(Protocol):
    async def get_token(self, *scopes: str) -> Any: ...  # returns an object with .token and .expires_on


class CachedToken:
    """One scope's token, fetched once and refreshed ahead of expiry by a single task."""

    def __init__(self, credential: TokenCredential, scope: str, clock: Clock) -> None:
        self.scope = scope
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
            log.exception("could not obtain an Entra ID token for scope %s", self._scope)
            return
        self._token = access.token
        self._expires_on = float(access.expires_on)


class BackendAuth:
    """Headers that authenticate the gateway to each backend. The consumer's key is never among them.

    Each identity backend gets a token for its own scope (`token_scope`), one cached token per scope: a token meant for
    Azure OpenAI never reaches an Azure AI Foundry endpoint or a third-party server, and a backend configured without
    identity auth gets no token at all.
    """

    def __init__(
        self,
        backends: tuple[Backend, ...],
        clock: Clock,
        credential_factory: Callable[[], TokenCredential] | None = None,
    ) -> None:
        self._static: dict[str, Mapping[str, str]] = {}
        self._tokens: dict[str, CachedToken] = {}  # backend id -> its scope's token
        by_scope: dict[str, CachedToken] = {}
        credential: TokenCredential | None = None
        for backend in backends:
            if backend.auth == "key" and backend.api_key:
                self._static[backend.id] = api_of(backend).key_headers(backend.api_key)
            elif backend.auth == "identity":
                if backend.token_scope is None:
                    raise ValueError(f"backend {backend.id} uses identity auth but has no token scope")
                if credential is None:
                    if credential_factory is None:
                        raise ValueError("a backend uses identity auth but no credential factory was given")
                    credential = credential_factory()
                token = by_scope.get(backend.token_scope)
                if token is None:
                    token = by_scope[backend.token_scope] = CachedToken(credential, backend.token_scope, clock)
                self._tokens[backend.id] = token
            else:
                self._static[backend.id] = {}

    def scope_of(self, backend: Backend) -> str | None:
        token = self._tokens.get(backend.id)
        return token.scope if token is not None else None

    async def headers(self, backend: Backend) -> Mapping[str, str]:
        static = self._static.get(backend.id)
        if static is not None:
            return static
        token = self._tokens.get(backend.id)
        if token is None:
            return {}  # not configured for a credential: it gets none
        return {"authorization": f"Bearer {await token.get()}"}


def default_credential_factory(client_id: str | None) -> Callable[[], TokenCredential]:
    def make() -> TokenCredential:
        from azure.identity.aio import DefaultAzureCredential

        credential: TokenCredential = DefaultAzureCredential(managed_identity_client_id=client_id)
        return credential

    return make
