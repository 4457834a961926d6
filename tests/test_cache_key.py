"""The cache key and the cacheability rules: table tests, and the tests that try to make two requests collide."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from shared.cache import rules
from shared.cache.key import cache_key, scope_of
from shared.edge.errors import GatewayError
from shared.flow.jsonbody import parse_body
from shared.records.cache import CachePolicy

ON = CachePolicy(enabled=True)


def key(body: dict[str, Any] | bytes, scope: str = "consumer:a", operation: str = "embeddings",
        deployment: str = "text-embedding-3-small", api_version: str | None = "2024-10-21") -> str:
    parsed = parse_body(body if isinstance(body, bytes) else orjson.dumps(body))
    return cache_key(scope, operation, deployment, api_version, parsed)


# ---- the key -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("first", "second"), [
    (b'{"input":"hello","dimensions":8}', b'{ "dimensions" : 8 ,\n "input" : "hello" }'),  # order, whitespace
    (b'{"input":"hello"}', b'{"input":"\\u0068\\u0065llo"}'),  # unicode escapes
    (b'{"input":"hello","a":{"x":1,"y":2}}', b'{"a":{"y":2,"x":1},"input":"hello"}'),  # nested order
    (b'{"input":"hello"}', b'{"input":"hello","stream":false,"user":"someone","model":"anything"}'),  # excluded fields
    (b'{"input":"hello"}', b'{"input":"hello","stream_options":{"include_usage":true},"safety_identifier":"u"}'),
])
def test_spelling_does_not_change_the_key(first: bytes, second: bytes) -> None:
    assert key(first) == key(second)


@pytest.mark.parametrize(("first", "second"), [
    (b'{"input":"hello"}', b'{"input":"hello "}'),
    (b'{"input":"hello"}', b'{"input":["hello"]}'),
    (b'{"input":"hello","dimensions":8}', b'{"input":"hello","dimensions":8.0}'),  # a type the backend may refuse
    (b'{"input":"hello"}', b'{"input":"hello","encoding_format":"base64"}'),
    (b'{"input":"a","x":"b"}', b'{"input":"a\\",\\"x\\":\\"b"}'),  # a value that spells other members
    (b'{"input":"ab"}', b'{"input":"a","b":null}'),
])
def test_anything_the_backend_reads_changes_the_key(first: bytes, second: bytes) -> None:
    assert key(first) != key(second)


def test_scope_deployment_operation_and_api_version_each_change_the_key() -> None:
    body = {"input": "hello"}
    base = key(body)
    assert key(body, scope="consumer:b") != base
    assert key(body, deployment="text-embedding-3-large") != base
    assert key(body, operation="completions") != base
    assert key(body, api_version="2025-01-01") != base
    assert key(body, api_version=None) != base


def test_names_cannot_be_shifted_between_the_parts_of_the_key() -> None:
    """Scope "consumer:a" + deployment "b:c" must not equal scope "consumer:a:b" + deployment "c"."""
    body = {"input": "x"}
    assert key(body, scope="consumer:a", deployment="b:c") != key(body, scope="consumer:a:b", deployment="c")
    assert key(body, scope="consumer:a", deployment="") != key(body, scope="consumer:", deployment="a")


def test_a_duplicate_key_is_refused_before_any_key_is_made() -> None:
    """{"input":"a","input":"b"}: the gateway would read b, a backend may read a; the parser refuses it, so the cache
    can never store a's answer under b's key."""
    for raw in (b'{"input":"a","input":"b"}', b'{"input":"a","\\u0069nput":"b"}', b'{"a":1,"input":"x","a\\u003a":2,"a":3}'):
        with pytest.raises(GatewayError) as refused:
            key(raw)
        assert refused.value.status == 400


def test_the_key_is_a_sha256_digest() -> None:
    digest = key({"input": "hello"})
    assert len(digest) == 64 and int(digest, 16) >= 0


@pytest.mark.parametrize(("policy", "team", "scope"), [
    (CachePolicy(True), None, "consumer:app"),
    (CachePolicy(True, scope="team"), "blue", "team:blue"),
    (CachePolicy(True, scope="team"), None, "consumer:app"),  # no team: never wider than the consumer
    (CachePolicy(True, scope="gateway"), "blue", "gateway"),
])
def test_scope(policy: CachePolicy, team: str | None, scope: str) -> None:
    assert scope_of(policy, "app", team) == scope


# ---- the rules ---------------------------------------------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("operation", "body", "reason"), [
    (rules.EMBEDDINGS, {"input": "x"}, ""),
    (rules.CHAT, {**CHAT, "temperature": 0}, ""),
    (rules.CHAT, {**CHAT, "temperature": 0.0, "n": 3}, ""),  # several answers, all the same
    (rules.CHAT, CHAT, rules.NOT_DETERMINISTIC),  # the default temperature is 1
    (rules.CHAT, {**CHAT, "temperature": 0.2}, rules.NOT_DETERMINISTIC),
    (rules.CHAT, {**CHAT, "temperature": "0"}, rules.NOT_DETERMINISTIC),
    (rules.CHAT, {**CHAT, "temperature": None}, rules.NOT_DETERMINISTIC),
    (rules.CHAT, {**CHAT, "temperature": 0.7, "seed": 4}, rules.NOT_DETERMINISTIC),  # a seed counts only by setting
    (rules.COMPLETIONS, {"prompt": "x", "temperature": 0}, ""),
    (rules.CHAT, {**CHAT, "temperature": 0, "tools": [{"type": "function", "function": {"name": "f"}}]}, ""),
    (rules.CHAT, {**CHAT, "temperature": 0, "data_sources": [{"type": "azure_search"}]}, rules.MOMENT_TOOLS),
    (rules.CHAT, {**CHAT, "temperature": 0, "dataSources": []}, rules.MOMENT_TOOLS),
    (rules.CHAT, {**CHAT, "temperature": 0, "web_search_options": {}}, rules.MOMENT_TOOLS),
    (rules.RESPONSES, {"input": "x", "temperature": 0}, rules.STATEFUL),  # store is true by default
    (rules.RESPONSES, {"input": "x", "temperature": 0, "store": False}, ""),
    (rules.RESPONSES, {"input": "x", "temperature": 0, "store": False, "previous_response_id": "resp_1"}, rules.STATEFUL),
    (rules.RESPONSES, {"input": "x", "temperature": 0, "store": False, "conversation": "conv_1"}, rules.STATEFUL),
    (rules.RESPONSES, {"input": "x", "temperature": 0, "store": False, "background": True}, rules.STATEFUL),
    (rules.RESPONSES, {"input": "x", "temperature": 0, "store": False, "stream": True}, rules.UNSUPPORTED),
    (rules.RESPONSES, {"input": "x", "temperature": 0, "store": False, "tools": [{"type": "web_search"}]},
     rules.MOMENT_TOOLS),
    (rules.RESPONSES, {"input": "x", "temperature": 0, "store": False, "tools": [{"type": "function", "name": "f"}]}, ""),
    (rules.RESPONSES, {"input": "x", "temperature": 0, "store": False, "tools": ["bad"]}, rules.MOMENT_TOOLS),
])
def test_what_is_cacheable(operation: str, body: dict[str, Any], reason: str) -> None:
    decided = rules.verdict(operation, body, ON, None)
    assert decided.reason == reason
    assert decided.serve == decided.store == (reason == "")


@pytest.mark.parametrize(("body", "reason"), [
    ({**CHAT, "temperature": 0.7, "seed": 4}, ""),
    ({**CHAT, "seed": 4}, ""),
    ({**CHAT, "temperature": 0.7, "seed": 4, "n": 2}, rules.SEVERAL_ANSWERS),
    ({**CHAT, "temperature": 0.7, "seed": True}, rules.NOT_DETERMINISTIC),
    ({**CHAT, "temperature": 0.7, "seed": "4"}, rules.NOT_DETERMINISTIC),
])
def test_a_seed_makes_a_request_cacheable_only_where_the_setting_says_so(body: dict[str, Any], reason: str) -> None:
    assert rules.verdict(rules.CHAT, body, ON, None, seed_deterministic=True).reason == reason
    assert rules.verdict(rules.COMPLETIONS, {**body, "prompt": "x", "best_of": 3}, ON, None,
                         seed_deterministic=True).reason in (rules.SEVERAL_ANSWERS, rules.NOT_DETERMINISTIC)


def test_a_consumer_may_cache_requests_with_tools_of_the_moment() -> None:
    body = {**CHAT, "temperature": 0, "data_sources": [{"type": "azure_search"}]}
    assert rules.verdict(rules.CHAT, body, CachePolicy(True, tools=True), None).reason == ""


def test_the_request_header() -> None:
    body = {"input": "x"}
    assert rules.verdict(rules.EMBEDDINGS, body, ON, rules.directive("no-store")).bypass
    refresh = rules.verdict(rules.EMBEDDINGS, body, ON, rules.directive(" No-Cache "))
    assert (refresh.serve, refresh.store) == (False, True)
    assert rules.directive(None) is None
    for bad in ("", "yes", "no-store, no-cache", "max-age=0"):
        with pytest.raises(rules.BadDirective):
            rules.directive(bad)


def test_an_unknown_operation_is_never_cached() -> None:
    assert rules.verdict("models", {}, ON, None).reason == rules.UNSUPPORTED
