"""Bodies and stream events shaped like Azure OpenAI's (keys in Azure's alphabetical order)."""

from __future__ import annotations

import base64
import math
import struct
import time
import uuid
from functools import lru_cache
from typing import Any

import orjson

# Words that are one token each, with their leading space, in both o200k_base and cl100k_base (checked by the tests),
# so a completion of N words is exactly N completion tokens and anyone can count it again.
VOCABULARY = (
    " the", " quick", " brown", " fox", " jumps", " over", " lazy", " dog", " and", " then", " runs", " back", " to",
    " its", " home", " in", " a", " small", " town", " near", " river", " where", " people", " live", " happy",
    " with", " their", " friends", " every", " day", " is", " new", " story", " about", " light", " water", " sky",
    " green", " tree", " house", " door", " open", " time", " place", " world", " good", " great", " long", " road",
    " bright", " morning", " calm", " wind", " stone", " bridge", " city", " garden", " warm", " summer", " night",
)
_STRIDE = 7  # coprime with len(VOCABULARY): a completion walks the whole vocabulary before repeating
SYSTEM_FINGERPRINT = "fp_sim"

_SAFE = {"filtered": False, "severity": "safe"}
_UNDETECTED = {"filtered": False, "detected": False}
PROMPT_FILTER = orjson.Fragment(orjson.dumps([{"prompt_index": 0, "content_filter_results": {
    "hate": _SAFE, "jailbreak": _UNDETECTED, "self_harm": _SAFE, "sexual": _SAFE, "violence": _SAFE,
}}]))
CHOICE_FILTER = orjson.Fragment(orjson.dumps({
    "hate": _SAFE, "protected_material_code": _UNDETECTED, "protected_material_text": _UNDETECTED, "self_harm": _SAFE,
    "sexual": _SAFE, "violence": _SAFE,
}))
CHUNK_FILTER = orjson.Fragment(orjson.dumps({"hate": _SAFE, "self_harm": _SAFE, "sexual": _SAFE, "violence": _SAFE}))

MALFORMED_BODY = b'{"choices": [{"message": {"role": "assistant", "content": "'
MALFORMED_EVENT = b'data: {"choices":[{"delta":{"content":" the"\n\n'
DONE = b"data: [DONE]\n\n"


@lru_cache(maxsize=4096)
def completion_words(count: int, seed: int) -> tuple[str, ...]:
    size = len(VOCABULARY)
    return tuple(VOCABULARY[(seed + i * _STRIDE) % size] for i in range(count))


def usage(prompt: int, completion: int | None) -> dict[str, Any]:
    if completion is None:
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    return {
        "completion_tokens": completion,
        "completion_tokens_details": {
            "accepted_prediction_tokens": 0, "audio_tokens": 0, "reasoning_tokens": 0, "rejected_prediction_tokens": 0,
        },
        "prompt_tokens": prompt,
        "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
        "total_tokens": prompt + completion,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:29]}"


def chat_completion(model: str, text: str, completion: int, finish: str, prompt: int, choices: int = 1) -> bytes:
    return orjson.dumps({
        "choices": [{
            "content_filter_results": CHOICE_FILTER, "finish_reason": finish, "index": i, "logprobs": None,
            "message": {"annotations": [], "content": text, "refusal": None, "role": "assistant"},
        } for i in range(choices)],
        "created": int(time.time()),
        "id": new_id("chatcmpl"),
        "model": model,
        "object": "chat.completion",
        "prompt_filter_results": PROMPT_FILTER,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "usage": usage(prompt, completion),
    })


def text_completion(model: str, text: str, completion: int, finish: str, prompt: int, choices: int = 1) -> bytes:
    return orjson.dumps({
        "choices": [{
            "content_filter_results": CHOICE_FILTER, "finish_reason": finish, "index": i, "logprobs": None, "text": text,
        } for i in range(choices)],
        "created": int(time.time()),
        "id": new_id("cmpl"),
        "model": model,
        "object": "text_completion",
        "prompt_filter_results": PROMPT_FILTER,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "usage": usage(prompt, completion),
    })


