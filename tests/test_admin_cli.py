"""The admin command as a product: one actionable line and a non-zero exit for each failure, never a traceback;
`--json` output that is only JSON; deployment names no backend serves refused unless forced; `--priority` explained."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError

from shared.admin import cli
from shared.admin.cli import Admin, parser
from shared.admin.failures import BAD_INPUT, NOT_AUTHORIZED, REFUSED, UNREACHABLE, explain
from shared.config import load_settings
from shared.edge.consumers import hash_key
from shared.records.consumers import Consumer
from shared.storage.consumer_table import consumer_from_entity, consumer_to_entity
from shared.storage.memory import MemoryConsumerStore
from shared.storage.protocols import Conflict, StoreUnavailable
from tools import stack

SECRET = "Zm9vYmFyc2VjcmV0a2V5bm90dG9iZWVjaG9lZA=="


def _store_error(cause: BaseException) -> StoreUnavailable:
    """A StoreUnavailable raised as Tables raises it: `from None`, the SDK's error left as its context."""
    try:
        try:
            raise cause
        except Exception:
            raise StoreUnavailable("table gatewayconsumers: " + type(cause).__name__) from None
    except StoreUnavailable as error:
        return error


def _settings(**env: str) -> Any:
    return load_settings(env, require_backends=False)


