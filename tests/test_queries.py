"""The KQL in queries/ and in the workbook, checked against Application Insights' documented classic schema and the
gateway's telemetry contract; the query command checked against recorded responses through a fake client."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.admin import queries as insights

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "appinsights"
SCHEMA: dict[str, Any] = json.loads((DATA / "schema.json").read_text(encoding="utf-8"))
RESPONSES: dict[str, Any] = json.loads((DATA / "responses.json").read_text(encoding="utf-8"))
WORKBOOK: dict[str, Any] = json.loads((ROOT / "bicep" / "workbook.json").read_text(encoding="utf-8"))
QUERY_NAMES = insights.available()
RESOURCE_ID = "/subscriptions/0000/resourceGroups/rg-gateway/providers/Microsoft.Insights/components/appi-gateway"

# The questions the brief asks for; the workbook must chart each of them.
REQUIRED = {
    "tokens_per_consumer", "tokens_by_backend", "tokens_by_region", "top_consumers_today", "throttled_by_consumer",
    "throttled_over_time", "failovers_over_time", "ptu_share", "breaker_trips_over_time", "breaker_transitions",
    "time_to_first_token", "chargeback_monthly", "request_log",
}


# ---- a small KQL checker ----------------------------------------------------------------------------------------
#
# It understands the subset of KQL the queries use (let, where, extend, project, summarize ... by, order/sort, top,
# take, distinct, count, join, render) and refuses anything else, so a query cannot slip past it by using an operator
# it does not know. For every pipeline it tracks the columns in scope, starting from the documented columns of the
# table it reads, and fails on: an unknown table; a column that is neither in the table nor created earlier; an
# unknown function; an unnamed extend/summarize column; a metric name the gateway does not emit; a customMetrics
# query without a name filter; a customDimensions key that none of the filtered metrics (or the span) carries.


class KqlError(Exception):
    pass


_TOKEN = re.compile(
    r"""(?P<ws>\s+)|(?P<comment>//[^\n]*)
    |(?P<string>@?'(?:[^'\\\n]|\\.)*'|@?"(?:[^"\\\n]|\\.)*")
    |(?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[A-Za-z]*)
    |(?P<word>\$?[A-Za-z_][A-Za-z0-9_]*(?:-(?:away|rename|reorder|keep|expand|series))?)
    |(?P<op>==|!=|=~|!~|<=|>=|\.\.|=>|[|(),;=<>+\-*/%.\[\]{}:!~])""",
    re.X,
)

KEYWORDS = {
    "and", "or", "in", "between", "has", "has_any", "has_all", "contains", "startswith", "endswith", "matches",
    "regex", "asc", "desc", "nulls", "first", "last", "true", "false", "null", "by",
}
FUNCTIONS = {
    "sum", "sumif", "count", "countif", "dcount", "dcountif", "avg", "avgif", "min", "max", "minif", "maxif",
    "percentile", "percentiles", "percentilew", "percentilesw", "arg_max", "arg_min", "make_set", "take_any",
    "bin", "tostring", "toint", "tolong", "todouble", "toreal", "tobool", "todatetime", "round", "floor", "abs",
    "strcat", "iff", "iif", "case", "coalesce", "isempty", "isnotempty", "isnull", "isnotnull", "not", "ago", "now",
    "startofday", "startofmonth",
}
LITERALS = {"datetime", "timespan", "dynamic", "real", "int", "long", "bool", "guid"}  # typed literals: x(...)
DIMENSION_COLUMNS = {"customDimensions"}
COMPARISONS = {"!=", "=~", "!~", "!", "has", "contains", "startswith", "endswith", "matches", "has_any"}


@dataclass(frozen=True)
class Tok:
    kind: str
    text: str


def tokenize(text: str) -> list[Tok]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise KqlError(f"cannot read {text[pos:pos + 20]!r}")
        kind = match.lastgroup or ""
        if kind not in ("ws", "comment"):
            tokens.append(Tok(kind, match.group()))
        pos = match.end()
    return tokens


def normalise(text: str) -> str:
    """The query without comments, every token separated by one space: layout and comments never matter."""
    return " ".join(t.text for t in tokenize(text))


def _split(tokens: list[Tok], separator: str) -> list[list[Tok]]:
    parts: list[list[Tok]] = [[]]
    depth = 0
    for tok in tokens:
        if tok.kind == "op" and tok.text in "([{":
            depth += 1
        elif tok.kind == "op" and tok.text in ")]}":
            depth -= 1
            if depth < 0:
                raise KqlError("unbalanced brackets")
        if depth == 0 and tok.text == separator and tok.kind in ("op", "word"):
            parts.append([])
        else:
            parts[-1].append(tok)
    if depth:
        raise KqlError("unbalanced brackets")
    return parts


def _closing(tokens: list[Tok], start: int) -> int:
    depth = 0
    for i in range(start, len(tokens)):
        if tokens[i].text in ("(", "[", "{"):
            depth += 1
        elif tokens[i].text in (")", "]", "}"):
            depth -= 1
            if depth == 0:
                return i
    raise KqlError("unbalanced brackets")


def _string(tok: Tok) -> str:
    if tok.kind != "string":
        raise KqlError(f"expected a string, got {tok.text!r}")
    return tok.text.lstrip("@")[1:-1]


@dataclass
class Rows:
    """What a tabular expression yields: the table it came from, its columns, and the metrics it was filtered to."""

    table: str
    columns: list[str]
    metrics: set[str] = field(default_factory=set)


@dataclass
class Report:
    tables: set[str] = field(default_factory=set)
    metrics: set[str] = field(default_factory=set)
    dimensions: set[str] = field(default_factory=set)
    output: list[str] = field(default_factory=list)


class Checker:
    def __init__(self, schema: dict[str, Any]) -> None:
        self.tables: dict[str, dict[str, str]] = schema["tables"]
        self.metric_dimensions: dict[str, list[str]] = schema["metrics"]
        self.span_dimensions: dict[str, list[str]] = schema["spans"]

    def check(self, text: str) -> Report:
        report = Report()
        lets: dict[str, Rows | None] = {}  # None: a scalar
        statements = [s for s in _split(tokenize(text), ";") if s]
        if not statements:
            raise KqlError("empty query")
        for statement in statements[:-1]:
            if len(statement) < 4 or statement[0].text != "let" or statement[2].text != "=":
                raise KqlError("only let statements may precede the query")
            rhs = statement[3:]
            tabular = rhs[0].text in self.tables or isinstance(lets.get(rhs[0].text), Rows)
            lets[statement[1].text] = self._pipeline(rhs, lets, report) if tabular else None
        if statements[-1][0].text == "let":
            raise KqlError("the query ends with a let statement")
        report.output = self._pipeline(statements[-1], lets, report).columns
        return report

    # -- pipelines ---------------------------------------------------------------------------------------------

    def _pipeline(self, tokens: list[Tok], lets: dict[str, Rows | None], report: Report) -> Rows:
        stages = _split(tokens, "|")
        source = stages[0]
        if len(source) != 1 or source[0].kind != "word":
            raise KqlError(f"a pipeline must start from a table, got {' '.join(t.text for t in source)!r}")
        name = source[0].text
        known = lets.get(name)
        if name in self.tables:
            rows = Rows(name, list(self.tables[name]))
            report.tables.add(name)
        elif isinstance(known, Rows):
            rows = Rows(known.table, list(known.columns), set(known.metrics))
        else:
            raise KqlError(f"unknown table {name!r}")
        for stage in stages[1:]:
            if not stage:
                raise KqlError("empty pipeline stage")
            rows = self._stage(stage, rows, lets, report)
        if rows.table == "customMetrics" and not rows.metrics:
            raise KqlError("a customMetrics query must filter on name (otherwise it adds up different metrics)")
        return rows

    def _stage(self, stage: list[Tok], rows: Rows, lets: dict[str, Rows | None], report: Report) -> Rows:
        op, args = stage[0].text, stage[1:]
        if op in ("where", "filter"):
            self._expr(args, rows, lets, report, where=True)
            return rows
        if op == "extend":
            for name, expr in self._assignments(args, op):
                self._expr(expr, rows, lets, report)
                if name not in rows.columns:
                    rows.columns.append(name)
            return rows
        if op == "project":
            columns = []
            for item in _split(args, ","):
                if len(item) == 1 and item[0].kind == "word":
                    self._expr(item, rows, lets, report)
                    columns.append(item[0].text)
                else:
                    [(name, expr)] = self._assignments(item, op)
                    self._expr(expr, rows, lets, report)
                    columns.append(name)
            return Rows(rows.table, columns, rows.metrics)
        if op == "summarize":
            parts = _split(args, "by")
            if len(parts) > 2:
                raise KqlError("summarize with more than one by")
            aggregates = self._assignments(parts[0], op)
            keys: list[str] = []
            for item in _split(parts[1], ",") if len(parts) == 2 else []:
                if len(item) == 1 and item[0].kind == "word":
                    self._expr(item, rows, lets, report)
                    keys.append(item[0].text)
                elif [t.text for t in item[:2]] == ["bin", "("] and item[2].kind == "word":
                    self._expr(item, rows, lets, report)
                    keys.append(item[2].text)  # KQL names an unnamed bin(x, ...) key x
                else:
                    [(name, expr)] = self._assignments(item, "summarize ... by")
                    self._expr(expr, rows, lets, report)
                    keys.append(name)
            for _, expr in aggregates:
                self._expr(expr, rows, lets, report)
            return Rows(rows.table, keys + [name for name, _ in aggregates], rows.metrics)
        if op in ("order", "sort", "top"):
            if op == "top":
                if not args or args[0].kind != "number":
                    raise KqlError("top needs a count")
                args = args[1:]
            if not args or args[0].text != "by":
                raise KqlError(f"{op} needs by")
            for item in _split(args[1:], ","):
                self._expr(item, rows, lets, report)
            return rows
        if op in ("take", "limit"):
            if len(args) != 1 or args[0].kind != "number":
                raise KqlError(f"{op} needs a count")
            return rows
        if op == "distinct":
            columns = []
            for item in _split(args, ","):
                if len(item) != 1 or item[0].kind != "word":
                    raise KqlError("distinct takes column names")
                self._expr(item, rows, lets, report)
                columns.append(item[0].text)
            return Rows(rows.table, columns, rows.metrics)
        if op == "count":
            return Rows(rows.table, ["Count"], rows.metrics)
        if op == "join":
            return self._join(args, rows, lets, report)
        if op == "render":
            return rows
        raise KqlError(f"operator {op!r} is not supported by the checker")

    def _join(self, args: list[Tok], left: Rows, lets: dict[str, Rows | None], report: Report) -> Rows:
        kind = "innerunique"
        i = 0
        while i < len(args) and args[i].text != "(":
            if i + 2 < len(args) and args[i + 1].text == "=" and args[i].text == "kind":
                kind = args[i + 2].text
            i += 1
        if i == len(args):
            raise KqlError("join needs a parenthesised right side")
        end = _closing(args, i)
        right = self._pipeline(args[i + 1 : end], lets, report)
        on = args[end + 1 :]
        if not on or on[0].text != "on":
            raise KqlError("join needs on")
        for item in _split(on[1:], ","):
            if len(item) == 1:
                for side in (left, right):
                    if item[0].text not in side.columns:
                        raise KqlError(f"join key {item[0].text!r} is not a column of both sides")
            elif [t.text for t in item[:2]] == ["$left", "."] and len(item) == 7:
                if item[2].text not in left.columns or item[6].text not in right.columns:
                    raise KqlError(f"unknown join key in {' '.join(t.text for t in item)!r}")
            else:
                raise KqlError(f"cannot read join key {' '.join(t.text for t in item)!r}")
        if kind in ("leftsemi", "leftanti"):
            return left
        if kind in ("rightsemi", "rightanti"):
            return right
        columns = list(left.columns)
        for column in right.columns:
            columns.append(f"{column}1" if column in left.columns else column)
        return Rows(left.table, columns, left.metrics | right.metrics)

    # -- expressions -------------------------------------------------------------------------------------------

    @staticmethod
    def _assignments(tokens: list[Tok], op: str) -> list[tuple[str, list[Tok]]]:
        result = []
        for item in _split(tokens, ","):
            if len(item) < 3 or item[0].kind != "word" or item[1].text != "=":
                raise KqlError(f"{op}: name every column ({' '.join(t.text for t in item)!r})")
            result.append((item[0].text, item[2:]))
        return result

    def _expr(
        self, tokens: list[Tok], rows: Rows, lets: dict[str, Rows | None], report: Report, where: bool = False
    ) -> None:
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            nxt = tokens[i + 1].text if i + 1 < len(tokens) else None
            if tok.kind != "word" or (i and tokens[i - 1].text == "."):
                i += 1
                continue
            if tok.text in KEYWORDS:
                pass
            elif nxt == "(":
                if tok.text in LITERALS:
                    i = _closing(tokens, i + 1) + 1
                    continue
                if tok.text not in FUNCTIONS:
                    raise KqlError(f"unknown function {tok.text!r}")
            elif tok.text in lets:
                pass
            elif tok.text not in rows.columns:
                raise KqlError(f"unknown column {tok.text!r} (in scope: {', '.join(rows.columns)})")
            elif tok.text in DIMENSION_COLUMNS:
                self._dimension(tokens, i, rows, report)
            elif tok.text == "name" and rows.table == "customMetrics" and nxt in ("==", "in"):
                self._metric_filter(tokens, i, rows, report, where)
            elif tok.text == "name" and rows.table == "customMetrics" and nxt in COMPARISONS:
                raise KqlError("compare name with == or in (...)")
            i += 1

    def _dimension(self, tokens: list[Tok], i: int, rows: Rows, report: Report) -> None:
        if i + 3 < len(tokens) and tokens[i + 1].text == "[" and tokens[i + 3].text == "]":
            key = _string(tokens[i + 2])
        elif i + 2 < len(tokens) and tokens[i + 1].text == "." and tokens[i + 2].kind == "word":
            key = tokens[i + 2].text
        else:
            raise KqlError("read customDimensions by key: customDimensions['Name']")
        if rows.table == "customMetrics":
            if not rows.metrics:
                raise KqlError(f"dimension {key!r} read before the query filters on a metric name")
            allowed = {d for metric in rows.metrics for d in self.metric_dimensions[metric]}
            where = f"metrics {', '.join(sorted(rows.metrics))}"
        else:
            allowed = set(self.span_dimensions.get(rows.table, ()))
            where = f"{rows.table} spans"
        if key not in allowed:
            raise KqlError(f"dimension {key!r} is not carried by the {where}")
        report.dimensions.add(key)

    def _metric_filter(self, tokens: list[Tok], i: int, rows: Rows, report: Report, where: bool) -> None:
        rest = tokens[i + 1 :]
        if len(rest) > 1 and rest[0].text == "==":
            names = {_string(rest[1])}
        elif len(rest) > 1 and rest[0].text == "in" and rest[1].text == "(":
            names = {_string(t) for t in rest[2 : _closing(rest, 1)] if t.text != ","}
        else:
            raise KqlError("compare name with == or in (...)")
        unknown = names - set(self.metric_dimensions)
        if unknown:
            raise KqlError(f"unknown metric {sorted(unknown)}; the gateway emits {sorted(self.metric_dimensions)}")
        if rows.metrics and not names <= rows.metrics:
            raise KqlError(f"metric {sorted(names - rows.metrics)} was filtered out earlier")
        if where:
            rows.metrics = names if not rows.metrics else rows.metrics & names
        elif not rows.metrics:
            raise KqlError("filter on name in a where before using it elsewhere")
        report.metrics |= names


CHECKER = Checker(SCHEMA)


def query_text(name: str) -> str:
    return insights.load(name).text


# ---- the schema and the contract --------------------------------------------------------------------------------


def test_schema_cites_microsofts_documentation_and_lists_the_classic_tables() -> None:
    assert SCHEMA["_source"].startswith("https://learn.microsoft.com/")
    assert set(SCHEMA["tables"]) == {"customMetrics", "requests", "dependencies", "customEvents", "traces"}
    assert {"name", "customDimensions", "customMeasurements", "itemCount"} <= set(SCHEMA["tables"]["customEvents"])
    assert {"name", "timestamp", "valueSum", "valueCount", "valueMin", "valueMax", "customDimensions"} <= set(
        SCHEMA["tables"]["customMetrics"]
    )
    assert {"itemCount", "duration", "resultCode", "customDimensions"} <= set(SCHEMA["tables"]["requests"])
    assert {"type", "target", "itemCount", "resultCode"} <= set(SCHEMA["tables"]["dependencies"])
    assert "itemCount" not in SCHEMA["tables"]["customMetrics"]  # pre-aggregated: valueCount plays that part


def test_schema_metrics_and_dimensions_are_the_gateways() -> None:
    from shared.config import ALL_METRIC_DIMENSIONS
    from shared.telemetry import protocol as telemetry
    from shared.telemetry.otel import INSTRUMENTS

    assert set(SCHEMA["metrics"]) == set(INSTRUMENTS)
    assert SCHEMA["metrics"][telemetry.TOTAL_TOKENS] == list(ALL_METRIC_DIMENSIONS)
    names = {v for k, v in vars(telemetry).items() if k.isupper() and isinstance(v, str)} | {"Attempt"}
    for dimensions in [*SCHEMA["metrics"].values(), *SCHEMA["spans"].values()]:
        assert set(dimensions) <= names


# ---- the queries ------------------------------------------------------------------------------------------------


def test_the_questions_asked_have_queries() -> None:
    assert REQUIRED <= set(QUERY_NAMES)


@pytest.mark.parametrize("name", QUERY_NAMES)
def test_query_passes_the_checker(name: str) -> None:
    report = CHECKER.check(query_text(name))
    assert report.tables and report.output
    if "customMetrics" in report.tables:
        assert report.metrics


@pytest.mark.parametrize("name", QUERY_NAMES)
def test_query_has_a_header(name: str) -> None:
    query = insights.load(name)
    header = [line for line in query.text.splitlines() if line.startswith("//")]
    assert query.text.startswith("// ") and query.description
    assert any("Time range" in line for line in header), "say where the time range comes from"
    assert any("Source:" in line for line in header), "say which table and metric it reads"


def test_counters_are_summed_from_valuesum() -> None:
    for name in QUERY_NAMES:
        tokens = [t.text for t in tokenize(query_text(name))]
        assert "value" not in tokens, f"{name}: use valueSum (AppMetrics has no value column)"


VALID = """
let slow = dependencies | where duration > 1000 | project operation_Id, Backend = tostring(customDimensions['Backend ID']);
requests
| where resultCode == '200'
| join kind=inner (slow) on operation_Id
| join kind=leftouter (customMetrics | where name == 'Failovers' | project operation_Id, Reason = tostring(customDimensions.Reason)) on $left.operation_Id == $right.operation_Id
| summarize Requests = sum(itemCount) by Backend, Reason
| top 5 by Requests desc
"""


def test_checker_follows_let_and_join() -> None:
    report = CHECKER.check(VALID)
    assert report.tables == {"requests", "dependencies", "customMetrics"}
    assert report.dimensions == {"Backend ID", "Reason"}
    assert report.output == ["Backend", "Reason", "Requests"]


BASE = "customMetrics | where name == 'Total Tokens' "


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("customMetric | where name == 'Total Tokens'", "unknown table 'customMetric'"),
        ("AppMetrics | where Name == 'Total Tokens'", "unknown table 'AppMetrics'"),
        (BASE + "| summarize Tokens = sum(valueSums)", "unknown column 'valueSums'"),
        (BASE + "| summarize Tokens = sum(valueSum) by bin(Timestamp, 1m)", "unknown column 'Timestamp'"),
        (BASE + "| summarize Tokens = sum(valueSum) by name | where valueSum > 0", "unknown column 'valueSum'"),
        (BASE + "| project name | extend c = cloud_RoleName", "unknown column 'cloud_RoleName'"),
        (BASE + "| extend c = tostring(customDimensions['Consumer'])", "dimension 'Consumer' is not carried"),
        (BASE + "| extend p = tostring(customDimensions['PTU'])", "dimension 'PTU' is not carried"),
        ("customMetrics | where name == 'Total Token'", "unknown metric ['Total Token']"),
        ("customMetrics | summarize sum(valueSum)", "summarize: name every column"),
        ("customMetrics | summarize Total = sum(valueSum)", "must filter on name"),
        (BASE + "| summarize t = sumif(valueSum, name == 'Prompt Tokens')", "filtered out earlier"),
        (BASE + "| summarize Tokens = summ(valueSum)", "unknown function 'summ'"),
        (BASE + "| extend tostring(customDimensions['Location'])", "extend: name every column"),
        (BASE + "| mv-expand customDimensions", "operator 'mv-expand' is not supported"),
        (BASE + "| summarize Tokens = sum(valueSum", "unbalanced brackets"),
        ("requests | extend b = tostring(customDimensions['Attempt'])", "not carried by the requests spans"),
        ("requests | join (dependencies) on operation", "join key 'operation' is not a column of both sides"),
    ],
)
def test_checker_rejects_wrong_queries(query: str, message: str) -> None:
    with pytest.raises(KqlError, match=re.escape(message)):
        CHECKER.check(query)


def test_normalise_ignores_layout_and_comments_but_not_tokens() -> None:
    a = "// header\ncustomMetrics\n| where name == 'X'   // why\n| take 1\n"
    assert normalise(a) == normalise("customMetrics | where name=='X' | take 1")
    assert normalise(a) != normalise("customMetrics | where name == 'Y' | take 1")
    assert normalise("x | where s == '// not a comment'") == "x | where s == '// not a comment'"


# ---- the workbook -----------------------------------------------------------------------------------------------


def _kql_items() -> list[dict[str, Any]]:
    return [item for item in WORKBOOK["items"] if item["type"] == 3]


def test_workbook_is_a_notebook_with_a_time_range() -> None:
    assert WORKBOOK["version"] == "Notebook/1.0"
    assert WORKBOOK["$schema"].endswith("/schema/workbook.json")
    # Replaced with the Application Insights id by the Bicep, as in the AI-Gateway labs:
    # replace(loadTextContent('workbook.json'), '{appinsights-id}', appInsights.id)
    assert WORKBOOK["fallbackResourceIds"] == ["{appinsights-id}"]
    assert {item["type"] for item in WORKBOOK["items"]} <= {1, 3, 9}
    names = [item["name"] for item in WORKBOOK["items"]]
    assert len(names) == len(set(names))
    parameters = [p for item in WORKBOOK["items"] if item["type"] == 9 for p in item["content"]["parameters"]]
    assert [(p["name"], p["type"]) for p in parameters] == [("TimeRange", 4)]


def test_workbook_charts_every_question() -> None:
    assert REQUIRED <= {item["name"] for item in _kql_items()}


@pytest.mark.parametrize("item", _kql_items(), ids=lambda item: item["name"])
def test_workbook_query_is_the_file_of_the_same_name(item: dict[str, Any]) -> None:
    """The rule: a query item is named after a file in queries/ and runs that file's KQL (comments and layout
    aside); the time range comes from the TimeRange parameter, as --timespan does for the command."""
    content = item["content"]
    assert item["name"] in QUERY_NAMES
    body = "\n".join(line for line in query_text(item["name"]).splitlines() if not line.startswith("//")).strip()
    assert normalise(content["query"]) == normalise(body), f"out of date; the file's query as JSON: {json.dumps(body)}"
    assert content["version"] == "KqlItem/1.0"
    assert (content["queryType"], content["resourceType"]) == (0, "microsoft.insights/components")
    if item["name"] == "top_consumers_today":  # "today" needs a whole day whatever the picker says
        assert "timeContextFromParameter" not in content and content["timeContext"] == {"durationMs": 86_400_000}
    else:
        assert content["timeContextFromParameter"] == "TimeRange"
    report = CHECKER.check(content["query"])
    chart = content.get("chartSettings", {})
    for column in [chart.get("xAxis"), *chart.get("yAxis", [])]:
        assert column is None or column in report.output


# ---- formatting recorded responses ------------------------------------------------------------------------------


def sdk_response(body: dict[str, Any]) -> Any:
    """What LogsQueryClient.query_resource makes of a response body (its own branch, verbatim)."""
    from azure.monitor.query import LogsQueryError, LogsQueryPartialResult, LogsQueryResult

    if body.get("error"):
        return LogsQueryPartialResult._from_generated(body, LogsQueryError)
    return LogsQueryResult._from_generated(body)


def recorded(name: str) -> insights.Result:
    return insights.from_response(sdk_response(RESPONSES[name]))


TABLES = {
    "tokens_per_consumer": """\
