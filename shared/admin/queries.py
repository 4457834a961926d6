"""The query command: run one of the KQL files in queries/ against Application Insights and print the result.

    python -m shared.admin query list
    python -m shared.admin query show NAME
    python -m shared.admin query run NAME --resource-id ID [--timespan P1D] [--format table|csv|json]

(`python -m shared.admin.queries ...` takes the same arguments.) The resource id is the Application Insights resource's;
the queries use its classic tables. Authentication is DefaultAzureCredential (`az login`, environment, managed
identity); the signed-in identity needs read access to the resource (e.g. Monitoring Reader). azure-monitor-query is
an admin dependency (requirements-dev.txt), imported only when a query runs.

Exit status: 0 done, 1 the query failed, 2 bad arguments, 3 partial result (printed, with a warning on stderr).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from shared.text import table as text_table

QUERIES_DIR = Path(__file__).resolve().parents[2] / "queries"
FORMATS = ("table", "csv", "json")
DEFAULT_TIMESPAN = "P1D"
NUMERIC_TYPES = frozenset({"int", "long", "real", "decimal"})

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3

_NAME_RE = re.compile(r"^[a-z0-9_]+$")
_DURATION_RE = re.compile(
    r"^P(?:(?P<weeks>\d+)W)?(?:(?P<days>\d+)D)?"
    r"(?:T(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)
_RESOURCE_RE = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/microsoft\.insights/components/[^/]+$", re.I
)


class UsageError(Exception):
    pass


class QueryFailed(Exception):
    pass


# ---- the queries ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    text: str

    @property
    def description(self) -> str:
        """The header's first line: what the query answers."""
        for line in self.text.splitlines():
            if line.startswith("//"):
                return line.lstrip("/ ").strip()
            if line.strip():
                break
        return ""


def available(directory: Path = QUERIES_DIR) -> list[str]:
    return sorted(path.stem for path in directory.glob("*.kql"))


def load(name: str, directory: Path = QUERIES_DIR) -> Query:
    names = available(directory)
    if not _NAME_RE.match(name) or name not in names:
        raise UsageError(f"unknown query {name!r}; available: {', '.join(names)}")
    return Query(name, (directory / f"{name}.kql").read_text(encoding="utf-8"))


def parse_timespan(text: str) -> timedelta:
    """An ISO 8601 duration in weeks, days, hours, minutes and seconds (PT1H, P1D, P7D, PT30M)."""
    match = _DURATION_RE.match(text.strip().upper())
    if match is None or not any(match.groupdict().values()):
        raise UsageError(f"--timespan: expected an ISO 8601 duration such as PT1H or P1D, got {text!r}")
    parts = {key: float(value) for key, value in match.groupdict().items() if value}
    span = timedelta(**parts)
    if span <= timedelta(0):
        raise UsageError(f"--timespan must be longer than zero, got {text!r}")
    return span


# ---- results as plain values ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[str, ...]
    types: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True, slots=True)
class Result:
    tables: tuple[Table, ...]
    partial_error: str | None = None


def _plain_table(table: Any) -> Table:
    types = tuple(str(t) for t in table.columns_types)
    rows = []
    for row in table.rows:
        values = list(row)
        for i, kind in enumerate(types):
            # The SDK turns timespan and guid cells into str() of the value, so a null arrives as "None".
            if kind in ("timespan", "guid") and values[i] == "None":
                values[i] = None
        rows.append(tuple(values))
    return Table(str(table.name), tuple(str(c) for c in table.columns), types, tuple(rows))


def _error_text(error: Any) -> str:
    if error is None:
        return "the service returned part of the result"
    code = getattr(error, "code", None) or ""
    message = getattr(error, "message", None) or ""
    details = getattr(error, "details", None) or []
    for detail in details:
        inner = detail
        while isinstance(inner, dict) and isinstance(inner.get("innererror"), dict):
            inner = inner["innererror"]
        extra = inner.get("message") if isinstance(inner, dict) else None
        if extra and extra != message:
            message = f"{message} ({extra})" if message else str(extra)
            break
    return f"{code}: {message}" if code and message else code or message or str(error)


def from_response(response: Any) -> Result:
    """A LogsQueryResult or LogsQueryPartialResult as plain tables, plus the partial error's text if any."""
    if getattr(response, "status", None) == "PartialError":
        tables = getattr(response, "partial_data", None) or []
        return Result(tuple(_plain_table(t) for t in tables), _error_text(getattr(response, "partial_error", None)))
    return Result(tuple(_plain_table(t) for t in (getattr(response, "tables", None) or [])))


# ---- formatting: plain values in, text out ----------------------------------------------------------------------