AZURITE = {"GATEWAY_TABLE_CONNECTION_STRING": "UseDevelopmentStorage=true"}
REMOTE = {"GATEWAY_TABLE_CONNECTION_STRING":
          f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={SECRET};EndpointSuffix=core.windows.net"}
IDENTITY = {"GATEWAY_TABLE_ENDPOINT": "https://acct.table.core.windows.net"}


@pytest.mark.parametrize(
    ("env", "cause", "exit_code", "words"),
    [
        (AZURITE, ServiceRequestError("connection refused"), UNREACHABLE, ["127.0.0.1:10002", "Azurite running", "scripts/run"]),
        (REMOTE, ServiceRequestError("dns"), UNREACHABLE, ["acct.table.core.windows.net", "GATEWAY_TABLE_ENDPOINT"]),
        (IDENTITY, ClientAuthenticationError("DefaultAzureCredential failed"), NOT_AUTHORIZED, ["not signed in", "az login"]),
        (IDENTITY, HttpResponseError(message="AuthorizationPermissionMismatch", response=None), NOT_AUTHORIZED, []),
    ],
)
def test_a_store_failure_is_one_actionable_line(env: dict[str, str], cause: BaseException, exit_code: int,
                                                words: list[str]) -> None:
    if isinstance(cause, HttpResponseError) and not isinstance(cause, ClientAuthenticationError):
        cause.status_code = 403
        words = ["Storage Table Data Contributor", "acct.table.core.windows.net"]
    failure = explain(_store_error(cause), _settings(**env))
    assert failure is not None
    assert failure.exit_code == exit_code
    assert "\n" not in failure.message and all(w in failure.message for w in words), failure.message
    assert SECRET not in failure.message


def test_refusals_and_bad_input_have_their_own_exit_codes_and_bugs_keep_their_traceback() -> None:
    refused = explain(SystemExit("no consumer with id 'x'"))
    assert refused is not None and refused.exit_code == REFUSED
    bad = explain(ValueError("consumer id: lower-case letters"))
    assert bad is not None and bad.exit_code == BAD_INPUT
    assert explain(SystemExit(2)) is None  # argparse's own exit keeps its code and usage text
    assert explain(KeyError("a bug")) is None  # not hidden behind a friendly line


def test_with_azurite_not_running_the_command_exits_3_with_one_line_and_json_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_TABLE_CONNECTION_STRING", stack.table_connection_string(stack.free_port()))
    assert cli.main(["--settings", "", "consumers", "list"]) == UNREACHABLE
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "is Azurite running?" in err
    assert cli.main(["--settings", "", "--json", "consumers", "show", "demo"]) == UNREACHABLE
    out, err = capsys.readouterr()
    assert json.loads(out)["error"]["code"] == "store_unreachable"


def test_bad_settings_exit_2_naming_the_setting(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GATEWAY_TABLE_CONNECTION_STRING", "UseDevelopmentStorage=true")
    monkeypatch.setenv("GATEWAY_TABLE_PREFIX", "no-dashes-allowed")
    assert cli.main(["--settings", "", "--json", "consumers", "list"]) == BAD_INPUT
    out, err = capsys.readouterr()
    assert "GATEWAY_TABLE_PREFIX" in err and json.loads(out)["error"]["code"] == "bad_input"


def _admin(json_mode: bool, served: frozenset[str] | None = frozenset({"gpt-4o-mini", "text-embedding-3-small"})
           ) -> tuple[Admin, io.StringIO, io.StringIO, MemoryConsumerStore]:
    store, out, err = MemoryConsumerStore(), io.StringIO(), io.StringIO()
    return Admin(store, out, err=err, json_mode=json_mode, served=served), out, err, store  # type: ignore[arg-type]


async def test_json_mode_prints_one_json_document_for_every_command_and_notes_go_to_stderr() -> None:
    admin, out, err, store = _admin(json_mode=True)
    commands = [
        (admin.create, ["consumers", "create", "Team A", "--deployments", "gpt-4o-mini"]),
        (admin.list, ["consumers", "list"]),
        (admin.show, ["consumers", "show", "team-a"]),
        (admin.update, ["consumers", "set", "team-a", "--tpm", "5000"]),
        (admin.rotate, ["consumers", "rotate", "team-a", "--grace-seconds", "60"]),
        (admin.reindex, ["consumers", "reindex"]),
        (admin.delete, ["consumers", "delete", "team-a"]),
    ]
    documents = []
    for command, argv in commands:
        out.seek(0)
        out.truncate()
        assert await command(parser().parse_args(argv)) == 0
        documents.append(json.loads(out.getvalue()))  # the whole of stdout is one JSON document
    created = documents[0]
    assert created["id"] == "team-a" and created["key"].startswith("gw-")
    assert documents[3]["tokens_per_minute"] == 5000 and documents[-1] == {"id": "team-a", "deleted": True}
    assert "Store this key now" in err.getvalue() and "60 seconds" in err.getvalue()
    out.seek(0)
    out.truncate()
    await admin.create(parser().parse_args(["consumers", "create", "B", "--all-deployments"]))
    assert await admin.set_enabled("b", False) == 0
    assert json.loads(out.getvalue().split("\n}\n", 1)[1]) == {"id": "b", "enabled": False}
    assert store.consumers["b"].enabled is False


async def test_text_mode_keeps_stdout_free_of_notes() -> None:
    admin, out, err, _ = _admin(json_mode=False)
    await admin.create(parser().parse_args(["consumers", "create", "Team A", "--deployments", "gpt-4o-mini"]))
    assert json.loads(out.getvalue())["id"] == "team-a"
    out.seek(0)
    out.truncate()
    await admin.set_enabled("team-a", False)
    assert out.getvalue() == "team-a: disabled\n"


async def test_deployments_no_backend_serves_are_refused_unless_forced() -> None:
    admin, out, err, store = _admin(json_mode=True)
    with pytest.raises(SystemExit, match=r"no configured backend serves gpt-4o \(GATEWAY_BACKENDS serves: gpt-4o-mini"):
        await admin.create(parser().parse_args(["consumers", "create", "A", "--deployments", "gpt-4o,gpt-4o-mini"]))
    assert store.consumers == {}
    assert await admin.create(parser().parse_args(["consumers", "create", "A", "--deployments", "gpt-4o", "--force"])) == 0
    assert store.consumers["a"].deployments == frozenset({"gpt-4o"}) and "warning: no configured backend" in err.getvalue()
    with pytest.raises(SystemExit, match="--force"):
        await admin.update(parser().parse_args(["consumers", "set", "a", "--deployments", "gpt-5"]))
    assert await admin.update(parser().parse_args(["consumers", "set", "a", "--tpm", "10"])) == 0  # other changes pass
    # Where the command runs without GATEWAY_BACKENDS (an operator's shell), it cannot check, and says so.
    unchecked, _, unchecked_err, _ = _admin(json_mode=True, served=None)
    assert await unchecked.create(parser().parse_args(["consumers", "create", "B", "--deployments", "gpt-5"])) == 0
    assert "were not checked" in unchecked_err.getvalue()


def test_priority_is_explained_and_low_is_gone_but_a_stored_low_still_reads() -> None:
    help_text = parser()._subparsers._group_actions[0].choices["consumers"]  # type: ignore[union-attr]
    create_help = help_text._subparsers._group_actions[0].choices["create"].format_help()
    assert "reserve_tokens" in create_help and "{high,normal}" in create_help
    with pytest.raises(SystemExit):
        parser().parse_args(["consumers", "create", "A", "--all-deployments", "--priority", "low"])
    with pytest.raises(ValueError, match="retired"):
        cli.consumer_from_spec({"name": "A", "deployments": "*", "priority": "low"})
    entity = consumer_to_entity(Consumer(id="old", name="Old", key_hash="0" * 64, key_prefix="gw-abcdef"))
    entity["priority"] = "low"
    assert consumer_from_entity(entity).priority == "normal"


async def test_a_record_that_keeps_changing_under_a_command_is_not_overwritten_and_the_command_says_so() -> None:
    admin, _, _, store = _admin(json_mode=False)
    await store.create(Consumer(id="busy", name="busy", key_hash=hash_key("gw-busy"), key_prefix="gw-busy"))

    async def always_beaten(consumer: Consumer, if_match: str | None = None) -> None:
        raise Conflict("another writer came first")

    store.put = always_beaten  # type: ignore[method-assign]
    with pytest.raises(SystemExit, match="changed by other writers 5 times"):
        await admin.set_enabled("busy", False)
    stored = await store.get("busy")
    assert stored is not None and stored.enabled


def test_a_store_that_refuses_the_credential_exits_4_naming_the_role(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real SDK against a loopback server answering as Table Storage does to an identity without a data role."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refusing(BaseHTTPRequestHandler):
        def _refuse(self) -> None:
            body = json.dumps({"odata.error": {"code": "AuthorizationPermissionMismatch", "message": {
                "lang": "en-US", "value": "This request is not authorized to perform this operation using this permission."}}})
            self.send_response(403)
            self.send_header("content-type", "application/json;odata=minimalmetadata")
            self.send_header("x-ms-error-code", "AuthorizationPermissionMismatch")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("GATEWAY_TABLE_CONNECTION_STRING", stack.table_connection_string(server.server_address[1]))
        assert cli.main(["--settings", "", "--json", "consumers", "list"]) == NOT_AUTHORIZED
    finally:
        server.shutdown()
        server.server_close()
    out, err = capsys.readouterr()
    assert "Storage Table Data Contributor" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert json.loads(out)["error"]["code"] == "no_role"
    assert "Eby8vdM02" not in err + out  # the connection string's key is never echoed
