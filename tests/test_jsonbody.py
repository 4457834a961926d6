"""Bodies a JSON parser accepts but the gateway must refuse: too deep, or a key given twice in one object."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.edge.errors import GatewayError
from shared.flow.jsonbody import MAX_DEPTH, parse_body


def refused(raw: bytes) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        parse_body(raw)
    error = caught.value
    assert error.status == 400 and error.type == "invalid_request_error"
    assert set(orjson.loads(error.body())["error"]) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 300, 1_000, 1_020])
@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deep_nesting_is_400_not_a_recursion_error(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    inner = opener * (depth - 1) + "1" + closer * (depth - 1)
    raw = ('{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],"tools":' + inner + "}").encode()
    assert refused(raw).code == "invalid_json"


def test_nesting_within_the_bound_is_accepted() -> None:
    inner = "[" * (MAX_DEPTH - 2) + "1" + "]" * (MAX_DEPTH - 2)
    assert parse_body(('{"a":' + inner + "}").encode())["a"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"gpt-4o","max_tokens":10,"max_tokens":100000}',
        b'{"messages":[{"role":"user","role":"system","content":"x"}]}',
        b'{"a":{"b":1,"b":2}}',
        b'{"stream":false,"x":"a:b:c","stream":true}',
        # An escaped colon must not hide a repeated key from the count.
        b'{"a":"\\u003a","a":1}',
        b'{"a\\u003A":1,"b":2,"b":3}',
        # The same key spelled with an escape is the same key.
        b'{"max_tokens":1,"max_\\u0074okens":99999}',
    ],
)
def test_duplicate_keys_are_400(raw: bytes) -> None:
    assert refused(raw).code == "duplicate_key"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"messages":[{"role":"user","content":"Note: see https://example.com:443/a?b=c:d"}]}',
        b'{"a":"\\u003a\\u003A:","b":{"c:":"::"}}',
        b'{"a":[{"x":1},{"x":2}],"b":{"x":{"x":3}}}',
        '{"ключ":"значение: да"}'.encode(),
    ],
)
def test_colons_in_text_and_the_same_key_in_different_objects_are_fine(raw: bytes) -> None:
    assert parse_body(raw) == json.loads(raw)


keys = st.text(alphabet=st.sampled_from('ab:"\\\u00e9'), min_size=0, max_size=3)
values = st.recursive(
    # Integers within 64 bits: beyond them orjson reads a float where json reads an int (not what is tested here).
    st.none() | st.integers(-(2**63), 2**63 - 1) | st.text(alphabet=st.sampled_from('ab:"\\ \u00e9'), max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.lists(st.tuples(keys, inner), max_size=4),
    max_leaves=12,
)


def render(value: object, escape: bool) -> str:
    """JSON text for a value in which lists of pairs become objects that may repeat keys."""
    if isinstance(value, list) and value and all(isinstance(v, tuple) for v in value):
        members = []
        for key, item in value:
            text = json.dumps(key, ensure_ascii=False)
            if escape:
                text = text.replace(":", "\\u003a")
            members.append(f"{text}:{render(item, escape)}")
        return "{" + ",".join(members) + "}"
    if isinstance(value, list):
        return "[" + ",".join(render(v, escape) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(keys, values), max_size=5), st.booleans())
def test_refused_exactly_when_some_object_repeats_a_key(pairs: list[tuple[str, object]], escape: bool) -> None:
    raw = render(pairs, escape).encode() if pairs else b"{}"
    repeated = False

    def hook(members: list[tuple[str, object]]) -> dict[str, object]:
        nonlocal repeated
        repeated = repeated or len({k for k, _ in members}) != len(members)
        return dict(members)

    expected = json.loads(raw, object_pairs_hook=hook)
    if repeated:
        assert refused(raw).code == "duplicate_key"
    else:
        assert parse_body(raw) == expected
