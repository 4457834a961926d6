"""The edge's security rules against running gateways: Azurite behind the counting TCP proxy, simulated regions, real
HTTP, the official openai SDK as the client."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import unique
from tests.e2e import Stack, gateway_env, wait_for
from tools import stack

pytestmark = pytest.mark.e2e
MESSAGES = [{"role": "user", "content": "hi"}]


def v1(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


async def spray(url: str, count: int, concurrency: int = 16, forwarded: bool = True) -> list[int]:
    """`count` distinct made-up keys, each from its own (forwarded) address; the statuses in order."""
    statuses: list[int] = []
    queue = iter(range(count))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in queue:
            headers = {"api-key": f"gw-bogus-{i:08d}-{unique('k')}"}
            if forwarded:
                headers["x-forwarded-for"] = f"198.18.{i // 250 % 250}.{i % 250}"
            response = await client.post("/v1/chat/completions", headers=headers, json={"model": "gpt-4o", "messages": MESSAGES})
            statuses.append(response.status_code)

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return statuses


def test_a_key_spray_costs_the_store_at_most_the_lookup_budget(e2e: Stack, log_dir: Path) -> None:
    proxy, control = stack.start_tcpproxy(e2e.table_port, log_dir, name=unique("tcpproxy"))
    env = gateway_env(proxy.port, [s.region for s in e2e.simulators], {
        # The defaults, and every request from its own address (as a spray from many machines would be).
        "GATEWAY_CONSUMER_REFRESH_S": "5", "GATEWAY_UNKNOWN_KEY_LOOKUPS_PER_S": "2",
        "GATEWAY_AUTH_FAILURES_PER_MINUTE": "20", "GATEWAY_FORWARDED_HOPS": "1",
    })
    local = Stack(table_port=proxy.port, simulators=e2e.simulators, env=env)
    key = local.create_consumer(unique("steady"))
    e2e.keys.append(key)
    gateway = stack.start_gateway(env, log_dir=log_dir, name=unique("gateway-spray"))
    try:
        assert v1(gateway.url, key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=1)
        stack.proxy_control(control, "reset")
        started = time.monotonic()
        statuses = asyncio.run(spray(gateway.url, 1500))
        elapsed = time.monotonic() - started
        consumers_table = stack.proxy_control(control, "stats")["requests"].get("gatewayconsumers", 0)
        assert set(statuses) == {401}
        # Budget: 2 lookups/s (+ a burst of 2), a change-marker read a second, and the full reload every 5 s (a marker
        # read and a listing); 1,500 keys did not make 1,500 reads.
        bound = 2 * elapsed + 2 + (elapsed + 2) + 2 * (elapsed / 5 + 2)
        assert consumers_table <= bound, (consumers_table, elapsed)
        # A key created now works at the next lookup the budget allows (or the next marker check), spray or not.
        fresh = local.create_consumer(unique("fresh"))
        e2e.keys.append(fresh)
        wait_for(lambda: _works(gateway.url, fresh), 10)
    finally:
        gateway.stop()
        proxy.stop()


def _works(url: str, key: str) -> bool:
    return httpx.get(url + "/v1/models", headers={"api-key": key}).status_code == 200


def test_failed_authentications_from_one_address_are_throttled(e2e: Stack, gateway_factory: Callable[..., stack.Child]) -> None:
    gateway = gateway_factory({"GATEWAY_AUTH_FAILURES_PER_MINUTE": "20", "GATEWAY_UNKNOWN_KEY_LOOKUPS_PER_S": "2"})
    key = e2e.create_consumer(unique("neighbour"))
    statuses = asyncio.run(spray(gateway.url, 40, concurrency=1, forwarded=False))
    assert statuses[:20] == [401] * 20 and set(statuses[20:]) == {429}
    throttled = httpx.get(gateway.url + "/v1/models", headers={"api-key": "gw-another-guess"})
    assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1
    assert throttled.json()["error"]["code"] == "too_many_failed_authentications"
    wait_for(lambda: _works(gateway.url, key), 5)  # a valid key from the same address still works


def test_a_disabled_key_is_answered_exactly_like_a_made_up_one(e2e: Stack) -> None:
    disabled = e2e.create_consumer(unique("off"), enabled=False)
    answers = []
    for key in (disabled, "gw-" + "A" * 43):
        with pytest.raises(openai.AuthenticationError) as caught:
            v1(e2e.url, key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
        response = caught.value.response
        answers.append((response.status_code, response.json(), response.headers.get("www-authenticate")))
    assert answers[0] == answers[1]
    assert answers[0][1]["error"]["message"] == "The API key is not valid."


def test_the_key_is_checked_before_the_body_is_read(e2e: Stack) -> None:
    host, port = e2e.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # A large body announced and never sent: a gateway that read it first would wait for it (and time out here).
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
                     b"api-key: gw-made-up\r\ncontent-length: 200000\r\n\r\n")
        data = sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 401"), data[:100]


def test_health_is_public_only_as_a_yes_or_no(e2e: Stack) -> None:
    public = httpx.get(e2e.url + "/health")
    assert public.status_code == 200 and public.json() == {"status": "ok"}
    for headers in ({}, {"api-key": e2e.create_consumer(unique("not-admin"))}, {"api-key": stack.ADMIN_KEY + "x"}):
        refused = httpx.get(e2e.url + "/health/details", headers=headers)
        assert refused.status_code == 401 and "uksouth" not in refused.text
    details = httpx.get(e2e.url + "/health/details", headers=stack.ADMIN_HEADERS)
    assert details.status_code == 200 and {b["region"] for b in details.json()["backends"]} >= {"uksouth"}


def test_data_sources_reach_a_backend_only_for_consumers_allowed_them(e2e: Stack) -> None:
    data_sources = [{"type": "azure_search", "parameters": {"endpoint": "https://search.example", "index_name": "x"}}]
    plain = e2e.create_consumer(unique("plain"))
    granted = e2e.create_consumer(unique("rag"), capabilities=["data_sources"])
    client = openai.AzureOpenAI(azure_endpoint=e2e.url, api_key=plain, api_version="2024-10-21", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=1, extra_body={"data_sources": data_sources})
    assert caught.value.code == "capability_not_allowed"
    allowed = openai.AzureOpenAI(azure_endpoint=e2e.url, api_key=granted, api_version="2024-10-21", max_retries=0)
    allowed.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=1, extra_body={"data_sources": data_sources})
    sent = [json.dumps(r) for sim in e2e.simulators for r in sim.requests(50)]
    assert sum("search.example" in r for r in sent) == 1


@pytest.mark.parametrize(("tool", "capability"), [
    ({"type": "mcp", "server_label": "x", "server_url": "https://mcp.evil.example/sse"}, "mcp"),
    ({"type": "Web_Search_Preview"}, "web_search"),
    ({"type": "file_search", "vector_store_ids": ["vs_evil_example"]}, "file_search"),
])
def test_built_in_tools_reach_a_backend_only_for_consumers_allowed_them(
    e2e: Stack, tool: dict[str, object], capability: str
) -> None:
    plain = e2e.create_consumer(unique("plain"))
    granted = e2e.create_consumer(unique("tools"), capabilities=[capability])
    body = {"model": "gpt-4o", "input": "hi", "max_output_tokens": 5, "tools": [tool]}
    refused = httpx.post(f"{e2e.url}/v1/responses", json=body, headers={"api-key": plain}, timeout=30)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "capability_not_allowed"
    allowed = httpx.post(f"{e2e.url}/v1/responses", json=body, headers={"api-key": granted}, timeout=30)
    assert allowed.status_code == 200
    sent = [r["body"] for sim in e2e.simulators for r in sim.requests(50) if isinstance(r.get("body"), dict)]
    assert sum(tool in (b.get("tools") or []) for b in sent) == 1  # the granted consumer's only


def test_a_backend_over_plain_http_with_a_key_stops_the_start_up(e2e: Stack, log_dir: Path) -> None:
    backends = json.loads(stack.backends_setting([e2e.simulators[0].region]))
    del backends[0]["allow_insecure_http"]
    env = gateway_env(e2e.table_port, [], {"GATEWAY_BACKENDS": json.dumps(backends)})
    with pytest.raises(RuntimeError):
        stack.start_gateway(env, log_dir=log_dir, name=unique("gateway-insecure"))


def test_a_flood_of_stored_response_reads_costs_the_responses_table_at_most_the_read_rate(e2e: Stack, log_dir: Path) -> None:
    """GET / DELETE / cancel of response ids and continuations of them, as fast as one consumer can send them: no
    admission charges these, so GATEWAY_RESPONSE_READS_PER_S (per consumer and instance) is what bounds the reads."""
    proxy, control = stack.start_tcpproxy(e2e.table_port, log_dir, name=unique("tcpproxy"))
    env = gateway_env(proxy.port, [s.region for s in e2e.simulators], {"GATEWAY_RESPONSE_READS_PER_S": "5"})
    local = Stack(table_port=proxy.port, simulators=e2e.simulators, env=env)
    key, other = local.create_consumer(unique("reader")), local.create_consumer(unique("bystander"))
    e2e.keys.extend([key, other])
    gateway = stack.start_gateway(env, log_dir=log_dir, name=unique("gateway-reads"))

    async def flood(count: int) -> list[int]:
        async with httpx.AsyncClient(base_url=gateway.url, headers={"api-key": key}, timeout=30) as client:
            async def one(i: int) -> int:
                rid = f"resp_{unique('x')}"
                match i % 4:
                    case 0:
                        return (await client.get(f"/v1/responses/{rid}")).status_code
                    case 1:
                        return (await client.delete(f"/v1/responses/{rid}")).status_code
                    case 2:
                        return (await client.post(f"/v1/responses/{rid}/cancel")).status_code
                    case _:
                        return (await client.post("/v1/responses", json={
                            "model": "gpt-4o", "input": "Go on.", "previous_response_id": rid})).status_code

            statuses: list[int] = []
            for start in range(0, count, 50):  # 50 at a time, bounded in count
                statuses += await asyncio.gather(*(one(i) for i in range(start, min(count, start + 50))))
            return statuses

    try:
        assert _works(gateway.url, key)
        stack.proxy_control(control, "reset")
        started = time.monotonic()
        statuses = asyncio.run(flood(600))
        elapsed = time.monotonic() - started
        reads = stack.proxy_control(control, "stats")["requests"].get("gatewayresponses", 0)
        assert set(statuses) <= {400, 404, 429} and statuses.count(429) >= 600 - (5 * elapsed + 10)
        # The burst (twice the rate) and the rate for the time the flood took; 600 requests did not make 600 reads.
        assert reads <= 5 * elapsed + 10, (reads, elapsed)
        # The limit is the flooding consumer's only.
        answer = httpx.get(gateway.url + f"/v1/responses/resp_{unique('y')}", headers={"api-key": other}, timeout=10)
        assert answer.status_code == 404
    finally:
        gateway.stop()
        proxy.stop()
