"""The simulated region's HTTP server (aiohttp: it is the benchmarks' "direct" floor, so it must be cheap)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from shared import tokens
from tools.simulator.capacity import SlidingWindow
from tools.simulator.faults import Fault, FaultPlan
from tools.simulator.responses import (
    DONE,
    ChunkWriter,
    chat_completion,
    completion_words,
    embeddings,
    text_completion,
)

REGION: web.AppKey[Region] = web.AppKey("region")  # type: ignore[name-defined]
OPERATIONS = {"chat/completions": "chat", "completions": "completions", "embeddings": "embeddings"}
OPERATION_NAMES = {"chat": "ChatCompletions_Create", "completions": "Completions_Create", "embeddings": "Embeddings_Create"}


@dataclass(frozen=True)
class DeploymentConfig:
    name: str
    tpm: int = 300_000
    rpm: int | None = None
    model: str = ""
    completion_tokens: int = 40  # when the request sets no max_tokens
    dimensions: int = 1536


@dataclass
class RegionConfig:
    region: str
    deployments: dict[str, DeploymentConfig]
    api_key: str | None = None
    latency_ms: float = 50.0
    token_latency_ms: float = 10.0
    recent_requests: int = 200


@dataclass
class Stats:
    requests: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    usage: Counter[str] = field(default_factory=Counter)
    usage_by_deployment: dict[str, Counter[str]] = field(default_factory=dict)
    streams_cut: int = 0
    delivered_in_cut: int = 0
    streams_abandoned: int = 0  # the caller went away mid-stream
    unreported: Counter[str] = field(default_factory=Counter)  # prompt + delivered tokens of streams that never reported usage
    throttled: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=5000))  # (when, retry-after s)

    def reported(self, deployment: str, prompt: int, completion: int | None) -> None:
        total = prompt + (completion or 0)
        per = self.usage_by_deployment.setdefault(deployment, Counter())
        for counter in (self.usage, per):
            counter["prompt_tokens"] += prompt
            counter["completion_tokens"] += completion or 0
            counter["total_tokens"] += total

    def as_json(self) -> dict[str, Any]:
        blank = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return {
            "requests": self.requests,
            "by_status": dict(self.by_status),
            "usage": {**blank, **self.usage},
            "usage_by_deployment": {d: {**blank, **c} for d, c in self.usage_by_deployment.items()},
            "streams_cut": self.streams_cut,
            "delivered_completion_tokens_in_cut_streams": self.delivered_in_cut,
            "streams_abandoned": self.streams_abandoned,
            "unreported": {**blank, **self.unreported},
            "throttled": [[round(t, 3), round(r, 3)] for t, r in self.throttled],
        }


def _azure_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps({"error": {"code": code, "message": message}}),
        content_type="application/json", headers=headers,
    )


def _abort(request: web.Request) -> None:
    """Drop the connection with a TCP reset, as a crashing or overloaded front end would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class Region:
    def __init__(self, config: RegionConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.windows = {d.name: SlidingWindow(d.tpm, d.rpm, clock) for d in config.deployments.values()}
        self.faults = FaultPlan()
        self.stats = Stats()
        self.recent: deque[dict[str, Any]] = deque(maxlen=config.recent_requests)
        self._latency = (config.latency_ms, config.token_latency_ms)

    # ---- the Azure OpenAI surface ----------------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        key = self.config.api_key
        if key is None:
            return True
        sent = request.headers.get("api-key")
        if sent is None:
            authorization = request.headers.get("authorization", "")
            sent = authorization[7:] if authorization[:7].lower() == "bearer " else None
        return sent == key

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        request_id = str(uuid.uuid4())
        headers = {"x-ms-region": self.config.region, "apim-request-id": request_id, "x-request-id": request_id}
        if extra:
            headers.update(extra)
        return headers

    async def operation(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        response = await self._operation(request)
        self.stats.by_status[str(response.status)] += 1
        return response

    async def _operation(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        deployment: str | None = None
        if path.startswith("/openai/deployments/"):
            rest = path[len("/openai/deployments/"):]
            deployment, _, op_path = rest.partition("/")
            if "api-version" not in request.query:
                return _azure_error(400, "BadRequest", "Missing required query parameter: api-version")
        else:
            op_path = path.split("/v1/", 1)[1] if "/v1/" in path else ""
        operation = OPERATIONS.get(op_path)
        if operation is None:
            return _azure_error(404, "404", "Resource not found")
        if not self._authorized(request):
            return _azure_error(
                401, "401", "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a "
                "valid key for an active subscription and use a correct regional API endpoint for your resource.",
            )
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _azure_error(400, "BadRequest", "The request body is not valid JSON.")
        if not isinstance(body, dict):
            return _azure_error(400, "BadRequest", "The request body must be a JSON object.")
        if deployment is None:
            deployment = body.get("model") if isinstance(body.get("model"), str) else ""
        self.recent.append({
            "method": request.method, "path": path, "query": dict(request.query),
            "headers": {str(k): v for k, v in request.headers.items()}, "body": body,
        })
        config = self.config.deployments.get(deployment or "")
        if config is None:
            return _azure_error(
                404, "DeploymentNotFound",
                "The API deployment for this resource does not exist. If you created the deployment within the last "
                "5 minutes, please wait a moment and try again.",
            )
        fault = self.faults.take(config.name)
        if fault is not None and fault.kind != "cut":
            return await self._fault(request, fault, operation)

        model = config.model or config.name
        encoding = tokens.encoding_for(model)
        if operation == "chat":
            prompt = tokens.count_chat_prompt(body, encoding)
        elif operation == "completions":
            prompt = tokens.count_completion_prompt(body, encoding)
        else:
            prompt = tokens.count_embedding_input(body, encoding)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        limit = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None
        completion = 0 if operation == "embeddings" else min(limit or config.completion_tokens, config.completion_tokens)
        charge = prompt if operation == "embeddings" else prompt + (limit or config.completion_tokens)

        verdict = self.windows[config.name].admit(charge)
        limits = {
            "x-ratelimit-remaining-tokens": str(verdict.remaining_tokens),
            "x-ratelimit-remaining-requests": str(verdict.remaining_requests),
        }
        if not verdict.admitted:
            self.stats.throttled.append((time.time(), verdict.retry_after_s))
            seconds = max(1, int(-(-verdict.retry_after_s // 1)))
            return _azure_error(
                429, "429",
                f"Requests to the {OPERATION_NAMES[operation]} Operation under Azure OpenAI API version "
                f"{request.query.get('api-version', 'v1')} have exceeded token rate limit of your current OpenAI S0 "
                f"pricing tier. Please retry after {seconds} seconds. Please go here: https://aka.ms/oai/quotaincrease "
                "if you would like to further increase the default rate limit.",
                self._headers({
                    **limits, "retry-after": str(seconds), "retry-after-ms": str(int(verdict.retry_after_s * 1000) + 1),
                    "x-ratelimit-reset-tokens": f"{seconds}s",
                }),
            )

        if self.config.latency_ms > 0:
            await asyncio.sleep(self.config.latency_ms / 1000)
        headers = self._headers(limits)
        if operation == "embeddings":
            inputs = body.get("input")
            count = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
            dimensions = body.get("dimensions") if isinstance(body.get("dimensions"), int) else config.dimensions
            payload = embeddings(model, count, dimensions, body.get("encoding_format") == "base64", prompt)
            self.stats.reported(config.name, prompt, None)
            return web.Response(body=payload, content_type="application/json", headers=headers)

        words = completion_words(completion, prompt)
        finish = "length" if limit is not None and limit <= config.completion_tokens else "stop"
        if body.get("stream") is True:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            cut_after = fault.after_chunks if fault is not None else None
            return await self._stream(request, headers, model, operation == "chat", words, finish, prompt,
                                      include_usage, cut_after, config.name)
        if fault is not None:  # a cut non-streaming response: headers and half the body, then the connection drops
            payload = chat_completion(model, words, finish, prompt) if operation == "chat" else text_completion(model, words, finish, prompt)
            response = web.StreamResponse(headers={**headers, "content-type": "application/json"})
            response.content_length = len(payload)
            await response.prepare(request)
            await response.write(payload[: len(payload) // 2])
            self.stats.streams_cut += 1
            self._unreported(prompt, 0)
            _abort(request)
            return response
        self.stats.reported(config.name, prompt, len(words))
        payload = chat_completion(model, words, finish, prompt) if operation == "chat" else text_completion(model, words, finish, prompt)
        return web.Response(body=payload, content_type="application/json", headers=headers)

    async def _stream(
        self, request: web.Request, headers: dict[str, str], model: str, chat: bool, words: list[str], finish: str,
        prompt: int, include_usage: bool, cut_after: int | None, deployment: str,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={**headers, "content-type": "text/event-stream", "cache-control": "no-cache"})
        await response.prepare(request)
        writer = ChunkWriter(model, chat, include_usage)
        for event in writer.prelude():
            await response.write(event)
        delay = self.config.token_latency_ms / 1000
        sent = 0
        try:
            for index, word in enumerate(words):
                if cut_after is not None and index >= cut_after:
                    self.stats.streams_cut += 1
                    self.stats.delivered_in_cut += index
                    self._unreported(prompt, index)
                    _abort(request)
                    return response
                if delay > 0:
                    await asyncio.sleep(delay)
                await response.write(writer.word(word))
                sent = index + 1
        except (ConnectionError, asyncio.CancelledError):
            self.stats.streams_abandoned += 1
            self._unreported(prompt, sent)
            raise
        await response.write(writer.finish(finish))
        if include_usage:
            await response.write(writer.usage(prompt, len(words)))
            self.stats.reported(deployment, prompt, len(words))
        await response.write(DONE)
        await response.write_eof()
        return response

    def _unreported(self, prompt: int, completion: int) -> None:
        self.stats.unreported["prompt_tokens"] += prompt
        self.stats.unreported["completion_tokens"] += completion
        self.stats.unreported["total_tokens"] += prompt + completion

    async def _fault(self, request: web.Request, fault: Fault, operation: str) -> web.StreamResponse:
        kind = fault.kind
        if kind == "500":
            return _azure_error(500, "InternalServerError", "The server had an error while processing your request.", self._headers())
        if kind == "503":
            return _azure_error(503, "ServiceUnavailable", "The service is temporarily unavailable.", self._headers({"retry-after": "1"}))
        if kind == "reset":
            _abort(request)
            return web.Response(status=500)
        if kind == "timeout":
            await asyncio.sleep(fault.delay_s if fault.delay_s is not None else 30.0)
            return _azure_error(504, "Timeout", "The operation timed out.", self._headers())
        if kind == "malformed":
            return web.Response(body=b'{"choices": [{"message": ', content_type="application/json", headers=self._headers())
        if kind == "429":
            seconds = fault.delay_s if fault.delay_s is not None else 2.0
            return _azure_error(429, "429", f"Rate limit is exceeded. Try again in {int(seconds)} seconds.", self._headers({
                "retry-after": str(max(1, int(-(-seconds // 1)))), "retry-after-ms": str(int(seconds * 1000)),
                "x-ratelimit-remaining-tokens": "0", "x-ratelimit-remaining-requests": "0",
            }))
        if kind == "429-huge":
            return _azure_error(429, "429", "Rate limit is exceeded. Try again in 86400 seconds.", self._headers({
                "retry-after": "86400", "retry-after-ms": "86400000",
            }))
        # 429-bare: no retry hint at all
        return _azure_error(429, "429", "Rate limit is exceeded.", self._headers())

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": d, "object": "model", "created": 0, "owned_by": "system"} for d in sorted(self.config.deployments)]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")

    # ---- control -----------------------------------------------------------------------------------------------

    async def add_fault(self, request: web.Request) -> web.Response:
        spec = await request.json()
        try:
            self.faults.add(Fault(
                kind=str(spec["kind"]), count=int(spec.get("count", 1)), deployment=spec.get("deployment"),
                after_chunks=int(spec.get("after_chunks", 3)),
                delay_s=float(spec["delay_s"]) if spec.get("delay_s") is not None else None,
            ))
        except (KeyError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"queued": len(self.faults)})

    async def clear_faults(self, request: web.Request) -> web.Response:
        self.faults.clear()
        return web.json_response({"queued": 0})

    async def set_capacity(self, request: web.Request) -> web.Response:
        spec = await request.json()
        window = self.windows.get(spec.get("deployment", ""))
        if window is None:
            return web.json_response({"error": "unknown deployment"}, status=404)
        window.resize(int(spec["tpm"]), int(spec["rpm"]) if spec.get("rpm") is not None else None)
        return web.json_response({"deployment": spec["deployment"], "tpm": window.tpm, "rpm": window.rpm})

    async def set_latency(self, request: web.Request) -> web.Response:
        spec = await request.json()
        if "latency_ms" in spec:
            self.config.latency_ms = float(spec["latency_ms"])
        if "token_latency_ms" in spec:
            self.config.token_latency_ms = float(spec["token_latency_ms"])
        return web.json_response({"latency_ms": self.config.latency_ms, "token_latency_ms": self.config.token_latency_ms})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.as_json())

    async def get_requests(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", "20"))
        return web.Response(body=orjson.dumps(list(self.recent)[-limit:]), content_type="application/json")

    async def reset(self, request: web.Request) -> web.Response:
        """Back to the state at start: configured capacity and latency, no faults, stats or recorded requests."""
        self.stats = Stats()
        self.faults.clear()
        self.recent.clear()
        for name, window in self.windows.items():
            window.clear()
            deployment = self.config.deployments[name]
            window.resize(deployment.tpm, deployment.rpm)
        self.config.latency_ms, self.config.token_latency_ms = self._latency
        return web.json_response({"reset": True})


def create_app(config: RegionConfig, clock: Callable[[], float] = time.monotonic) -> web.Application:
    region = Region(config, clock)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[REGION] = region
    for prefix in ("/openai/deployments/{deployment}/", "/v1/", "/openai/v1/"):
        for op in OPERATIONS:
            app.router.add_post(prefix + op, region.operation)
    app.router.add_get("/v1/models", region.models)
    app.router.add_get("/openai/v1/models", region.models)
    app.router.add_post("/_sim/faults", region.add_fault)
    app.router.add_delete("/_sim/faults", region.clear_faults)
    app.router.add_post("/_sim/capacity", region.set_capacity)
    app.router.add_post("/_sim/latency", region.set_latency)
    app.router.add_get("/_sim/stats", region.get_stats)
    app.router.add_get("/_sim/requests", region.get_requests)
    app.router.add_post("/_sim/reset", region.reset)
    return app


async def start(config: RegionConfig, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(create_app(config), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    return runner
