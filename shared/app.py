"""Builds the gateway once per worker from its settings; the request path never constructs anything."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import Response

from shared.clock import Clock, SystemClock
from shared.config import Settings, load_settings
from shared.console.api import ConsoleApi
from shared.edge.http import read_body, to_gateway_request, to_response
from shared.flow import tokens
from shared.flow.gateway import Gateway
from shared.lifecycle import on_sigterm
from shared.telemetry import otel
from shared.wiring import Built, build, table_stores

log = logging.getLogger(__name__)


def build_services(settings: Settings, clock: Clock | None = None) -> Built:
    """The worker's services over Table Storage and Blob storage, telemetry to OpenTelemetry (shared/wiring.py)."""
    return build(settings, table_stores(settings), clock or SystemClock(), otel.configure(settings))


def tune_runtime(enabled: bool) -> None:
    """Garbage collection for a long-lived server: what exists at start-up (modules, encodings) is never collected, so
    it is moved out of the collector's sight, and the young generation is collected less often (measured: at 64
    concurrent clients it lifts throughput from ~0.91 to ~0.97 of a direct call; docs/benchmarks.md)."""
    if not enabled:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 50)


class Edge:
    """What each Function handler delegates to: framework request in, framework response out."""

    def __init__(self, settings: Settings, built: Built | None = None) -> None:
        """`built`: the services (shared/wiring.py), when the caller built them (a test over in-memory stores); else
        they are built over Table Storage on the first request."""
        self.settings = settings
        self._built = built
        self._console: ConsoleApi | None = None
        self._gateway: Gateway | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Edge:
        # Parsing here, at import of function_app, makes a bad setting fail the start-up, not the first request;
        # the token encodings load here too, from the installed package, so no request waits for them.
        edge = cls(load_settings(os.environ if env is None else env))
        tokens.preload(edge.settings.deployments())
        tune_runtime(edge.settings.gc_tuning)
        return edge

    async def gateway(self) -> Gateway:
        gateway = self._gateway
        if gateway is None:
            async with self._lock:
                if self._gateway is None:
                    if self._built is None:
                        self._built = build_services(self.settings)
                    self._gateway = Gateway(self._built.services)
                    # Built on the first request, inside the worker's loop: from now on something is buffered.
                    on_sigterm(self.close)
                gateway = self._gateway
        return gateway

    async def close(self) -> None:
        """Return limiter leases, save usage rows and budget spend, export telemetry, close clients (at shutdown)."""
        built = self._built
        if built is None or self._closed:
            return
        self._closed = True
        services = built.services
        if self._gateway is not None:
            await self._gateway.holds.close()
        screening = services.safety
        for closer in (services.limiter, services.usage, services.router, services.upstream, services.responses,
                       services.identity, services.cache, services.audit, built.counter,
                       *(screening.services() if screening is not None else ())):
            close = getattr(closer, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.exception("error while closing %s", type(closer).__name__)
        if built.stores.tables is not None:
            await built.stores.tables.close()
        for tables in built.stores.ledger_tables:
            await tables.close()
        otel.flush()

    async def console(self) -> ConsoleApi:
        await self.gateway()
        if self._console is None:
            assert self._built is not None
            self._console = ConsoleApi(self._built.console)
        return self._console

    async def handle(self, request: Request) -> Response:
        gateway = await self.gateway()
        settings = self.settings

        async def body() -> bytes:
            return await read_body(request, settings.max_body_bytes)

        framed = to_gateway_request(request, read_body=body, hops=settings.forwarded_hops, proxies=settings.trusted_proxies)
        if framed.raw_path == "/console" or framed.raw_path.startswith("/console/"):
            return to_response(await (await self.console()).handle(framed))
        return to_response(await gateway.handle(framed))
