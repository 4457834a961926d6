"""The README's settings table, local.settings.example.json and the Bicep app settings against what shared/config.py
reads: every setting listed, none listed that is not read, and every documented or shipped default giving exactly
the settings the code's own default gives (setting it changes nothing)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from shared.config import load_settings
from tests.test_bicep import ROOT, RecordingEnv, app_settings, deployed, names_read_by_the_code

BASE = {
    "GATEWAY_TABLE_CONNECTION_STRING": "UseDevelopmentStorage=true",
    "GATEWAY_BACKENDS": json.dumps([{"id": "uk", "endpoint": "https://uk.openai.azure.com", "region": "uksouth",
                                     "deployments": ["gpt-4o"], "auth": "none"}]),
}
# Settings read only when a feature is on: compared against a base that turns it on (Entra ID callers' tuning).
BASES = (
    BASE,
    {**BASE, "GATEWAY_ENTRA_TENANT_IDS": "72f988bf-86f1-41af-91ab-2d7cd011db47", "GATEWAY_ENTRA_AUDIENCES": "api://gw"},
)
# Read by the code, deliberately not in local.settings.example.json: set by the platform or the Functions host.
NOT_LOCAL = {
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "AzureWebJobsStorage__accountName", "AzureWebJobsStorage__tableServiceUri",
    "AzureWebJobsStorage__blobServiceUri", "WEBSITE_SITE_NAME", "GATEWAY_RECORD_CONTENT",
}
# In the example, not read by the gateway's settings: the Functions host's own, and the simulated regions' key.
HOST_ONLY = {"FUNCTIONS_WORKER_RUNTIME", "PYTHON_ENABLE_INIT_INDEXING", "SIM_API_KEY"}
# Example values that differ from the defaults on purpose (the local stack: Azurite, simulators, a price table).
LOCAL_VALUES = {"GATEWAY_BACKENDS", "GATEWAY_PRICES", "GATEWAY_ID", "AzureWebJobsStorage", "GATEWAY_TABLE_CONNECTION_STRING"}
# Bicep settings that describe the deployment rather than a default.
DEPLOYMENT_VALUES = {
    "GATEWAY_BACKENDS", "GATEWAY_TABLE_ENDPOINT", "GATEWAY_BLOB_ENDPOINT", "GATEWAY_INSTANCE_COUNT", "GATEWAY_ID",
    "APPLICATIONINSIGHTS_CONNECTION_STRING", "APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "AZURE_CLIENT_ID",
}
# Defaults written as words in the README, checked by a test of their own elsewhere or meaning "derived".
DESCRIBED = {"GATEWAY_METRIC_DIMENSIONS", "GATEWAY_ID", "GATEWAY_FORWARDED_HOPS", "GATEWAY_BLOB_ENDPOINT"}


def settings_table() -> list[tuple[list[str], str, str]]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("\n## Settings"):]
    section = section[: section.index("\n## ", 5)]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            names = [n for n in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cells[0]) if not n.startswith("__")]
            rows.append((names, cells[1], cells[0]))
    return rows


def documented() -> set[str]:
    names = set()
    for row_names, default, _ in settings_table():
        names |= set(row_names)
        names |= set(re.findall(r"`(WEBSITE_SITE_NAME)`", default))  # the platform's, named where it is a default
    # `AzureWebJobsStorage__accountName` / `__tableServiceUri`: the suffixes name settings of the same prefix.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    names |= {"AzureWebJobsStorage" + s for s in re.findall(r"`(__[A-Za-z]+)`", readme)}
    return names


def example() -> dict[str, str]:
    values: dict[str, str] = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    return values


def _base_reading(name: str) -> dict[str, str]:
    for base in BASES:
        env = RecordingEnv(base)
        load_settings(env)
        if name in env.read:
            return base
    raise AssertionError(f"{name} is not read by load_settings under any base: comparing its default proves nothing")


def unchanged(name: str, value: str) -> bool:
    """Setting `name` to `value` gives exactly the settings leaving it out gives, under a base where it is read (a
    setting the code never looks at would compare equal whatever its documented default said)."""
    base = _base_reading(name)
    return load_settings(base) == load_settings({**base, name: value})


def test_the_readme_lists_every_setting_the_code_reads_and_no_other() -> None:
    read, listed = names_read_by_the_code(), documented()
    assert not read - listed, "add these to README.md, Settings"
    assert not listed - read, "README.md, Settings, lists settings the code no longer reads"


def test_the_example_settings_hold_every_setting_the_code_reads() -> None:
    read, shipped = names_read_by_the_code(), set(example())
    assert not read - shipped - NOT_LOCAL, "add these to local.settings.example.json"
    assert not shipped - read - HOST_ONLY, "local.settings.example.json holds settings the code does not read"


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, v in example().items() if n not in LOCAL_VALUES | HOST_ONLY])
def test_every_example_value_is_the_codes_default(name: str, value: str) -> None:
    assert unchanged(name, value), f"local.settings.example.json: {name}={value!r} is not the default"


def _readme_defaults() -> list[tuple[str, str]]:
    pairs = []
    for names, default, cell in settings_table():
        cleaned = default.replace("`", "").strip()
        if cleaned in ("—", "(required)") or " / " in cell or set(names) & DESCRIBED:
            continue
        values = [v.strip() for v in cleaned.split(",")] if len(names) > 1 else [cleaned]
        assert len(values) == len(names), f"README.md, Settings: one default per name in the row of {names}"
        pairs += [(n, v) for n, v in zip(names, values, strict=True) if v != "—"]
    return pairs


def _literal(text: str) -> str:
    text = re.sub(r"\s*\(.*\)$", "", text)  # "0 (= every candidate)"
    mib = re.fullmatch(r"(\d+) MiB", text)
    return str(int(mib.group(1)) * 1024 * 1024) if mib else text


@pytest.mark.parametrize(("name", "default"), _readme_defaults())
def test_every_readme_default_is_the_codes_default(name: str, default: str) -> None:
    assert unchanged(name, _literal(default)), f"README.md, Settings: {name} default {default!r} is not the code's"


def test_the_readme_defaults_were_checked() -> None:
    checked = {name for name, _ in _readme_defaults()}
    assert len(checked) >= 40 and {"GATEWAY_MAX_BODY_BYTES", "GATEWAY_ADMIT_ON_BOUND", "GATEWAY_AUTH_FAIL_MODE"} <= checked


def test_the_bicep_settings_that_are_not_about_the_deployment_are_the_defaults() -> None:
    settings: dict[str, Any] = app_settings(deployed("main"))
    compared = [n for n in settings if n.startswith("GATEWAY_") and n not in DEPLOYMENT_VALUES]
    assert "GATEWAY_LIMIT_FAIL_MODE" in compared
    for name in compared:
        assert isinstance(settings[name], str) and unchanged(name, settings[name]), name


def test_the_readme_backend_table_lists_every_backend_and_breaker_field() -> None:
    from shared.config import _BACKEND_FIELDS, _BREAKER_FIELDS

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("\n## Backends"):]
    section = section[: section.index("\n## ", 5)]
    table = "\n".join(line for line in section.splitlines() if line.startswith("| `"))
    named = set(re.findall(r"`([a-z_]+)`", table))
    assert not _BACKEND_FIELDS - named, "README.md, Backends: list these fields"
    assert not _BREAKER_FIELDS - named, "README.md, Backends: list these breaker fields"


# "`GATEWAY_X` (default 2)", "`GATEWAY_X=open`, the default", "`GATEWAY_X` is `reasoning` by default", "`GATEWAY_X`
# applies: `closed` (default)": the defaults the other pages state in their prose.
_PROSE_DEFAULT = re.compile(
    r"`(GATEWAY_[A-Z0-9_]+)`[^.`\n]{0,12}\(default `?([^)\s,;`]+)`?(?: s\b)?([^)]*)\)"
    r"|`(GATEWAY_[A-Z0-9_]+)=([^`]+)`,? \(?the default"
    r"|`(GATEWAY_[A-Z0-9_]+)` is `([^`]+)` by default"
    r"|`(GATEWAY_[A-Z0-9_]+)` applies: `([^`]+)` \(default\)"
)


def _prose_defaults() -> list[tuple[str, str, str]]:
    found = []
    for path in [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in _PROSE_DEFAULT.finditer(path.read_text(encoding="utf-8")):
            if match.group(1):
                if match.group(3).strip().startswith("when"):  # "(default 1 when ...)": a derived default
                    continue
                name, value = match.group(1), match.group(2)
            else:
                name, value = [g for g in match.groups()[3:] if g is not None]
            found.append((path.name, name, value))
    return found


def test_the_defaults_stated_in_the_docs_prose_are_the_codes() -> None:
    stated = _prose_defaults()
    assert len(stated) >= 8 and "GATEWAY_UNKNOWN_KEY_LOOKUPS_PER_S" in {name for _, name, _ in stated}
    wrong = [f"{page}: {name} default {value!r}" for page, name, value in stated if not unchanged(name, value)]
    assert not wrong, "these pages state a default the code does not have"


def test_the_readme_backend_table_states_the_codes_defaults() -> None:
    from shared.config import Backend, BreakerRule, parse_status_rule
    from shared.flow.backend_api import DEFAULT_API_VERSION

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("\n## Backends"):]
    rows = {line.split("|")[1].strip(): line.split("|")[2] for line in section.splitlines() if line.startswith("| `")}
    stated = dict(re.findall(r"`([a-z_]+)`(?: that count as failures)? \(`?([^)`]+)`?\)", rows["`breaker`"]))
    assert set(stated) == {f for f in BreakerRule.__dataclass_fields__}, "README.md, Backends: a breaker default per field"
    rule = BreakerRule()
    for name, text in stated.items():
        value = getattr(rule, name)
        if name == "statuses":
            assert parse_status_rule(text, name) == value, name
        elif isinstance(value, bool):
            assert text == str(value).lower(), name
        else:
            assert float(text) == value, name
    backend = Backend(id="b", endpoint="https://b", region="r", deployments={})
    assert f"`{backend.api}` (default)" in rows["`api`"]
    assert f"`{backend.auth}` (the default)" in rows["`auth`, `api_key_setting`, `api_key`"]
    assert rows["`allow_insecure_http`"].strip().startswith(str(backend.allow_insecure_http).lower())
    assert f"(default `{DEFAULT_API_VERSION}`)" in rows["`api_version`, `timeout_s`, `connect_timeout_s`"]
