"""The admin API described for tools (OpenAPI 3.1), served at /console/api/openapi.json."""

from __future__ import annotations

from functools import cache
from typing import Any

from shared.adminops.documents import CACHE_FIELDS, CONSUMER_FIELDS, TEAM_FIELDS, USER_FIELDS
from shared.records.consumers import CAPABILITIES, PRIORITIES, QUOTA_PERIODS, USER_SOURCES

_COUNT = {"type": "integer", "minimum": 0, "maximum": 10**12}
_PERIOD = {"type": ["string", "null"], "enum": [*QUOTA_PERIODS, None]}
_DEPLOYMENTS = {"oneOf": [{"type": "array", "items": {"type": "string"}, "minItems": 1}, {"const": "*"}]}
_CACHE = {"type": "object", "additionalProperties": False, "properties": {
    "on": {"type": "boolean"}, "ttl_s": {"type": "integer", "minimum": 1, "maximum": 86400},
    "scope": {"enum": ["consumer", "team", "gateway"]}, "tools": {"type": "boolean"}}}
_CONSUMER_PROPS: dict[str, Any] = {
    "name": {"type": "string", "minLength": 1, "maxLength": 200},
    "id": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$", "description": "made from the name when absent; read-only after"},
    "enabled": {"type": "boolean"},
    "deployments": _DEPLOYMENTS,
    "tokens_per_minute": _COUNT,
    "deployment_tokens_per_minute": {"type": "object", "additionalProperties": _COUNT},
    "quota": _COUNT, "quota_period": _PERIOD,
    "budget": {"type": "number", "minimum": 0}, "budget_period": _PERIOD,
    "priority": {"enum": list(PRIORITIES)},
    "output_cap": {"enum": ["on", "off", "default"]},
    "entra": {"type": "array", "items": {"type": "string", "description": "app:<guid>, oid:<guid>, role:<name> or "
                                                                          "group:<guid>, optionally @<tenant>"}},
    "capabilities": {"type": "array", "items": {"enum": sorted(CAPABILITIES)}},
    "team": {"type": ["string", "null"]},
    "users": {"type": "object", "additionalProperties": False, "properties": {
        "tokens_per_minute": _COUNT, "quota": _COUNT, "quota_period": _PERIOD,
        "sources": {"type": "array", "items": {"enum": list(USER_SOURCES)}}, "required": {"type": "boolean"}}},
    "fallback": {"enum": ["on", "off"]},
    "cache": _CACHE,
    "key_prefix": {"type": "string", "readOnly": True},
    "safety_policy": {"type": ["string", "null"], "description": "a policy of GATEWAY_SAFETY_POLICIES, 'none', or "
                                                                "null to inherit"},
}
_TEAM_PROPS: dict[str, Any] = {k: v for k, v in _CONSUMER_PROPS.items() if k in TEAM_FIELDS}
_TEAM_PROPS["members"] = {"type": "array", "items": {"type": "string"}, "readOnly": True}
assert set(_CONSUMER_PROPS) == set(CONSUMER_FIELDS) and set(_TEAM_PROPS) == set(TEAM_FIELDS)
assert set(_CONSUMER_PROPS["users"]["properties"]) == set(USER_FIELDS)
assert set(_CACHE["properties"]) == set(CACHE_FIELDS)  # type: ignore[call-overload]


def _op(summary: str, *, body: str | None = None, params: list[dict[str, Any]] | None = None, ok: int = 200,
        write: bool = False) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {
        str(ok): {"description": "done", "content": {"application/json": {}}},
        "400": {"$ref": "#/components/responses/Error"}, "401": {"$ref": "#/components/responses/Error"},
        **({"403": {"$ref": "#/components/responses/Error"}} if write else {}),
    }}
    if body:
        operation["requestBody"] = {"required": body != "Rotate", "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}}}
    if params:
        operation["parameters"] = params
    return operation


def _q(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_FORCE = [_q("force", {"type": "boolean"}, "save deployments no configured backend serves")]


@cache
def openapi() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "AI gateway admin API", "version": "1",
                 "description": "Gateway.Reader reads; Gateway.Admin also writes. Every write is in /audit."},
        "servers": [{"url": "/console/api"}],
        "security": [{"bearer": []}],
        "paths": {
            "/signin": {"get": {**_op("how to sign in: easy_auth is true where App Service Authentication is in "
                                      "front (the page then needs no key)"), "security": []}},
            "/whoami": {"get": _op("who the credential is, and its role")},
            "/consumers": {"get": _op("every consumer"),
                           "post": _op("create a consumer; its key is in this answer only", body="Consumer",
                                       params=_FORCE, ok=201, write=True)},
            "/consumers/{id}": {"parameters": _ID, "get": _op("one consumer"),
                                "patch": _op("change the fields given", body="Consumer", params=_FORCE, write=True),
                                "delete": _op("delete a consumer", write=True)},
            "/consumers/{id}/rotate": {"parameters": _ID, "post": _op(
                "a new key (in this answer only); the old one works for grace_seconds", body="Rotate", write=True)},
            "/consumers/{id}/disable": {"parameters": _ID, "post": _op("refuse its key and tokens", write=True)},
            "/consumers/{id}/enable": {"parameters": _ID, "post": _op("accept them again", write=True)},
            "/teams": {"get": _op("every team and its members"),
                       "post": _op("create a team", body="Team", params=_FORCE, ok=201, write=True)},
            "/teams/{id}": {"parameters": _ID, "get": _op("one team"),
                            "patch": _op("change the fields given", body="Team", params=_FORCE, write=True),
                            "delete": _op("delete a team without members", write=True)},
            "/usage": {"get": _op("tokens, requests and cost per consumer and deployment for one period", params=[
                _q("period", {"enum": list(QUOTA_PERIODS)}), _q("at", {"type": "string", "format": "date-time"}),
                _q("consumer", {"type": "string"})])},
            "/traffic": {"get": _op("per backend per 10 s, across instances: requests, tokens, backend 429s, "
                                    "failures, failovers; per deployment, its model fallbacks", params=[_q("minutes", {"type": "integer", "minimum": 1,
                                                                                  "maximum": 60})])},
            "/backends": {"get": _op("breaker state, recovery time, learnt PTU capacity (no secrets)")},
            "/audit": {"get": _op("admin changes, newest first", params=[
                _q("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
                _q("days", {"type": "integer", "minimum": 1, "maximum": 366})])},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description":
                                           "the gateway admin key, or an Entra ID access token with the app role "
                                           "Gateway.Admin or Gateway.Reader"}},
            "schemas": {
                "Consumer": {"type": "object", "additionalProperties": False, "properties": _CONSUMER_PROPS},
                "Team": {"type": "object", "additionalProperties": False, "properties": _TEAM_PROPS},
                "Rotate": {"type": "object", "additionalProperties": False, "properties": {
                    "grace_seconds": {"type": "number", "minimum": 0, "maximum": 2592000}}},
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "string"},
                    "param": {"type": ["string", "null"]}}}}},
            },
            "responses": {"Error": {"description": "refused", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
        },
    }
