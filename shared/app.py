"""Builds the gateway once per worker from its settings; the request path never constructs anything."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import Response

from shared.clock import Clock, SystemClock
from shared.config import Settings, load_settings
from shared.consumers import ConsumerDirectory
from shared.credentials import BackendAuth, default_credential_factory
from shared.errors import GatewayError
from shared.gateway import Gateway, Services
from shared.http import error_response, read_body, to_gateway_request, to_response
from shared.limits import NoLimits
from shared.routing import Router
from shared.storage import TableConsumerStore, Tables
from shared.telemetry import NullTelemetry
from shared.upstream import Upstream

log = logging.getLogger(__name__)


def build_services(settings: Settings, clock: Clock | None = None) -> Services:
    clock = clock or SystemClock()
    tables = Tables.from_settings(settings)
    return Services(
        settings=settings,
        clock=clock,
        consumers=ConsumerDirectory(TableConsumerStore(tables), clock, settings.consumer_refresh_s),
        router=Router(settings.backends),
        upstream=Upstream(settings.backends),
        auth=BackendAuth(settings.backends, clock, default_credential_factory(settings.managed_identity_client_id)),
        limiter=NoLimits(),
        telemetry=NullTelemetry(),
    )


class Edge:
    """What each Function handler delegates to: framework request in, framework response out."""

    def __init__(self, settings: Settings, services: Services | None = None) -> None:
        self.settings = settings
        self._services = services
        self._gateway: Gateway | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Edge:
        # Parsing here, at import of function_app, makes a bad setting fail the start-up, not the first request.
        return cls(load_settings(os.environ if env is None else env))

    async def gateway(self) -> Gateway:
        gateway = self._gateway
        if gateway is None:
            async with self._lock:
                if self._gateway is None:
                    services = self._services or build_services(self.settings)
                    self._gateway = Gateway(services)
                gateway = self._gateway
        return gateway

    async def handle(self, request: Request) -> Response:
        gateway = await self.gateway()
        try:
            body = await read_body(request, self.settings.max_body_bytes)
        except GatewayError as error:
            return error_response(error)
        return to_response(await gateway.handle(to_gateway_request(request, body)))
