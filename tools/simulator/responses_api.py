"""The Responses API of a simulated region: create (whole or streamed, background), and the stored-state follow-ups.

Responses are stored per region, as Azure stores them in the resource that produced them: a `previous_response_id`,
GET, DELETE, input_items or cancel for an id another region made is answered as Azure would (400
`previous_response_not_found` / 404). Input tokens are counted with the gateway's own counter, plus the input and
output of the response continued, so tests can compare a gateway's books with what the region reported, to the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from shared.flow.responses import count_input
from tools.simulator.faults import AFTER_ADMISSION, Fault
from tools.simulator.responses import completion_words
from tools.simulator.server import (
    ACCESS_DENIED,
    DEPLOYMENT_NOT_FOUND,
    DROPPED,
    NOT_JSON,
    Operation,
    authorized,
    azure_error,
    base_headers,
    drop,
    inject,
    invalid_request,
    throttled,
)
from tools.simulator.state import REGION, Region

JSON = "application/json"
SSE = "text/event-stream; charset=utf-8"
PREFIXES = ("/openai/v1/", "/v1/", "/openai/")  # the last is Azure's preview path, which requires an api-version
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Stored:
    response: dict[str, Any]
    items: list[dict[str, Any]]
    deployment: str
    words: tuple[str, ...] = ()
    completes_at: float = 0.0  # background: when a queued response is done (looked at lazily, on reads)
    final: dict[str, Any] = field(default_factory=dict)  # background: what it becomes when done


class Store:
    """One region's stored responses."""

    def __init__(self) -> None:
        self.responses: dict[str, Stored] = {}
        # Encrypted reasoning is sealed with the resource's own key: another region cannot read it.
        self.seal = uuid.uuid4().hex

    def has_item(self, item_id: str) -> bool:
        """An input or output item of a stored response (what an `item_reference` may name)."""
        for stored in self.responses.values():
            for item in (*stored.items, *(stored.response.get("output") or ())):
                if isinstance(item, dict) and item.get("id") == item_id:
                    return True
        return False

    def sealed(self) -> str:
        return f"sealed-{self.seal}-{uuid.uuid4().hex}"

    def unreadable(self, body: Mapping[str, Any]) -> tuple[int, str, str | None] | None:
        """What the service answers for input items this region cannot use: an `item_reference` to no item it stores
        (404), encrypted reasoning another resource sealed (400)."""
        items = body.get("input")
        for item in items if isinstance(items, list) else ():
            if not isinstance(item, dict):
                continue
            if item.get("type") == "item_reference" and not self.has_item(str(item.get("id"))):
                return 404, f"Item with id '{item.get('id')}' not found.", None
            sealed = item.get("encrypted_content")
            if item.get("type") == "reasoning" and isinstance(sealed, str) and not sealed.startswith(f"sealed-{self.seal}-"):
                return 400, f"The encrypted content for item {item.get('id')} could not be verified.", "invalid_encrypted_content"
        return None

    def get(self, response_id: str) -> Stored | None:
        stored = self.responses.get(response_id)
        if stored is not None and stored.final and time.time() >= stored.completes_at:
            stored.response.update(stored.final)
            stored.final = {}
        return stored


STORE = web.AppKey("responses_store", Store)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}{uuid.uuid4().hex[:16]}"


def _error(region: Region, status: int, message: str, code: str | None, param: str | None = None) -> web.Response:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}})
    return web.Response(status=status, body=body, content_type=JSON, headers=base_headers(region))


