"""README's "What is not included", kept true: the lines that name something checkable are checked here, so adding
what a line says is missing fails this test until the line goes."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from shared.config import ConfigError, load_settings
from shared.records.consumers import Limits
from tests.docs_commands import ROOT
from tests.fakes.gateway import GatewayHarness
from tests.test_bicep import deployed, of_type

README = (ROOT / "README.md").read_text(encoding="utf-8")
SECTION = README[README.index("## What is not included"):]
SECTION = SECTION[: SECTION.index("\n## ", 5)]

# The APIs the section says are not forwarded, by the path an SDK calls.
UNROUTED = {
    "images": "images/generations", "audio": "audio/transcriptions", "Realtime": "realtime", "Assistants": "assistants",
    "files": "files", "batches": "batches", "fine-tuning": "fine_tuning/jobs", "vector stores": "vector_stores",
    "Conversations": "conversations",
}


def test_the_section_names_what_this_file_checks() -> None:
    for word in [*UNROUTED, "Request-count limits", "`azure` or `openai`", "one Function App"]:
        assert word in SECTION, word


@pytest.mark.parametrize("path", sorted(UNROUTED.values()))
async def test_the_apis_it_lists_are_answered_404_and_never_forwarded(path: str) -> None:
    harness = GatewayHarness()
    try:
        key = harness.consumer("a")
        for url in (f"/v1/{path}", f"/openai/deployments/gpt-4o/{path}?api-version=2024-10-21"):
            response = await harness.post(url, key, {"model": "gpt-4o", "prompt": "x", "input": "x"})
            assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", url
        assert harness.upstream.sent == []
    finally:
        await harness.close()


def test_a_backend_is_azure_or_openai_compatible_only() -> None:
    backend = {"id": "x", "endpoint": "https://x.example", "region": "r", "deployments": ["m"], "auth": "none"}
    for api in ("anthropic", "bedrock", "vertex"):
        with pytest.raises(ConfigError, match="expected 'azure' or 'openai'"):
            load_settings({"GATEWAY_TABLE_CONNECTION_STRING": "UseDevelopmentStorage=true",
                           "GATEWAY_BACKENDS": json.dumps([{**backend, "api": api}])})


def test_limits_count_tokens_and_currency_never_requests() -> None:
    names = [f.name for f in dataclasses.fields(Limits)]
    assert not [n for n in names if re.search(r"request|rpm", n)], names


def test_the_templates_deploy_one_function_app() -> None:
    assert len(of_type(deployed("main"), "Microsoft.Web/sites")) == 1
