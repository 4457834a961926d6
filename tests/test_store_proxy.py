"""The Table client reads proxy settings from the environment only where the environment names a proxy: aiohttp
otherwise looks them up (and ~/.netrc) in a worker thread for every store call."""

from __future__ import annotations

from typing import Any

import pytest

from shared.config import load_settings
from shared.storage.tables import Tables, proxies_in_environment


def _transport(tables: Tables) -> Any:
    transport = tables.client("ledger")._client._client._pipeline._transport
    while hasattr(transport, "_transport"):
        transport = transport._transport
    return transport


@pytest.mark.parametrize(("env", "expected"), [
    ({}, False),
    ({"HTTPS_PROXY": ""}, False),
    ({"HTTPS_PROXY": "http://127.0.0.1:3128"}, True),
    ({"http_proxy": "http://127.0.0.1:3128"}, True),
    ({"ALL_PROXY": "socks5://127.0.0.1:1080"}, True),
    ({"NO_PROXY": "*"}, False),
])
def test_a_proxy_is_looked_for_only_where_one_is_named(env: dict[str, str], expected: bool) -> None:
    assert proxies_in_environment(env) is expected


@pytest.mark.parametrize("proxy", ["", "http://127.0.0.1:3128"])
def test_the_table_client_trusts_the_environment_only_with_a_proxy(monkeypatch: pytest.MonkeyPatch, proxy: str) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    if proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy)
    settings = load_settings({"GATEWAY_TABLE_CONNECTION_STRING": "UseDevelopmentStorage=true"}, require_backends=False)
    assert _transport(Tables.from_settings(settings))._use_env_settings is bool(proxy)
