"""Candidate order for a deployment (placeholder: priority order; weights and breakers come with routing)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.config import Backend
from shared.errors import GatewayError


class Router:
    def __init__(self, backends: tuple[Backend, ...]) -> None:
        self._backends = backends
        self._by_deployment: dict[str, list[Backend]] = {}
        for backend in backends:
            for deployment in backend.deployments:
                self._by_deployment.setdefault(deployment, []).append(backend)
        for group in self._by_deployment.values():
            group.sort(key=lambda b: (b.priority, -b.weight))

    def candidates(self, deployment: str, need_tokens: int, priority: str) -> list[Backend]:
        return list(self._by_deployment.get(deployment, ()))

    def is_failure(self, backend: Backend, status: int) -> bool:
        return status in backend.breaker.statuses

    def record_error(self, backend: Backend, kind: str) -> None:
        pass

    def record_failure(self, backend: Backend, status: int, headers: Mapping[str, str]) -> None:
        pass

    def record_success(self, backend: Backend, headers: Mapping[str, str]) -> None:
        pass

    def exhausted(self, deployment: str, failures: list[str]) -> GatewayError:
        if failures and all(f == "timeout" for f in failures):
            return GatewayError(504, "The backend did not answer in time.", type="server_error", code="backend_timeout")
        if failures and all(f == "connection" for f in failures):
            return GatewayError(502, "The backend could not be reached.", type="server_error", code="backend_unreachable")
        if failures and all(f == "429" for f in failures):
            return GatewayError(429, "Every backend is busy; retry later.", type="rate_limit_error", code="backends_busy", headers={"retry-after": "1"})
        return GatewayError(503, "No backend could serve the request.", type="server_error", code="service_unavailable", headers={"retry-after": "1"})

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "backends": [{"id": b.id, "region": b.region, "state": "closed"} for b in self._backends]}