def _datetime(value: datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    return text + "Z"


def _short_number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1e15:
        return f"{value:.6g}"
    if value.is_integer():
        return str(int(value))
    if abs(value) >= 1:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def _text(value: Any, short: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return _datetime(value)
    if isinstance(value, float):
        if short:
            return _short_number(value)
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def format_table(columns: Sequence[str], types: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned columns for people: numbers right-aligned and rounded, datetimes in UTC, nulls blank."""
    numeric = [c for c, t in zip(columns, types, strict=True) if t in NUMERIC_TYPES]
    body = text_table(list(columns), [[_text(v, short=True) for v in row] for row in rows], numeric=numeric)
    return body if rows else body + "\n(no rows)"


def format_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """RFC 4180 CSV with a header row; full precision, datetimes in UTC, nulls empty."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_text(v, short=False) for v in row] for row in rows)
    return out.getvalue().rstrip("\n")


def _json_value(value: Any, kind: str) -> Any:
    if isinstance(value, datetime):
        return _datetime(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if kind == "dynamic" and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def format_json(result: Result) -> str:
    """One object per row, keyed by column name, under each table's name and column types."""
    document = {
        "tables": [
            {
                "name": t.name,
                "columns": [{"name": c, "type": k} for c, k in zip(t.columns, t.types, strict=True)],
                "rows": [
                    {c: _json_value(v, k) for c, k, v in zip(t.columns, t.types, row, strict=True)} for row in t.rows
                ],
            }
            for t in result.tables
        ],
        "partial_error": result.partial_error,
    }
    return json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)


def render(result: Result, fmt: str) -> str:
    if fmt == "json":
        return format_json(result)
    parts = []
    for t in result.tables:
        text = format_table(t.columns, t.types, t.rows) if fmt == "table" else format_csv(t.columns, t.rows)
        parts.append(f"# {t.name}\n{text}" if len(result.tables) > 1 else text)
    return "\n\n".join(parts)


# ---- running a query --------------------------------------------------------------------------------------------


class LogsClient(Protocol):
    """The part of azure.monitor.query.LogsQueryClient the command uses."""

    def query_resource(self, resource_id: str, query: str, *, timespan: timedelta | None) -> Any: ...


ClientFactory = Callable[[], LogsClient]


class _AzureLogs:
    """LogsQueryClient with DefaultAzureCredential, both closed after the query."""

    def __init__(self) -> None:
        from azure.identity import DefaultAzureCredential
        from azure.monitor.query import LogsQueryClient

        self._credential = DefaultAzureCredential()
        self._client = LogsQueryClient(self._credential)

    def query_resource(self, resource_id: str, query: str, *, timespan: timedelta | None) -> Any:
        return self._client.query_resource(resource_id, query, timespan=timespan)

    def close(self) -> None:
        self._client.close()
        self._credential.close()


def azure_client() -> LogsClient:
    return _AzureLogs()


def run_query(client: LogsClient, resource_id: str, query: str, timespan: timedelta) -> Result:
    """Run a query; Azure's errors become QueryFailed with the service's message (never a credential)."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

    try:
        response = client.query_resource(resource_id, query, timespan=timespan)
    except ClientAuthenticationError as error:
        raise QueryFailed(
            f"could not authenticate ({error.message}); sign in with `az login` or set up another "
            "DefaultAzureCredential source"
        ) from None
    except HttpResponseError as error:
        raise QueryFailed(error.message or str(error)) from None
    return from_response(response)


def _check_resource_id(resource_id: str) -> str:
    if not _RESOURCE_RE.match(resource_id.strip()):
        raise UsageError(
            "--resource-id: expected an Application Insights resource id, "
            "/subscriptions/SUB/resourceGroups/RG/providers/Microsoft.Insights/components/NAME "
            "(the queries use its classic tables: customMetrics, requests, dependencies)"
        )
    return resource_id.strip()


def parser(prog: str = "python -m shared.admin query") -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog=prog, description="Run the gateway's KQL queries against Application Insights.")
    commands = root.add_subparsers(dest="action", required=True)
    commands.add_parser("list", help="the queries in queries/ and what each answers")
    show = commands.add_parser("show", help="print a query's KQL")
    show.add_argument("name")
    run = commands.add_parser("run", help="run a query and print the result")
    run.add_argument("name")
    run.add_argument("--resource-id", required=True, help="the Application Insights resource id")
    run.add_argument("--timespan", default=DEFAULT_TIMESPAN, help="ISO 8601 duration back from now (default P1D)")
    run.add_argument("--format", default="table", choices=FORMATS)
    return root


def _list(directory: Path) -> str:
    rows = [[name, load(name, directory).description] for name in available(directory)]
    return text_table(["NAME", "ANSWERS"], rows)


def main(
    argv: list[str] | None = None,
    *,
    client_factory: ClientFactory = azure_client,
    directory: Path = QUERIES_DIR,
    prog: str = "python -m shared.admin query",
) -> int:
    try:
        args = parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        if args.action == "list":
            print(_list(directory))
            return EXIT_OK
        query = load(args.name, directory)
        if args.action == "show":
            print(query.text, end="" if query.text.endswith("\n") else "\n")
            return EXIT_OK
        resource_id = _check_resource_id(args.resource_id)
        timespan = parse_timespan(args.timespan)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        client = client_factory()
    except ImportError as error:
        print(
            f"error: {error.name or error}: install the admin dependencies (pip install -r requirements-dev.txt)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    try:
        result = run_query(client, resource_id, query.text, timespan)
    except QueryFailed as error:
        print(f"error: query {query.name} failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        close = getattr(client, "close", None)
        if close is not None:
            close()
    print(render(result, args.format))
    if result.partial_error is not None:
        print(f"warning: partial result, rows may be missing: {result.partial_error}", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m shared.admin.queries"))
