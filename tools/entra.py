"""A stand-in for Microsoft Entra ID: tenants with RSA signing keys, their OpenID metadata and JWKS (in memory or served
over HTTP on 127.0.0.1), and tokens shaped like Entra's v1 and v2 access tokens."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

TENANT = "5b3c2a1d-0e9f-4a8b-9c7d-6e5f4a3b2c1d"
OTHER_TENANT = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
GATEWAY_APP = "3f1c1b9e-5a4e-4c43-9a43-1c2f5b0c7d11"
AUDIENCE = f"api://{GATEWAY_APP}"
CALLER_APP = "8d7c6b5a-4e3f-4a2b-8c1d-0e9f8a7b6c5d"
CALLER_OID = "1a2b3c4d-5e6f-4a8b-9c0d-1e2f3a4b5c6d"


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Authority:
    """Tenants, each with signing keys by kid; what Entra publishes for them; tokens it would issue."""

    def __init__(self, tenants: tuple[str, ...] = (TENANT,)) -> None:
        self.tenants = tenants
        self.keys: dict[str, rsa.RSAPrivateKey] = {"key-1": new_rsa_key()}
        self.base_url = "https://login.microsoftonline.com"  # where jwks_uri points; a served authority replaces it
        self.requests: list[str] = []

    def rotate(self, kid: str) -> None:
        """Publish a new signing key (keeping the old ones, as Entra does during a rollover)."""
        self.keys[kid] = new_rsa_key()

    def metadata(self, tenant: str) -> dict[str, Any]:
        return {
            "issuer": f"https://login.microsoftonline.com/{tenant}/v2.0",
            "jwks_uri": f"{self.base_url}/{tenant}/discovery/v2.0/keys",
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig", "kty": "RSA"})
        return {"keys": keys}

    def document(self, path: str) -> dict[str, Any] | None:
        self.requests.append(path)
        parts = path.strip("/").split("/")
        if len(parts) >= 2 and parts[0] in self.tenants:
            if parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
                return self.metadata(parts[0])
            if parts[1:] == ["discovery", "v2.0", "keys"]:
                return self.jwks()
        return None

    def claims(self, version: int = 2, tenant: str = TENANT, lifetime_s: float = 3600, issued_at: float | None = None,
               **extra: Any) -> dict[str, Any]:
        now = int(time.time() if issued_at is None else issued_at)
        claims: dict[str, Any] = {
            "aud": AUDIENCE,
            "iss": f"https://login.microsoftonline.com/{tenant}/v2.0" if version == 2 else f"https://sts.windows.net/{tenant}/",
            "iat": now,
            "nbf": now,
            "exp": int(now + lifetime_s),
            "tid": tenant,
            "oid": CALLER_OID,
            "sub": CALLER_OID,
            "ver": "2.0" if version == 2 else "1.0",
            "uti": uuid.uuid4().hex,
        }
        claims["azp" if version == 2 else "appid"] = CALLER_APP
        claims.update(extra)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, kid: str = "key-1", key: rsa.RSAPrivateKey | None = None, algorithm: str = "RS256", **claims: Any) -> str:
        payload = self.claims(**claims)
        signer = key if key is not None else self.keys[kid]
        return jwt.encode(payload, signer, algorithm=algorithm, headers={"kid": kid})


class MemoryFetcher:
    """The JSON fetcher the validator uses, answered from an Authority in memory; counts what it was asked."""

    def __init__(self, authority: Authority, failing: bool = False) -> None:
        self.authority = authority
        self.failing = failing
        self.urls: list[str] = []

    async def get_json(self, url: str) -> Mapping[str, Any]:
        self.urls.append(url)
        if self.failing:
            raise ConnectionError("identity provider unreachable")
        path = url.split("://", 1)[1].split("/", 1)[1]
        document = self.authority.document("/" + path)
        if document is None:
            raise LookupError(url)
        return document


@contextmanager
def served(authority: Authority) -> Iterator[str]:
    """The authority's metadata and JWKS over real HTTP on 127.0.0.1; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            document = authority.document(self.path)
            body = json.dumps(document or {"error": "not_found"}).encode()
            self.send_response(200 if document is not None else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    authority.base_url = base
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield base
    finally:
        server.shutdown()
        server.server_close()
