"""azd's preprovision hook (azure.yaml): tell the parameters files what kind of principal runs `azd provision`.

azd compiles a `.bicepparam` file with its environment plus AZURE_PRINCIPAL_ID, but never AZURE_PRINCIPAL_TYPE (it
sets that one only for `main.parameters.json` substitutions; Azure/azure-dev, pkg/infra/provisioning/bicep,
compileBicep). The files grant the deployer the admin roles with that type, and a role assignment whose type is wrong
fails the whole deployment (UnmatchedPrincipalType); without a type they grant no admin. This hook reads the type from
the claims of azd's own access token and stores it in the azd environment (`azd env set`), which azd reloads after
every hook, before it compiles the parameters file. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

VARIABLE = "AZURE_PRINCIPAL_TYPE"

Run = Callable[[Sequence[str]], str]


def claims_of(token: str) -> dict[str, Any] | None:
    """The payload of a JWT, unverified (azd just obtained it; only its shape is read)."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        value = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    return value if isinstance(value, dict) else None


def principal_type(claims: Mapping[str, Any]) -> str | None:
    """`User` for a delegated token (a person signed in), `ServicePrincipal` for an app-only one (a service principal,
    federated credential or managed identity); None when the token says neither."""
    if claims.get("idtyp") == "user" or "scp" in claims:
        return "User"
    if claims.get("idtyp") == "app" or "roles" in claims:
        return "ServicePrincipal"
    return None


def run_command(argv: Sequence[str]) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True, timeout=120).stdout


def main(env: Mapping[str, str] = os.environ, run: Run = run_command, out: Callable[[str], None] = print) -> int:
    """Never fails the provision: at worst the type stays as it was (unset: no admin role)."""
    # Always read afresh: the same azd environment may be provisioned by a person and later by a pipeline.
    before = env.get(VARIABLE, "")
    try:
        token = run(["azd", "auth", "token", "--output", "json"])
        parsed = json.loads(token)
        claims = claims_of(str(parsed.get("token", ""))) if isinstance(parsed, dict) else None
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        out(f"could not read azd's sign-in ({type(error).__name__}); {VARIABLE} stays {before or 'unset'} "
            "(unset: the deployer is granted no admin role; docs/deploy.md, the admin under azd)")
        return 0
    kind = principal_type(claims or {})
    if kind is None:
        out(f"azd's token names no principal type; {VARIABLE} stays {before or 'unset'}")
        return 0
    if kind != before:
        try:
            run(["azd", "env", "set", VARIABLE, kind])
        except (OSError, subprocess.SubprocessError) as error:
            out(f"azd env set {VARIABLE} {kind} failed ({type(error).__name__}); it stays {before or 'unset'}")
            return 0
    out(f"{VARIABLE}={kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
