from __future__ import annotations

from typing import Any

import orjson
import pytest

from shared.config import Backend
from shared.edge.errors import GatewayError
from shared.flow.jsonbody import parse_body
from shared.flow.translate import (
    AZURE_API,
    OPENAI_API,
    Operation,
    backend_body,
    backend_url,
    check_api_version,
    check_body,
    match_route,
    request_headers,
)

AZURE = Backend(id="uk", endpoint="https://uk.openai.azure.com", region="uksouth", deployments={"gpt-4o": "gpt-4o-ptu"})
COMPATIBLE = Backend(id="oss", endpoint="http://10.0.0.5:8000/v1", region="onprem", deployments={"gpt-4o": "llama-3"}, api="openai")


@pytest.mark.parametrize(
    ("path", "api", "operation", "deployment"),
    [
        ("/openai/deployments/gpt-4o/chat/completions", AZURE_API, Operation.CHAT, "gpt-4o"),
        ("/openai/deployments/gpt-4o/completions", AZURE_API, Operation.COMPLETIONS, "gpt-4o"),
        ("/openai/deployments/emb.small_1/embeddings", AZURE_API, Operation.EMBEDDINGS, "emb.small_1"),
        ("/v1/chat/completions", OPENAI_API, Operation.CHAT, None),
        ("/openai/v1/embeddings", OPENAI_API, Operation.EMBEDDINGS, None),
        ("/v1/chat/completions/", OPENAI_API, Operation.CHAT, None),
    ],
)
def test_routes(path: str, api: str, operation: Operation, deployment: str | None) -> None:
    route = match_route("POST", path)
    assert (route.api, route.operation, route.deployment) == (api, operation, deployment)


@pytest.mark.parametrize(
    "path",
    ["/", "/openai", "/v1/images/generations", "/openai/deployments/gpt-4o", "/openai/deployments/gpt-4o/audio",
     "/openai/deployments/../chat/completions", "/openai/deployments/a%2Fb/chat/completions",
     "/openai/deployments/" + "x" * 200 + "/chat/completions", "/openai/deployments/%2e%2e/chat/completions"],
)
def test_unknown_or_hostile_paths_are_404(path: str) -> None:
    with pytest.raises(GatewayError) as caught:
        match_route("POST", path)
    assert caught.value.status == 404


def test_wrong_method_is_405_with_allow() -> None:
    with pytest.raises(GatewayError) as caught:
        match_route("GET", "/v1/chat/completions")
    assert caught.value.status == 405 and caught.value.headers == {"allow": "POST"}
    assert match_route("GET", "/v1/models").operation is Operation.MODELS
    with pytest.raises(GatewayError):
        match_route("POST", "/v1/models")


@pytest.mark.parametrize("version", ["2024-10-21", "2025-01-01-preview", "preview", "v1"])
def test_api_versions_pass(version: str) -> None:
    assert check_api_version({"api-version": version}) == version


@pytest.mark.parametrize("version", ["2024-10-21&x=1", "../../etc", "a" * 41, "", "2024 10"])
def test_hostile_api_versions_are_400(version: str) -> None:
    with pytest.raises(GatewayError) as caught:
        check_api_version({"api-version": version})
    assert caught.value.status == 400


