"""Client request -> what to send to a backend: route matching, body checks, backend URL, body and headers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import unquote, urlencode

import orjson

from shared.config import API_VERSION, DEPLOYMENT_NAME, Backend
from shared.edge.errors import GatewayError, bad_request, echoed, not_found
from shared.flow import responses
from shared.flow.backend_api import api_of


class Operation(Enum):
    CHAT = ("chat/completions", "ChatCompletions_Create", "messages")
    COMPLETIONS = ("completions", "Completions_Create", "prompt")
    EMBEDDINGS = ("embeddings", "Embeddings_Create", "input")
    MODELS = ("models", "Models_List", None)
    HEALTH = ("health", "Health_Get", None)
    RESPONSES = ("responses", "Responses_Create", None)
    # Follow-ups of a stored response: `path` is what follows responses/{response_id}.
    RESPONSE_GET = ("", "Responses_Get", None)
    RESPONSE_DELETE = ("", "Responses_Delete", None)
    RESPONSE_INPUT_ITEMS = ("/input_items", "Responses_ListInputItems", None)
    RESPONSE_CANCEL = ("/cancel", "Responses_Cancel", None)
    HEALTH_DETAILS = ("health/details", "Health_Details", None)

    def __init__(self, path: str, operation_id: str, required: str | None) -> None:
        self.path = path
        self.operation_id = operation_id
        self.required = required


AZURE_API = "azure-openai"
OPENAI_API = "openai-v1"

_OPERATIONS = {op.path: op for op in (Operation.CHAT, Operation.COMPLETIONS, Operation.EMBEDDINGS, Operation.RESPONSES)}
FOLLOW_UPS = frozenset(
    {Operation.RESPONSE_GET, Operation.RESPONSE_DELETE, Operation.RESPONSE_INPUT_ITEMS, Operation.RESPONSE_CANCEL}
)
# The follow-ups by what follows responses/{id}, and the methods each path takes.
_FOLLOW_UP_PATHS: dict[str, dict[str, Operation]] = {
    "": {"GET": Operation.RESPONSE_GET, "DELETE": Operation.RESPONSE_DELETE},
    "input_items": {"GET": Operation.RESPONSE_INPUT_ITEMS},
    "cancel": {"POST": Operation.RESPONSE_CANCEL},
}

_FOLLOW_UP_METHODS = {op: method for methods in _FOLLOW_UP_PATHS.values() for method, op in methods.items()}
# Query parameters a follow-up may carry on to the backend (include[], pagination, the replay of a stream).
_FOLLOW_UP_QUERY = frozenset({"include", "include[]", "stream", "starting_after", "after", "before", "limit", "order"})


@dataclass(frozen=True, slots=True)
class Route:
    api: str
    operation: Operation
    deployment: str | None  # from the path (Azure style); None when it comes from the body's `model`
    response_id: str | None = None  # the stored response a follow-up is about

    @property
    def template(self) -> str:
        if self.operation in (Operation.HEALTH, Operation.HEALTH_DETAILS):
            return "/" + self.operation.path
        if self.operation in FOLLOW_UPS:
            prefix = "/openai" if self.api == AZURE_API else "/v1"
            return f"{prefix}/responses/{{response_id}}{self.operation.path}"
        if self.operation is Operation.RESPONSES:
            return "/openai/responses" if self.api == AZURE_API else "/v1/responses"
        if self.api == AZURE_API:
            return f"/openai/deployments/{{deployment}}/{self.operation.path}"
        return f"/v1/{self.operation.path}"


def _method_check(method: str, op: Operation) -> None:
    allowed = "GET" if op in (Operation.MODELS, Operation.HEALTH, Operation.HEALTH_DETAILS) else "POST"
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise GatewayError(
            405,
            f"Method {method} is not allowed here; use {allowed}.",
            code="method_not_allowed",
            headers={"allow": allowed},
        )


def _responses_route(method: str, api: str, rest: list[str]) -> Route | None:
    """`responses` and `responses/{id}[/input_items|/cancel]` (rest starts after the API's prefix)."""
    if rest == ["responses"]:
        return Route(api, Operation.RESPONSES, None)
    if len(rest) not in (2, 3) or rest[0] != "responses":
        return None
    by_method = _FOLLOW_UP_PATHS.get(rest[2] if len(rest) == 3 else "")
    if by_method is None:
        return None
    response_id = unquote(rest[1])
    if not responses.RESPONSE_ID_RE.fullmatch(response_id):
        raise not_found(f"Response with id '{echoed(response_id)}' not found.", code="response_not_found")
    operation = by_method.get(method)
    if operation is None:
        allowed = ", ".join(by_method)
        raise GatewayError(
            405, f"Method {method} is not allowed here; use {allowed}.", code="method_not_allowed", headers={"allow": allowed}
        )
    return Route(api, operation, None, response_id)


_ROUTES: dict[tuple[str, str], Route] = {}
_ROUTES_MAX = 1024  # paths come from clients: the memo of the routes found is bounded (cleared when full)


def match_route(method: str, raw_path: str) -> Route:
    """Map a request path to the API and operation it names; 404 for anything else, 405 for a wrong method."""
    key = (method, raw_path)
    route = _ROUTES.get(key)
    if route is None:
        route = _match_route(method, raw_path)  # raises for a path or method it refuses: those are not kept
        if len(_ROUTES) >= _ROUTES_MAX:
            _ROUTES.clear()
        _ROUTES[key] = route
    return route


def _match_route(method: str, raw_path: str) -> Route:
    path = raw_path.split("?", 1)[0]
    if path.endswith("/") and len(path) > 1:
        path = path[:-1]
    parts = path.split("/")[1:]
    route: Route | None = None
    if parts == ["health"]:
        route = Route(AZURE_API, Operation.HEALTH, None)
    elif parts == ["health", "details"]:
        route = Route(AZURE_API, Operation.HEALTH_DETAILS, None)
    elif len(parts) >= 4 and parts[0] == "openai" and parts[1] == "deployments":
        op = _OPERATIONS.get("/".join(parts[3:]))
        if op is not None:
            deployment = unquote(parts[2])
            if not DEPLOYMENT_NAME.fullmatch(deployment):
                raise not_found("The deployment name is not valid.", code="DeploymentNotFound")
            route = Route(AZURE_API, op, deployment)
    elif parts[:2] == ["openai", "responses"]:
        route = _responses_route(method, AZURE_API, parts[1:])  # the preview path: Azure style, api-version given
    else:
        rest: list[str] | None = None
        if parts[:1] == ["v1"]:
            rest = parts[1:]
        elif parts[:2] == ["openai", "v1"]:
            rest = parts[2:]
        if rest is not None:
            tail = "/".join(rest)
            op = Operation.MODELS if tail == "models" else _OPERATIONS.get(tail)
            if op is not None:
                route = Route(OPENAI_API, op, None)
            elif rest[:1] == ["responses"]:
                route = _responses_route(method, OPENAI_API, rest)
    if route is None:
        raise not_found("Resource not found. The gateway serves /openai/deployments/{deployment}/..., /v1/... and /openai/v1/....")
    if route.operation not in FOLLOW_UPS:
        _method_check(method, route.operation)
    return route


_API_VERSIONS_SEEN: set[str] = set()  # well-formed ones (bounded: at most 64)


def check_api_version(query: Mapping[str, str], allowed: frozenset[str] | None = None) -> str | None:
    """The client's api-version: well-formed, and one of `allowed` when the operator named them."""
    value = query.get("api-version")
    if value is None:
        return None
    if value in _API_VERSIONS_SEEN and (allowed is None or value in allowed):
        return value
    if not API_VERSION.fullmatch(value) or (allowed is not None and value not in allowed):
        raise bad_request("The api-version query parameter is not valid.", param="api-version", code="invalid_api_version")
    if len(_API_VERSIONS_SEEN) < 64:
        _API_VERSIONS_SEEN.add(value)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class CallShape:
    """What the gateway needs to know about a request body, checked once."""

    deployment: str
    stream: bool
    client_wants_usage: bool
    max_tokens: int | None
    model_in_body: bool = False  # the backend reads the deployment from the body's model on every API (Responses)
    choices: int = 1  # completions generated per request (n, best_of): each may run to max_tokens
    capped: bool = False  # the gateway set max_tokens itself (output cap): it is written into the body sent
    background: bool = False  # a Responses create run in the background: always capped, held until its usage is known


# The service's own bound on n (and best_of): a larger value is refused there, so it is refused here before admission.
MAX_CHOICES = 128


def check_body(route: Route, body: Mapping[str, Any]) -> CallShape:
    """Validate the fields the gateway relies on; everything else is the backend's business."""
    op = route.operation
    _check_input(op, body)
    create = responses.check_create(body) if op is Operation.RESPONSES else None
    deployment = route.deployment if route.deployment is not None else _body_deployment(body)
    stream, wants_usage = _stream(op, body)
    if create is not None:
        # Streams always end with usage (in response.completed): nothing to ask for.
        return CallShape(deployment, create.stream, True, create.max_output_tokens, model_in_body=True,
                         background=create.background)
    return CallShape(deployment, stream, wants_usage, _max_tokens(body), choices=_choices(op, body))


def _check_input(op: Operation, body: Mapping[str, Any]) -> None:
    """The operation's required input is there, and of the shape the gateway counts."""
    required = op.required
    if required is not None and body.get(required) is None:
        raise bad_request(f"Missing required parameter: '{required}'.", param=required, code="missing_required_parameter")
    if op is Operation.CHAT:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' must be a non-empty array.", param="messages", code="invalid_type")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise bad_request(f"'messages[{i}]' must be an object with a string 'role'.", param=f"messages[{i}]", code="invalid_type")
    elif op is Operation.COMPLETIONS:
        if not isinstance(body["prompt"], (str, list)):
            raise bad_request("'prompt' must be a string or an array.", param="prompt", code="invalid_type")
    elif op is Operation.EMBEDDINGS:
        value = body["input"]
        if not isinstance(value, (str, list)) or value == [] or value == "":
            raise bad_request("'input' must be a non-empty string or array.", param="input", code="invalid_type")


def _body_deployment(body: Mapping[str, Any]) -> str:
    """The deployment a body names in `model` (OpenAI-style paths carry none)."""
    model = body.get("model")
    if model is None:
        raise bad_request("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not DEPLOYMENT_NAME.fullmatch(model):
        raise not_found("The model (deployment) name is not valid.", code="DeploymentNotFound")
    return model


def _stream(op: Operation, body: Mapping[str, Any]) -> tuple[bool, bool]:
    """Whether the answer streams, and whether the client asked for the stream's usage chunk."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", param="stream", code="invalid_type")
    if stream and op is Operation.EMBEDDINGS:
        raise bad_request("'stream' is not supported for embeddings.", param="stream", code="invalid_value")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", param="stream_options", code="invalid_type")
    return stream, bool(options and options.get("include_usage") is True)


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    """The client's output cap: max_completion_tokens or max_tokens, a positive integer, never both."""
    max_tokens: int | None = None
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise bad_request(f"'{name}' must be a positive integer.", param=name, code="invalid_type")
        if max_tokens is not None:
            # The service refuses both at once; admitting it at one of them would reserve for the other's cap.
            raise bad_request(
                "Setting 'max_tokens' and 'max_completion_tokens' at the same time is not supported.",
                param="max_tokens", code="invalid_parameter_combination",
            )
        max_tokens = value
    return max_tokens


def _choices(op: Operation, body: Mapping[str, Any]) -> int:
    """How many completions the backend generates (and bills) for one request: `n`, or `best_of` candidates."""
    if op is Operation.EMBEDDINGS:
        return 1
    choices = 1
    for name in ("n", "best_of") if op is Operation.COMPLETIONS else ("n",):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or not 1 <= value <= MAX_CHOICES:
            raise bad_request(f"'{name}' must be an integer between 1 and {MAX_CHOICES}.", param=name,
                              code="invalid_value")
        choices = max(choices, value)
    return choices


def backend_url(
    backend: Backend, route: Route, deployment: str, api_version: str | None, query: Mapping[str, str] | None = None
) -> str:
    """Where the request goes on `backend`; a follow-up of a stored response carries on the query parameters it may
    (`query`: the client's)."""
    api = api_of(backend)
    if route.operation is Operation.RESPONSES:
        return api.responses_url(backend, route.api == AZURE_API, api_version, "")
    if route.operation in FOLLOW_UPS:
        url = api.responses_url(backend, route.api == AZURE_API, api_version, f"/{route.response_id}{route.operation.path}")
        kept = {k: v for k, v in (query or {}).items() if k in _FOLLOW_UP_QUERY}
        return url + ("&" if "?" in url else "?") + urlencode(kept) if kept else url
    return api.url(backend, route.operation.path, deployment, api_version)


def backend_method(operation: Operation) -> str:
    """The HTTP method a request is sent to the backend with (the client's, for a follow-up)."""
    return _FOLLOW_UP_METHODS.get(operation, "POST")


def streams_report_usage(backend: Backend, api_version: str | None) -> bool:
    """Whether the backend accepts `stream_options` (and so can be asked for the usage of a stream)."""
    return api_of(backend).accepts_stream_options(backend, api_version)


def _cap_field(body: Mapping[str, Any], backend: Backend, api_version: str | None) -> str:
    """Where the output cap goes: the field the client used; else the backend API's own choice (legacy completions
    know only max_tokens)."""
    for name in ("max_completion_tokens", "max_tokens"):
        if name in body:
            return name
    if "prompt" in body:
        return "max_tokens"
    return api_of(backend).output_cap_field(backend, api_version)


def backend_body(
    raw: bytes, body: Mapping[str, Any], backend: Backend, deployment: str, shape: CallShape,
    api_version: str | None = None,
) -> bytes:
    """The body to send: the client's bytes unless the model name or stream options must change."""
    changes: dict[str, Any] = {}
    if shape.stream and not shape.client_wants_usage and streams_report_usage(backend, api_version):
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        changes["stream_options"] = options
    if shape.capped and shape.max_tokens is not None:
        field = "max_output_tokens" if shape.model_in_body else _cap_field(body, backend, api_version)
        changes[field] = shape.max_tokens
    upstream_name = backend.deployments[deployment]
    if (api_of(backend).model_in_body or shape.model_in_body) and body.get("model") != upstream_name:
        changes["model"] = upstream_name
    if not changes:
        return raw
    return orjson.dumps({**body, **changes})


# Headers a client may send that are passed to the backend; everything else (cookies, the consumer's key,
# hop-by-hop headers, forwarding headers) stays at the gateway.
FORWARDED_REQUEST_HEADERS = frozenset(
    {"content-type", "accept", "user-agent", "x-ms-client-request-id", "openai-beta", "x-stainless-lang",
     "x-stainless-package-version", "x-stainless-retry-count"}
)
# Backend response headers passed to the client. Rate-limit headers describe the shared backend, not the consumer, so
# they are replaced by the consumer's own.
FORWARDED_RESPONSE_HEADERS = frozenset(
    {"content-type", "x-ms-region", "apim-request-id", "x-request-id", "x-ms-client-request-id",
     "openai-processing-ms", "openai-version", "openai-model"}
)


def request_headers(client: Mapping[str, str]) -> dict[str, str]:
    headers = {name: value for name, value in client.items() if name in FORWARDED_REQUEST_HEADERS}
    headers["content-type"] = "application/json"
    headers["accept-encoding"] = "identity"
    return headers
