"""An answer in both of its forms: a whole JSON answer is what the cache keeps; a streamed answer is assembled into
one on its way to the client (chat and completions), and a cached answer is replayed as a stream when a streamed
request hits it: one chunk per choice with its whole content, one with its finish reason, the usage chunk when the
client asked for it, `[DONE]`.

What the cache keeps must be an answer the backend gave in full: not one a content filter stopped or annotated as
filtered, and not a stream with parts the assembly does not rebuild (log probabilities, audio): those are not kept.
"""

from __future__ import annotations

from typing import Any

import orjson

from shared.flow import sse

CHAT_DELTA_FIELDS = frozenset({"role", "content", "refusal", "tool_calls"})


def _filtered(results: Any) -> bool:
    return isinstance(results, dict) and any(isinstance(v, dict) and v.get("filtered") is True for v in results.values())


def complete_answer(obj: Any) -> bool:
    """A whole answer the backend gave in full: no content filter stopped or flagged it, no Responses call left
    incomplete."""
    if not isinstance(obj, dict):
        return False
    if "status" in obj and obj.get("object") == "response" and obj.get("status") != "completed":
        return False
    for prompt in obj.get("prompt_filter_results") or ():
        if isinstance(prompt, dict) and _filtered(prompt.get("content_filter_results")):
            return False
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict) or choice.get("finish_reason") == "content_filter":
            return False
        if _filtered(choice.get("content_filter_results")):
            return False
    return True


class StreamAssembler:
    """Builds the whole answer of a chat or completions stream from its events, within `limit` bytes of events."""

    def __init__(self, limit: int) -> None:
        self._framer = sse.Framer()
        self._limit = limit
        self._seen = 0
        self._head: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._usage: Any = None
        self._prompt_filters: list[Any] = []
        self._chat = False
        self.broken = False  # something the assembly does not rebuild, or too large: nothing to keep
        self.done = False

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        self._seen += len(data)
        if self._seen > self._limit:
            self.broken = True
            return
        for event in self._framer.feed(data):
            if sse.event_data(event) == b"[DONE]":
                self.done = True
                continue
            obj = sse.event_object(event)
            if obj is None:
                continue
            self._take(obj)
            if self.broken:
                return

    def _take(self, obj: dict[str, Any]) -> None:
        for name in ("id", "object", "created", "model", "system_fingerprint", "service_tier"):
            # Azure's first event (the prompt filter results) has every one of these empty: not the answer's.
            if obj.get(name) not in (None, "", 0):
                self._head.setdefault(name, obj[name])
        if obj.get("usage") is not None:
            self._usage = obj["usage"]
        self._prompt_filters.extend(obj.get("prompt_filter_results") or ())
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict) or not isinstance(choice.get("index", 0), int):
                self.broken = True
                return
            if choice.get("logprobs") is not None or _filtered(choice.get("content_filter_results")):
                self.broken = True
                return
            index = choice.get("index", 0)
            into = self._choices.setdefault(index, {"index": index, "text": [], "content": [], "refusal": [],
                                                    "tools": {}, "role": None, "finish_reason": None})
            if "delta" in choice:
                self._chat = True
            if choice.get("finish_reason") is not None:
                into["finish_reason"] = choice["finish_reason"]
            if isinstance(choice.get("text"), str):
                into["text"].append(choice["text"])
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._take_delta(into, delta)

    def _take_delta(self, into: dict[str, Any], delta: dict[str, Any]) -> None:
        if set(k for k, v in delta.items() if v is not None) - CHAT_DELTA_FIELDS:
            self.broken = True
            return
        if isinstance(delta.get("role"), str):
            into["role"] = delta["role"]
        for name in ("content", "refusal"):
            if isinstance(delta.get(name), str):
                into[name].append(delta[name])
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, dict) or not isinstance(call.get("index"), int):
                self.broken = True
                return
            tool = into["tools"].setdefault(call["index"], {"id": None, "type": "function", "name": [], "arguments": []})
            if call.get("id"):
                tool["id"] = call["id"]
            if call.get("type"):
                tool["type"] = call["type"]
            function = call.get("function") or {}
            if isinstance(function.get("name"), str):
                tool["name"].append(function["name"])
            if isinstance(function.get("arguments"), str):
                tool["arguments"].append(function["arguments"])

    def answer(self) -> bytes | None:
        """The whole answer as JSON, or None when the stream cannot be kept (broken off, filtered, not rebuilt)."""
        if self.broken or not self.done or self._usage is None or not self._choices:
            return None
        chat = self._chat
        choices = []
        for index in sorted(self._choices):
            part = self._choices[index]
            if part["finish_reason"] in (None, "content_filter"):
                return None
            if chat:
                message: dict[str, Any] = {"role": part["role"] or "assistant", "content": "".join(part["content"]) or None}
                if part["refusal"]:
                    message["refusal"] = "".join(part["refusal"])
                if part["tools"]:
                    message["tool_calls"] = [
                        {"id": t["id"], "type": t["type"], "function": {"name": "".join(t["name"]),
                                                                         "arguments": "".join(t["arguments"])}}
                        for _, t in sorted(part["tools"].items())
                    ]
                choices.append({"index": index, "message": message, "finish_reason": part["finish_reason"],
                                "logprobs": None})
            else:
                choices.append({"index": index, "text": "".join(part["text"]), "finish_reason": part["finish_reason"],
                                "logprobs": None})
        whole: dict[str, Any] = {**self._head, "object": "chat.completion" if chat else "text_completion",
                                 "choices": choices, "usage": self._usage}
        if self._prompt_filters:
            whole["prompt_filter_results"] = self._prompt_filters
        return orjson.dumps(whole)


def _event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def as_events(body: bytes, include_usage: bool) -> bytes:
    """A whole chat or completions answer as the stream a backend would have sent for it."""
    whole = orjson.loads(body)
    chat = whole.get("object") == "chat.completion"
    head = {k: whole[k] for k in ("id", "created", "model", "system_fingerprint") if k in whole}
    head["object"] = "chat.completion.chunk" if chat else "text_completion"
    events: list[bytes] = []
    if whole.get("prompt_filter_results"):
        events.append(_event({**head, "choices": [], "prompt_filter_results": whole["prompt_filter_results"]}))
    choices = whole.get("choices") or []
    for choice in choices:
        if chat:
            message = choice.get("message") or {}
            delta: dict[str, Any] = {"role": message.get("role", "assistant"), "content": message.get("content")}
            if message.get("refusal") is not None:
                delta["refusal"] = message["refusal"]
            if message.get("tool_calls"):
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            part: dict[str, Any] = {"index": choice.get("index", 0), "delta": delta, "finish_reason": None,
                                    "logprobs": None}
        else:
            part = {"index": choice.get("index", 0), "text": choice.get("text", ""), "finish_reason": None,
                    "logprobs": None}
        events.append(_event({**head, "choices": [part]}))
    for choice in choices:
        end: dict[str, Any] = {"index": choice.get("index", 0), "finish_reason": choice.get("finish_reason"),
                               "logprobs": None}
        if chat:
            end["delta"] = {}
        else:
            end["text"] = ""
        events.append(_event({**head, "choices": [end]}))
    if include_usage and whole.get("usage") is not None:
        events.append(_event({**head, "choices": [], "usage": whole["usage"]}))
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)
