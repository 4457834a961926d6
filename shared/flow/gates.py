"""Request features that make a backend act, or spend, beyond answering: allowed only by the consumer's capabilities.

Pure: a parsed body and the granted capabilities in, a 403 or nothing out. An allow-list: a built-in tool, an input
item or a body field the gateway does not know is refused like a gated one it does know, so a feature the service adds
later reaches no backend until this table names it. Names are compared the way a lenient deserializer might read them
(case and '_'/'-' ignored: `Tools`, `DATA_SOURCES`, `dataSources`, `File_Id` are all the same field), and the input is
walked to any depth, since content parts nest in tool outputs and stored-prompt variables.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from shared.edge.errors import GatewayError, echoed
from shared.records.consumers import (
    CODE_INTERPRETER,
    COMPUTER_USE,
    DATA_SOURCES,
    FILE_SEARCH,
    FILES,
    IMAGE_GENERATION,
    MCP,
    PROMPTS,
    WEB_SEARCH,
)

TOOL_CAPABILITIES = (WEB_SEARCH, FILE_SEARCH, CODE_INTERPRETER, IMAGE_GENERATION, COMPUTER_USE, MCP)


_NORMS: dict[str, str] = {}
_NORMS_MAX = 4096  # names come from clients: the memo is bounded (cleared when full)


def norm(name: str) -> str:
    """A field or type name as a lenient reader sees it."""
    normed = _NORMS.get(name)
    if normed is None:
        normed = name.lower().replace("_", "").replace("-", "")
        if len(name) <= 64:
            if len(_NORMS) >= _NORMS_MAX:
                _NORMS.clear()
            _NORMS[name] = normed
    return normed


# Tool types any consumer may declare: the model only asks, the caller runs them.
_FREE_TOOLS = frozenset(norm(t) for t in ("function", "custom", "local_shell", "shell", "apply_patch"))
# Built-in tool types (by prefix: dated variants such as web_search_preview_2025_03_11) and their capability.
_TOOL_PREFIXES = (
    ("websearch", WEB_SEARCH),
    ("filesearch", FILE_SEARCH),
    ("codeinterpreter", CODE_INTERPRETER),
    ("imagegeneration", IMAGE_GENERATION),
    ("computeruse", COMPUTER_USE),
    ("computer", COMPUTER_USE),
    ("mcp", MCP),
)
# Top-level body fields and their capability.
_FIELDS = {
    norm("data_sources"): DATA_SOURCES,
    norm("web_search_options"): WEB_SEARCH,
}
# Keys, anywhere in the content, that make the backend read a stored or remote file.
_FILE_KEYS = frozenset(norm(k) for k in ("file_id", "file_url", "vector_store_ids"))
# Keys whose values are JSON schemas (property names there are the caller's own words, not fields the backend reads).
# Annotations and log probabilities of output passed back are records of what happened, not requests.
_SKIPPED_KEYS = frozenset(norm(k) for k in (
    "parameters", "schema", "properties", "$defs", "definitions", "json_schema", "annotations", "logprobs",
))
# Input item types any consumer may send back, and the tool-call items that need their tool's capability.
_FREE_ITEMS = frozenset(norm(t) for t in (
    "message", "function_call", "function_call_output", "custom_tool_call", "custom_tool_call_output", "reasoning",
    "item_reference", "function", "custom", "local_shell_call", "local_shell_call_output", "shell_call", "shell_call_output",
    "apply_patch_call", "apply_patch_call_output",
    # content parts (the walk meets them as typed objects too)
    "input_text", "output_text", "text", "refusal", "input_image", "image_url", "input_audio", "summary_text",
    "reasoning_text", "input_file", "file", "output_audio", "audio",
    "content",  # chat's predicted output

))
_ITEM_PREFIXES = (
    ("websearchcall", WEB_SEARCH),
    ("filesearchcall", FILE_SEARCH),
    ("codeinterpretercall", CODE_INTERPRETER),
    ("imagegenerationcall", IMAGE_GENERATION),
    ("computercall", COMPUTER_USE),
    ("mcp", MCP),
)


# Top-level members that are not content: the tool declarations (checked above), schemas, the caller's metadata, and
# the gated fields (refused above unless granted; their own nested types are the feature's business).
_NOT_CONTENT = frozenset(norm(k) for k in ("tools", "tool_choice", "text", "response_format", "metadata")) | frozenset(_FIELDS)


def _refuse(message: str, param: str) -> GatewayError:
    return GatewayError(403, message, type="permission_error", code="capability_not_allowed", param=param)


def tool_capability(kind: str) -> str | None:
    """The capability a tool type needs; None for the free ones; '' for a type the gateway does not know."""
    key = norm(kind)
    if key in _FREE_TOOLS:
        return None
    for prefix, capability in _TOOL_PREFIXES:
        if key.startswith(prefix):
            return capability
    return ""


def _item_capability(kind: str) -> str | None:
    key = norm(kind)
    if key in _FREE_ITEMS:
        return None
    for prefix, capability in _ITEM_PREFIXES:
        if key.startswith(prefix):
            return capability
    return ""


def _members(obj: Mapping[str, Any], name: str) -> Iterator[tuple[str, Any]]:
    """Every member of `obj` a lenient reader would take for `name`, with its spelling."""
    for key, value in obj.items():
        if isinstance(key, str) and norm(key) == name:
            yield key, value


def _types(obj: Mapping[str, Any]) -> list[str]:
    """Every value a lenient reader would take for the object's `type` ("" for one that is not a string)."""
    return [value if isinstance(value, str) else "" for key, value in obj.items()
            if isinstance(key, str) and norm(key) == "type"]