def _not_found(region: Region, response_id: str) -> web.Response:
    return _error(region, 404, f"Response with id '{response_id}' not found.", None)


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _input_items(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    items: list[dict[str, Any]] = []
    for item in value if isinstance(value, list) else []:
        if not isinstance(item, dict):
            continue
        copy = {"id": _id("msg"), "type": "message", **item} if item.get("type", "message") == "message" else {"id": _id("item"), **item}
        if isinstance(copy.get("content"), str):
            copy["content"] = [{"type": "input_text", "text": copy["content"]}]
        copy.setdefault("status", "completed")
        items.append(copy)
    return items


def _message(text: str, status: str) -> dict[str, Any]:
    content = [{"annotations": [], "logprobs": [], "text": text, "type": "output_text"}] if status != "in_progress" else []
    return {"content": content, "id": _id("msg"), "role": "assistant", "status": status, "type": "message"}


def _response(body: Mapping[str, Any], model: str, status: str) -> dict[str, Any]:
    return {
        "background": body.get("background") is True,
        "created_at": int(time.time()),
        "error": None,
        "id": _id("resp"),
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "model": model,
        "object": "response",
        "output": [],
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "status": status,
        "store": body.get("store") is not False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": body.get("tools") or [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": None,
        "user": None,
    }


def _finished(response: dict[str, Any], words: tuple[str, ...], prompt: int, truncated: bool) -> dict[str, Any]:
    """The members that change when a response is done."""
    return {
        "status": "incomplete" if truncated else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
        "output": [_message("".join(words), "incomplete" if truncated else "completed")],
        "usage": _usage(prompt, len(words)),
    }


def _event(kind: str, sequence: int, **members: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, "sequence_number": sequence, **members}) + b"\n\n"


def stream_events(response: dict[str, Any], words: tuple[str, ...], final: dict[str, Any]) -> Iterator[bytes]:
    """Every event of one streamed response, in order: created, in_progress, the message item and its text part,
    one delta per word, the done events, then the terminal event carrying the usage."""
    seq = iter(range(1 << 30))
    start = {**response, "status": "in_progress", "output": [], "usage": None}
    yield _event("response.created", next(seq), response=start)
    yield _event("response.in_progress", next(seq), response=start)
    message = final["output"][0]
    opening = {**message, "status": "in_progress", "content": []}
    yield _event("response.output_item.added", next(seq), output_index=0, item=opening)
    empty = {"annotations": [], "logprobs": [], "text": "", "type": "output_text"}
    yield _event("response.content_part.added", next(seq), item_id=message["id"], output_index=0, content_index=0, part=empty)
    for word in words:
        yield _event("response.output_text.delta", next(seq), item_id=message["id"], output_index=0, content_index=0,
                     delta=word, logprobs=[])
    text = "".join(words)
    yield _event("response.output_text.done", next(seq), item_id=message["id"], output_index=0, content_index=0,
                 text=text, logprobs=[])
    yield _event("response.content_part.done", next(seq), item_id=message["id"], output_index=0, content_index=0,
                 part=message["content"][0])
    yield _event("response.output_item.done", next(seq), output_index=0, item=message)
    kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
    yield _event(kind, next(seq), response={**response, **final})


def _requires_api_version(region: Region, request: web.Request, preview: bool) -> web.Response | None:
    if preview and "api-version" not in request.query:
        return azure_error(region, 400, "BadRequest", "Missing required query parameter: api-version")
    return None


def _unauthorized(region: Region, request: web.Request) -> web.Response | None:
    return None if authorized(region.config.api_key, request) else azure_error(region, 401, "401", ACCESS_DENIED)


def _check(body: Mapping[str, Any]) -> tuple[str, str] | None:
    value = body.get("input")
    if value is None and body.get("previous_response_id") is None:
        return "Missing required parameter: 'input'.", "input"
    if value is not None and not isinstance(value, str | list):
        return "Invalid type for 'input': expected a string or an array.", "input"
    limit = body.get("max_output_tokens")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        return "Invalid 'max_output_tokens': expected an integer of at least 1.", "max_output_tokens"
    if body.get("background") is True and body.get("store") is False:
        return "Background responses require store=true.", "store"
    return None


async def _fault(region: Region, request: web.Request, deployment: str, streaming: bool) -> tuple[web.StreamResponse | None, Fault | None]:
    """A queued fault that takes this request over (answered here), or one that acts after admission (returned)."""
    fault = region.faults.peek(deployment)
    if fault is not None and fault.kind not in AFTER_ADMISSION:
        region.faults.use(fault)
        return await inject(region, request, fault, streaming), None
    return None, fault


