"""The admin API in-process (the real edge, over the in-memory stores): every endpoint, every refusal, the audit
table, and the one implementation under both the API and the admin command."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest

from shared.edge.consumers import hash_key
from tests.fakes.gateway import ADMIN_KEY, GatewayHarness
from tests.fakes.upstream import Reply, Sent, default_reply, error_reply
from tools.entra import AUDIENCE, TENANT, Authority, served

API = "/console/api"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
PAGE = {"x-requested-with": "gateway-console"}  # what the console page sends with every call


@pytest.fixture
async def harness() -> AsyncIterator[GatewayHarness]:
    h = GatewayHarness()
    yield h
    await h.close()


def principal(*roles: str, name: str = "ops@example.com") -> str:
    claims = [{"typ": "name", "val": name}, *({"typ": "roles", "val": r} for r in roles)]
    return base64.b64encode(json.dumps({"auth_typ": "aad", "name_typ": "name", "role_typ": "roles",
                                        "claims": claims}).encode()).decode()


async def call(h: GatewayHarness, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
               **options: Any) -> httpx.Response:
    sent = {**ADMIN, **(headers or {})} if headers is None or "authorization" not in headers else headers
    if body is not None:
        options["json"] = body
    return await h.http.request(method, API + path, headers=sent, **options)


def error(response: httpx.Response) -> dict[str, Any]:
    document: dict[str, Any] = response.json()["error"]
    assert set(document) == {"message", "type", "param", "code"}
    return document


# ---- consumers: create, key once, read, change, rotate, disable, enable, delete --------------------------------------

async def test_a_created_consumer_gets_its_key_once_and_the_key_calls_the_gateway(harness: GatewayHarness) -> None:
    created = await call(harness, "POST", "/consumers", {"name": "Billing app", "deployments": ["gpt-4o"],
                                                         "tokens_per_minute": 5000})
    assert created.status_code == 201, created.text
    document = created.json()
    key = document["key"]
    assert document["id"] == "billing-app" and key.startswith(document["key_prefix"])
    assert created.headers["location"] == f"{API}/consumers/billing-app"
    assert created.headers["cache-control"] == "no-store"
    answer = await harness.openai(key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert answer.usage is not None
    for read in (await call(harness, "GET", "/consumers/billing-app"), await call(harness, "GET", "/consumers")):
        assert read.status_code == 200 and key not in read.text and hash_key(key) not in read.text
    listed = (await call(harness, "GET", "/consumers")).json()["data"]
    assert [c["id"] for c in listed] == ["billing-app"] and listed[0]["tokens_per_minute"] == 5000
    audit = (await call(harness, "GET", "/audit")).json()["data"]
    assert key not in json.dumps(audit) and hash_key(key) not in json.dumps(audit)


async def test_every_field_the_command_sets_goes_through_the_api_with_the_same_names(harness: GatewayHarness) -> None:
    harness.team("core")
    document = {
        "name": "Full", "id": "full", "deployments": ["gpt-4o", "gpt-4o-mini"], "tokens_per_minute": 1000,
        "deployment_tokens_per_minute": {"gpt-4o": 500}, "quota": 100000, "quota_period": "monthly", "budget": 12.5,
        "budget_period": "daily", "priority": "high", "output_cap": "off",
        "entra": ["app:6d6d6d6d-1111-4222-8333-444455556666", "role:Billing.Reader"],
        "capabilities": ["web_search"], "team": "core",
        "users": {"tokens_per_minute": 10, "quota": 20, "quota_period": "daily", "sources": ["header"], "required": True},
        "fallback": "off", "cache": {"on": True, "ttl_s": 60, "scope": "team", "tools": False}, "enabled": True,
    }
    created = await call(harness, "POST", "/consumers", document)
    assert created.status_code == 201, created.text
    shown = (await call(harness, "GET", "/consumers/full")).json()
    for field, value in document.items():
        expected = sorted(value) if field in ("entra", "capabilities", "deployments") else value
        assert shown[field] == expected, field
    # A document read can be sent back as it is.
    back = await call(harness, "PATCH", "/consumers/full", shown)
    assert back.status_code == 200 and back.json() == shown
    from shared.admin.cli import describe

    assert describe(harness.consumer_store.consumers["full"]) == shown  # the command prints the same document


async def test_patch_changes_only_the_fields_given_and_records_before_and_after(harness: GatewayHarness) -> None:
    await call(harness, "POST", "/consumers", {"name": "a", "deployments": "*", "tokens_per_minute": 10})
    changed = await call(harness, "PATCH", "/consumers/a", {"quota": 50, "quota_period": "daily"})
    assert changed.status_code == 200
    assert (changed.json()["tokens_per_minute"], changed.json()["quota"]) == (10, 50)
    entry = (await call(harness, "GET", "/audit")).json()["data"][0]
    assert (entry["action"], entry["target"], entry["actor"], entry["role"]) == ("consumers.set", "a", "key:admin",
                                                                                  "Gateway.Admin")
    assert (entry["before"]["quota"], entry["after"]["quota"]) == (0, 50)


async def test_rotate_with_grace_then_disable_enable_and_delete(harness: GatewayHarness) -> None:
    old = (await call(harness, "POST", "/consumers", {"name": "r", "deployments": "*"})).json()["key"]
    rotated = await call(harness, "POST", "/consumers/r/rotate", {"grace_seconds": 60})
    assert rotated.status_code == 200
    new = rotated.json()["key"]
    assert new != old and rotated.json()["key_prefix"] == new[:9]
    ask = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    await harness.services.consumers.reload()  # what every gateway does within GATEWAY_CONSUMER_CHECK_S
    await harness.openai(old).chat.completions.create(**ask)  # within its grace
    harness.clock.advance(61)
    with pytest.raises(openai.AuthenticationError):
        await harness.openai(old).chat.completions.create(**ask)
    await harness.openai(new).chat.completions.create(**ask)
    assert (await call(harness, "POST", "/consumers/r/disable")).json()["enabled"] is False
    await harness.services.consumers.reload()
    with pytest.raises(openai.AuthenticationError):
        await harness.openai(new).chat.completions.create(**ask)
    assert (await call(harness, "POST", "/consumers/r/enable")).json()["enabled"] is True
    deleted = await call(harness, "DELETE", "/consumers/r")
    assert deleted.json() == {"id": "r", "deleted": True}
    assert (await call(harness, "GET", "/consumers/r")).status_code == 404
    actions = [e["action"] for e in (await call(harness, "GET", "/audit")).json()["data"]]
    assert actions == ["consumers.delete", "consumers.enable", "consumers.disable", "consumers.rotate", "consumers.create"]


# ---- strict input: the field named, nothing written -----------------------------------------------------------------

@pytest.mark.parametrize(("body", "param", "code"), [
    ({"name": "x", "deployments": "*", "colour": "red"}, "colour", "unknown_field"),
    ({"name": "x", "deployments": "*", "tokens_per_minute": "10"}, "tokens_per_minute", "invalid_value"),
    ({"name": "x", "deployments": "*", "tokens_per_minute": -1}, "tokens_per_minute", "invalid_value"),
    ({"name": "x", "deployments": "*", "tokens_per_minute": 10**13}, "tokens_per_minute", "invalid_value"),
    ({"name": "x", "deployments": "*", "tokens_per_minute": True}, "tokens_per_minute", "invalid_value"),
    ({"name": "x", "deployments": "*", "quota": 5}, "quota_period", "invalid_value"),
    ({"name": "x", "deployments": "*", "budget": float("inf")}, None, "invalid_json"),
    ({"name": "x", "deployments": "*", "budget": -2}, "budget", "invalid_value"),
    ({"name": "x", "deployments": "*", "priority": "low"}, "priority", "invalid_value"),
    ({"name": "x", "deployments": []}, "deployments", "invalid_value"),
    ({"name": "x", "deployments": ["bad name!"]}, "deployments", "invalid_value"),
    ({"name": "x", "deployments": ["not-served"]}, "deployments", "deployment_not_served"),
    ({"name": "x"}, "deployments", "invalid_value"),
    ({"deployments": "*"}, "name", "invalid_value"),
    ({"name": "x", "id": "Bad_Id", "deployments": "*"}, "id", "invalid_value"),
    ({"name": "x", "deployments": "*", "entra": ["app:not-a-guid"]}, "entra", "invalid_value"),
    ({"name": "x", "deployments": "*", "capabilities": ["everything"]}, "capabilities", "invalid_value"),
    ({"name": "x", "deployments": "*", "users": {"tokens": 5}}, "tokens", "unknown_field"),
    ({"name": "x", "deployments": "*", "cache": {"ttl_s": 0}}, "cache.ttl_s", "invalid_value"),
    ({"name": "x", "deployments": "*", "team": "no-such-team"}, "team", "invalid_value"),
    ({"name": "x", "deployments": "*", "key_prefix": "gw-abc"}, "key_prefix", "invalid_value"),
    (["not", "an", "object"], "body", "invalid_value"),
])
async def test_a_bad_create_is_400_with_the_field_named_and_writes_nothing(
    harness: GatewayHarness, body: Any, param: str | None, code: str,
) -> None:
    if code == "invalid_json":
        response = await harness.http.post(API + "/consumers", headers={**ADMIN, "content-type": "application/json"},
                                           content=json.dumps(body).encode())  # Infinity is not JSON
    else:
        response = await call(harness, "POST", "/consumers", body)
    assert response.status_code == 400, response.text
    assert (error(response)["param"], error(response)["code"]) == (param, code)
    assert harness.consumer_store.consumers == {} and harness.change_log.entries == []


async def test_a_bad_patch_writes_nothing(harness: GatewayHarness) -> None:
    await call(harness, "POST", "/consumers", {"name": "p", "deployments": "*", "tokens_per_minute": 7})
    before = harness.consumer_store.consumers["p"]
    entries = len(harness.change_log.entries)
    for body, param in (({"tokens_per_minute": 1, "quota": "x"}, "quota"), ({"id": "other"}, "id"),
                        ({"key_prefix": "gw-123456"}, "key_prefix"), ({"name": ""}, "name")):
        response = await call(harness, "PATCH", "/consumers/p", body)
        assert response.status_code == 400 and error(response)["param"] == param
    assert harness.consumer_store.consumers["p"] == before and len(harness.change_log.entries) == entries


async def test_refusals_of_shape_media_size_method_and_missing_records(harness: GatewayHarness) -> None:
    as_text = await harness.http.post(API + "/consumers", headers={**ADMIN, "content-type": "text/plain"}, content=b"{}")
    assert as_text.status_code == 415
    broken = await harness.http.post(API + "/consumers", headers={**ADMIN, "content-type": "application/json"},
                                     content=b"{nope")
    assert (broken.status_code, error(broken)["code"]) == (400, "invalid_json")
    huge = await call(harness, "POST", "/consumers", {"name": "x" * 70_000, "deployments": "*"})
    assert huge.status_code == 413
    assert (await call(harness, "PUT", "/consumers")).status_code == 405
    assert (await call(harness, "GET", "/nothing-here")).status_code == 404
    for method, path in (("GET", "/consumers/ghost"), ("PATCH", "/consumers/ghost"), ("DELETE", "/consumers/ghost"),
                         ("POST", "/consumers/ghost/rotate"), ("POST", "/consumers/ghost/disable"),
                         ("GET", "/teams/ghost"), ("DELETE", "/teams/ghost")):
        response = await call(harness, method, path, {} if method == "PATCH" else None)
        assert response.status_code == 404, (method, path)
    await call(harness, "POST", "/consumers", {"name": "dup", "deployments": "*"})
    again = await call(harness, "POST", "/consumers", {"name": "dup", "deployments": "*"})
    assert (again.status_code, error(again)["code"]) == (409, "already_exists")
    for grace in (-1, 30 * 86400 + 1, "10", True):
        bad = await call(harness, "POST", "/consumers/dup/rotate", {"grace_seconds": grace})
        assert (bad.status_code, error(bad)["param"]) == (400, "grace_seconds")
    assert (await call(harness, "POST", "/consumers/dup/rotate", {"grace": 1})).status_code == 400
    assert (await call(harness, "GET", "/consumers?secret=1")).status_code == 400
    assert len([e for e in harness.change_log.entries if e.action == "consumers.rotate"]) == 0


async def test_one_entra_mapping_one_consumer(harness: GatewayHarness) -> None:
    mapping = ["app:6d6d6d6d-1111-4222-8333-444455556666"]
    assert (await call(harness, "POST", "/consumers", {"name": "a", "deployments": "*", "entra": mapping})).status_code == 201
    taken = await call(harness, "POST", "/consumers", {"name": "b", "deployments": "*", "entra": mapping})
    assert (taken.status_code, error(taken)["code"], error(taken)["param"]) == (409, "mapping_taken", "entra")
    assert "b" not in harness.consumer_store.consumers


# ---- sign-in and roles ----------------------------------------------------------------------------------------------

async def test_no_credential_or_a_wrong_key_is_401_and_every_endpoint_asks(harness: GatewayHarness) -> None:
    for method, path in (("GET", "/consumers"), ("POST", "/consumers"), ("GET", "/usage"), ("GET", "/traffic"),
                         ("GET", "/backends"), ("GET", "/audit"), ("GET", "/teams"), ("GET", "/whoami"),
                         ("POST", "/consumers/x/rotate"), ("DELETE", "/consumers/x")):
        response = await harness.http.request(method, API + path)
        assert response.status_code == 401, (method, path)
    wrong = await harness.http.get(API + "/consumers", headers={"authorization": "Bearer gw-not-the-admin-key"})
    assert (wrong.status_code, error(wrong)["code"]) == (401, "invalid_credential")
    in_query = await harness.http.get(API + "/consumers", params={"key": ADMIN_KEY})
    assert in_query.status_code == 401  # never from a URL
    as_api_key = await harness.http.get(API + "/consumers", headers={"api-key": ADMIN_KEY})
    assert as_api_key.status_code == 401


async def test_a_consumer_key_is_not_an_admin_credential(harness: GatewayHarness) -> None:
    key = harness.consumer("app")
    assert (await harness.http.get(API + "/consumers", headers={"authorization": f"Bearer {key}"})).status_code == 401


async def test_failed_credentials_are_throttled_per_address(harness: GatewayHarness) -> None:
    statuses = [(await harness.http.get(API + "/consumers", headers={"authorization": f"Bearer wrong-{i}"})).status_code
                for i in range(40)]
    assert statuses[0] == 401 and statuses[-1] == 429


async def test_a_forged_easy_auth_principal_is_ignored_without_the_setting(harness: GatewayHarness) -> None:
    forged = await harness.http.get(API + "/consumers", headers={"x-ms-client-principal": principal("Gateway.Admin")})
    assert forged.status_code == 401
    written = await harness.http.post(API + "/consumers", json={"name": "x", "deployments": "*"},
                                      headers={"x-ms-client-principal": principal("Gateway.Admin")})
    assert written.status_code == 401 and harness.consumer_store.consumers == {}


async def test_behind_easy_auth_the_reader_reads_and_is_refused_writes() -> None:
    h = GatewayHarness(env={"GATEWAY_CONSOLE_EASY_AUTH": "true"})
    try:
        reader = {"x-ms-client-principal": principal("Gateway.Reader", name="reader@example.com"), **PAGE}
        assert (await h.http.get(API + "/consumers", headers=reader)).status_code == 200
        who = (await h.http.get(API + "/whoami", headers=reader)).json()
        assert who == {"name": "easyauth:reader@example.com", "role": "Gateway.Reader", "may_write": False}
        for method, path in (("POST", "/consumers"), ("PATCH", "/consumers/x"), ("DELETE", "/consumers/x"),
                             ("POST", "/consumers/x/rotate"), ("POST", "/consumers/x/disable"), ("POST", "/teams")):
            refused = await h.http.request(method, API + path, headers=reader, json={"name": "x", "deployments": "*"})
            assert (refused.status_code, error(refused)["code"]) == (403, "read_only"), (method, path)
        assert h.consumer_store.consumers == {} and h.change_log.entries == []
        nobody = await h.http.get(API + "/consumers", headers={"x-ms-client-principal": principal()})
        assert (nobody.status_code, error(nobody)["code"]) == (403, "no_role")
        garbage = await h.http.get(API + "/consumers", headers={"x-ms-client-principal": "%%%"})
        assert garbage.status_code == 401
        admin = {"x-ms-client-principal": principal("Gateway.Admin", name="boss@example.com"), **PAGE}
        made = await h.http.post(API + "/consumers", headers=admin, json={"name": "x", "deployments": "*"})
        assert made.status_code == 201
        assert h.change_log.entries[-1].actor == "easyauth:boss@example.com"
    finally:
        await h.close()


async def test_behind_easy_auth_a_change_without_the_pages_header_is_refused_as_cross_site() -> None:
    """Easy Auth's sign-in rides on a cookie the browser sends with any site's form: a change made with it must carry
    a header only a script of this origin can add. Reads need none; the admin key (never ambient) needs none."""
    h = GatewayHarness(env={"GATEWAY_CONSOLE_EASY_AUTH": "true"})
    try:
        signed_in = {"x-ms-client-principal": principal("Gateway.Admin", name="boss@example.com")}
        await h.http.post(API + "/consumers", headers={**ADMIN, **PAGE}, json={"name": "victim", "deployments": "*"})
        entries = len(h.change_log.entries)
        for method, path, body in (("POST", "/consumers/victim/disable", None), ("DELETE", "/consumers/victim", None),
                                   ("POST", "/consumers/victim/rotate", None),
                                   ("PATCH", "/consumers/victim", {"tokens_per_minute": 1}),
                                   ("POST", "/consumers", {"name": "y", "deployments": "*"})):
            for headers in (signed_in, {**signed_in, "x-requested-with": "XMLHttpRequest"}):
                forged = await h.http.request(method, API + path, headers=headers, json=body)
                assert (forged.status_code, error(forged)["code"]) == (403, "cross_site"), (method, path)
        assert h.consumer_store.consumers["victim"].enabled and len(h.change_log.entries) == entries
        assert list(h.consumer_store.consumers) == ["victim"]
        assert (await h.http.get(API + "/consumers", headers=signed_in)).status_code == 200
        by_key = await h.http.post(API + "/consumers/victim/disable", headers=ADMIN)
        assert by_key.status_code == 200
        by_page = await h.http.post(API + "/consumers/victim/enable", headers={**signed_in, **PAGE})
        assert by_page.status_code == 200 and by_page.json()["enabled"] is True
    finally:
        await h.close()


@pytest.fixture(scope="module")
def authority() -> Iterator[Authority]:
    entra = Authority()
    with served(entra):
        yield entra


async def test_entra_tokens_with_the_app_roles(authority: Authority) -> None:
    h = GatewayHarness(env={"GATEWAY_ENTRA_TENANT_IDS": TENANT, "GATEWAY_ENTRA_AUDIENCES": AUDIENCE,
                            "GATEWAY_ENTRA_AUTHORITY": authority.base_url})
    try:
        def bearer(**claims: Any) -> dict[str, str]:
            return {"authorization": "Bearer " + authority.token(issued_at=h.clock.now(), **claims)}

        admin, reader = bearer(roles=["Gateway.Admin"]), bearer(roles=["Gateway.Reader"])
        made = await h.http.post(API + "/consumers", headers=admin, json={"name": "t", "deployments": "*"})
        assert made.status_code == 201
        assert h.change_log.entries[-1].actor.startswith("entra:")
        assert (await h.http.get(API + "/consumers", headers=reader)).status_code == 200
        assert (await h.http.post(API + "/consumers/t/disable", headers=reader)).status_code == 403
        assert (await h.http.get(API + "/consumers", headers=bearer(roles=["Something.Else"]))).status_code == 403
        wrong_audience = bearer(roles=["Gateway.Admin"], aud="api://someone-else")
        assert (await h.http.get(API + "/consumers", headers=wrong_audience)).status_code == 401
    finally:
        await h.close()


# ---- teams -----------------------------------------------------------------------------------------------------------

async def test_teams_create_change_membership_and_delete_only_when_empty(harness: GatewayHarness) -> None:
    made = await call(harness, "POST", "/teams", {"name": "Core", "deployments": "*", "tokens_per_minute": 900})
    assert made.status_code == 201 and made.json()["members"] == []
    assert (await call(harness, "PATCH", "/teams/core", {"quota": 5, "quota_period": "daily"})).json()["quota"] == 5
    await call(harness, "POST", "/consumers", {"name": "m", "deployments": "*", "team": "core"})
    assert (await call(harness, "GET", "/teams/core")).json()["members"] == ["m"]
    assert [t["id"] for t in (await call(harness, "GET", "/teams")).json()["data"]] == ["core"]
    busy = await call(harness, "DELETE", "/teams/core")
    assert (busy.status_code, error(busy)["code"]) == (409, "team_has_members")
    await call(harness, "PATCH", "/consumers/m", {"team": None})
    assert (await call(harness, "DELETE", "/teams/core")).status_code == 200
    bad = await call(harness, "PATCH", "/teams/core", {"members": []})
    assert bad.status_code in (400, 404)


# ---- usage, traffic, backends, audit, openapi ----------------------------------------------------------------------

async def test_usage_from_the_same_rows_as_the_command(harness: GatewayHarness) -> None:
    key = (await call(harness, "POST", "/consumers", {"name": "u", "deployments": "*"})).json()["key"]
    answer = await harness.openai(key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    await harness.usage.flush()
    assert answer.usage is not None
    for period in ("hourly", "daily", "monthly"):
        usage = (await call(harness, "GET", f"/usage?period={period}&consumer=u")).json()
        assert [(u["consumer"], u["deployment"], u["requests"], u["total_tokens"]) for u in usage["usage"]] == [
            ("u", "gpt-4o", 1, answer.usage.total_tokens)]
    from shared.admin.usage_report import summarize

    assert summarize(harness.usage_store.rows.values())[0].total == answer.usage.total_tokens
    for query, param in (("period=weekly-ish", "period"), ("at=yesterday", "at"), ("consumer=Bad!", "consumer")):
        bad = await call(harness, "GET", f"/usage?{query}")
        assert (bad.status_code, error(bad)["param"]) == (400, param)


async def test_traffic_per_backend_shows_429s_and_the_failover(harness: GatewayHarness) -> None:
    key = harness.consumer("t")
    harness.upstream.script("uksouth-ptu", error_reply(429, {"retry-after": "5"}))
    await harness.openai(key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    traffic = (await call(harness, "GET", "/traffic?minutes=5")).json()
    assert traffic["bucket_s"] == 10 and traffic["buckets"] == 30
    by_id = {b["id"]: b for b in traffic["backends"]}
    assert [b["id"] for b in traffic["backends"]][0] == "uksouth-ptu"  # PTU first
    assert sum(by_id["uksouth-ptu"]["throttled"]) == 1 and sum(by_id["uksouth-ptu"]["failovers"]) == 1
    served = [b for b in traffic["backends"] if sum(b["requests"]) == 1]
    assert len(served) == 1 and served[0]["id"] != "uksouth-ptu" and sum(served[0]["tokens"]) > 0
    for minutes in ("0", "61", "x", "-1"):
        assert (await call(harness, "GET", f"/traffic?minutes={minutes}")).status_code == 400
    assert traffic["deployments"] == []  # no model fell back


async def test_traffic_shows_model_fallbacks_per_deployment_over_time() -> None:
    """gpt-4o's every region answers 429: each request falls back to gpt-4o-mini, and the traffic says so, per
    deployment, in the bucket it happened in, summed across instances."""
    chain = {"GATEWAY_DEPLOYMENTS": json.dumps({"gpt-4o": {"fallback": ["gpt-4o-mini"]}})}
    h = GatewayHarness(env=chain)
    other = GatewayHarness(env=chain, beside=h, instance_id="other")

    def busy_gpt4o(sent: Sent) -> Reply:
        return error_reply(429, {"retry-after": "1"}) if "/deployments/gpt-4o/" in sent.url else default_reply(sent)

    h.upstream._default = busy_gpt4o  # both instances share this upstream
    try:
        key = h.consumer("fb")
        ask = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        for harness in (h, other):
            answer = await harness.openai(key).chat.completions.with_raw_response.create(**ask)
            assert answer.headers["x-gateway-deployment"] == "gpt-4o-mini"
            h.clock.advance(11)
        await other.traffic.flush()  # the other instance's rows, as it writes them within 10 s
        h.traffic_store.rows.update(other.traffic_store.rows)  # one table in Azure: both instances write to it
        traffic = (await call(h, "GET", "/traffic?minutes=1")).json()
        (gpt4o,) = traffic["deployments"]
        assert gpt4o["id"] == "gpt-4o" and gpt4o["fallbacks"][-3:] == [1, 1, 0] and sum(gpt4o["fallbacks"]) == 2
    finally:
        await other.close()
        await h.close()


async def test_backends_show_breakers_without_secrets(harness: GatewayHarness) -> None:
    backends = (await call(harness, "GET", "/backends")).json()
    assert [b["id"] for b in backends["backends"]] == ["uksouth-ptu", "swedencentral", "francecentral"]
    text = json.dumps(backends)
    assert "api_key" not in text and "sim-key" not in text.lower()


async def test_audit_limits_and_days_are_checked(harness: GatewayHarness) -> None:
    for query in ("limit=0", "limit=501", "days=0", "limit=x", "other=1"):
        assert (await call(harness, "GET", f"/audit?{query}")).status_code == 400, query
    for i in range(3):
        await call(harness, "POST", "/consumers", {"name": f"c{i}", "deployments": "*"})
    assert len((await call(harness, "GET", "/audit?limit=2")).json()["data"]) == 2


async def test_openapi_describes_every_route_the_api_serves(harness: GatewayHarness) -> None:
    document = (await harness.http.get(API + "/openapi.json")).json()
    assert document["openapi"].startswith("3.")
    api = (await harness.gateway(), harness.edge)[1]
    console = await api.console()
    served = {("get", "/signin")}  # answered before any credential is asked for
    for method, pattern, _ in console._routes:
        path = pattern.pattern.replace("([a-z0-9][a-z0-9-]{0,62})", "{id}").replace("(disable|enable)", "disable")
        served.add((method.lower(), path))
        if "(disable|enable)" in pattern.pattern:
            served.add((method.lower(), path.replace("disable", "enable")))
    described = {(m, p) for p, ops in document["paths"].items() for m in ops if m != "parameters"}
    assert described == served


async def test_the_sign_in_hint_needs_no_credential_and_says_only_whether_easy_auth_is_in_front() -> None:
    for setting, expected in (("false", False), ("true", True)):
        h = GatewayHarness(env={"GATEWAY_CONSOLE_EASY_AUTH": setting})
        try:
            answer = await h.http.get(API + "/signin")
            assert answer.status_code == 200 and answer.json() == {"easy_auth": expected}
            assert (await h.http.post(API + "/signin")).status_code == 404
        finally:
            await h.close()


async def test_the_cli_and_the_api_write_through_one_operation(harness: GatewayHarness) -> None:
    """The command's create goes through AdminOperations and lands in the same audit table."""
    import argparse

    from shared.admin.cli import Admin

    admin = Admin(harness.consumer_store, out=io.StringIO(), err=io.StringIO(), json_mode=True, audit=harness.change_log)
    args = argparse.Namespace(name="From CLI", id=None, no_key=False, deployments=None, all_deployments=True, tpm=None,
                              deployment_tpm=None, quota=None, quota_period=None, budget=None, budget_period=None,
                              priority=None)
    await admin.create(args)
    entry = (await call(harness, "GET", "/audit")).json()["data"][0]
    assert entry["action"] == "consumers.create" and entry["target"] == "from-cli" and entry["actor"].startswith("cli:")
