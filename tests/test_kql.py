"""Every query the project ships, parsed and type-checked by Microsoft's own KQL parser.

`tools/kql/check.js` runs the Kusto language service (npm `@kusto/language-service-next`, the parser and binder behind
Azure Data Explorer's and Log Analytics' editors) under the project's Node, against the Application Insights tables and
columns of tests/data/appinsights/schema.json (taken from Microsoft's documentation). It catches what only the real
grammar and binder know: syntax, unknown tables, columns and functions, wrong argument types, comparisons of
incompatible types. What the parser cannot know, the gateway's telemetry contract (which metric names exist, which
dimension keys each metric or event carries), stays with the checker in tests/test_queries.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "tests" / "data" / "appinsights" / "schema.json").read_text(encoding="utf-8"))
# Every check here runs the Kusto language service under node: the full run's, not --quick's.
pytestmark = pytest.mark.process

WORKBOOK = json.loads((ROOT / "bicep" / "workbook.json").read_text(encoding="utf-8"))


def _workbook_queries(items: list[dict[str, Any]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for item in items:
        content = item.get("content", {})
        if "query" in content and content.get("queryType", 0) == 0:
            found[f"workbook:{item['name']}"] = content["query"]
        found.update(_workbook_queries(content.get("items", [])))
    return found


def shipped() -> dict[str, str]:
    """Every .kql file, every workbook query and every alert query (bicep/alerts, loaded by alerts.bicep)."""
    files = sorted((ROOT / "queries").glob("*.kql")) + sorted((ROOT / "bicep").rglob("*.kql"))
    queries = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in files}
    queries.update(_workbook_queries(WORKBOOK["items"]))
    return queries


# Seeded mistakes: each must be reported, or the check proves nothing.
MISTAKES = {
    "misspelt column": ("requests | where resultCod == '429'", "resultCod"),
    "misspelt table": ("customMetric | where name == 'Total Tokens'", "customMetric"),
    "workspace column on a classic table": ("customMetrics | summarize sum(Sum)", "Sum"),
    "unknown function": ("customMetrics | summarize x = summ(valueSum)", "summ"),
    "string compared with a number": ("requests | where resultCode > 400", "operand types string and long"),
    "syntax": ("customMetrics | where name == 'Total Tokens' | summarize by", "Missing expression"),
    "column dropped by summarize": ("customMetrics | summarize t = sum(valueSum) by name | where valueSum > 0", "valueSum"),
    "datetime minus string": ("requests | extend x = timestamp - name", "operand types datetime and string"),
}


@cache
def diagnostics() -> dict[str, list[dict[str, Any]]]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (scripts/bootstrap installs the project's npm packages)")
    queries = [{"id": k, "text": v} for k, v in shipped().items()]
    queries += [{"id": f"mistake:{k}", "text": text} for k, (text, _) in MISTAKES.items()]
    done = subprocess.run(
        [node, str(ROOT / "tools" / "kql" / "check.js")],
        input=json.dumps({"tables": SCHEMA["tables"], "queries": queries}),
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )
    assert done.returncode == 0, done.stderr
    return {r["id"]: r["diagnostics"] for r in json.loads(done.stdout)}


def test_every_shipped_query_is_checked() -> None:
    names = set(shipped())
    assert {"queries/request_log.kql", "queries/chargeback_monthly.kql", "workbook:tokens_per_consumer"} <= names
    assert any(n.startswith("bicep/alerts/") for n in names)
    assert names <= set(diagnostics())


@pytest.mark.parametrize("name", sorted(shipped()))
def test_query_parses_and_type_checks(name: str) -> None:
    assert diagnostics()[name] == []


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_seeded_mistake_is_reported(mistake: str) -> None:
    _, where = MISTAKES[mistake]
    found = [d for d in diagnostics()[f"mistake:{mistake}"] if d["severity"] == "Error"]
    assert found, f"Microsoft's parser accepted {MISTAKES[mistake][0]!r}"
    assert any(where in d["text"] or where in d["message"] for d in found), found