async def create(region: Region, store: Store, preview: bool, request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    region.record(request.method, request.path, request.query, request.headers, body)
    refused = _requires_api_version(region, request, preview) or _unauthorized(region, request)
    if refused is not None:
        return refused
    if not isinstance(body, dict):
        return invalid_request(region, NOT_JSON, None)
    name = body.get("model")
    deployment = region.deployments.get(name) if isinstance(name, str) else None
    if deployment is None:
        return azure_error(region, 404, "DeploymentNotFound", DEPLOYMENT_NOT_FOUND)
    problem = _check(body)
    if problem is not None:
        return invalid_request(region, *problem)
    unreadable = store.unreadable(body)
    if unreadable is not None:
        return _error(region, unreadable[0], unreadable[1], unreadable[2], "input")
    context = 0
    previous_id = body.get("previous_response_id")
    previous = store.get(previous_id) if isinstance(previous_id, str) else None
    if previous_id is not None:
        if previous is None:
            return _error(region, 400, f"Previous response with id '{previous_id}' not found.",
                          "previous_response_not_found", "previous_response_id")
        usage = previous.response.get("usage") or {}
        context = int(usage.get("input_tokens", 0)) + int(usage.get("output_tokens", 0))
    streaming = body.get("stream") is True
    answered, fault = await _fault(region, request, deployment.name, streaming)
    if answered is not None:
        return answered

    prompt = count_input(body, region.encodings[deployment.name], context)
    limit = body.get("max_output_tokens")
    default = region.config.completion_for(deployment)
    completion = min(limit, default) if limit is not None else default
    charge = prompt + (limit if limit is not None else default)
    window = region.windows[deployment.name]
    verdict = window.admit(charge)
    if not verdict.admitted:
        return throttled(region, request, Operation("responses", "Responses_Create", "input", count_input), verdict,
                         deployment.ptu)
    # Settled at once with what the answer will use: the simulator's Responses API is not a capacity benchmark.
    window.settle(charge, prompt + completion)
    if fault is not None:
        region.faults.use(fault)
    if region.latency_ms > 0:
        await asyncio.sleep(region.latency_ms / 1000)
    headers = base_headers(region)
    headers["x-ratelimit-remaining-tokens"] = str(verdict.remaining_tokens)
    headers["x-ratelimit-remaining-requests"] = str(verdict.remaining_requests)

    words = completion_words(completion, prompt)
    background = body.get("background") is True
    response = _response(body, deployment.model_name, "queued" if background and not streaming else "completed")
    final = _finished(response, words, prompt, limit is not None and limit <= default)
    include = body.get("include")
    if isinstance(include, list) and "reasoning.encrypted_content" in include:
        final["output"] = [*final["output"], {"type": "reasoning", "id": _id("rs"), "summary": [],
                                              "encrypted_content": store.sealed()}]
    stored = Stored(response, _input_items(body.get("input")), deployment.name, words)
    if response["store"]:
        store.responses[response["id"]] = stored
    if streaming:
        response.update(final)
        cut_after = fault.after_chunks if fault is not None and fault.kind == "cut" else None
        return await _stream(region, request, headers, response, words, final, prompt, cut_after, deployment.name)
    if background:
        # Done after the time it would take to generate (or what the caller's metadata asks of the simulator).
        hint = (body.get("metadata") or {}).get("sim_background_s") if isinstance(body.get("metadata"), dict) else None
        seconds = float(hint) if isinstance(hint, str) and hint.replace(".", "", 1).isdigit() else region.token_latency_ms * completion / 1000
        stored.completes_at = time.time() + seconds
        stored.final = final
        region.stats.reported(deployment.name, prompt, len(words))
        return web.Response(body=orjson.dumps(response), content_type=JSON, headers=headers)
    response.update(final)
    region.stats.reported(deployment.name, prompt, len(words))
    return web.Response(body=orjson.dumps(response), content_type=JSON, headers=headers)


async def _stream(
    region: Region, request: web.Request, headers: dict[str, str], response: dict[str, Any], words: tuple[str, ...],
    final: dict[str, Any], prompt: int, cut_after: int | None, deployment: str, starting_after: int = -1,
    account: bool = True,
) -> web.StreamResponse:
    headers = {**headers, "content-type": SSE, "cache-control": "no-cache"}
    out = web.StreamResponse(headers=headers)
    sent = 0
    delay = region.token_latency_ms / 1000
    try:
        await out.prepare(request)
        for sequence, event in enumerate(stream_events(response, words, final)):
            is_delta = b"event: response.output_text.delta\n" in event[:40]
            if is_delta:
                if cut_after is not None and sent >= cut_after:
                    region.stats.cut(prompt, sent, streamed=True)
                    drop(request)
                    return out
                if delay > 0:
                    await asyncio.sleep(delay)
                sent += 1
            if sequence > starting_after:
                await out.write(event)
    except ConnectionError:
        if account:
            region.stats.abandoned(prompt, sent)
        return out
    if account:
        region.stats.reported(deployment, prompt, len(words))
    with contextlib.suppress(ConnectionError):
        await out.write_eof()
    return out


def _stored_or_404(region: Region, store: Store, request: web.Request) -> tuple[Stored | None, web.Response | None]:
    response_id = request.match_info["response_id"]
    stored = store.get(response_id)
    if stored is None:
        return None, _not_found(region, response_id)
    return stored, None


async def follow_up(region: Region, store: Store, preview: bool, action: str, request: web.Request) -> web.StreamResponse:
    region.record(request.method, request.path, request.query, request.headers, None)
    refused = _requires_api_version(region, request, preview) or _unauthorized(region, request)
    if refused is not None:
        return refused
    stored, missing = _stored_or_404(region, store, request)
    if missing is not None or stored is None:
        assert missing is not None
        return missing
    answered, _ = await _fault(region, request, stored.deployment, request.query.get("stream") == "true")
    if answered is not None:
        return answered
    response = stored.response
    headers = base_headers(region)
    if action == "get":
        if request.query.get("stream") == "true" and response.get("output"):
            try:
                after = int(request.query.get("starting_after", "-1"))
            except ValueError:
                after = -1
            return await _stream(region, request, headers, response, stored.words, response, 0, None, stored.deployment,
                                 after, account=False)
        return web.Response(body=orjson.dumps(response), content_type=JSON, headers=headers)
    if action == "delete":
        del store.responses[response["id"]]
        return web.Response(body=orjson.dumps({"deleted": True, "id": response["id"], "object": "response"}),
                            content_type=JSON, headers=headers)
    if action == "cancel":
        if not response.get("background"):
            return _error(region, 400, "Only responses created with background=true can be cancelled.", None)
        if response["status"] in ("queued", "in_progress"):
            response["status"] = "cancelled"
            stored.final = {}
        return web.Response(body=orjson.dumps(response), content_type=JSON, headers=headers)
    items = stored.items if request.query.get("order", "desc") == "asc" else stored.items[::-1]
    after_id = request.query.get("after")
    if after_id is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after_id) + 1 :] if after_id in ids else []
    try:
        limit = max(1, min(100, int(request.query.get("limit", "20"))))
    except ValueError:
        limit = 20
    page = items[:limit]
    listing = {
        "data": page, "first_id": page[0]["id"] if page else None, "has_more": len(items) > limit,
        "last_id": page[-1]["id"] if page else None, "object": "list",
    }
    return web.Response(body=orjson.dumps(listing), content_type=JSON, headers=headers)


def _counted(region: Region, handler: Handler) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        region.stats.requests += 1
        response = await handler(request)
        region.stats.by_status["reset" if response.get(DROPPED) and not response.prepared else str(response.status)] += 1
        return response

    return handle


def add_routes(app: web.Application) -> None:
    region = app[REGION]
    store = app[STORE] = Store()
    for prefix in PREFIXES:
        preview = prefix == "/openai/"

        def bound(action: str, preview: bool = preview) -> Handler:
            return _counted(region, lambda request: follow_up(region, store, preview, action, request))

        app.router.add_post(prefix + "responses", _counted(region, lambda r, p=preview: create(region, store, p, r)))  # type: ignore[misc]
        app.router.add_get(prefix + "responses/{response_id}", bound("get"))
        app.router.add_delete(prefix + "responses/{response_id}", bound("delete"))
        app.router.add_get(prefix + "responses/{response_id}/input_items", bound("input_items"))
        app.router.add_post(prefix + "responses/{response_id}/cancel", bound("cancel"))
