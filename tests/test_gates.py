"""Capabilities: built-in tools, file references, stored prompts and data sources reach a backend only for consumers
granted them (shared/flow/gates.py), whatever the spelling or nesting; and the admin CLI grants them."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.admin.cli import Admin, parser
from shared.edge.errors import GatewayError
from shared.flow.gates import check_capabilities
from shared.records.consumers import CAPABILITIES
from shared.storage.memory import MemoryConsumerStore
from tests.fakes.gateway import GatewayHarness

ALL = CAPABILITIES


def refused(body: dict[str, Any], granted: frozenset[str] = frozenset()) -> str | None:
    """The param of the 403, or None when the body passes."""
    try:
        check_capabilities(body, granted)
    except GatewayError as error:
        assert error.status == 403 and error.code == "capability_not_allowed"
        return error.param or ""
    return None


# (body, the capability that lets it through)
GATED: list[tuple[dict[str, Any], str]] = [
    ({"tools": [{"type": "web_search_preview"}]}, "web_search"),
    ({"tools": [{"type": "web_search"}]}, "web_search"),
    ({"tools": [{"type": "web_search_preview_2025_03_11"}]}, "web_search"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "file_search"),
    ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "code_interpreter"),
    ({"tools": [{"type": "image_generation"}]}, "image_generation"),
    ({"tools": [{"type": "computer_use_preview", "display_width": 1024}]}, "computer_use"),
    ({"tools": [{"type": "mcp", "server_label": "x", "server_url": "https://evil.example/mcp"}]}, "mcp"),
    ({"web_search_options": {}}, "web_search"),
    ({"data_sources": [{"type": "azure_search"}]}, "data_sources"),
    ({"prompt": {"id": "pmpt_123", "version": "2"}}, "prompts"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]}, "files"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "https://x.example/a.pdf"}]}]}, "files"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]}, "files"),
    ({"input": [{"type": "mcp_approval_response", "approve": True, "approval_request_id": "a"}]}, "mcp"),
    ({"input": [{"type": "computer_call_output", "call_id": "c", "output": {"type": "input_image"}}]}, "computer_use"),
]

# Hostile spellings and nestings: each must be refused without its capability.
HOSTILE: list[tuple[dict[str, Any], str]] = [
    ({"Tools": [{"type": "web_search_preview"}]}, "web_search"),
    ({"TOOLS": [{"Type": "WEB_SEARCH_PREVIEW"}]}, "web_search"),
    ({"tools": [{"type": "function", "name": "f"}, {"TYPE": "Web-Search-Preview"}]}, "web_search"),
    ({"tools": [{"type": "function", "Type": "mcp", "server_url": "https://evil.example"}]}, "mcp"),
    ({"tools": [], "Tools": [{"type": "code_interpreter"}]}, "code_interpreter"),
    ({"DATA_SOURCES": []}, "data_sources"),
    ({"DataSources": []}, "data_sources"),
    ({"data-sources": []}, "data_sources"),
    ({"Web_Search_Options": {}}, "web_search"),
    ({"Prompt": {"id": "pmpt_1"}}, "prompts"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "FILE_ID": "file-1"}]}]}, "files"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "File-Url": "https://x.example"}]}]}, "files"),
    # A file reference inside a function call's output parts, inside a message, inside a list.
    ({"input": [{"type": "function_call_output", "call_id": "c",
                 "output": [{"type": "input_text", "text": "t"}, {"type": "input_file", "file_id": "f"}]}]}, "files"),
    ({"input": [[{"role": "user", "content": [[{"type": "input_image", "file_id": "f"}]]}]]}, "files"),
    # In a stored prompt's variables (with the prompt capability granted, the files are still gated).
    ({"prompt": {"id": "p", "variables": {"doc": {"type": "input_file", "file_id": "f"}}}}, "files"),
    ({"input": [{"type": "MCP_Call", "server_label": "x"}]}, "mcp"),
    ({"input": [{"role": "user", "content": [{"type": "Web_Search_Call"}]}]}, "web_search"),
]


@pytest.mark.parametrize(("body", "capability"), GATED + HOSTILE)
def test_a_gated_feature_needs_its_capability_and_only_that(body: dict[str, Any], capability: str) -> None:
    assert refused(body) is not None
    assert refused(body, ALL - {capability}) is not None
    extra = frozenset({"prompts"}) if "prompt" in json.dumps(body).lower() else frozenset()
    assert refused(body, frozenset({capability}) | extra) is None


@pytest.mark.parametrize("body", [
    {"tools": [{"type": "a_tool_from_next_year"}]},
    {"tools": [{"type": 7}]},
    {"input": [{"type": "something_new", "x": 1}]},
    {"messages": [{"role": "user", "content": [{"type": "teleport"}]}]},
])
def test_what_the_gateway_does_not_know_is_refused_even_with_every_capability(body: dict[str, Any]) -> None:
    assert refused(body, ALL) is not None


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f",
     "parameters": {"type": "object", "properties": {"file_id": {"type": "string"}, "type": {"type": "mcp"}}}}}]},
    {"input": [{"role": "user", "content": [{"type": "input_text", "text": "file_id: tools mcp"},
                                            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                                            {"type": "input_file", "filename": "a.pdf", "file_data": "AAAA"}]},
               {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
               {"type": "function_call_output", "call_id": "c", "output": "ok"},
               {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "s"}],
                "encrypted_content": "gAAA"},
               {"type": "item_reference", "id": "msg_1"},
               {"role": "assistant", "content": [{"type": "output_text", "text": "x",
                                                  "annotations": [{"type": "file_citation", "file_id": "f"}]}]}],
     "text": {"format": {"type": "json_schema", "schema": {"properties": {"file_url": {"type": "string"}}}}},
     "tools": [{"type": "custom", "name": "c"}], "tool_choice": {"type": "web_search_preview"}},
    {"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                                         "function": {"name": "f", "arguments": "{}"}}]}],
     "prediction": {"type": "content", "content": "x"}, "response_format": {"type": "json_object"}},
    {"prompt": "completions take text here", "metadata": {"file_id": "mine", "type": "whatever"}},
])
def test_ordinary_requests_pass_without_any_capability(body: dict[str, Any]) -> None:
    assert refused(body) is None


AZURE_CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"


@pytest.mark.parametrize(("extra", "capability"), [
    ({"tools": [{"type": "web_search_preview"}]}, "web_search"),
    ({"Tools": [{"TYPE": "MCP", "server_label": "x", "server_url": "https://evil.example/mcp"}]}, "mcp"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-abc"}]}]}, "files"),
    ({"prompt": {"id": "pmpt_1"}}, "prompts"),
])
async def test_a_responses_feature_reaches_a_backend_only_for_a_consumer_granted_it(
    harness: GatewayHarness, extra: dict[str, Any], capability: str,
) -> None:
    plain = harness.consumer("plain")
    granted = harness.consumer("granted", capabilities=[capability])
    body = {"model": "gpt-4o", "input": "hi", **extra}
    answer = await harness.post("/v1/responses", plain, body)
    assert answer.status_code == 403, answer.text
    error = answer.json()["error"]
    assert error["code"] == "capability_not_allowed" and error["type"] == "permission_error"
    assert harness.upstream.sent == []
    passed = await harness.post("/v1/responses", granted, body)
    assert passed.status_code == 200 and len(harness.upstream.sent) == 1


async def test_the_sdk_sees_a_permission_error_for_a_built_in_tool(harness: GatewayHarness) -> None:
    import openai

    key = harness.consumer("plain")
    with pytest.raises(openai.PermissionDeniedError) as raised:
        await harness.openai(key).responses.create(model="gpt-4o", input="hi", tools=[{"type": "code_interpreter",
                                                                                         "container": {"type": "auto"}}])
    assert "code_interpreter" in str(raised.value)
    assert harness.upstream.sent == []


async def test_a_large_body_is_checked_too(harness: GatewayHarness) -> None:
    key = harness.consumer("plain")
    filler = [{"role": "user", "content": "word " * 2000} for _ in range(20)]  # ~200 KB: checked off the loop
    body = {"model": "gpt-4o", "input": [*filler, {"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}
    answer = await harness.post("/v1/responses", key, body)
    assert answer.status_code == 403 and harness.upstream.sent == []


async def test_the_admin_cli_grants_and_withdraws_each_capability() -> None:
    store = MemoryConsumerStore()
    out = io.StringIO()
    admin = Admin(store, out)  # type: ignore[arg-type]
    names = ",".join(sorted(CAPABILITIES))
    assert await admin.create(parser().parse_args(["consumers", "create", "team", "--all-deployments",
                                                   "--capabilities", names])) == 0
    (consumer,) = await store.list_consumers()
    assert consumer.capabilities == CAPABILITIES
    await admin.update(parser().parse_args(["consumers", "set", consumer.id, "--capabilities", "web_search,files"]))
    assert (await store.get(consumer.id)).capabilities == {"web_search", "files"}  # type: ignore[union-attr]
    with pytest.raises(SystemExit, match="unknown web_search_preview"):
        await admin.update(parser().parse_args(["consumers", "set", consumer.id, "--capabilities", "web_search_preview"]))

GATED_TOOLS = {"web_search_preview": "web_search", "file_search": "file_search", "code_interpreter": "code_interpreter",
               "image_generation": "image_generation", "computer_use_preview": "computer_use", "mcp": "mcp"}


@st.composite
def respelled(draw: st.DrawFn, name: str) -> str:
    """`name` as a lenient reader would still read it: any casing, '_' and '-' swapped, dropped or doubled."""
    out = []
    for ch in name:
        if ch == "_":
            out.append(draw(st.sampled_from(["_", "-", "", "__", "_-"])))
        else:
            out.append(ch.upper() if draw(st.booleans()) else ch)
    return "".join(out)


@given(data=st.data(), tool=st.sampled_from(sorted(GATED_TOOLS)), depth=st.integers(0, 3))
def test_any_spelling_of_a_gated_tool_or_field_is_refused_without_its_capability(
    data: st.DataObject, tool: str, depth: int,
) -> None:
    kind = data.draw(respelled(tool))
    tools_key = data.draw(respelled("tools"))
    type_key = data.draw(respelled("type"))
    body: dict[str, Any] = {tools_key: [{"type": "function", "name": "f"}, {type_key: kind}]}
    assert refused(body) is not None
    assert refused(body, frozenset({GATED_TOOLS[tool]})) is None
    # A file reference, nested `depth` lists deep in a message's content, under any spelling of file_id.
    part: Any = {"type": "input_file", data.draw(respelled("file_id")): "file-1"}
    for _ in range(depth):
        part = [part]
    content = {"input": [{"role": "user", "content": [part]}]}
    assert refused(content) is not None and refused(content, frozenset({"files"})) is None
