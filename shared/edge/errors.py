"""The gateway's own errors, each rendered as an OpenAI-shaped body with the right status."""

from __future__ import annotations

from collections.abc import Mapping

import orjson


class GatewayError(Exception):
    """An answer the gateway gives instead of a backend's: status, OpenAI error fields, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.deployment: str | None = None  # set by the request flow once the deployment is known, for metrics

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, code=code, param=param)


def not_found(message: str, code: str = "not_found") -> GatewayError:
    return GatewayError(404, message, code=code)


def unauthorized(message: str) -> GatewayError:
    return GatewayError(
        401, message, type="authentication_error", code="invalid_api_key", headers={"www-authenticate": "Bearer"}
    )


def forbidden(message: str, code: str = "permission_denied") -> GatewayError:
    return GatewayError(403, message, type="permission_error", code=code)
