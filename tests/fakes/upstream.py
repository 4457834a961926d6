"""A scripted upstream: each backend answers from its own script of replies and failures, then from a default that
reads the request (a chat completion, a stream with its usage chunk, embeddings), so a test scripts only what matters.

It implements `shared.flow.upstream.UpstreamClient`; nothing here opens a socket.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from shared.config import Backend
from shared.flow.upstream import UpstreamBroken, UpstreamError
from shared.outcomes import FailureKind

PROMPT_TOKENS = 11  # what the default answers report as the prompt's size
MODEL = "gpt-4o-2024-11-20"


@dataclass(frozen=True)
class Reply:
    """One answer: status and headers, then the body, whole or as pieces (a stream).

    `breaks_after`: the body breaks off after that many pieces (0: right after the headers). `stalls_after`: after that
    many pieces nothing more comes, ever (a client that leaves is what ends it)."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    pieces: tuple[bytes, ...] | None = None
    breaks_after: int | None = None
    stalls_after: int | None = None

    def parts(self) -> tuple[bytes, ...]:
        return self.pieces if self.pieces is not None else (self.body,)


@dataclass(frozen=True)
class Fail:
    """No answer at all: TIMEOUT (before the headers) or CONNECTION (refused, reset)."""

    kind: FailureKind


Step = Reply | Fail


@dataclass(frozen=True)
class Sent:
    backend_id: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    method: str = "POST"

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def path(self) -> str:
        return "/" + self.url.split("://", 1)[1].split("/", 1)[1].split("?", 1)[0]


class FakeAnswer:
    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.status = reply.status
        self.headers: Mapping[str, str] = {k.lower(): v for k, v in reply.headers.items()}
        self._parts = reply.parts()
        self._at = 0
        self._body: bytes | None = None
        self.closed = False
        self.released = False

    async def read(self) -> bytes:
        if self._body is not None:
            return self._body
        if self.reply.breaks_after is not None:
            self.released = True
            raise UpstreamBroken("scripted")
        if self.reply.stalls_after is not None:
            await asyncio.Future()  # a backend still generating: only the caller's cancellation ends the wait
        self._body = b"".join(self._parts)
        self.released = True
        return self._body

    async def next_chunk(self) -> bytes:
        await asyncio.sleep(0)  # a real body arrives across loop turns; so does this one
        if self.reply.stalls_after is not None and self._at >= self.reply.stalls_after:
            await asyncio.Future()  # never resolves
        if self.reply.breaks_after is not None and self._at >= self.reply.breaks_after:
            raise UpstreamBroken("scripted")
        if self._at >= len(self._parts):
            return b""
        self._at += 1
        return self._parts[self._at - 1]

    @property
    def delivered(self) -> int:
        return self._at

    def close(self) -> None:
        self.closed = True

    def release(self) -> None:
        self.released = True


class ScriptedUpstream:
    def __init__(self, default: Callable[[Sent], Reply] | None = None) -> None:
        self._scripts: dict[str, deque[Step]] = {}
        self._default = default or default_reply
        self.sent: list[Sent] = []
        self.answers: list[FakeAnswer] = []
        self.closed = False

    def script(self, backend_id: str, *steps: Step) -> None:
        """What `backend_id` answers to its next requests, in order; after them, the default."""
        self._scripts.setdefault(backend_id, deque()).extend(steps)

    def to(self, backend_id: str) -> list[Sent]:
        return [s for s in self.sent if s.backend_id == backend_id]

    async def send(
        self, backend: Backend, url: str, headers: Mapping[str, str], body: bytes, method: str = "POST"
    ) -> FakeAnswer:
        sent = Sent(backend.id, url, dict(headers), body, method)
        self.sent.append(sent)
        script = self._scripts.get(backend.id)
        step = script.popleft() if script else self._default(sent)
        if isinstance(step, Fail):
            raise UpstreamError(step.kind, backend.id, "scripted")
        answer = FakeAnswer(step)
        self.answers.append(answer)
        return answer

    async def close(self) -> None:
        self.closed = True


