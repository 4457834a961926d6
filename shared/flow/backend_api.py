"""What differs between the kinds of backend API, each in one object: where a call goes, how the gateway's key is
presented, whether the body must name the backend's model, and how usage is read from an answer.

    azure    Azure OpenAI: /openai/deployments/{name}/{operation}?api-version=..., `api-key` header
    openai   OpenAI-compatible (OpenAI, vLLM, ...): {endpoint}/{operation}, `Authorization: Bearer`, model in the body

A new kind is a new class here and a name in config.ApiStyle; nothing else branches on it.
"""

from __future__ import annotations

import re
from typing import Protocol
from urllib.parse import quote

from shared.config import Backend
from shared.flow.usage import usage_from_body
from shared.records.usage import TokenUsage

DEFAULT_API_VERSION = "2024-10-21"
STREAM_USAGE_SINCE = "2024-09-01"
_DATED_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}")


class BackendApi(Protocol):
    def url(self, backend: Backend, operation_path: str, deployment: str, api_version: str | None) -> str:
        """Where a call of `operation_path` (chat/completions, embeddings, ...) for `deployment` goes."""
        ...

    def responses_url(self, backend: Backend, preview_path: bool, api_version: str | None, tail: str) -> str:
        """Where a Responses API call goes (`tail`: "" or "/{id}..." for follow-ups)."""
        ...

    def key_headers(self, api_key: str) -> dict[str, str]:
        """How the gateway's own key for the backend is sent."""
        ...

    @property
    def model_in_body(self) -> bool:
        """Whether the body must carry the backend's model name (the URL does not name it)."""
        ...

    def usage(self, raw: bytes) -> tuple[TokenUsage | None, str | None]:
        """The usage and model of a whole answer."""
        ...

    def accepts_stream_options(self, backend: Backend, api_version: str | None) -> bool:
        """Whether `stream_options` (and so the usage of a stream) may be asked of this backend."""
        ...

    def output_cap_field(self, backend: Backend, api_version: str | None) -> str:
        """The field an output cap the gateway sets goes in, when the client named none."""
        ...


class AzureOpenAI:
    model_in_body = False

    def url(self, backend: Backend, operation_path: str, deployment: str, api_version: str | None) -> str:
        name = quote(backend.deployments[deployment], safe="")
        version = quote(api_version or backend.api_version or DEFAULT_API_VERSION, safe="")
        return f"{backend.endpoint}/openai/deployments/{name}/{operation_path}?api-version={version}"

    def responses_url(self, backend: Backend, preview_path: bool, api_version: str | None, tail: str) -> str:
        # Azure serves the API on the v1 path (no api-version needed) and on the older preview path (api-version
        # required): a client that called the preview path with an api-version is sent the same way; everything else
        # goes to the v1 path, with the client's api-version if it gave one.
        path = "responses" + tail
        if preview_path and api_version:
            return f"{backend.endpoint}/openai/{path}?api-version={quote(api_version, safe='')}"
        query = f"?api-version={quote(api_version, safe='')}" if api_version else ""
        return f"{backend.endpoint}/openai/v1/{path}{query}"

    def key_headers(self, api_key: str) -> dict[str, str]:
        return {"api-key": api_key}

    def usage(self, raw: bytes) -> tuple[TokenUsage | None, str | None]:
        return usage_from_body(raw)

    def accepts_stream_options(self, backend: Backend, api_version: str | None) -> bool:
        # Api-versions before 2024-09-01 refuse the field (400 "Unrecognized request argument supplied").
        version = api_version or backend.api_version or DEFAULT_API_VERSION
        if not _DATED_VERSION.match(version):
            return True  # "preview", "v1", "latest": the current API
        return version[:10] >= STREAM_USAGE_SINCE

    def output_cap_field(self, backend: Backend, api_version: str | None) -> str:
        # Reasoning models accept only max_completion_tokens, which came with the same api-versions.
        return "max_completion_tokens" if self.accepts_stream_options(backend, api_version) else "max_tokens"


class OpenAICompatible:
    model_in_body = True

    def url(self, backend: Backend, operation_path: str, deployment: str, api_version: str | None) -> str:
        return f"{backend.endpoint}/{operation_path}"

    def responses_url(self, backend: Backend, preview_path: bool, api_version: str | None, tail: str) -> str:
        return f"{backend.endpoint}/responses{tail}"

    def key_headers(self, api_key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"}

    def usage(self, raw: bytes) -> tuple[TokenUsage | None, str | None]:
        return usage_from_body(raw)

    def accepts_stream_options(self, backend: Backend, api_version: str | None) -> bool:
        return True

    def output_cap_field(self, backend: Backend, api_version: str | None) -> str:
        return "max_tokens"  # what every OpenAI-compatible server reads


APIS: dict[str, BackendApi] = {"azure": AzureOpenAI(), "openai": OpenAICompatible()}


def api_of(backend: Backend) -> BackendApi:
    return APIS[backend.api]