timestamp             Consumer        Tokens
--------------------  --------------  ------
2025-06-02T09:00:00Z  contoso-chat     18342
2025-06-02T09:00:00Z  fabrikam-batch  120500
2025-06-02T09:01:00Z  contoso-chat      9127
2025-06-02T09:01:00Z                      35""",
    "throttled_by_consumer": """\
Consumer        Requests  RateLimited  QuotaExceeded  BackendsBusy  Throttled  ThrottledPct
--------------  --------  -----------  -------------  ------------  ---------  ------------
fabrikam-batch      1532          187              0            12        199         12.99
contoso-chat           3            0              1             0          1         33.33
tailwind-eval          0            0              0             2          2""",
    "breaker_transitions": """\
Backend              Region         Trips  HalfOpen  Closed  LastTrip
-------------------  -------------  -----  --------  ------  ---------------------------
ptu-uksouth          uksouth            4         4       3  2025-06-02T09:41:07.123456Z
paygo-swedencentral  swedencentral      0         0       1""",
    "failover_routes": """\
FromBackend          ToBackend            Reason   Failovers  LastSeen
-------------------  -------------------  -------  ---------  ----------------------
ptu-uksouth          paygo-swedencentral  429            311  2025-06-02T09:59:00Z
paygo-swedencentral  paygo-francecentral  timeout          2  2025-06-02T08:12:30.5Z""",
}

CSV = {
    "throttled_by_consumer": """\
