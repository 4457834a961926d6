"""Loaded by processes started with this folder on PYTHONPATH: refuses and records any connection beyond loopback.

Tests start gateway processes with it to prove that nothing they do (Azure Monitor's statsbeat, live metrics, the
metadata service, tiktoken downloads) reaches beyond 127.0.0.1.
"""

import ipaddress
import os
import socket

_log = os.environ.get("NETGUARD_LOG")
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex
_getaddrinfo = socket.getaddrinfo


def _loopback(host: object) -> bool:
    if not isinstance(host, str):
        return True  # unix sockets and the like
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _record(what: str) -> None:
    if _log:
        with open(_log, "a", encoding="utf-8") as handle:
            handle.write(what + "\n")


def _guard(address: object) -> None:
    if isinstance(address, tuple) and address and not _loopback(address[0]):
        _record(f"connect {address[0]}:{address[1] if len(address) > 1 else ''}")
        raise ConnectionRefusedError(f"netguard: no connections beyond loopback ({address[0]})")


def connect(self, address):  # type: ignore[no-untyped-def]
    _guard(address)
    return _connect(self, address)


def connect_ex(self, address):  # type: ignore[no-untyped-def]
    _guard(address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
    if host is not None and not _loopback(host if isinstance(host, str) else str(host)):
        _record(f"resolve {host}")
        raise socket.gaierror(socket.EAI_NONAME, f"netguard: no lookups beyond loopback ({host})")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = connect  # type: ignore[method-assign]
socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
socket.getaddrinfo = getaddrinfo