@lru_cache(maxsize=512)
def embedding_vector(dimensions: int, index: int) -> tuple[orjson.Fragment, str]:
    """A deterministic unit vector, as JSON floats and as base64 of little-endian float32 (the SDK's default)."""
    raw = [math.sin((index + 1) * 12.9898 + i * 78.233) for i in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    values = [v / norm for v in raw]
    packed = struct.pack(f"<{dimensions}f", *values)
    floats = list(struct.unpack(f"<{dimensions}f", packed))  # the float32 values, so both formats agree exactly
    return orjson.Fragment(orjson.dumps(floats)), base64.b64encode(packed).decode()


def embeddings(model: str, count: int, dimensions: int, base64_format: bool, prompt: int) -> bytes:
    return orjson.dumps({
        "data": [
            {"embedding": embedding_vector(dimensions, i)[1 if base64_format else 0], "index": i, "object": "embedding"}
            for i in range(count)
        ],
        "model": model,
        "object": "list",
        "usage": usage(prompt, None),
    })


def event(body: Any) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


_WORD = "\x00word\x00"


class ChunkWriter:
    """The SSE events of one streamed chat or text completion.

    Content events are the hot path: each is a precomputed prefix and suffix around the word (vocabulary words need no
    JSON escaping).
    """

    def __init__(self, model: str, chat: bool, include_usage: bool) -> None:
        self.model = model
        self.chat = chat
        self.include_usage = include_usage
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"
        if chat:
            choice: dict[str, Any] = {
                "content_filter_results": CHUNK_FILTER, "delta": {"content": _WORD}, "finish_reason": None, "index": 0,
                "logprobs": None,
            }
        else:
            choice = {"content_filter_results": CHUNK_FILTER, "finish_reason": None, "index": 0, "logprobs": None, "text": _WORD}
        prefix, suffix = self._event(choice).split(orjson.dumps(_WORD)[1:-1])
        self._prefix, self._suffix = prefix, suffix
        self._suffixes: dict[int, bytes] = {}

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "choices": choices, "created": self.created, "id": self.id, "model": self.model, "object": self.object,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if self.include_usage:
            body["usage"] = None
        body.update(extra)
        return body

    def _event(self, choice: dict[str, Any]) -> bytes:
        return event(self._chunk([choice]))

    def prelude(self) -> bytes:
        """Azure's first event carries only the prompt filter results; a chat stream then announces the role."""
        events = event({
            "choices": [], "created": 0, "id": "", "model": "", "object": "", "prompt_filter_results": PROMPT_FILTER,
        })
        if self.chat:
            events += self._event({
                "content_filter_results": {}, "delta": {"content": "", "refusal": None, "role": "assistant"},
                "finish_reason": None, "index": 0, "logprobs": None,
            })
        return events

    def word(self, word: str, index: int = 0) -> bytes:
        if index == 0:
            return self._prefix + word.encode() + self._suffix
        suffix = self._suffixes.get(index)
        if suffix is None:
            suffix = self._suffixes[index] = self._suffix.replace(b'"index":0', b'"index":%d' % index, 1)
        return self._prefix + word.encode() + suffix

    def finish(self, reason: str, choices: int = 1) -> bytes:
        if self.chat:
            return b"".join(self._event({"content_filter_results": {}, "delta": {}, "finish_reason": reason, "index": i,
                                         "logprobs": None}) for i in range(choices))
        return b"".join(self._event({"content_filter_results": {}, "finish_reason": reason, "index": i, "logprobs": None,
                                     "text": ""}) for i in range(choices))

    def usage(self, prompt: int, completion: int) -> bytes:
        return event(self._chunk([], usage=usage(prompt, completion)))
