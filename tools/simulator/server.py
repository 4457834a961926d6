"""The simulated region's Azure OpenAI surface over aiohttp (the benchmarks' "direct" floor, so it must stay cheap)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import tiktoken
from aiohttp import web

from shared.flow import tokens
from tools.simulator import control
from tools.simulator.capacity import Clock, Verdict
from tools.simulator.config import DEFAULT_HOST, DeploymentConfig, RegionConfig
from tools.simulator.faults import AFTER_ADMISSION, Fault
from tools.simulator.responses import (
    DONE,
    MALFORMED_BODY,
    MALFORMED_EVENT,
    ChunkWriter,
    chat_completion,
    completion_words,
    embeddings,
    text_completion,
)
from tools.simulator.state import REGION, Region

__all__ = ["DeploymentConfig", "Region", "RegionConfig", "Running", "create_app", "start"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Operation:
    path: str
    azure_name: str  # as Azure names it in 429 messages
    required: str  # the body field it cannot do without
    count_prompt: Callable[[Mapping[str, Any], tiktoken.Encoding], int]


CHAT = Operation("chat/completions", "ChatCompletions_Create", "messages", tokens.count_chat_prompt)
COMPLETIONS = Operation("completions", "Completions_Create", "prompt", tokens.count_completion_prompt)
EMBEDDINGS = Operation("embeddings", "Embeddings_Create", "input", tokens.count_embedding_input)
OPERATIONS = (CHAT, COMPLETIONS, EMBEDDINGS)

JSON = "application/json"
SSE = "text/event-stream; charset=utf-8"
ACCESS_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an "
    "active subscription and use a correct regional API endpoint for your resource."
)
DEPLOYMENT_NOT_FOUND = (
    "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, "
    "please wait a moment and try again."
)
NOT_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library "
    "correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
)
_INVALID = object()
DROPPED = web.ResponseKey("dropped", bool)


def base_headers(region: Region) -> dict[str, str]:
    request_id = str(uuid.uuid4())
    return {"x-ms-region": region.config.region, "apim-request-id": request_id, "x-request-id": request_id}


_FILTERED = {"filtered": True, "severity": "high"}
_CLEAN = {"filtered": False, "severity": "safe"}
CONTENT_FILTER_BODY = orjson.dumps({"error": {
    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. Please "
               "modify your prompt and retry. To learn more about our content filtering policies please read our "
               "documentation: https://go.microsoft.com/fwlink/?linkid=2198766",
    "type": None, "param": "prompt", "code": "content_filter", "status": 400,
    "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
        "hate": _CLEAN, "jailbreak": {"filtered": False, "detected": False}, "self_harm": _CLEAN, "sexual": _CLEAN,
        "violence": _FILTERED}},
}})


def azure_error(region: Region, status: int, code: str, message: str, extra: Mapping[str, str] | None = None) -> web.Response:
    headers = base_headers(region)
    if extra:
        headers.update(extra)
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return web.Response(status=status, body=body, content_type=JSON, headers=headers)


def invalid_request(region: Region, message: str, param: str | None) -> web.Response:
    """Azure answers request validation errors in OpenAI's shape."""
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}})
    return web.Response(status=400, body=body, content_type=JSON, headers=base_headers(region))


