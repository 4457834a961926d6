from __future__ import annotations

import json
from typing import Any

import pytest

from shared.config import ConfigError, load_settings, parse_status_rule

BACKEND = {"id": "uk", "endpoint": "https://uk.openai.azure.com/", "region": "uksouth", "deployments": ["gpt-4o"], "auth": "key", "api_key_setting": "UK_KEY"}


def env(*backends: dict[str, Any], **extra: str) -> dict[str, str]:
    return {
        "GATEWAY_BACKENDS": json.dumps(list(backends)),
        "UK_KEY": "secret",
        "GATEWAY_TABLE_CONNECTION_STRING": "UseDevelopmentStorage=true",
        **extra,
    }


def test_a_valid_configuration() -> None:
    settings = load_settings(env(BACKEND, {**BACKEND, "id": "se", "region": "swedencentral", "priority": 2, "auth": "identity", "deployments": {"gpt-4o": "gpt4o-standard"}}))
    uk, se = settings.backends
    assert uk.endpoint == "https://uk.openai.azure.com" and uk.api_key == "secret" and uk.priority == 1
    assert se.auth == "identity" and se.deployments == {"gpt-4o": "gpt4o-standard"}
    assert settings.deployments() == {"gpt-4o"}
    assert "secret" not in repr(settings)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"GATEWAY_BACKENDS": "not json"}, "GATEWAY_BACKENDS: invalid JSON"),
        ({"GATEWAY_BACKENDS": "[]"}, "GATEWAY_BACKENDS: expected a non-empty JSON array"),
        ({"GATEWAY_BACKENDS": json.dumps([{**BACKEND, "endpoint": "ftp://x"}])}, "GATEWAY_BACKENDS[0].endpoint"),
        ({"GATEWAY_BACKENDS": json.dumps([{**BACKEND, "priority": "high"}])}, "GATEWAY_BACKENDS[0].priority"),
        ({"GATEWAY_BACKENDS": json.dumps([{**BACKEND, "weight": -1}])}, "GATEWAY_BACKENDS[0].weight"),
        ({"GATEWAY_BACKENDS": json.dumps([{**BACKEND, "deployments": []}])}, "GATEWAY_BACKENDS[0].deployments"),
        ({"GATEWAY_BACKENDS": json.dumps([{**BACKEND, "api_key_setting": "MISSING"}])}, "app setting MISSING is not set"),
        ({"GATEWAY_BACKENDS": json.dumps([{**BACKEND, "auth": "password"}])}, "GATEWAY_BACKENDS[0].auth"),
        ({"GATEWAY_BACKENDS": json.dumps([{**BACKEND, "colour": "red"}])}, "GATEWAY_BACKENDS[0].colour: unknown field"),
        ({"GATEWAY_BACKENDS": json.dumps([BACKEND, BACKEND])}, "GATEWAY_BACKENDS[1].id: duplicate"),
        ({"GATEWAY_BACKENDS": json.dumps([{**BACKEND, "breaker": {"statuses": "429,700"}}])}, "GATEWAY_BACKENDS[0].breaker.statuses"),
        ({"GATEWAY_BACKENDS": json.dumps([{**BACKEND, "breaker": {"trip_s": 0}}])}, "GATEWAY_BACKENDS[0].breaker.trip_s"),
        ({"GATEWAY_MAX_BODY_BYTES": "lots"}, "GATEWAY_MAX_BODY_BYTES: expected a number"),
        ({"GATEWAY_LIMIT_FAIL_MODE": "maybe"}, "GATEWAY_LIMIT_FAIL_MODE"),
        ({"GATEWAY_METRIC_DIMENSIONS": "Subscription ID,Colour"}, "GATEWAY_METRIC_DIMENSIONS: unknown dimension 'Colour'"),
        ({"GATEWAY_RECORD_CONTENT": "perhaps"}, "GATEWAY_RECORD_CONTENT"),
        ({"GATEWAY_RECORD_CONTENT": "true"}, "GATEWAY_RECORD_CONTENT: removed; prompts and completions are never recorded"),
        ({"GATEWAY_PRICES": '{"deployments": {"gpt-4o": {"input": -2}}}'}, "GATEWAY_PRICES.deployments.gpt-4o.input"),
        ({"GATEWAY_PRICES_FILE": "/nonexistent/prices.json"}, "GATEWAY_PRICES_FILE .*prices.json.*: cannot read"),
        ({"GATEWAY_PRICES": "{}", "GATEWAY_PRICES_FILE": "x"}, "set one, not both"),
        ({"GATEWAY_REQUEST_LOG_SAMPLING": "0"}, "GATEWAY_REQUEST_LOG_SAMPLING"),
        ({"GATEWAY_CLIENT_IP": "full"}, "GATEWAY_CLIENT_IP: expected one of truncated, raw, omit"),
    ],
)
def test_bad_settings_fail_naming_the_setting(change: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings({**env(BACKEND), **change})


def test_prices_from_a_file(tmp_path: Any) -> None:
    path = tmp_path / "prices.json"
    path.write_text('{"currency": "EUR", "deployments": {"gpt-4o": {"input": 2.5, "output": 10}}}')
    settings = load_settings({**env(BACKEND), "GATEWAY_PRICES_FILE": str(path)})
    assert settings.prices.currency == "EUR" and settings.prices.deployments["gpt-4o"].output == 10


def test_backends_from_a_file_unescaped_with_errors_naming_the_file(tmp_path: Any) -> None:
    path = tmp_path / "backends.json"
    path.write_text(json.dumps([BACKEND, {**BACKEND, "id": "se", "region": "swedencentral"}], indent=2))
    base = {k: v for k, v in env(BACKEND).items() if k != "GATEWAY_BACKENDS"}
    settings = load_settings({**base, "GATEWAY_BACKENDS_FILE": str(path)})
    assert [b.id for b in settings.backends] == ["uk", "se"] and settings.backends[0].api_key == "secret"
    assert settings.backends == load_settings({**base, "GATEWAY_BACKENDS": path.read_text()}).backends
    path.write_text(json.dumps([{**BACKEND, "weight": -1}]))
    with pytest.raises(ConfigError, match=r"GATEWAY_BACKENDS_FILE \(.*backends.json\)\[0\].weight"):
        load_settings({**base, "GATEWAY_BACKENDS_FILE": str(path)})
    path.write_text("[\n  {\"id\": \"uk\",\n  }\n]")
    with pytest.raises(ConfigError, match="invalid JSON .* at line 3"):
        load_settings({**base, "GATEWAY_BACKENDS_FILE": str(path)})
    with pytest.raises(ConfigError, match="set one, not both"):
        load_settings({**env(BACKEND), "GATEWAY_BACKENDS_FILE": str(path)})
    with pytest.raises(ConfigError, match="GATEWAY_BACKENDS_FILE .*missing.json.*: cannot read"):
        load_settings({**base, "GATEWAY_BACKENDS_FILE": str(tmp_path / "missing.json")})


def test_backends_are_required_unless_only_storage_is() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_BACKENDS: not set"):
        load_settings({"GATEWAY_TABLE_CONNECTION_STRING": "UseDevelopmentStorage=true"})
    assert load_settings({"GATEWAY_TABLE_CONNECTION_STRING": "UseDevelopmentStorage=true"}, require_backends=False).backends == ()


def test_table_storage_falls_back_to_the_functions_host_storage() -> None:
    settings = load_settings({"GATEWAY_BACKENDS": env(BACKEND)["GATEWAY_BACKENDS"], "UK_KEY": "k", "AzureWebJobsStorage__accountName": "acct"})
    assert settings.table_endpoint == "https://acct.table.core.windows.net"
    assert settings.table_connection_string is None


def test_status_rule() -> None:
    assert parse_status_rule("429, 500-502", "x") == frozenset({429, 500, 501, 502})


HTTP_KEYED = {**BACKEND, "endpoint": "http://10.0.0.5:8000"}


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        (HTTP_KEYED, "GATEWAY_BACKENDS[0].endpoint: http:// would send"),
        ({**HTTP_KEYED, "auth": "identity", "api_key_setting": None}, "GATEWAY_BACKENDS[0].endpoint: http:// would send"),
        ({**BACKEND, "api": "openai", "auth": "identity"}, "GATEWAY_BACKENDS[0].token_scope: auth 'identity'"),
        ({**BACKEND, "auth": "identity", "token_scope": "https://evil.example/"}, "GATEWAY_BACKENDS[0].token_scope: expected"),
        ({**BACKEND, "token_scope": "https://ai.azure.com/.default"}, "GATEWAY_BACKENDS[0].token_scope: only backends"),
        ({**BACKEND, "deployments": ["gpt-4o\n"]}, "GATEWAY_BACKENDS[0].deployments"),
        ({**BACKEND, "api_version": "2024-10-21\n"}, "GATEWAY_BACKENDS[0].api_version"),
        ({**BACKEND, "allow_insecure_http": "yes"}, "GATEWAY_BACKENDS[0].allow_insecure_http"),
    ],
)
def test_backends_that_would_leak_credentials_or_carry_bad_names_are_refused(backend: dict[str, Any], message: str) -> None:
    backend = {k: v for k, v in backend.items() if v is not None}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings(env(backend))


