"""azd's preprovision hook: AZURE_PRINCIPAL_TYPE from azd's own token, stored with `azd env set`."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Sequence
from typing import Any

import pytest

from tools import azd_principal


def jwt(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


# Shapes of Entra access tokens for Azure Resource Manager: a person (delegated, `scp`), a service principal with a
# secret, certificate or federated credential and a managed identity (app-only, `idtyp: app`, `roles` when granted).
PERSON = {"oid": "1", "scp": "user_impersonation", "idtyp": "user", "upn": "a@contoso.com"}
APP = {"oid": "2", "idtyp": "app", "appid": "3"}
APP_WITH_ROLES_ONLY = {"oid": "2", "roles": ["x"], "appid": "3"}


class Azd:
    def __init__(self, token: str | None, fail_set: bool = False) -> None:
        self.token, self.fail_set = token, fail_set
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> str:
        self.calls.append(list(argv))
        if argv[:3] == ["azd", "auth", "token"]:
            if self.token is None:
                raise subprocess.CalledProcessError(1, list(argv), "", "not logged in")
            return json.dumps({"token": self.token, "expiresOn": "2026-12-05T12:00:00Z"})
        if self.fail_set:
            raise FileNotFoundError("azd")
        return ""


@pytest.mark.parametrize(
    ("claims", "expected"),
    [(PERSON, "User"), (APP, "ServicePrincipal"), (APP_WITH_ROLES_ONLY, "ServicePrincipal"), ({"oid": "4"}, None)],
)
def test_the_type_is_read_from_the_token(claims: dict[str, Any], expected: str | None) -> None:
    parsed = azd_principal.claims_of(jwt(claims))
    assert parsed == claims
    assert azd_principal.principal_type(parsed) == expected


@pytest.mark.parametrize("token", ["", "a.b", "a.!!!.c", "a." + base64.urlsafe_b64encode(b"[1]").decode() + ".c"])
def test_a_token_that_is_not_a_jwt_has_no_claims(token: str) -> None:
    assert azd_principal.claims_of(token) is None


@pytest.mark.parametrize(("claims", "expected"), [(PERSON, "User"), (APP, "ServicePrincipal")])
def test_the_hook_stores_the_type_in_the_azd_environment(claims: dict[str, Any], expected: str) -> None:
    azd, said = Azd(jwt(claims)), list[str]()
    assert azd_principal.main({}, azd, said.append) == 0
    assert azd.calls[-1] == ["azd", "env", "set", "AZURE_PRINCIPAL_TYPE", expected]
    assert said == [f"AZURE_PRINCIPAL_TYPE={expected}"]


def test_a_stale_type_is_replaced_when_another_principal_provisions() -> None:
    # The environment was provisioned by a person; a pipeline's service principal provisions it next.
    azd = Azd(jwt(APP))
    azd_principal.main({"AZURE_PRINCIPAL_TYPE": "User"}, azd, lambda _: None)
    assert azd.calls[-1] == ["azd", "env", "set", "AZURE_PRINCIPAL_TYPE", "ServicePrincipal"]
    same = Azd(jwt(APP))
    azd_principal.main({"AZURE_PRINCIPAL_TYPE": "ServicePrincipal"}, same, lambda _: None)
    assert [c[:3] for c in same.calls] == [["azd", "auth", "token"]]  # already right: nothing written


@pytest.mark.parametrize("azd", [Azd(None), Azd(jwt({"oid": "4"})), Azd("not json"), Azd(jwt(APP), fail_set=True)])
def test_the_hook_never_fails_the_provision_and_never_guesses(azd: Azd) -> None:
    said: list[str] = []
    assert azd_principal.main({}, azd, said.append) == 0
    assert not [c for c in azd.calls if c[:3] == ["azd", "env", "set"] and not azd.fail_set]
    assert said and "unset" in said[0]
