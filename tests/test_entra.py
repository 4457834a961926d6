"""Entra ID access tokens: each way a token can be wrong is refused with its reason, and what is right is cached."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from shared.clock import FakeClock
from shared.config import ConfigError, EntraSettings, load_settings
from shared.edge.consumers import ConsumerDirectory, hash_key
from shared.edge.entra import (
    PrincipalIndex,
    SigningKeys,
    TokenRefused,
    TokenValidator,
    looks_like_jwt,
    mapping_key,
)
from shared.edge.errors import render
from shared.edge.identity import Identifier
from shared.outcomes import AuthStoreUnavailable, AuthThrottled, InvalidToken
from shared.records.consumers import Consumer
from shared.storage.memory import MemoryConsumerStore
from shared.telemetry.protocol import NullTelemetry
from tools.entra import (
    AUDIENCE,
    CALLER_APP,
    CALLER_OID,
    GATEWAY_APP,
    OTHER_TENANT,
    TENANT,
    Authority,
    MemoryFetcher,
    new_rsa_key,
)

OTHER_OID = "9e8d7c6b-5a49-4837-a625-140f3e2d1c0b"
SETTINGS = EntraSettings(tenants=(TENANT,), audiences=(AUDIENCE, GATEWAY_APP), clock_skew_s=60)


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority(tenants=(TENANT, OTHER_TENANT))


def make(authority: Authority, settings: EntraSettings = SETTINGS, failing: bool = False) -> tuple[TokenValidator, MemoryFetcher, FakeClock]:
    clock = FakeClock(start=time.time())
    fetcher = MemoryFetcher(authority, failing=failing)
    return TokenValidator(settings, SigningKeys(settings, fetcher, clock), clock), fetcher, clock


async def refused(validator: TokenValidator, token: str) -> str:
    with pytest.raises(TokenRefused) as caught:
        await validator.validate(token)
    return caught.value.reason


# ---- what is accepted ---------------------------------------------------------------------------------------------


async def test_a_v2_token_names_its_application_and_object(authority: Authority) -> None:
    validator, fetcher, _ = make(authority)
    principal = await validator.validate(authority.token(roles=["Gateway.Call"]))
    assert (principal.tenant, principal.app_id, principal.object_id) == (TENANT, CALLER_APP, CALLER_OID)
    assert principal.roles == ("Gateway.Call",)
    assert len(fetcher.urls) == 2  # metadata, then its jwks_uri


async def test_a_delegated_token_speaks_for_a_person_and_an_app_only_one_for_none(authority: Authority) -> None:
    """The end-user level takes the object id only of a person (issue 27): a delegated token carries scopes (`scp`) or
    idtyp 'user'; a token an application got for itself carries neither."""
    validator, _, _ = make(authority)
    assert (await validator.validate(authority.token(scp="Gateway.Call"))).person
    assert (await validator.validate(authority.token(idtyp="user"))).person
    assert not (await validator.validate(authority.token(roles=["Gateway.Call"]))).person
    assert not (await validator.validate(authority.token(idtyp="app", roles=["Gateway.Call"]))).person


async def test_a_v1_token_from_sts_windows_net_with_appid(authority: Authority) -> None:
    validator, _, _ = make(authority)
    principal = await validator.validate(authority.token(version=1, aud=GATEWAY_APP))
    assert principal.app_id == CALLER_APP


# ---- what is refused, and why -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"aud": "api://some-other-app"}, "wrong_audience"),
        ({"aud": "https://cognitiveservices.azure.com"}, "wrong_audience"),
        ({"tenant": OTHER_TENANT}, "wrong_tenant"),
        ({"iss": f"https://login.microsoftonline.com/{OTHER_TENANT}/v2.0"}, "wrong_issuer"),
        ({"iss": "https://evil.example/v2.0"}, "wrong_issuer"),
        ({"lifetime_s": -3600}, "expired"),
        ({"nbf": int(time.time()) + 3600}, "not_yet_valid"),
        ({"exp": None}, "missing_claim"),
        ({"aud": None}, "missing_claim"),
    ],
)
async def test_claims_that_do_not_fit_are_refused(authority: Authority, claims: dict[str, Any], reason: str) -> None:
    validator, _, _ = make(authority)
    assert await refused(validator, authority.token(**claims)) == reason


async def test_a_tenant_that_is_not_allowed_costs_no_fetch(authority: Authority) -> None:
    validator, fetcher, _ = make(authority)
    for _ in range(50):
        assert await refused(validator, authority.token(tenant=OTHER_TENANT, uti=str(_))) == "wrong_tenant"
    assert fetcher.urls == []


async def test_expiry_allows_the_configured_clock_skew(authority: Authority) -> None:
    validator, _, clock = make(authority)
    token = authority.token(lifetime_s=10)
    clock.advance(10 + 50)  # past exp, within 60 s of skew
    assert (await validator.validate(token)).app_id == CALLER_APP
    clock.advance(20)
    assert await refused(validator, token) == "expired"


async def test_a_signature_by_another_key_under_a_known_kid_is_refused(authority: Authority) -> None:
    validator, _, _ = make(authority)
    assert await refused(validator, authority.token(kid="key-1", key=new_rsa_key())) == "bad_signature"


async def test_alg_none_is_refused(authority: Authority) -> None:
    validator, fetcher, _ = make(authority)
    token = jwt.encode(authority.claims(), key=None, algorithm="none", headers={"kid": "key-1"})
    assert await refused(validator, token) == "alg_not_allowed"
    assert fetcher.urls == []


async def test_hs256_signed_with_the_public_key_is_refused(authority: Authority) -> None:
    """The classic confusion: the attacker signs with HMAC, using the published public key as the secret."""
    validator, _, _ = make(authority)
    public_pem = authority.keys["key-1"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"kid": "key-1", "alg": "HS256", "typ": "JWT"}
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(authority.claims()).encode())
    signature = b64(hmac.new(public_pem, signing_input, hashlib.sha256).digest())
    assert await refused(validator, (signing_input + b"." + signature).decode()) == "alg_not_allowed"


@pytest.mark.parametrize("token", ["eyJhbGciOiJSUzI1NiJ9.not-json.sig", "eyJ" + "A" * 40 + ".." , "eyJ.e30.x"])
async def test_garbage_is_malformed_never_an_exception(authority: Authority, token: str) -> None:
    validator, _, _ = make(authority)
    assert await refused(validator, token) == "malformed"


async def test_required_roles_or_scopes(authority: Authority) -> None:
    settings = replace(SETTINGS, required_roles=("Gateway.Call",), required_scopes=("user_impersonation",))
    validator, _, _ = make(authority, settings)
    assert await refused(validator, authority.token(roles=["Other"])) == "missing_role"
    assert (await validator.validate(authority.token(roles=["Gateway.Call"]))).roles == ("Gateway.Call",)
    assert (await validator.validate(authority.token(scp="openid user_impersonation"))).app_id == CALLER_APP


# ---- signing keys: rotation, unknown kids, outages ----------------------------------------------------------------


async def test_a_rotated_key_is_fetched_when_a_token_names_it() -> None:
    authority = Authority()
    validator, fetcher, clock = make(authority)
    await validator.validate(authority.token())
    clock.advance(SETTINGS.keys_min_refresh_s)
    authority.rotate("key-2")
    assert (await validator.validate(authority.token(kid="key-2"))).app_id == CALLER_APP
    assert len(fetcher.urls) == 4


async def test_unknown_kids_refresh_the_keys_at_most_once_per_interval() -> None:
    authority = Authority()
    validator, fetcher, clock = make(authority)
    await validator.validate(authority.token())
    clock.advance(SETTINGS.keys_min_refresh_s)
    for i in range(200):  # a caller inventing key ids
        assert await refused(validator, _forged(authority, f"made-up-{i}")) == "unknown_kid"
    assert len(fetcher.urls) == 4  # the first load, and one refresh for all 200
    clock.advance(SETTINGS.keys_min_refresh_s)
    assert await refused(validator, _forged(authority, "made-up-again")) == "unknown_kid"
    assert len(fetcher.urls) == 6


def _forged(authority: Authority, kid: str) -> str:
    return jwt.encode(authority.claims(), _FORGER, algorithm="RS256", headers={"kid": kid})


_FORGER = new_rsa_key()


async def test_an_identity_provider_outage_keeps_the_keys_already_known() -> None:
    authority = Authority()
    validator, fetcher, clock = make(authority)
    await validator.validate(authority.token())
    fetcher.failing = True
    clock.advance(SETTINGS.keys_max_age_s + 1)  # due for a refresh, which fails
    token = authority.token(lifetime_s=SETTINGS.keys_max_age_s + 3600)
    assert (await validator.validate(token)).app_id == CALLER_APP
    assert len(fetcher.urls) == 3


async def test_no_keys_at_all_while_the_provider_is_down_refuses_without_asking_on_every_request() -> None:
    authority = Authority()
    validator, fetcher, _ = make(authority, failing=True)
    for i in range(20):
        assert await refused(validator, authority.token(uti=str(i))) == "unknown_kid"
    assert len(fetcher.urls) == 1


# ---- caching ------------------------------------------------------------------------------------------------------


async def test_a_verified_token_is_not_verified_again_until_it_expires(authority: Authority, monkeypatch: pytest.MonkeyPatch) -> None:
    validator, _, clock = make(authority)
    token = authority.token(lifetime_s=300)
    await validator.validate(token)
    calls = 0
    real = jwt.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    for _ in range(100):
        await validator.validate(token)
    assert calls == 0
    clock.advance(300 + SETTINGS.clock_skew_s + 1)
    assert await refused(validator, token) == "expired"


async def test_a_refused_token_is_remembered_for_a_while(authority: Authority, monkeypatch: pytest.MonkeyPatch) -> None:
    validator, _, clock = make(authority)
    token = authority.token(kid="key-1", key=new_rsa_key())
    assert await refused(validator, token) == "bad_signature"
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: pytest.fail("verified twice"))
    assert await refused(validator, token) == "bad_signature"


# ---- mapping to consumers -----------------------------------------------------------------------------------------


def principal(authority: Authority, **claims: Any) -> Any:
    from shared.edge.entra import Principal

    return Principal(tenant=TENANT, app_id=CALLER_APP, object_id=CALLER_OID, roles=(), groups=(), expires=0, home=True, **claims)


def test_the_most_specific_mapping_wins(authority: Authority) -> None:
    p = replace(principal(authority), roles=("Gateway.Call",))
    index = PrincipalIndex([("by-app", f"app:{CALLER_APP}"), ("by-role", "role:Gateway.Call"), ("by-oid", f"oid:{CALLER_OID}")])
    assert index.resolve(p) == "by-oid"
    assert PrincipalIndex([("by-app", f"app:{CALLER_APP}"), ("by-role", "role:Gateway.Call")]).resolve(p) == "by-app"
    assert PrincipalIndex([("by-role", "role:Gateway.Call")]).resolve(p) == "by-role"


def test_an_ambiguous_mapping_admits_no_one(authority: Authority, caplog: pytest.LogCaptureFixture) -> None:
    p = replace(principal(authority), roles=("A", "B"))
    assert PrincipalIndex([("one", f"app:{CALLER_APP}"), ("two", f"app:{CALLER_APP}")]).resolve(p) is None
    assert PrincipalIndex([("one", "role:A"), ("two", "role:B")]).resolve(p) is None


def test_mapping_keys_are_validated() -> None:
    assert mapping_key("app", CALLER_APP.upper()) == f"app:{CALLER_APP}"
    for kind, value in [("tenant", "x"), ("app", ""), ("role", "a b"), ("role", "x" * 300)]:
        with pytest.raises(ValueError):
            mapping_key(kind, value)


def test_looks_like_jwt() -> None:
    assert looks_like_jwt(Authority().token())
    assert not looks_like_jwt("gw-abc.def.ghi") and not looks_like_jwt("eyJabc")


# ---- the identifier: keys and tokens side by side -----------------------------------------------------------------


class RecordingTelemetry(NullTelemetry):
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def auth_refused(self, reason: str) -> None:
        self.reasons.append(reason)


def consumer(consumer_id: str, key: str = "", **changes: Any) -> Consumer:
    return replace(Consumer(id=consumer_id, name=consumer_id, key_hash=hash_key(key) if key else "", key_prefix=""), **changes)


async def identifier(authority: Authority, *consumers: Consumer, accept_keys: bool = True, entra: bool = True) -> tuple[Identifier, RecordingTelemetry, MemoryConsumerStore, FakeClock]:
    validator, _, clock = make(authority)
    store = MemoryConsumerStore()
    for c in consumers:
        await store.put(c)
    telemetry = RecordingTelemetry()
    directory = ConsumerDirectory(store, clock, refresh_s=5.0)
    return Identifier(directory, telemetry, validator if entra else None, accept_keys), telemetry, store, clock


async def test_a_consumer_can_have_a_key_and_a_token(authority: Authority) -> None:
    ident, _, _, _ = await identifier(authority, consumer("both", "gw-secret", entra=frozenset({f"app:{CALLER_APP}"})))
    assert (await ident.identify({"api-key": "gw-secret"}, frozenset())).consumer.id == "both"
    caller = await ident.identify({"authorization": f"Bearer {authority.token()}"}, frozenset())
    assert caller.consumer.id == "both"


async def test_the_user_id_can_come_from_a_claim() -> None:
    authority = Authority()
    settings = replace(SETTINGS, user_id_claim="preferred_username")
    validator, _, clock = make(authority, settings)
    store = MemoryConsumerStore()
    await store.put(consumer("c", entra=frozenset({f"app:{CALLER_APP}"})))
    ident = Identifier(ConsumerDirectory(store, clock, 5.0), NullTelemetry(), validator, True)
    caller = await ident.identify({"authorization": f"Bearer {authority.token(preferred_username='ana@contoso.com')}"}, frozenset())
    assert caller.user_id == "ana@contoso.com"


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ({"entra": False}, "entra_disabled"),
        ({"mapping": frozenset({"app:00000000-0000-0000-0000-000000000000"})}, "no_consumer"),
        ({"enabled": False}, "consumer_disabled"),
        ({"token": {"aud": "api://elsewhere"}}, "wrong_audience"),
    ],
)
async def test_every_refusal_is_a_401_with_a_reason_and_no_token_in_the_log(
    authority: Authority, caplog: pytest.LogCaptureFixture, setup: dict[str, Any], reason: str
) -> None:
    mapped = consumer("c", enabled=setup.get("enabled", True), entra=setup.get("mapping", frozenset({f"app:{CALLER_APP}"})))
    ident, telemetry, _, _ = await identifier(authority, mapped, entra=setup.get("entra", True))
    token = authority.token(**setup.get("token", {}))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(InvalidToken) as caught:
        await ident.identify({"authorization": f"Bearer {token}"}, frozenset())
    assert caught.value.reason == reason
    error = render(caught.value)
    assert error.status == 401 and error.code == "invalid_token" and error.type == "authentication_error"
    assert telemetry.reasons == [reason]
    body = error.body().decode()
    assert token not in body and token.split(".")[2] not in caplog.text and token.split(".")[1] not in caplog.text


async def test_keys_can_be_turned_off(authority: Authority) -> None:
    ident, telemetry, _, _ = await identifier(authority, consumer("k", "gw-secret"), accept_keys=False)
    with pytest.raises(InvalidToken) as caught:
        await ident.identify({"api-key": "gw-secret"}, frozenset())
    assert render(caught.value).status == 401 and telemetry.reasons == ["keys_disabled"]


async def test_a_token_that_maps_to_no_consumer_forces_no_reload_and_is_throttled_like_a_made_up_key(authority: Authority) -> None:
    ident, telemetry, store, clock = await identifier(authority, consumer("known", entra=frozenset({f"oid:{OTHER_OID}"})))
    stray = {"authorization": f"Bearer {authority.token()}"}
    mapped = {"authorization": f"Bearer {authority.token(oid=OTHER_OID)}"}
    assert (await ident.identify(mapped, frozenset(), "10.0.0.9")).consumer.id == "known"
    calls = store.calls
    answers = []
    for _ in range(100):  # a burst of verified tokens that map to nothing, from one address: no store call each
        with pytest.raises((InvalidToken, AuthThrottled)) as caught:
            await ident.identify(stray, frozenset(), "10.0.0.9")
        answers.append(render(caught.value).status)
    assert store.calls == calls
    assert answers == [401] * 20 + [429] * 80  # GATEWAY_AUTH_FAILURES_PER_MINUTE (20) as for keys
    assert render(caught.value).headers["retry-after"] == "60"
    # The same address's mapped token keeps working (a shared NAT is not locked out), and other addresses are not held.
    assert (await ident.identify(mapped, frozenset(), "10.0.0.9")).consumer.id == "known"
    with pytest.raises(InvalidToken):
        await ident.identify(stray, frozenset(), "10.0.0.10")
    # A mapping added through the admin command is seen at the next marker check, not by a reload the token forced.
    await store.put(consumer("new-app", entra=frozenset({f"app:{CALLER_APP}"})))
    clock.advance(1.0)
    with pytest.raises(InvalidToken):
        await ident.identify(stray, frozenset(), "10.0.0.11")  # starts the marker check in the background
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert (await ident.identify(stray, frozenset(), "10.0.0.11")).consumer.id == "new-app"
    assert store.calls - calls <= 3  # one marker read and the reload it asked for


@pytest.mark.parametrize("fail_closed", [True, False])
async def test_an_entra_caller_is_held_to_the_consumer_caches_maximum_staleness(authority: Authority, fail_closed: bool) -> None:
    validator, _, clock = make(authority)
    store = MemoryConsumerStore()
    await store.put(consumer("c", entra=frozenset({f"app:{CALLER_APP}"})))
    directory = ConsumerDirectory(store, clock, refresh_s=60.0, max_stale_s=300.0, fail_closed=fail_closed)
    ident = Identifier(directory, NullTelemetry(), validator, True)
    header = {"authorization": f"Bearer {authority.token()}"}
    assert (await ident.identify(header, frozenset())).consumer.id == "c"
    # Disabled while Table Storage is away: the cached copy serves within the staleness bound, never past it.
    await store.put(consumer("c", enabled=False, entra=frozenset({f"app:{CALLER_APP}"})))
    store.unavailable = True
    for _ in range(30):
        clock.advance(10.0)
        await ident.identify(header, frozenset())
        await asyncio.sleep(0)
    clock.advance(10.1)
    if fail_closed:
        with pytest.raises(AuthStoreUnavailable) as caught:
            await ident.identify(header, frozenset())
        assert render(caught.value).status == 503
    else:
        assert (await ident.identify(header, frozenset())).consumer.id == "c"
    store.unavailable = False
    await directory.reload()
    with pytest.raises(InvalidToken) as refused_now:
        await ident.identify(header, frozenset())
    assert refused_now.value.reason == "consumer_disabled"


async def test_a_second_allowed_tenants_app_with_the_same_id_is_another_caller(authority: Authority) -> None:
    settings = replace(SETTINGS, tenants=(TENANT, OTHER_TENANT))
    clock = FakeClock(start=time.time())
    validator = TokenValidator(settings, SigningKeys(settings, MemoryFetcher(authority), clock), clock)
    store = MemoryConsumerStore()
    await store.put(consumer("home", entra=frozenset({f"app:{CALLER_APP}"})))  # no tenant: the first allowed one
    await store.put(consumer("partner", entra=frozenset({mapping_key("app", CALLER_APP, OTHER_TENANT.upper())})))
    ident = Identifier(ConsumerDirectory(store, clock, 5.0), NullTelemetry(), validator, True)

    async def caller(tenant: str, **claims: Any) -> str:
        token = authority.token(tenant=tenant, **claims)
        try:
            return (await ident.identify({"authorization": f"Bearer {token}"}, frozenset())).consumer.id
        except InvalidToken as refusal:
            return refusal.reason

    assert await caller(TENANT) == "home"
    assert await caller(OTHER_TENANT) == "partner"
    # The same object id, role or group in the other tenant is another principal too.
    await store.put(consumer("home", entra=frozenset({f"oid:{OTHER_OID}", "role:Gateway.Call", f"group:{CALLER_APP}"})))
    await store.put(consumer("partner", entra=frozenset()))
    await ident._directory.reload()
    assert await caller(TENANT, oid=OTHER_OID) == "home"
    assert await caller(TENANT, roles=["Gateway.Call"]) == "home"
    for claims in ({"oid": OTHER_OID}, {"roles": ["Gateway.Call"]}, {"groups": [CALLER_APP]}):
        assert await caller(OTHER_TENANT, **claims) == "no_consumer", claims


@pytest.mark.parametrize(
    "claims",
    [
        {"nonce": "n-0S6_WzA2Mj"},  # an OpenID Connect sign-in
        {"at_hash": "77QmUPtjPfzWtF2AnpK9RQ"},
        {"c_hash": "LDktKdoQak3Pk0cnXxCltA"},
        {"azp": None},  # names no client: every access token does (azp in v2, appid in v1)
        {"azp": None, "roles": ["Gateway.Call"]},  # an ID token may carry the user's app roles
    ],
)
async def test_an_id_token_is_refused_as_an_access_token(authority: Authority, claims: dict[str, Any]) -> None:
    validator, _, _ = make(authority)
    assert await refused(validator, authority.token(aud=GATEWAY_APP, **claims)) == "not_access_token"
    assert await refused(validator, authority.token(version=1, aud=GATEWAY_APP, appid=None, **{
        k: v for k, v in claims.items() if k != "azp"})) == "not_access_token"


def test_a_mapping_can_name_its_tenant() -> None:
    assert mapping_key("app", CALLER_APP, OTHER_TENANT.upper()) == f"app:{CALLER_APP}@{OTHER_TENANT}"
    with pytest.raises(ValueError):
        mapping_key("app", CALLER_APP, "contoso.onmicrosoft.com")


# ---- settings -----------------------------------------------------------------------------------------------------

BASE_ENV = {"GATEWAY_TABLE_CONNECTION_STRING": "UseDevelopmentStorage=true"}


def test_entra_settings_parse_and_fail_clearly() -> None:
    settings = load_settings({**BASE_ENV, "GATEWAY_ENTRA_TENANT_IDS": TENANT.upper(), "GATEWAY_ENTRA_AUDIENCES": AUDIENCE},
                             require_backends=False)
    assert settings.entra is not None and settings.entra.tenants == (TENANT,)
    assert load_settings(BASE_ENV, require_backends=False).entra is None
    for bad in [
        {"GATEWAY_ENTRA_TENANT_IDS": TENANT},
        {"GATEWAY_ENTRA_TENANT_IDS": "contoso.onmicrosoft.com", "GATEWAY_ENTRA_AUDIENCES": AUDIENCE},
        {"GATEWAY_ENTRA_TENANT_IDS": TENANT, "GATEWAY_ENTRA_AUDIENCES": AUDIENCE, "GATEWAY_ENTRA_AUTHORITY": "http://login.example"},
        {"GATEWAY_ENTRA_TENANT_IDS": TENANT, "GATEWAY_ENTRA_AUDIENCES": AUDIENCE, "GATEWAY_ENTRA_USER_ID_CLAIM": "a b"},
    ]:
        with pytest.raises(ConfigError):
            load_settings({**BASE_ENV, **bad}, require_backends=False)


# ---- hostile input ------------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_PART = st.text(alphabet=st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=300)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=_PART, payload=_PART, signature=_PART)
async def test_any_token_shaped_garbage_is_refused_never_raised(authority: Authority, header: str, payload: str, signature: str) -> None:
    import base64

    def b64(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    validator, _, _ = make(authority)
    for token in (f"eyJ{header}.{payload}.{signature}", f"{b64('{' + header)}.{b64(payload)}.{signature}"):
        try:
            await validator.validate(token)
        except TokenRefused:
            continue
        pytest.fail("garbage accepted")
