"""Built-in tool calls are metered: counted from the answer's output items (whole, streamed, cut, or read later for a
background response), priced per call by the price table (on PTU backends too), and found in the usage rows, the
Tool Calls metric, the request log and the consumer's budget."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from shared.admin.usage_report import format_report, summarize
from shared.flow.usage import tool_calls
from shared.records.prices import PriceError, parse_prices
from shared.records.usage import TokenUsage, UsageRow, combined
from tests.fakes.gateway import GatewayHarness
from tests.fakes.upstream import Reply, json_reply

PRICES = {"currency": "USD", "deployments": {"gpt-4o": {"input": 0, "output": 0}},
          "tools": {"web_search": 0.01, "code_interpreter": 0.03, "file_search": 0.0025}}

SEARCH = {"type": "web_search_call", "status": "completed", "action": {"type": "search", "query": "q"}}
MESSAGE = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
           "content": [{"type": "output_text", "text": "hi", "annotations": []}]}


def output_with(*items: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**item, "id": item.get("id", f"{item['type']}_{i}")} for i, item in enumerate(items)]


def response(output: list[dict[str, Any]], status: str = "completed", **extra: Any) -> dict[str, Any]:
    return {"id": "resp_tools", "object": "response", "model": "gpt-4o-2024-11-20", "status": status, "store": True,
            "output": output, "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}, **extra}


def test_calls_are_counted_per_item_and_code_interpreter_per_container() -> None:
    output = output_with(
        SEARCH, SEARCH, MESSAGE,
        {"type": "code_interpreter_call", "container_id": "cntr_1"},
        {"type": "code_interpreter_call", "container_id": "cntr_1"},
        {"type": "code_interpreter_call", "container_id": "cntr_2"},
        {"type": "file_search_call", "queries": ["x"]},
        {"type": "image_generation_call"}, {"type": "mcp_call"}, {"type": "computer_call"},
        {"type": "function_call", "name": "f"},
    )
    assert dict(tool_calls(output)) == {"web_search": 2, "code_interpreter": 2, "file_search": 1,
                                        "image_generation": 1, "mcp": 1, "computer_use": 1}
    assert tool_calls("not a list") == () and tool_calls([{"type": 5}, None, "x"]) == ()
    both = combined(TokenUsage(1, 1, 2, tools=(("web_search", 2),)), TokenUsage(1, 1, 2, tools=(("mcp", 1), ("web_search", 1))))
    assert both is not None and both.tools == (("mcp", 1), ("web_search", 3))


def test_the_price_table_prices_tool_calls_on_every_backend() -> None:
    table = parse_prices(json.dumps(PRICES))
    usage = TokenUsage(0, 0, 0, tools=(("web_search", 3), ("code_interpreter", 1), ("mcp", 4)))
    assert table.cost("gpt-4o", ptu=False, usage=usage) == pytest.approx(0.06)
    assert table.cost("gpt-4o", ptu=True, usage=usage) == pytest.approx(0.06)  # a PTU pays for tokens, not tools
    assert table.cost("unpriced", ptu=False, usage=usage) == pytest.approx(0.06)
    for bad in ({"tools": {"web_search_preview": 1}}, {"tools": {"web_search": -1}}, {"tools": []}):
        with pytest.raises(PriceError, match="tools"):
            parse_prices(json.dumps(bad))


def test_usage_rows_and_the_report_carry_the_calls() -> None:
    row = UsageRow("team", "2026-12-05T10", "gpt-4o", "i").plus(TokenUsage(1, 1, 2, tools=(("web_search", 2),)))
    row = row.plus(TokenUsage(1, 1, 2, tools=(("web_search", 1), ("mcp", 1))))
    assert row.tools == (("mcp", 1), ("web_search", 3))
    report = format_report("today", summarize([row]))
    assert "tool_calls" in report and "mcp=1 web_search=3" in report


@pytest.fixture
async def priced() -> Any:
    harness = GatewayHarness(env={"GATEWAY_PRICES": json.dumps(PRICES)})
    yield harness
    await harness.close()


async def test_a_whole_answer_with_tool_calls_is_metered_everywhere(priced: GatewayHarness) -> None:
    key = priced.consumer("team", budget=100.0, capabilities=["web_search"])
    priced.upstream.script("uksouth-ptu", json_reply(orjson.dumps(response(output_with(SEARCH, SEARCH, MESSAGE)))))
    answer = await priced.openai(key).responses.create(model="gpt-4o", input="news?", tools=[{"type": "web_search_preview"}])
    assert answer.id == "resp_tools"
    record = priced.telemetry.requests[-1]
    assert record.usage is not None and record.usage.tools == (("web_search", 2),)
    (row,) = await priced.usage_rows("team")
    assert row.tools == (("web_search", 2),)
    assert priced.budgets.spent("team") == pytest.approx(0.02)  # on the PTU: the tool calls alone


def sse(kind: str, obj: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: ".encode() + orjson.dumps({"type": kind, **obj}) + b"\n\n"


async def test_a_stream_cut_after_a_tool_call_started_is_charged_for_it(priced: GatewayHarness) -> None:
    key = priced.consumer("team", budget=100.0, capabilities=["code_interpreter"])
    started = response([], status="in_progress", usage=None)
    call = {"type": "code_interpreter_call", "id": "ci_1", "container_id": "cntr_9", "status": "in_progress"}
    pieces = (sse("response.created", {"response": started}),
              sse("response.output_item.added", {"output_index": 0, "item": call}),
              sse("response.output_item.done", {"output_index": 0, "item": {**call, "status": "completed"}}))
    priced.upstream.script("uksouth-ptu", Reply(200, {"content-type": "text/event-stream"}, pieces=pieces, breaks_after=3))
    body = {"model": "gpt-4o", "input": "run it", "stream": True, "tools": [{"type": "code_interpreter",
                                                                              "container": {"type": "auto"}}]}
    reply = await priced.post("/v1/responses", key, body)
    assert b"stream_interrupted" in reply.content
    record = priced.telemetry.requests[-1]
    assert record.usage is not None and not record.usage.reported and record.usage.tools == (("code_interpreter", 1),)
    assert priced.budgets.spent("team") == pytest.approx(0.03)


async def test_a_completed_stream_counts_each_call_once(priced: GatewayHarness) -> None:
    key = priced.consumer("team", capabilities=["file_search"])
    call = {"type": "file_search_call", "id": "fs_1", "status": "completed", "queries": ["q"]}
    done = response(output_with(call, MESSAGE))
    pieces = (sse("response.created", {"response": response([], status="in_progress", usage=None)}),
              sse("response.output_item.added", {"output_index": 0, "item": call}),
              sse("response.output_item.done", {"output_index": 0, "item": call}),
              sse("response.completed", {"response": done}))
    priced.upstream.script("uksouth-ptu", Reply(200, {"content-type": "text/event-stream"}, pieces=pieces))
    body = {"model": "gpt-4o", "input": "find", "stream": True,
            "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}
    assert (await priced.post("/v1/responses", key, body)).status_code == 200
    assert priced.telemetry.requests[-1].usage.tools == (("file_search", 1),)  # type: ignore[union-attr]


async def test_a_background_response_read_finished_is_metered_with_its_calls(priced: GatewayHarness) -> None:
    key = priced.consumer("team", budget=100.0, capabilities=["web_search"])
    client = priced.openai(key)
    queued = response([], status="queued", usage=None, background=True)
    priced.upstream.script("uksouth-ptu", json_reply(orjson.dumps(queued)),
                           json_reply(orjson.dumps(response(output_with(SEARCH, MESSAGE), background=True))))
    await client.responses.create(model="gpt-4o", input="later", background=True, tools=[{"type": "web_search"}])
    await client.responses.retrieve("resp_tools")
    rows = await priced.usage_rows("team")
    assert [r.tools for r in rows] == [(("web_search", 1),)]
    assert priced.budgets.spent("team") == pytest.approx(0.01)


async def test_a_chat_completion_that_searched_the_web_is_charged_one_search(priced: GatewayHarness) -> None:
    key = priced.consumer("team", budget=100.0, capabilities=["web_search"])
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "news?"}], "web_search_options": {}}
    assert (await priced.post("/v1/chat/completions", key, body)).status_code == 200
    assert (await priced.post("/v1/chat/completions", key, {**body, "web_search_options": None} | {
        "messages": body["messages"]})).status_code == 200  # present, even null: the backend reads it as asked
    plain = {k: v for k, v in body.items() if k != "web_search_options"}
    assert (await priced.post("/v1/chat/completions", key, plain)).status_code == 200
    assert [r.usage.tools for r in priced.telemetry.requests] == [  # type: ignore[union-attr]
        (("web_search", 1),), (("web_search", 1),), ()]
    assert priced.budgets.spent("team") == pytest.approx(0.02)
