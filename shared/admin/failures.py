"""The admin command's failures: each one actionable line and an exit code, never a traceback.

    0  done
    1  refused (no such consumer, an id taken, a deployment no backend serves without --force, ...)
    2  bad input or settings (the option or setting is named)
    3  Table Storage cannot be reached (locally: Azurite is not running)
    4  not signed in to Azure, or signed in without a data role on the storage account

The store's errors reach the command as StoreUnavailable with the SDK's exception as its context; that context says
which of 3 and 4 it is. Nothing here echoes a connection string or key: only the table endpoint's host is named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

from shared.adminops.operations import OperationError
from shared.config import ConfigError, Settings
from shared.storage.protocols import StoreUnavailable

REFUSED, BAD_INPUT, UNREACHABLE, NOT_AUTHORIZED = 1, 2, 3, 4


@dataclass(frozen=True)
class Failure:
    message: str
    exit_code: int
    code: str  # a stable word for scripts: refused, bad_input, store_unreachable, not_signed_in, no_role


def store_host(settings: Settings | None) -> str:
    """Where the tables are, by host only (a connection string's key never leaves it)."""
    if settings is None:
        return "Table Storage"
    if settings.table_endpoint:
        return urlsplit(settings.table_endpoint).netloc or "Table Storage"
    connection = settings.table_connection_string or ""
    if connection.strip().lower().startswith("usedevelopmentstorage=true"):
        return "127.0.0.1:10002 (Azurite)"
    endpoint = re.search(r"TableEndpoint=([^;]+)", connection, re.IGNORECASE)
    if endpoint:
        return urlsplit(endpoint.group(1)).netloc or "Table Storage"
    account = re.search(r"AccountName=([^;]+)", connection, re.IGNORECASE)
    return f"{account.group(1)}.table.core.windows.net" if account else "Table Storage"


def _local(host: str) -> bool:
    return host.startswith(("127.0.0.1", "localhost", "[::1]"))


def _causes(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def explain(error: BaseException, settings: Settings | None = None) -> Failure | None:
    """The one line and exit code for a failure of the admin command; None for a bug (which keeps its traceback)."""
    if isinstance(error, SystemExit):
        if error.code is None or isinstance(error.code, int):
            return None  # a plain exit (argparse's own, or a command's return code): not ours to reword
        return Failure(str(error.code), REFUSED, "refused")
    if isinstance(error, OperationError):
        return Failure(error.message, REFUSED, "refused")
    if isinstance(error, ConfigError):
        return Failure(f"configuration error: {error}", BAD_INPUT, "bad_input")
    if isinstance(error, (StoreUnavailable, ClientAuthenticationError, HttpResponseError)):
        return _store_failure(error, store_host(settings))
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return Failure(f"cannot read {error.filename}: {error.strerror}", BAD_INPUT, "bad_input")
    if isinstance(error, ValueError):
        return Failure(f"error: {error}", BAD_INPUT, "bad_input")
    return None


def _store_failure(error: BaseException, host: str) -> Failure:
    for cause in _causes(error):
        if isinstance(cause, ClientAuthenticationError):
            return Failure(
                f"not signed in to Azure (no credential could get a token for {host}): run `az login` "
                "(or set AZURE_CLIENT_ID for a managed identity), then run the command again",
                NOT_AUTHORIZED, "not_signed_in",
            )
        if isinstance(cause, HttpResponseError) and cause.status_code in (401, 403):
            return Failure(
                f"{host} refused this identity ({cause.status_code}): give it the role 'Storage Table Data "
                "Contributor' on the storage account (or fix the connection string's key), then run the command again",
                NOT_AUTHORIZED, "no_role",
            )
    if _local(host):
        return Failure(
            f"cannot reach Table Storage at {host}: is Azurite running? `scripts/run` starts it "
            "(or `npx azurite-table --location .run/azurite`)",
            UNREACHABLE, "store_unreachable",
        )
    return Failure(
        f"cannot reach Table Storage at {host} ({type(_causes(error)[-1]).__name__}): check "
        "GATEWAY_TABLE_ENDPOINT or the connection string, and that this machine may reach the storage account",
        UNREACHABLE, "store_unreachable",
    )