def drop(request: web.Request) -> web.Response:
    """Drop the connection with a TCP reset and no response, as a crashing front end would."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    response = web.Response(status=500)
    response[DROPPED] = True
    return response


def authorized(key: str | None, request: web.Request) -> bool:
    if key is None:
        return True
    sent = request.headers.get("api-key")
    if sent is None:
        authorization = request.headers.get("authorization", "")
        sent = authorization[7:] if authorization[:7].lower() == "bearer " else None
    return sent is not None and secrets.compare_digest(sent.encode(), key.encode())


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate(op: Operation, body: Mapping[str, Any]) -> tuple[str, str] | None:
    """(message, param) of the first problem Azure would reject the body for, else None."""
    value = body.get(op.required)
    if value is None:
        return f"'{op.required}' is a required property", op.required
    if op is CHAT and (not isinstance(value, list) or not value):
        return "Invalid 'messages': expected a non-empty array.", "messages"
    if op is not CHAT and (not isinstance(value, str | list) or value == []):
        return f"Invalid '{op.required}': expected a string or a non-empty array.", op.required
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None and not _positive_int(body[key]):
            return f"Invalid '{key}': expected an integer of at least 1.", key
    if op is EMBEDDINGS:
        if body.get("dimensions") is not None and not _positive_int(body["dimensions"]):
            return "Invalid 'dimensions': expected an integer of at least 1.", "dimensions"
        if body.get("encoding_format") not in (None, "float", "base64"):
            return "Invalid 'encoding_format': expected 'float' or 'base64'.", "encoding_format"
    return None


def stream_options_supported(api_version: str) -> bool:
    dated = len(api_version) >= 10 and api_version[:4].isdigit() and api_version[4] == "-"
    return not dated or api_version[:10] >= "2024-09-01"


def requested_choices(body: Mapping[str, Any]) -> int:
    """How many completions the request generates (n, or best_of candidates), each billed."""
    choices = 1
    for key in ("n", "best_of"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            choices = max(choices, min(value, 128))
    return choices


def requested_max_tokens(body: Mapping[str, Any]) -> int | None:
    value = body.get("max_completion_tokens")
    if value is None:
        value = body.get("max_tokens")
    return value if _positive_int(value) else None


def throttled(region: Region, request: web.Request, op: Operation, verdict: Verdict, provisioned: bool) -> web.Response:
    region.stats.throttled.append((time.time(), verdict.retry_after_s))
    seconds = max(1, math.ceil(verdict.retry_after_s))
    wait_ms = str(max(1, math.ceil(verdict.retry_after_s * 1000)))
    if provisioned:
        return provisioned_429(region, request, op.azure_name, verdict.retry_after_s)
    what = "token rate limit" if verdict.limited_by == "tokens" else "call rate limit"
    headers = {
        "retry-after": str(seconds),
        "retry-after-ms": wait_ms,
        "x-ratelimit-remaining-tokens": str(verdict.remaining_tokens),
        "x-ratelimit-remaining-requests": str(verdict.remaining_requests),
        "x-ratelimit-reset-tokens": f"{seconds}s",
    }
    if verdict.limited_by == "requests":
        headers["x-ratelimit-reset-requests"] = f"{seconds}s"
    return azure_error(
        region, 429, "429",
        f"Requests to the {op.azure_name} Operation under Azure OpenAI API version "
        f"{request.query.get('api-version', 'v1')} have exceeded {what} of your current OpenAI S0 pricing tier. "
        f"Please retry after {seconds} seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to "
        "further increase the default rate limit.",
        headers,
    )


def provisioned_429(region: Region, request: web.Request, operation: str, retry_after_s: float) -> web.Response:
    """A provisioned deployment's 429. Microsoft documents only these two headers for it: the time until utilisation
    is back under 100 %, in milliseconds and in seconds. It sends no x-ratelimit-* figures."""
    wait_ms = str(max(1, math.ceil(retry_after_s * 1000)))
    return azure_error(
        region, 429, "429",
        f"Requests to the {operation} Operation under Azure OpenAI API version "
        f"{request.query.get('api-version', 'v1')} have exceeded the provisioned throughput of this deployment. "
        f"Please retry after {wait_ms} milliseconds.",
        {"retry-after": str(max(1, math.ceil(retry_after_s))), "retry-after-ms": wait_ms},
    )


async def inject(region: Region, request: web.Request, fault: Fault, streaming: bool) -> web.StreamResponse:
    """The answer to a request that a fault (other than cut and slow) takes over."""
    kind = fault.kind
    if kind == "500":
        return azure_error(region, 500, "InternalServerError",
                           "The server had an error while processing your request. Sorry about that!")
    if kind == "503":
        return azure_error(region, 503, "ServiceUnavailable",
                           "The service is temporarily unable to process your request. Please try again later.",
                           {"retry-after": "1"})
    if kind == "reset":
        return drop(request)
    if kind == "401":  # the gateway's key was rotated away
        return azure_error(region, 401, "401", ACCESS_DENIED)
    if kind == "403":  # the gateway's identity lost its role on the resource
        return azure_error(region, 403, "PermissionDenied",
                           "The principal lacks the required data action "
                           "'Microsoft.CognitiveServices/accounts/OpenAI/deployments/chat/completions/action'.")
    if kind == "content-filter":  # the prompt tripped the content filter: Azure's 400, an answer, not a failure
        return web.Response(status=400, body=CONTENT_FILTER_BODY, content_type=JSON, headers=base_headers(region))
    if kind == "timeout":
        await asyncio.sleep(fault.delay)
        return azure_error(region, 504, "Timeout", "The operation was timeout.")
    if kind == "malformed":
        if streaming:
            response = web.StreamResponse(headers={**base_headers(region), "content-type": SSE})
            await response.prepare(request)
            with contextlib.suppress(ConnectionError):
                await response.write(MALFORMED_EVENT + DONE)
            return response
        return web.Response(body=MALFORMED_BODY, content_type=JSON, headers=base_headers(region))
    if kind == "429":
        return azure_error(region, 429, "429", f"Rate limit is exceeded. Try again in {math.ceil(fault.delay)} seconds.", {
            "retry-after": str(max(1, math.ceil(fault.delay))),
            "retry-after-ms": str(max(1, round(fault.delay * 1000))),
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-tokens": f"{max(1, math.ceil(fault.delay))}s",
        })
    if kind == "429-ptu":  # shaped as a provisioned deployment's, though its utilisation is not what sent it
        return provisioned_429(region, request, "ChatCompletions_Create", fault.delay)
    if kind == "429-huge":
        return azure_error(region, 429, "429", "Rate limit is exceeded. Try again in 86400 seconds.",
                           {"retry-after": "86400", "retry-after-ms": "86400000"})
    return azure_error(region, 429, "429", "Rate limit is exceeded.")  # 429-bare: no hint when to retry


async def serve(region: Region, op: Operation, azure: bool, request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = _INVALID
    region.record(request.method, request.path, request.query, request.headers, None if body is _INVALID else body)
    if azure and "api-version" not in request.query:
        return azure_error(region, 400, "BadRequest", "Missing required query parameter: api-version")
    if not authorized(region.config.api_key, request):
        return azure_error(region, 401, "401", ACCESS_DENIED)
    if not isinstance(body, dict):
        return invalid_request(region, NOT_JSON, None)
    name = request.match_info["deployment"] if azure else body.get("model")
    deployment = region.deployments.get(name) if isinstance(name, str) else None
    if deployment is None:
        return azure_error(region, 404, "DeploymentNotFound", DEPLOYMENT_NOT_FOUND)
    problem = validate(op, body)
    if problem is not None:
        return invalid_request(region, *problem)
    if azure and "stream_options" in body and not stream_options_supported(request.query.get("api-version", "")):
        # As Azure OpenAI answers on api-versions before 2024-09-01 (2024-06-01, 2024-02-01 and older previews).
        return invalid_request(region, "Unrecognized request argument supplied: stream_options", None)
    streaming = body.get("stream") is True and op is not EMBEDDINGS
    fault = region.faults.peek(deployment.name)
    if fault is not None and fault.kind not in AFTER_ADMISSION:
        region.faults.use(fault)
        if fault.kind == "timeout":  # read, then held past any caller's patience: answered with nothing billed
            region.stats.unanswered_prompt(op.count_prompt(body, region.encodings[deployment.name]))
        return await inject(region, request, fault, streaming)

    prompt = op.count_prompt(body, region.encodings[deployment.name])
    limit = requested_max_tokens(body)
    default = region.config.completion_for(deployment)
    choices = 1 if op is EMBEDDINGS else requested_choices(body)
    if op is EMBEDDINGS:
        completion, charge = 0, prompt
    else:
        completion = min(limit, default) if limit is not None else default
        charge = prompt + choices * (limit if limit is not None else default)
    window = region.windows[deployment.name]
    verdict = window.admit(charge)
    if not verdict.admitted:
        return throttled(region, request, op, verdict, deployment.ptu)

    def finished(used: int) -> None:
        """The call is over: a provisioned deployment corrects its utilisation to what the call really used."""
        window.settle(charge, used)
        if deployment.ptu:
            region.stats.provisioned.append((time.time(), deployment.name, used))
    if fault is not None:
        region.faults.use(fault)  # cut or slow: they act on admitted requests only

    delay_ms = region.latency_ms
    if fault is not None and fault.kind == "slow":
        delay_ms += fault.delay * 1000
    if region.pace_non_streaming and not streaming:
        delay_ms += region.token_latency_ms * completion
    if delay_ms > 0:
        try:
            await asyncio.sleep(delay_ms / 1000)
        except asyncio.CancelledError:  # the caller went away before the answer: the prompt was still read
            finished(prompt)
            region.stats.unanswered_prompt(prompt)
            raise
    headers = base_headers(region)
    if not deployment.ptu:
        headers["x-ratelimit-remaining-tokens"] = str(verdict.remaining_tokens)
        headers["x-ratelimit-remaining-requests"] = str(verdict.remaining_requests)
    model = deployment.model_name

    if op is EMBEDDINGS:
        inputs = body["input"]
        count = len(inputs) if isinstance(inputs, list) and not isinstance(inputs[0], int) else 1
        dimensions = body.get("dimensions") or deployment.dimensions
        payload = embeddings(model, count, dimensions, body.get("encoding_format") == "base64", prompt)
        region.stats.reported(deployment.name, prompt, 0)
        finished(prompt)
        return web.Response(body=payload, content_type=JSON, headers=headers)

    words = completion_words(completion, prompt)
    finish = "length" if limit is not None and limit <= default else "stop"
    cut_after = fault.after_chunks if fault is not None and fault.kind == "cut" else None
    hold_after = fault.after_chunks if fault is not None and fault.kind == "hold" else None
    if streaming:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        report_usage = not (fault is not None and fault.kind in ("no-usage", "bare-done"))
        writer = ChunkWriter(model, op is CHAT, include_usage)
        end = BARE_DONE if fault is not None and fault.kind == "bare-done" else DONE
        return await stream(region, request, headers, writer, words, finish, prompt, cut_after, deployment.name,
                            finished, choices, report_usage, hold_after, end)
    build = chat_completion if op is CHAT else text_completion
    completion *= choices
    payload = build(model, "".join(words), completion, finish, prompt, choices)
    if cut_after is not None:  # headers and half the body, then the connection drops
        response = web.StreamResponse(headers={**headers, "content-type": JSON})
        response.content_length = len(payload)
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            await response.write(payload[: len(payload) // 2])
        region.stats.cut(prompt, 0, streamed=False)
        finished(prompt)
        drop(request)
        return response
    region.stats.reported(deployment.name, prompt, completion)
    finished(prompt + completion)
    return web.Response(body=payload, content_type=JSON, headers=headers)


# How Microsoft's aoai-api-simulator ends a chat stream: `[DONE]` alone, without the `data:` field or the blank line.
BARE_DONE = b"[DONE]"


async def stream(
    region: Region, request: web.Request, headers: dict[str, str], writer: ChunkWriter, words: tuple[str, ...],
    finish: str, prompt: int, cut_after: int | None, deployment: str, finished: Callable[[int], None],
    choices: int = 1, report_usage: bool = True, hold_after: int | None = None, end: bytes = b"",
) -> web.StreamResponse:
    headers["content-type"] = SSE
    headers["cache-control"] = "no-cache"
    response = web.StreamResponse(headers=headers)
    sent = 0
    try:
        await response.prepare(request)
        await response.write(writer.prelude())
        loop = asyncio.get_running_loop()
        delay = region.token_latency_ms / 1000
        started = loop.time()
        for index, word in enumerate(words if cut_after is None else words[:cut_after]):
            if index == hold_after:
                await region.held()
                started = loop.time() - index * delay  # the pace goes on from here, not in a catch-up burst
            if delay > 0:
                # Paced against the start, not the previous write, so many concurrent streams keep their rate.
                wait = started + (index + 1) * delay - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            if choices == 1:
                await response.write(writer.word(word))
            else:  # every choice generates its next token at the same pace
                await response.write(b"".join(writer.word(word, i) for i in range(choices)))
            sent = (index + 1) * choices
        if cut_after is not None:  # no finish, no usage, no [DONE]
            region.stats.cut(prompt, sent, streamed=True)
            drop(request)
            return response
        tail = writer.finish(finish, choices)
        if writer.include_usage and report_usage:
            tail += writer.usage(prompt, sent)
        await response.write(tail + (end or DONE))
    except ConnectionError:
        region.stats.abandoned(prompt, sent)
        return response
    finally:
        finished(prompt + sent)  # however the stream ended (even cancelled), it used what it generated
    if writer.include_usage and report_usage:
        region.stats.reported(deployment, prompt, sent)
    else:
        region.stats.served_unreported(prompt, sent)
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


def operation_handler(region: Region, op: Operation, azure: bool) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        region.stats.requests += 1
        response = await serve(region, op, azure, request)
        region.stats.by_status["reset" if response.get(DROPPED) and not response.prepared else str(response.status)] += 1
        return response

    return handle


def models_handler(region: Region) -> Handler:
    async def models(request: web.Request) -> web.StreamResponse:
        if not authorized(region.config.api_key, request):
            return azure_error(region, 401, "401", ACCESS_DENIED)
        data = [
            {"created": 0, "id": d.name, "object": "model", "owned_by": "system"}
            for d in sorted(region.deployments.values(), key=lambda d: d.name)
        ]
        return web.Response(body=orjson.dumps({"data": data, "object": "list"}), content_type=JSON, headers=base_headers(region))

    return models


def not_found_handler(region: Region) -> Handler:
    async def not_found(request: web.Request) -> web.StreamResponse:
        return azure_error(region, 404, "404", "Resource not found")

    return not_found


def create_app(config: RegionConfig, clock: Clock = time.monotonic) -> web.Application:
    region = Region(config, clock)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[REGION] = region
    for op in OPERATIONS:
        app.router.add_post(f"/openai/deployments/{{deployment}}/{op.path}", operation_handler(region, op, azure=True))
        for prefix in ("/v1/", "/openai/v1/"):
            app.router.add_post(prefix + op.path, operation_handler(region, op, azure=False))
    for path in ("/v1/models", "/openai/v1/models"):
        app.router.add_get(path, models_handler(region))
    # Imported here: the Responses API module builds on this one's helpers (errors, faults, 429s).
    from tools.simulator import responses_api

    responses_api.add_routes(app)
    control.add_routes(app.router)
    app.router.add_route("*", "/{tail:.*}", not_found_handler(region))
    return app


@dataclass(frozen=True)
class Running:
    """A region served in-process; `url` is its base address, `region` its live state."""

    runner: web.AppRunner
    region: Region
    url: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def cleanup(self) -> None:
        await self.runner.cleanup()


async def start(config: RegionConfig, host: str = DEFAULT_HOST, port: int = 0, clock: Clock = time.monotonic) -> Running:
    """Serve `config` on host:port (0: a free port) in the running event loop."""
    app = create_app(config, clock)
    # A short shutdown: streams in flight are not worth waiting a minute for when a test tool stops.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    return Running(runner, app[REGION], f"http://{host}:{bound_port}")
