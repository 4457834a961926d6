"""Hostile and malformed input, generated (hypothesis), against a running gateway.

Every one gets a 4xx OpenAI-style error (or, if it happens to be a valid request, the backend's answer); the gateway's
own code never answers 5xx, its worker keeps serving, and no backend receives anything the configuration did not name.
"""

from __future__ import annotations

import json
import re
import socket

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import unique
from tests.e2e import Stack

pytestmark = pytest.mark.e2e
CONFIGURED = {"gpt-4o", "gpt-4o-mini", "text-embedding-3-small"}
EXAMPLES = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
OPERATIONS = ("chat/completions", "completions", "embeddings")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
hostile_names = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["..", "../..", "%2e%2e", "a%2Fb", "a/b", "http:%2F%2Fevil.example", "//evil.example", "gpt-4o%00",
                     "gpt-4o?x=1", "gpt-4o#frag", "x" * 300, "%25", "\\..\\", "gpt-4o/../gpt-4o-mini", "~root"]),
)


@pytest.fixture(scope="module")
def key(e2e: Stack) -> str:
    return e2e.create_consumer(unique("fuzz"), tpm=100_000_000)


@pytest.fixture(scope="module")
def http(e2e: Stack) -> httpx.Client:
    with httpx.Client(base_url=e2e.url, timeout=30) as client:
        yield client


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert "type" in error and "code" in error
        assert "127.0.0.1" not in response.text


def backends_saw_only_configured_things(e2e: Stack) -> None:
    pattern = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|completions|embeddings)$")
    for sim in e2e.simulators:
        for request in sim.requests(200):
            match = pattern.match(request["path"])
            assert match and match.group(1) in CONFIGURED, request["path"]


@EXAMPLES
@given(name=hostile_names, operation=st.sampled_from(OPERATIONS))
def test_hostile_deployment_names_in_the_path_and_in_model(e2e: Stack, http: httpx.Client, key: str, name: str, operation: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi", "max_tokens": 1}
    try:
        response = http.post(f"/openai/deployments/{name}/{operation}?api-version=2024-10-21", json=body, headers={"api-key": key})
    except (httpx.InvalidURL, httpx.UnsupportedProtocol):
        response = None  # the client itself refuses to build such a URL
    if response is not None:
        check(response)
    check(http.post(f"/v1/{operation}", json={**body, "model": name}, headers={"api-key": key}))
    backends_saw_only_configured_things(e2e)


# Header values an HTTP client can send: printable latin-1.
header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255, blacklist_categories=("Cc",)), max_size=200)


@EXAMPLES
@given(key=header_text, bearer=st.booleans(), forwarded=st.one_of(st.none(), header_text,
       st.lists(st.ip_addresses().map(str), min_size=1, max_size=5).map(", ".join)))
def test_hostile_keys_and_forwarding_headers_are_refused_without_echo(
    e2e: Stack, http: httpx.Client, key: str, bearer: bool, forwarded: str | None
) -> None:
    key = key.strip(" \xa0")
    headers: dict[str, bytes] = {}
    if key:  # h11 refuses to send an empty or space-padded value; the bytes go as latin-1, as a hostile client's would
        headers["authorization" if bearer else "api-key"] = (f"Bearer {key}" if bearer else key).encode("latin-1")
    if forwarded is not None and forwarded.strip(" \xa0"):
        headers["x-forwarded-for"] = forwarded.strip(" \xa0").encode("latin-1")
    for path in ("/v1/chat/completions", "/openai/deployments/made-up/chat/completions", "/health/details"):
        response = http.request("GET" if path == "/health/details" else "POST", path, headers=headers,
                                json={"model": "gpt-4o", "messages": [{"role": "user"}]})
        check(response)
        assert response.status_code in (401, 429), (path, response.status_code)
        if len(key) >= 12:
            assert key not in response.text


@EXAMPLES
@given(value=json_values.filter(lambda v: "Infinity" not in json.dumps(v)), spelling=st.sampled_from(["data_sources", "dataSources"]))
def test_data_sources_of_any_shape_are_refused_without_the_capability(
    e2e: Stack, http: httpx.Client, key: str, value: object, spelling: str
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, spelling: value}
    response = http.post("/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21", json=body, headers={"api-key": key})
    check(response)
    assert response.status_code == 403 and response.json()["error"]["code"] == "capability_not_allowed"


def raw_request(e2e: Stack, lines: list[str], body: bytes = b"") -> tuple[int, bytes]:
    host, port = e2e.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = "\r\n".join(lines + [f"content-length: {len(body)}", "connection: close", "", ""]).encode("latin-1")
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def test_header_injection_attempts_do_not_reach_the_backend(e2e: Stack, key: str) -> None:
    before = len(e2e.simulators[0].requests(200))
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user"}],"max_tokens":1}'
    status, _ = raw_request(e2e, [
        "POST /v1/chat/completions HTTP/1.1", "host: gateway", "content-type: application/json", f"api-key: {key}",
        "x-user-id: alice", "x-forwarded-host: evil.example", "cookie: session=secret", "api-version: ../../x",
        "x-ms-client-request-id: ok-id",
    ], body)
    assert status == 200
    sent = e2e.simulators[0].requests(200)
    assert len(sent) >= before
    headers = {k.lower(): v for k, v in sent[-1]["headers"].items()}
    assert "cookie" not in headers and "x-forwarded-host" not in headers and "x-user-id" not in headers
    assert headers["api-key"] != key and headers["x-ms-client-request-id"] == "ok-id"


def test_the_worker_is_still_serving_after_all_of_it(e2e: Stack, key: str) -> None:
    response = httpx.post(e2e.url + "/v1/chat/completions", headers={"api-key": key},
                          json={"model": "gpt-4o", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 2})
    assert response.status_code == 200
    assert e2e.gateways[0].process.poll() is None
    backends_saw_only_configured_things(e2e)
