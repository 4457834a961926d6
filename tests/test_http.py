"""The edge's reading of the caller's address: X-Forwarded-For believed only as far as trusted hops wrote it."""

from __future__ import annotations

import ipaddress

import pytest

from shared.edge.http import client_address

PROXIES = (ipaddress.ip_network("10.1.0.0/16"),)


@pytest.mark.parametrize(
    ("peer", "forwarded", "hops", "proxies", "expected"),
    [
        # Nothing trusted (local default): the socket's peer, whatever the header says.
        ("192.0.2.1", "203.0.113.7", 0, (), "192.0.2.1"),
        ("192.0.2.1", None, 0, (), "192.0.2.1"),
        # Azure: the front end appends the caller's address (with its port); a client's own entries are to its left.
        ("127.0.0.1", "203.0.113.7:50123", 1, (), "203.0.113.7"),
        ("127.0.0.1", "6.6.6.6, 203.0.113.7:50123", 1, (), "203.0.113.7"),
        ("127.0.0.1", "[2001:db8::5]:443", 1, (), "2001:db8::5"),
        ("127.0.0.1", None, 1, (), "127.0.0.1"),
        # Behind a configured proxy (an Application Gateway subnet), its own entry is skipped, not the client's forgery.
        ("127.0.0.1", "6.6.6.6, 203.0.113.7, 10.1.2.3:443", 1, PROXIES, "203.0.113.7"),
        ("10.1.0.9", "6.6.6.6, 203.0.113.7", 0, PROXIES, "203.0.113.7"),
        ("192.0.2.1", "6.6.6.6, 203.0.113.7", 0, PROXIES, "192.0.2.1"),  # the peer is no trusted proxy
        # Garbage where a trusted hop should have written an address: fall back to the peer.
        ("127.0.0.1", "not-an-ip", 1, (), "127.0.0.1"),
        ("127.0.0.1", "x" * 5000, 1, (), "127.0.0.1"),
    ],
)
def test_client_address(peer: str, forwarded: str | None, hops: int, proxies: tuple[ipaddress.IPv4Network, ...], expected: str) -> None:
    assert client_address(peer, forwarded, hops, proxies) == expected