@pytest.mark.parametrize("raw", [b"", b"{", b"[1]", b'"text"', b"\xff\xfe{}", b"null"])
def test_bodies_that_are_not_json_objects_are_400(raw: bytes) -> None:
    with pytest.raises(GatewayError) as caught:
        parse_body(raw)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ("/openai/deployments/d/chat/completions", {}, "messages"),
        ("/openai/deployments/d/chat/completions", {"messages": []}, "messages"),
        ("/openai/deployments/d/chat/completions", {"messages": [{"content": "no role"}]}, "messages[0]"),
        ("/openai/deployments/d/chat/completions", {"messages": [{"role": "user"}], "stream": "yes"}, "stream"),
        ("/openai/deployments/d/chat/completions", {"messages": [{"role": "user"}], "max_tokens": -5}, "max_tokens"),
        ("/openai/deployments/d/chat/completions", {"messages": [{"role": "user"}], "max_tokens": True}, "max_tokens"),
        ("/openai/deployments/d/chat/completions", {"messages": [{"role": "user"}], "stream_options": []}, "stream_options"),
        ("/openai/deployments/d/embeddings", {"input": ""}, "input"),
        ("/openai/deployments/d/embeddings", {"input": "x", "stream": True}, "stream"),
        ("/openai/deployments/d/completions", {"prompt": 5}, "prompt"),
    ],
)
def test_missing_or_mistyped_fields_are_400_naming_the_parameter(path: str, body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as caught:
        check_body(match_route("POST", path), body)
    assert caught.value.status == 400 and caught.value.param == param


def test_body_shape() -> None:
    shape = check_body(match_route("POST", "/v1/chat/completions"), {"model": "gpt-4o", "messages": [{"role": "user"}], "stream": True, "max_completion_tokens": 50})
    assert (shape.deployment, shape.stream, shape.client_wants_usage, shape.max_tokens, shape.choices) == ("gpt-4o", True, False, 50, 1)


def test_both_output_caps_are_refused_as_the_service_does() -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user"}], "max_completion_tokens": 50, "max_tokens": 100_000}
    with pytest.raises(GatewayError) as caught:
        check_body(match_route("POST", "/v1/chat/completions"), body)
    assert (caught.value.status, caught.value.code, caught.value.param) == (400, "invalid_parameter_combination", "max_tokens")


@pytest.mark.parametrize(
    ("path", "extra", "choices"),
    [
        ("/v1/chat/completions", {"n": 4}, 4),
        ("/v1/completions", {"n": 2, "best_of": 5}, 5),
        ("/v1/completions", {"best_of": 3}, 3),
        ("/v1/embeddings", {"n": 7}, 1),
    ],
)
def test_every_generated_choice_is_counted(path: str, extra: dict[str, Any], choices: int) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user"}], "prompt": "p", "input": "i", **extra}
    assert check_body(match_route("POST", path), body).choices == choices


@pytest.mark.parametrize("n", [0, -1, 129, 2.5, "4", True])
def test_a_bad_n_is_refused(n: object) -> None:
    with pytest.raises(GatewayError) as caught:
        check_body(match_route("POST", "/v1/chat/completions"), {"model": "gpt-4o", "messages": [{"role": "user"}], "n": n})
    assert caught.value.status == 400 and caught.value.param == "n"


def test_backend_urls() -> None:
    azure_route = match_route("POST", "/openai/deployments/gpt-4o/chat/completions")
    assert backend_url(AZURE, azure_route, "gpt-4o", "2025-01-01-preview") == (
        "https://uk.openai.azure.com/openai/deployments/gpt-4o-ptu/chat/completions?api-version=2025-01-01-preview"
    )
    v1 = match_route("POST", "/v1/chat/completions")
    assert backend_url(AZURE, v1, "gpt-4o", None).endswith("?api-version=2024-10-21")
    assert backend_url(COMPATIBLE, v1, "gpt-4o", None) == "http://10.0.0.5:8000/v1/chat/completions"


def test_backend_body_adds_usage_to_streams_and_maps_the_model() -> None:
    route = match_route("POST", "/v1/chat/completions")
    body = {"model": "gpt-4o", "messages": [{"role": "user"}], "stream": True}
    raw = orjson.dumps(body)
    shape = check_body(route, body)
    sent = orjson.loads(backend_body(raw, body, AZURE, "gpt-4o", shape))
    assert sent["stream_options"] == {"include_usage": True} and sent["model"] == "gpt-4o"
    sent = orjson.loads(backend_body(raw, body, COMPATIBLE, "gpt-4o", shape))
    assert sent["model"] == "llama-3"
    plain = {"model": "gpt-4o", "messages": [{"role": "user"}]}
    plain_raw = orjson.dumps(plain)
    assert backend_body(plain_raw, plain, AZURE, "gpt-4o", check_body(route, plain)) is plain_raw


def test_client_headers_are_filtered() -> None:
    sent = request_headers({
        "api-key": "consumer-key", "authorization": "Bearer consumer-key", "cookie": "a=b", "connection": "keep-alive",
        "x-forwarded-for": "1.2.3.4", "user-agent": "OpenAI/Python", "x-ms-client-request-id": "abc", "content-type": "text/plain",
    })
    assert sent == {"user-agent": "OpenAI/Python", "x-ms-client-request-id": "abc", "content-type": "application/json", "accept-encoding": "identity"}


@pytest.mark.parametrize(
    ("version", "asked"),
    [("2024-06-01", False), ("2024-02-01", False), ("2024-08-01-preview", False), ("2024-09-01-preview", True),
     ("2024-10-21", True), ("2025-04-01-preview", True), ("preview", True), (None, True)],
)
def test_usage_is_asked_of_streams_only_where_the_api_version_accepts_it(version: str | None, asked: bool) -> None:
    route = match_route("POST", "/openai/deployments/gpt-4o/chat/completions")
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    raw = orjson.dumps(body)
    sent = orjson.loads(backend_body(raw, body, AZURE, "gpt-4o", check_body(route, body), version))
    assert ("stream_options" in sent) is asked
    # OpenAI-compatible backends take it on any version.
    assert "stream_options" in orjson.loads(backend_body(raw, body, COMPATIBLE, "gpt-4o", check_body(route, body), version))


@pytest.mark.parametrize(
    ("backend", "version", "body_extra", "field"),
    [
        (AZURE, "2024-10-21", {}, "max_completion_tokens"),
        (AZURE, "2024-06-01", {}, "max_tokens"),
        (AZURE, "2024-10-21", {"max_tokens": 99_999}, "max_tokens"),
        (COMPATIBLE, None, {}, "max_tokens"),
    ],
)
def test_an_output_cap_set_by_the_gateway_goes_where_the_backend_reads_it(
    backend: Backend, version: str | None, body_extra: dict[str, Any], field: str
) -> None:
    from dataclasses import replace

    route = match_route("POST", "/openai/deployments/gpt-4o/chat/completions")
    body = {"messages": [{"role": "user", "content": "hi"}], **body_extra}
    shape = replace(check_body(route, body), max_tokens=700, capped=True)
    sent = orjson.loads(backend_body(orjson.dumps(body), body, backend, "gpt-4o", shape, version))
    assert sent[field] == 700
    assert len({"max_tokens", "max_completion_tokens"} & set(sent)) == 1


@pytest.mark.parametrize("version", ["2024-10-21\n", "2024-10-21\r\n", "\n2024-10-21"])
def test_a_trailing_or_leading_newline_is_not_a_valid_api_version(version: str) -> None:
    with pytest.raises(GatewayError):
        check_api_version({"api-version": version})


@pytest.mark.parametrize("path", ["/openai/deployments/gpt-4o%0A/chat/completions", "/openai/deployments/gpt-4o%0D%0A/embeddings"])
def test_a_deployment_name_with_a_newline_is_404(path: str) -> None:
    with pytest.raises(GatewayError) as caught:
        match_route("POST", path)
    assert caught.value.status == 404


def test_a_model_with_a_trailing_newline_is_404() -> None:
    with pytest.raises(GatewayError) as caught:
        check_body(match_route("POST", "/v1/chat/completions"), {"model": "gpt-4o\n", "messages": [{"role": "user"}]})
    assert caught.value.status == 404
