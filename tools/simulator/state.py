"""The live state of one simulated region: capacity windows, queued faults, latency, stats and recorded requests."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import tiktoken
from aiohttp import web

from shared.flow import tokens
from tools.simulator.capacity import Admission, Clock, LeakyBucket, SlidingWindow
from tools.simulator.config import DeploymentConfig, RegionConfig
from tools.simulator.faults import FaultPlan
from tools.simulator.stats import Stats


class Region:
    def __init__(self, config: RegionConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.deployments: dict[str, DeploymentConfig] = {d.name: d for d in config.deployments}
        # Loaded now, so that neither the first request nor a benchmark pays for the tokenizer.
        self.encodings: dict[str, tiktoken.Encoding] = {d.name: tokens.encoding_for(d.model_name) for d in config.deployments}
        self.windows: dict[str, Admission] = {d.name: capacity_for(d, clock) for d in config.deployments}
        self.faults = FaultPlan()
        self.held_streams = 0  # streams waiting, mid-way, for their `hold` fault to be cleared
        self._release = asyncio.Event()
        self.stats = Stats()
        self.recent: deque[dict[str, Any]] = deque(maxlen=config.recent_requests)
        self.latency_ms = config.latency_ms
        self.token_latency_ms = config.token_latency_ms
        self.pace_non_streaming = config.pace_non_streaming

    def record(self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str], body: Any) -> None:
        self.recent.append({
            "method": method, "path": path, "query": dict(query), "headers": {str(k): v for k, v in headers.items()},
            "body": body,
        })

    async def held(self) -> None:
        """A `hold` fault's stream waits here until the faults are cleared."""
        self.held_streams += 1
        try:
            await self._release.wait()
        finally:
            self.held_streams -= 1

    def release_held(self) -> None:
        self._release.set()
        self._release = asyncio.Event()

    def reset(self) -> None:
        """Back to the state at start: configured capacity and latency; no faults, stats or recorded requests."""
        self.stats = Stats()
        self.faults.clear()
        self.release_held()
        self.recent.clear()
        for name, window in self.windows.items():
            window.clear()
            window.resize(self.deployments[name].tpm, self.deployments[name].rpm)
        self.latency_ms = self.config.latency_ms
        self.token_latency_ms = self.config.token_latency_ms
        self.pace_non_streaming = self.config.pace_non_streaming


def capacity_for(deployment: DeploymentConfig, clock: Clock) -> Admission:
    if deployment.ptu:
        return LeakyBucket(deployment.tpm, clock, deployment.burst_s)
    return SlidingWindow(deployment.tpm, deployment.rpm, clock)


REGION = web.AppKey("region", Region)
