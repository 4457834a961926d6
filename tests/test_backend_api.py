"""One object per kind of backend API: where a call goes, how the gateway's key is sent, whether the body names the
model, how usage is read; and nothing else in the gateway branches on the kind."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from shared.config import Backend
from shared.flow.backend_api import APIS, AzureOpenAI, OpenAICompatible, api_of

ROOT = Path(__file__).resolve().parent.parent
AZURE = Backend(id="az", endpoint="https://az.example", region="r", deployments={"chat": "gpt 4o/x"}, api="azure")
COMPATIBLE = Backend(id="oa", endpoint="https://oa.example/v1", region="r", deployments={"chat": "served"}, api="openai")


def test_each_backend_gets_the_object_of_its_api() -> None:
    assert isinstance(api_of(AZURE), AzureOpenAI) and isinstance(api_of(COMPATIBLE), OpenAICompatible)
    assert set(APIS) == {"azure", "openai"}


@pytest.mark.parametrize(
    ("backend", "version", "url"),
    [
        (AZURE, None, "https://az.example/openai/deployments/gpt%204o%2Fx/chat/completions?api-version=2024-10-21"),
        (AZURE, "2025-01-01-preview", "https://az.example/openai/deployments/gpt%204o%2Fx/chat/completions?api-version=2025-01-01-preview"),
        (COMPATIBLE, "2025-01-01-preview", "https://oa.example/v1/chat/completions"),
    ],
)
def test_urls(backend: Backend, version: str | None, url: str) -> None:
    assert api_of(backend).url(backend, "chat/completions", "chat", version) == url


@pytest.mark.parametrize(
    ("backend", "preview", "version", "tail", "url"),
    [
        (AZURE, False, None, "", "https://az.example/openai/v1/responses"),
        (AZURE, True, "2025-04-01-preview", "/resp_1", "https://az.example/openai/responses/resp_1?api-version=2025-04-01-preview"),
        (AZURE, False, "preview", "/resp_1/cancel", "https://az.example/openai/v1/responses/resp_1/cancel?api-version=preview"),
        (COMPATIBLE, True, "2025-04-01-preview", "/resp_1", "https://oa.example/v1/responses/resp_1"),
    ],
)
def test_responses_urls(backend: Backend, preview: bool, version: str | None, tail: str, url: str) -> None:
    assert api_of(backend).responses_url(backend, preview, version, tail) == url


def test_keys_and_model_names() -> None:
    assert api_of(AZURE).key_headers("k") == {"api-key": "k"} and not api_of(AZURE).model_in_body
    assert api_of(COMPATIBLE).key_headers("k") == {"authorization": "Bearer k"} and api_of(COMPATIBLE).model_in_body


@pytest.mark.parametrize("backend", [AZURE, COMPATIBLE])
def test_usage_is_read_from_a_whole_answer(backend: Backend) -> None:
    raw = orjson.dumps({"model": "m", "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
    usage, model = api_of(backend).usage(raw)
    assert usage is not None and (usage.prompt, usage.completion, usage.total, model) == (3, 4, 7, "m")


def test_nothing_outside_the_api_objects_branches_on_the_kind_of_backend_api() -> None:
    allowed = {ROOT / "shared" / "config.py"}  # where the kind is parsed and validated
    offenders = []
    for path in (ROOT / "shared").rglob("*.py"):
        if path in allowed:
            continue
        text = path.read_text(encoding="utf-8")
        # route.api is the API the client called (its paths); a backend's kind of API is what must not be branched on
        if re.search(r"\bbackend\.api\b\s*(==|!=|in\b)", text) or re.search(r"\.api\s*[!=]=\s*[\"'](azure|openai)[\"']", text):
            offenders.append(path.relative_to(ROOT).as_posix())
    assert offenders == []