Consumer,Requests,RateLimited,QuotaExceeded,BackendsBusy,Throttled,ThrottledPct
fabrikam-batch,1532,187,0,12,199,12.99
contoso-chat,3,0,1,0,1,33.333333333333336
tailwind-eval,0,0,0,2,2,""",
    "breaker_transitions": """\
Backend,Region,Trips,HalfOpen,Closed,LastTrip
ptu-uksouth,uksouth,4,4,3,2025-06-02T09:41:07.123456Z
paygo-swedencentral,swedencentral,0,0,1,""",
}

PARTIAL = (
    "PartialError: There were some errors when processing your query. (Query execution has exceeded the allowed "
    "limits (80DA0003): The results of this query exceed the set limit of 64 MB.)"
)


def test_every_recorded_response_is_for_a_query_whose_columns_it_has() -> None:
    for name, body in RESPONSES.items():
        if name.startswith("_"):
            continue
        columns = [c["name"] for c in body["tables"][0]["columns"]]
        assert columns == CHECKER.check(query_text(name)).output


@pytest.mark.parametrize("name", sorted(TABLES))
def test_table_output(name: str) -> None:
    assert insights.render(recorded(name), "table") == TABLES[name]


@pytest.mark.parametrize("name", sorted(CSV))
def test_csv_output(name: str) -> None:
    assert insights.render(recorded(name), "csv") == CSV[name]


def test_json_output_keeps_types_nulls_and_the_partial_error() -> None:
    document = json.loads(insights.render(recorded("failover_routes"), "json"))
    assert document == {
        "tables": [
            {
                "name": "PrimaryResult",
                "columns": [
                    {"name": "FromBackend", "type": "string"},
                    {"name": "ToBackend", "type": "string"},
                    {"name": "Reason", "type": "string"},
                    {"name": "Failovers", "type": "real"},
                    {"name": "LastSeen", "type": "datetime"},
                ],
                "rows": [
                    {"FromBackend": "ptu-uksouth", "ToBackend": "paygo-swedencentral", "Reason": "429",
                     "Failovers": 311.0, "LastSeen": "2025-06-02T09:59:00Z"},
                    {"FromBackend": "paygo-swedencentral", "ToBackend": "paygo-francecentral", "Reason": "timeout",
                     "Failovers": 2.0, "LastSeen": "2025-06-02T08:12:30.5Z"},
                ],
            }
        ],
        "partial_error": PARTIAL,
    }
    rows = json.loads(insights.render(recorded("throttled_by_consumer"), "json"))["tables"][0]["rows"]
    assert rows[2]["ThrottledPct"] is None


def test_partial_result_keeps_its_rows_and_names_the_error() -> None:
    result = recorded("failover_routes")
    assert len(result.tables[0].rows) == 2
    assert result.partial_error == PARTIAL
    assert recorded("tokens_per_consumer").partial_error is None


def test_formatting_edge_cases() -> None:
    assert insights.format_table(["A", "N"], ["string", "long"], []) == "A  N\n-  -\n(no rows)"
    two = insights.Result((insights.Table("one", ("A",), ("bool",), ((True,),)),
                           insights.Table("two", ("D",), ("dynamic",), (('{"k":[1]}',),))))
    assert insights.render(two, "table") == "# one\nA\n----\ntrue\n\n# two\nD\n---------\n{\"k\":[1]}"
    assert json.loads(insights.render(two, "json"))["tables"][1]["rows"] == [{"D": {"k": [1]}}]
    assert insights.format_csv(["S"], [['say "hi", then go']]) == 'S\n"say ""hi"", then go"'
    assert insights.format_table(["x"], ["real"], [[0.000123], [-2.5], [1e20]]).splitlines()[2:] == [
        "0.000123", "    -2.5", "   1e+20"
    ]


@pytest.mark.parametrize(
    ("text", "span"),
    [("PT1H", timedelta(hours=1)), ("P1D", timedelta(days=1)), ("pt30m", timedelta(minutes=30)),
     ("P1DT12H", timedelta(days=1, hours=12)), ("P2W", timedelta(weeks=2)), ("PT90.5S", timedelta(seconds=90.5))],
)
def test_parse_timespan(text: str, span: timedelta) -> None:
    assert insights.parse_timespan(text) == span


@pytest.mark.parametrize("text", ["1h", "P", "PT", "P1M", "P1Y", "PT0S", "-PT1H", "P1H"])
def test_parse_timespan_rejects(text: str) -> None:
    with pytest.raises(insights.UsageError):
        insights.parse_timespan(text)


# ---- the command, with a fake client ----------------------------------------------------------------------------


@dataclass
class FakeClient:
    response: Any = None
    error: Exception | None = None
    calls: list[tuple[str, str, timedelta | None]] = field(default_factory=list)
    closed: bool = False

    def query_resource(self, resource_id: str, query: str, *, timespan: timedelta | None) -> Any:
        self.calls.append((resource_id, query, timespan))
        if self.error is not None:
            raise self.error
        return self.response

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake() -> Iterator[FakeClient]:
    yield FakeClient(response=sdk_response(RESPONSES["tokens_per_consumer"]))


def run(argv: list[str], client: FakeClient | None) -> int:
    def factory() -> FakeClient:
        if client is None:
            raise AssertionError("the command must not reach Azure")
        return client

    return insights.main(argv, client_factory=factory)


def test_run_sends_the_query_file_to_the_resource_for_the_timespan(
    fake: FakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(["run", "tokens_per_consumer", "--resource-id", RESOURCE_ID, "--timespan", "PT1H"], fake)
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert fake.calls == [(RESOURCE_ID, query_text("tokens_per_consumer"), timedelta(hours=1))]
    assert out == TABLES["tokens_per_consumer"] + "\n"
    assert fake.closed


def test_run_defaults_to_a_day_and_takes_a_format(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["run", "tokens_per_consumer", "--resource-id", RESOURCE_ID, "--format", "csv"], fake) == 0
    assert fake.calls[0][2] == timedelta(days=1)
    assert capsys.readouterr().out.splitlines()[:2] == ["timestamp,Consumer,Tokens", "2025-06-02T09:00:00Z,contoso-chat,18342"]


def test_partial_result_is_printed_with_a_warning_and_status_3(capsys: pytest.CaptureFixture[str]) -> None:
    client = FakeClient(response=sdk_response(RESPONSES["failover_routes"]))
    assert run(["run", "failover_routes", "--resource-id", RESOURCE_ID], client) == 3
    out, err = capsys.readouterr()
    assert out == TABLES["failover_routes"] + "\n"
    assert err == f"warning: partial result, rows may be missing: {PARTIAL}\n"


def test_service_errors_are_reported_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

    client = FakeClient(error=HttpResponseError(message="(BadArgumentError) Failed to resolve column 'x'"))
    assert run(["run", "ptu_share", "--resource-id", RESOURCE_ID], client) == 1
    assert capsys.readouterr().err == "error: query ptu_share failed: (BadArgumentError) Failed to resolve column 'x'\n"
    assert client.closed

    client = FakeClient(error=ClientAuthenticationError(message="DefaultAzureCredential failed to retrieve a token"))
    assert run(["run", "ptu_share", "--resource-id", RESOURCE_ID], client) == 1
    err = capsys.readouterr().err
    assert "could not authenticate (DefaultAzureCredential failed to retrieve a token)" in err and "az login" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "no_such_query", "--resource-id", RESOURCE_ID], "unknown query 'no_such_query'; available: "),
        (["run", "../README", "--resource-id", RESOURCE_ID], "unknown query '../README'"),
        (["run", "ptu_share", "--resource-id", RESOURCE_ID, "--timespan", "1h"], "--timespan: expected"),
        (["run", "ptu_share", "--resource-id", "/subscriptions/0000/resourceGroups/rg/providers/"
          "Microsoft.OperationalInsights/workspaces/log"], "--resource-id: expected an Application Insights"),
        (["run", "ptu_share"], "the following arguments are required: --resource-id"),
        (["run", "ptu_share", "--resource-id", RESOURCE_ID, "--format", "xml"], "invalid choice: 'xml'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2_before_any_client_is_made(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(argv, None) == 2
    assert message in capsys.readouterr().err


def test_list_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["list"], None) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "ANSWERS"]
    assert [line.split()[0] for line in lines[2:]] == QUERY_NAMES
    assert run(["show", "ptu_share"], None) == 0
    assert capsys.readouterr().out == query_text("ptu_share")


def test_the_admin_command_dispatches_query_here() -> None:
    from shared.admin.cli import main as admin_main

    out = io.StringIO()
    with redirect_stdout(out):
        assert admin_main(["query", "list"]) == 0
    assert "tokens_per_consumer" in out.getvalue()


@pytest.mark.process
def test_standalone_and_without_azure_monitor_query_loaded() -> None:
    probe = "import sys, shared.admin.queries; assert 'azure.monitor.query' not in sys.modules, 'imported eagerly'"
    subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True)
    done = subprocess.run([sys.executable, "-m", "shared.admin.queries", "list"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "ptu_share" in done.stdout