def test_plain_http_is_accepted_without_credentials_or_when_the_backend_says_so() -> None:
    none = load_settings(env({**HTTP_KEYED, "auth": "none"})).backends[0]
    allowed = load_settings(env({**HTTP_KEYED, "allow_insecure_http": True})).backends[0]
    assert none.endpoint.startswith("http://") and allowed.allow_insecure_http


def test_token_scopes_per_backend() -> None:
    azure = {**BACKEND, "auth": "identity"}
    foundry = {**azure, "id": "foundry", "token_scope": "https://ai.azure.com/.default"}
    compatible = {**azure, "id": "oss", "api": "openai", "token_scope": "api://11111111-2222-3333-4444-555555555555/.default"}
    keyed = {**BACKEND, "id": "keyed"}
    scopes = {b.id: b.token_scope for b in load_settings(env(azure, foundry, compatible, keyed)).backends}
    assert scopes == {
        "uk": "https://cognitiveservices.azure.com/.default",
        "foundry": "https://ai.azure.com/.default",
        "oss": "api://11111111-2222-3333-4444-555555555555/.default",
        "keyed": None,
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"GATEWAY_AUTH_FAIL_MODE": "sometimes"}, "GATEWAY_AUTH_FAIL_MODE"),
        ({"GATEWAY_CONSUMER_MAX_STALE_S": "0"}, "GATEWAY_CONSUMER_MAX_STALE_S"),
        ({"GATEWAY_UNKNOWN_KEY_LOOKUPS_PER_S": "-1"}, "GATEWAY_UNKNOWN_KEY_LOOKUPS_PER_S"),
        ({"GATEWAY_ADMIN_KEY_SHA256": "secret"}, "GATEWAY_ADMIN_KEY_SHA256"),
        ({"GATEWAY_API_VERSIONS": "2024-10-21,../x"}, "GATEWAY_API_VERSIONS"),
        ({"GATEWAY_TRUSTED_PROXIES": "10.0.0.0/8,example.com"}, "GATEWAY_TRUSTED_PROXIES"),
    ],
)
def test_bad_security_settings_fail_naming_the_setting(change: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({**env(BACKEND), **change})


def test_security_defaults() -> None:
    settings = load_settings(env(BACKEND))
    assert settings.auth_fail_mode == "closed" and settings.consumer_max_stale_s == 300
    assert settings.unknown_key_lookups_per_s == 2 and settings.auth_failures_per_minute == 20
    assert not settings.reveal_deployments and settings.admin_key_sha256 is None and settings.api_versions is None
    assert settings.forwarded_hops == 0 and settings.trusted_proxies == ()
    on_azure = load_settings({**env(BACKEND), "WEBSITE_SITE_NAME": "func-aigw"})
    assert on_azure.forwarded_hops == 1  # the platform's front end appends the caller's address


def test_the_cache_blob_endpoint_follows_the_tables_account_or_its_setting() -> None:
    from shared.config import ConfigError, load_settings

    base: dict[str, str] = {}
    identity = load_settings({**base, "GATEWAY_TABLE_ENDPOINT": "https://acct.table.core.windows.net"},
                             require_backends=False)
    assert identity.blob_endpoint == "https://acct.blob.core.windows.net"
    named = load_settings({**base, "GATEWAY_TABLE_ENDPOINT": "https://acct.table.core.windows.net",
                           "GATEWAY_BLOB_ENDPOINT": "https://other.blob.core.windows.net"}, require_backends=False)
    assert named.blob_endpoint == "https://other.blob.core.windows.net"
    keyed = load_settings({**base, "GATEWAY_TABLE_CONNECTION_STRING": "UseDevelopmentStorage=true"},
                          require_backends=False)
    assert keyed.blob_endpoint is None and keyed.cache_memory_bytes == 64 * 1024 * 1024
    with pytest.raises(ConfigError, match="GATEWAY_BLOB_ENDPOINT"):
        load_settings({**base, "GATEWAY_TABLE_ENDPOINT": "https://a.table.core.windows.net",
                       "GATEWAY_BLOB_ENDPOINT": "ftp://x"}, require_backends=False)


PTU = {**BACKEND, "ptu": True, "deployments": ["gpt-4o", "gpt-4o-mini"]}


@pytest.mark.parametrize(
    ("fields", "stated"),
    [
        ({"ptu_tokens_per_minute": 30000}, {"gpt-4o": 30000, "gpt-4o-mini": 30000}),
        ({"ptu_tokens_per_minute": {"gpt-4o": 30000}}, {"gpt-4o": 30000}),
        ({"ptu_units": 15, "ptu_tokens_per_unit": 2500}, {"gpt-4o": 37500, "gpt-4o-mini": 37500}),
        ({"ptu_units": {"gpt-4o": 15, "gpt-4o-mini": 25}, "ptu_tokens_per_unit": {"gpt-4o": 2500, "gpt-4o-mini": 37000}},
         {"gpt-4o": 37500, "gpt-4o-mini": 925000}),
        ({}, {}),
    ],
)
def test_a_ptu_states_its_capacity(fields: dict[str, Any], stated: dict[str, int]) -> None:
    (backend,) = load_settings(env({**PTU, **fields})).backends
    assert dict(backend.ptu_tokens_per_minute) == stated


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ptu": False, "ptu_tokens_per_minute": 30000}, "ptu_tokens_per_minute: only a PTU backend"),
        ({"ptu_tokens_per_minute": 0}, "ptu_tokens_per_minute: expected a whole number"),
        ({"ptu_tokens_per_minute": "30k"}, "ptu_tokens_per_minute: expected a whole number"),
        ({"ptu_tokens_per_minute": True}, "ptu_tokens_per_minute: expected a whole number"),
        ({"ptu_tokens_per_minute": {"gpt-5": 1000}}, "ptu_tokens_per_minute.gpt-5: not a deployment of this backend"),
        ({"ptu_tokens_per_minute": {"gpt-4o": 1.5}}, "ptu_tokens_per_minute.gpt-4o: expected a whole number"),
        ({"ptu_tokens_per_minute": 1000, "ptu_units": 1}, "not both"),
        ({"ptu_units": 15}, "ptu_tokens_per_unit: ptu_units needs ptu_tokens_per_unit"),
        ({"ptu_tokens_per_unit": 2500}, "ptu_units: ptu_tokens_per_unit needs ptu_units"),
        ({"ptu_units": {"gpt-4o": 1}, "ptu_tokens_per_unit": {"gpt-4o-mini": 2}}, "give both ptu_units and ptu_tokens_per_unit"),
    ],
)
def test_a_bad_stated_capacity_fails_at_start_up(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(env({**PTU, **fields}))
    assert message in str(raised.value) and "GATEWAY_BACKENDS[0]" in str(raised.value)


@pytest.mark.parametrize(("value", "mode"), [(None, "reasoning"), ("reasoning", "reasoning"), ("true", "on"),
                                             ("ON", "on"), ("false", "off"), ("off", "off")])
def test_the_output_cap_is_on_off_or_for_reasoning_models(value: str | None, mode: str) -> None:
    assert load_settings({**env(BACKEND), **({"GATEWAY_OUTPUT_CAP": value} if value else {})}).output_cap == mode


def test_an_unknown_output_cap_mode_is_refused() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_OUTPUT_CAP: expected on, off or reasoning"):
        load_settings({**env(BACKEND), "GATEWAY_OUTPUT_CAP": "sometimes"})


def test_an_empty_stated_capacity_states_nothing_even_on_a_pay_as_you_go_backend() -> None:
    (backend,) = load_settings(env({**BACKEND, "ptu_tokens_per_minute": {}})).backends
    assert dict(backend.ptu_tokens_per_minute) == {}
