"""Safety policies: parsed and validated at start-up (GATEWAY_SAFETY_POLICIES), resolved consumer -> team -> default,
written on consumers and teams by the admin command only when the name is one of the gateway's, kept in Table rows."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from shared.admin.cli import Admin, _deployments, parser
from shared.admin.teams import TeamAdmin
from shared.config import ConfigError, load_settings
from shared.records.consumers import Consumer, Team, with_team
from shared.records.safety import PiiRule, PolicyError, parse_policies, resolve
from shared.storage.consumer_table import (
    BadConsumerRecord,
    consumer_from_entity,
    consumer_to_entity,
    team_from_entity,
    team_to_entity,
)
from shared.storage.memory import MemoryConsumerStore

BASE = {"GATEWAY_TABLE_CONNECTION_STRING": "UseDevelopmentStorage=true"}
SERVICES = {"GATEWAY_CONTENT_SAFETY_ENDPOINT": "https://cs.cognitiveservices.azure.com",
            "GATEWAY_LANGUAGE_ENDPOINT": "https://lang.cognitiveservices.azure.com"}
STRICT = {"categories": {"Hate": 2, "Violence": 4}, "blocklists": ["banned-terms"], "pii": {"mode": "redact",
          "categories": ["Email", "PhoneNumber"]}, "on_unavailable": "open", "audit": "required"}


def _settings(**env: str) -> Any:
    return load_settings({**BASE, **env}, require_backends=False)


def test_a_policy_parses_with_every_property_and_its_defaults() -> None:
    policies = parse_policies({"strict": STRICT, "shield-only": {}})
    strict = policies["strict"]
    assert strict.shield_prompt and strict.categories == {"Hate": 2, "Violence": 4}
    assert strict.blocklists == ("banned-terms",) and strict.pii == PiiRule("redact", ("Email", "PhoneNumber"))
    assert strict.on_unavailable == "open" and strict.audit == "required" and strict.analyze and strict.audited
    shield = policies["shield-only"]
    assert shield.shield_prompt and not shield.analyze and shield.on_unavailable == "closed" and shield.audit == "off"
    assert shield.pii == PiiRule()


@pytest.mark.parametrize(("raw", "words"), [
    ({"Strict": {}}, "a name is lower-case"),
    ({"none": {}}, "not 'none'"),
    ({"p": []}, "JSON object"),
    ({"p": {"shield": True}}, "unknown properties shield"),
    ({"p": {"categories": {"Gore": 2}}}, "'Gore' is not one of"),
    ({"p": {"categories": {"Hate": 8}}}, "severity 0 to 7"),
    ({"p": {"categories": {"Hate": True}}}, "severity 0 to 7"),
    ({"p": {"categories": {"Hate": "2"}}}, "severity 0 to 7"),
    ({"p": {"blocklists": "list"}}, "blocklists"),
    ({"p": {"blocklists": ["a b"]}}, "blocklists"),
    ({"p": {"blocklists": [f"b{i}" for i in range(11)]}}, "at most 10"),
    ({"p": {"pii": "mask"}}, "pii: mode"),
    ({"p": {"pii": {"mode": "redact", "categories": ["Email; drop"]}}}, "pii: categories"),
    ({"p": {"pii": {"mode": "redact", "types": []}}}, "pii: expected"),
    ({"p": {"on_unavailable": "maybe"}}, "on_unavailable"),
    ({"p": {"audit": "prompts"}}, "audit"),
    ({"p": {"shield_prompt": "yes"}}, "shield_prompt"),
    ({"p": {"shield_prompt": False}}, "checks nothing"),
])
def test_a_bad_policy_is_refused_with_its_name_and_property(raw: dict[str, Any], words: str) -> None:
    with pytest.raises(PolicyError, match=None) as refused:
        parse_policies(raw)
    assert words in str(refused.value)


def test_settings_refuse_at_start_up_what_a_request_would_fail_on() -> None:
    policies = json.dumps({"strict": STRICT})
    with pytest.raises(ConfigError, match="GATEWAY_SAFETY_POLICIES: policy 'x': unknown"):
        _settings(GATEWAY_SAFETY_POLICIES='{"x": {"bad": 1}}', **SERVICES)
    with pytest.raises(ConfigError, match="GATEWAY_SAFETY_POLICIES: invalid JSON"):
        _settings(GATEWAY_SAFETY_POLICIES="{strict")
    with pytest.raises(ConfigError, match="GATEWAY_CONTENT_SAFETY_ENDPOINT"):
        _settings(GATEWAY_SAFETY_POLICIES=policies, GATEWAY_LANGUAGE_ENDPOINT=SERVICES["GATEWAY_LANGUAGE_ENDPOINT"])
    with pytest.raises(ConfigError, match="GATEWAY_LANGUAGE_ENDPOINT"):
        _settings(GATEWAY_SAFETY_POLICIES=policies,
                  GATEWAY_CONTENT_SAFETY_ENDPOINT=SERVICES["GATEWAY_CONTENT_SAFETY_ENDPOINT"])
    with pytest.raises(ConfigError, match="GATEWAY_SAFETY_DEFAULT_POLICY: 'lax'"):
        _settings(GATEWAY_SAFETY_POLICIES=policies, GATEWAY_SAFETY_DEFAULT_POLICY="lax", **SERVICES)
    settings = _settings(GATEWAY_SAFETY_POLICIES=policies, GATEWAY_SAFETY_DEFAULT_POLICY="strict", **SERVICES)
    assert settings.safety.default_policy == "strict" and set(settings.safety.policies) == {"strict"}
    assert _settings().safety.policies == {}  # none set: no policy, no endpoint needed


@pytest.mark.parametrize("endpoint", [
    "http://cs.cognitiveservices.azure.com",  # a credential would travel in clear text
    "http://10.0.0.5:5000", "http://127.0.0.1.evil.example", "ftp://127.0.0.1", "https://cs.example/path?x=1",
    "https://a b",
])
def test_plain_http_is_only_for_this_machine(endpoint: str) -> None:
    with pytest.raises(ConfigError, match="GATEWAY_CONTENT_SAFETY_ENDPOINT"):
        _settings(GATEWAY_CONTENT_SAFETY_ENDPOINT=endpoint)


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:5081", "http://localhost:5081/", "https://cs.example.com/"])
def test_loopback_and_https_endpoints_are_accepted(endpoint: str) -> None:
    assert _settings(GATEWAY_CONTENT_SAFETY_ENDPOINT=endpoint).safety.content_safety_endpoint == endpoint.rstrip("/")


def test_keys_are_never_in_the_settings_repr() -> None:
    settings = _settings(GATEWAY_CONTENT_SAFETY_KEY="cs-secret-1", GATEWAY_LANGUAGE_KEY="lang-secret-2")
    assert settings.safety.content_safety_key == "cs-secret-1"
    assert "cs-secret-1" not in repr(settings) and "lang-secret-2" not in repr(settings)


@pytest.mark.parametrize(("own", "team", "default", "expected"), [
    (None, None, None, None), (None, None, "base", "base"), (None, "t", "base", "t"), ("c", "t", "base", "c"),
    ("none", "t", "base", None), (None, "none", "base", None),
])
def test_the_policy_is_the_consumers_else_its_teams_else_the_default(
    own: str | None, team: str | None, default: str | None, expected: str | None
) -> None:
    assert resolve(own, team, default) == expected
    consumer = with_team(Consumer("c1", "C", "0" * 64, "gw-", team="t1", safety=own), {"t1": Team("t1", "T", safety=team)})
    assert consumer.safety_policy(default) == expected


def test_rows_keep_the_name_and_refuse_a_malformed_one() -> None:
    consumer = Consumer("c1", "C", "0" * 64, "gw-", safety="strict")
    assert consumer_from_entity(consumer_to_entity(consumer)).safety == "strict"
    team = Team("t1", "T", safety="none")
    assert team_from_entity(team_to_entity(team)).safety == "none"
    old = consumer_to_entity(Consumer("c2", "C", "0" * 64, "gw-"))
    del old["safety"]  # a row written before policies existed
    assert consumer_from_entity(old).safety is None
    with pytest.raises(BadConsumerRecord, match="safety"):
        consumer_from_entity({**consumer_to_entity(consumer), "safety": "Strict Policy"})


async def _run(store: MemoryConsumerStore, *argv: str, policies: frozenset[str] = frozenset({"strict"})) -> dict[str, Any]:
    out = io.StringIO()
    args = parser().parse_args(["--json", *argv])
    if args.command == "teams":
        code = await TeamAdmin(store, out, _deployments, json_mode=True, policies=policies).run(args)
    else:
        admin = Admin(store, out, err=io.StringIO(), json_mode=True, policies=policies)  # type: ignore[arg-type]
        code = await (admin.create(args) if args.action == "create" else admin.update(args))
    assert code == 0
    shown: dict[str, Any] = json.loads(out.getvalue())
    return shown


async def test_the_admin_command_writes_known_names_and_refuses_unknown_ones_before_writing() -> None:
    store = MemoryConsumerStore()
    shown = await _run(store, "consumers", "create", "Claims", "--all-deployments", "--safety-policy", "strict")
    assert shown["safety_policy"] == "strict" and store.consumers["claims"].safety == "strict"
    with pytest.raises(SystemExit, match="no policy 'lax' in GATEWAY_SAFETY_POLICIES"):
        await _run(store, "consumers", "set", "claims", "--safety-policy", "lax", "--tpm", "5")
    assert store.consumers["claims"].safety == "strict" and store.consumers["claims"].limits.tokens_per_minute == 0
    with pytest.raises(SystemExit, match="no policy 'strict'"):
        await _run(store, "consumers", "create", "Other", "--all-deployments", "--safety-policy", "strict",
                   policies=frozenset())
    assert "other" not in store.consumers
    assert (await _run(store, "consumers", "set", "claims", "--safety-policy", "none"))["safety_policy"] == "none"
    assert (await _run(store, "consumers", "set", "claims", "--tpm", "9"))["safety_policy"] == "none"  # kept
    assert (await _run(store, "consumers", "set", "claims", "--safety-policy", ""))["safety_policy"] is None


async def test_a_team_gets_a_policy_for_its_members() -> None:
    store = MemoryConsumerStore()
    assert (await _run(store, "teams", "create", "Legal", "--all-deployments", "--safety-policy", "strict"))[
        "safety_policy"] == "strict"
    with pytest.raises(SystemExit, match="no policy 'lax'"):
        await _run(store, "teams", "set", "legal", "--safety-policy", "lax")
    await _run(store, "consumers", "create", "Paralegal", "--all-deployments", "--team", "legal")
    member = with_team(store.consumers["paralegal"], store.teams)
    assert member.safety is None and member.safety_policy(None) == "strict"