def check_capabilities(body: Mapping[str, Any], granted: frozenset[str]) -> None:
    """403 capability_not_allowed for the first feature the body uses that `granted` does not include."""
    for key in body:
        if not isinstance(key, str):
            continue
        capability = _FIELDS.get(norm(key))
        if capability is not None and capability not in granted:
            raise _refuse(f"The '{key}' field is not enabled for this key.", key)
        if norm(key) == "prompt" and isinstance(body[key], Mapping) and PROMPTS not in granted:
            # Responses: a stored prompt template ({id, version, variables}); the completions API's prompt is text.
            raise _refuse(f"Stored prompts ('{key}') are not enabled for this key.", key)
    for key, tools in _members(body, "tools"):
        for i, tool in enumerate(tools if isinstance(tools, list) else ()):
            if not isinstance(tool, Mapping):
                continue
            for kind in _types(tool):
                capability = tool_capability(kind)
                if capability is None:
                    continue
                if capability == "":
                    raise _refuse(f"The tool type '{echoed(kind)}' is not known to this gateway.", f"{key}[{i}].type")
                if capability not in granted:
                    raise _refuse(f"The '{echoed(kind)}' tool is not enabled for this key.", f"{key}[{i}].type")
    _walk_content(body, granted)


def _walk_content(body: Mapping[str, Any], granted: frozenset[str]) -> None:
    """Input items and content parts at any depth (messages, input, tool outputs, prompt variables): their types and
    the file references they carry. Iterative: the body is depth-bounded already, but a stack needs no recursion.
    A node's place in the body (for the refusal's `param`) is kept as (parent, key) and spelt out only on refusal."""
    stack: list[tuple[Any, Any]] = [
        (value, key) for key, value in body.items()
        if isinstance(key, str) and norm(key) not in _NOT_CONTENT and isinstance(value, (list, dict, Mapping))
    ]
    while stack:
        node, where = stack.pop()
        if type(node) is list:
            stack.extend((value, (where, i)) for i, value in enumerate(node)
                         if type(value) is dict or isinstance(value, (list, Mapping)))
            continue
        if type(node) is not dict and not isinstance(node, Mapping):
            continue
        tool_call = False
        for kind in _types(node):
            capability = _item_capability(kind)
            if capability == "":
                raise _refuse(f"The item type '{echoed(kind)}' is not known to this gateway.", f"{_place(where)}.type")
            if capability is not None and capability not in granted:
                raise _refuse(f"'{echoed(kind)}' items are not enabled for this key.", f"{_place(where)}.type")
            tool_call = tool_call or capability is not None
        if tool_call:
            continue  # a granted tool's own record (its actions, results, outputs) is the tool's business
        for key, value in node.items():
            if not isinstance(key, str):
                continue
            name = norm(key)
            if name in _FILE_KEYS and value is not None and FILES not in granted:
                raise _refuse(f"References to stored or remote files ('{key}') are not enabled for this key.",
                              f"{_place(where)}.{key}")
            if name in _SKIPPED_KEYS:
                continue
            if type(value) is dict or type(value) is list or isinstance(value, (list, Mapping)):
                stack.append((value, (where, key)))


def _place(where: Any) -> str:
    """`messages[2].content[0]` from the chain ((("messages", ), 2), "content"), 0) the walk keeps."""
    parts: list[str] = []
    while isinstance(where, tuple):
        where, step = where
        parts.append(f"[{step}]" if isinstance(step, int) else f".{step}")
    parts.append(str(where))
    return "".join(reversed(parts))