# ---- answers a backend would give --------------------------------------------------------------------------------


# Words that are one token each, alone and in a row (o200k_base), so that a test can say how many tokens were delivered.
_WORDS = (
    "the of and to in is was for on that with as by at from his her they this are have had were not but all can one "
    "which will there when their has been would more who what no about out so if up said time into could them some "
    "other than only its new two my first over may like any these most also after very made our people year work just "
    "back used way day man long little"
).split()


def words(n: int) -> list[str]:
    """n distinct one-token words (they repeat, numbered by their place, only past 82)."""
    return [" " + _WORDS[i % len(_WORDS)] for i in range(n)]


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_body(completion: int = 5, prompt: int = PROMPT_TOKENS, model: str = MODEL) -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words(completion))},
                     "finish_reason": "length"}],
        "usage": usage(prompt, completion),
    })


def completion_body(completion: int = 5, prompt: int = PROMPT_TOKENS, model: str = MODEL) -> bytes:
    return orjson.dumps({
        "id": "cmpl-1", "object": "text_completion", "created": 1, "model": model,
        "choices": [{"index": 0, "text": "".join(words(completion)), "finish_reason": "length"}],
        "usage": usage(prompt, completion),
    })


def embeddings_body(inputs: int = 1, dimensions: int = 8, prompt: int = PROMPT_TOKENS) -> bytes:
    return orjson.dumps({
        "object": "list", "model": "text-embedding-3-small",
        "data": [{"object": "embedding", "index": i, "embedding": [0.5] * dimensions} for i in range(inputs)],
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    })


def sse_events(completion: int = 5, prompt: int = PROMPT_TOKENS, with_usage: bool = True, model: str = MODEL) -> tuple[bytes, ...]:
    """A chat stream as Azure OpenAI sends it: one event per token, the usage chunk if asked for, then [DONE]."""

    def event(obj: Any) -> bytes:
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
    events = [event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
    events += [event({**base, "choices": [{"index": 0, "delta": {"content": w}}]}) for w in words(completion)]
    events.append(event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}))
    if with_usage:
        events.append(event({**base, "choices": [], "usage": usage(prompt, completion)}))
    events.append(b"data: [DONE]\n\n")
    return tuple(events)


def stream_reply(completion: int = 5, prompt: int = PROMPT_TOKENS, **options: Any) -> Reply:
    return Reply(200, {"content-type": "text/event-stream"}, pieces=sse_events(completion, prompt), **options)


def json_reply(body: bytes, status: int = 200, headers: Mapping[str, str] | None = None, **options: Any) -> Reply:
    return Reply(status, {"content-type": "application/json", **(headers or {})}, body, **options)


def error_reply(status: int, headers: Mapping[str, str] | None = None, code: str = "backend_said_no") -> Reply:
    body = orjson.dumps({"error": {"message": f"scripted {status}", "type": "server_error", "code": code}})
    return json_reply(body, status, headers)


def default_reply(sent: Sent) -> Reply:
    """What a healthy backend answers to the request it was sent (max_tokens decides the completion's length)."""
    request = sent.json
    completion = int(request.get("max_tokens") or 5)
    if sent.path.endswith("/embeddings"):
        inputs = request.get("input")
        count = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
        return json_reply(embeddings_body(count, int(request.get("dimensions") or 8)))
    if request.get("stream"):
        with_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        return Reply(200, {"content-type": "text/event-stream"}, pieces=sse_events(completion, with_usage=with_usage))
    if sent.path.endswith("/chat/completions"):
        return json_reply(chat_body(completion), headers={"x-ratelimit-remaining-tokens": "100000"})
    return json_reply(completion_body(completion))


def concat(parts: Iterable[bytes]) -> bytes:
    return b"".join(parts)
