"""Bodies and stream chunks shaped like Azure OpenAI's."""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any

import orjson

# Words that are one token each, with their leading space, in both o200k_base and cl100k_base (checked by the tests),
# so a completion of N words is exactly N completion tokens and can be counted again by anyone.
VOCABULARY = (
    " the", " quick", " brown", " fox", " jumps", " over", " lazy", " dog", " and", " then", " runs", " back", " to",
    " its", " home", " in", " a", " small", " town", " near", " river", " where", " people", " live", " happy",
    " with", " their", " friends", " every", " day", " is", " new", " story", " about", " light", " water", " sky",
    " green", " tree", " house", " door", " open", " time", " place", " world", " good", " great", " long", " road",
)

FILTER_OK = {
    "hate": {"filtered": False, "severity": "safe"},
    "self_harm": {"filtered": False, "severity": "safe"},
    "sexual": {"filtered": False, "severity": "safe"},
    "violence": {"filtered": False, "severity": "safe"},
}


def completion_words(count: int, seed: int) -> list[str]:
    return [VOCABULARY[(seed + i * 7) % len(VOCABULARY)] for i in range(count)]


def usage(prompt: int, completion: int | None) -> dict[str, Any]:
    if completion is None:
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
        "completion_tokens_details": {
            "accepted_prediction_tokens": 0, "audio_tokens": 0, "reasoning_tokens": 0, "rejected_prediction_tokens": 0,
        },
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_completion(model: str, words: list[str], finish: str, prompt: int) -> bytes:
    return orjson.dumps({
        "choices": [{
            "content_filter_results": FILTER_OK, "finish_reason": finish, "index": 0, "logprobs": None,
            "message": {"content": "".join(words), "refusal": None, "role": "assistant"},
        }],
        "created": int(time.time()),
        "id": new_id("chatcmpl"),
        "model": model,
        "object": "chat.completion",
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": FILTER_OK}],
        "system_fingerprint": "fp_sim",
        "usage": usage(prompt, len(words)),
    })


def text_completion(model: str, words: list[str], finish: str, prompt: int) -> bytes:
    return orjson.dumps({
        "choices": [{"finish_reason": finish, "index": 0, "logprobs": None, "text": "".join(words)}],
        "created": int(time.time()),
        "id": new_id("cmpl"),
        "model": model,
        "object": "text_completion",
        "usage": usage(prompt, len(words)),
    })


def embedding_vector(dimensions: int, index: int, base64_format: bool) -> Any:
    values = [((index + 1) * (i + 1) % 97) / 97.0 - 0.5 for i in range(dimensions)]
    if base64_format:
        return base64.b64encode(struct.pack(f"<{dimensions}f", *values)).decode()
    return values


def embeddings(model: str, count: int, dimensions: int, base64_format: bool, prompt: int) -> bytes:
    return orjson.dumps({
        "data": [
            {"embedding": embedding_vector(dimensions, i, base64_format), "index": i, "object": "embedding"}
            for i in range(count)
        ],
        "model": model,
        "object": "list",
        "usage": usage(prompt, None),
    })


class ChunkWriter:
    """The SSE events of one streamed chat or text completion."""

    def __init__(self, model: str, chat: bool, include_usage: bool) -> None:
        self.model = model
        self.chat = chat
        self.include_usage = include_usage
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _event(self, body: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        body: dict[str, Any] = {
            "choices": [choice], "created": self.created, "id": self.id, "model": self.model,
            "object": "chat.completion.chunk" if self.chat else "text_completion", "system_fingerprint": "fp_sim",
        }
        if self.include_usage:
            body["usage"] = None
        return self._event(body)

    def prelude(self) -> list[bytes]:
        events = [self._event({
            "choices": [], "created": 0, "id": "", "model": "", "object": "",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": FILTER_OK}],
        })]
        if self.chat:
            events.append(self._chunk({
                "content_filter_results": {}, "delta": {"content": "", "refusal": None, "role": "assistant"},
                "finish_reason": None, "index": 0, "logprobs": None,
            }))
        return events

    def word(self, word: str) -> bytes:
        if self.chat:
            return self._chunk({
                "content_filter_results": FILTER_OK, "delta": {"content": word}, "finish_reason": None, "index": 0,
                "logprobs": None,
            })
        return self._chunk({"finish_reason": None, "index": 0, "logprobs": None, "text": word})

    def finish(self, reason: str) -> bytes:
        if self.chat:
            return self._chunk({"content_filter_results": {}, "delta": {}, "finish_reason": reason, "index": 0, "logprobs": None})
        return self._chunk({"finish_reason": reason, "index": 0, "logprobs": None, "text": ""})

    def usage(self, prompt: int, completion: int) -> bytes:
        return self._event({
            "choices": [], "created": self.created, "id": self.id, "model": self.model,
            "object": "chat.completion.chunk" if self.chat else "text_completion", "system_fingerprint": "fp_sim",
            "usage": usage(prompt, completion),
        })


DONE = b"data: [DONE]\n\n"
