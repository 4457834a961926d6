"""`scripts/test --quick` is in-process only (tests/processguard.py): starting Azurite, a gateway, node or any other
process is refused and fails the test, and every test that needs one is left out of --quick by its marker."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PROCESS_FIXTURES
from tests.processguard import Guard, ProcessRefused
from tools import stack


@pytest.fixture
def guard() -> Iterator[Guard]:
    on = Guard()
    on.install()
    yield on
    on.uninstall()


def test_starting_azurite_is_refused_before_anything_runs(guard: Guard, tmp_path: Path) -> None:
    with pytest.raises(ProcessRefused, match="azurite"):
        stack.start_azurite(stack.free_port(), tmp_path, name="refused-azurite")
    assert len(guard.take()) == 1


@pytest.mark.parametrize("start", [
    lambda: subprocess.run([sys.executable, "-c", "pass"], check=False),
    lambda: subprocess.Popen(["node", "--version"]),
    lambda: os.system("true"),
    lambda: os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], dict(os.environ)),
    lambda: os._exit(0) if os.fork() == 0 else None,  # were it not refused, the child leaves at once
], ids=["subprocess.run", "Popen", "os.system", "os.posix_spawn", "os.fork"])
def test_every_way_of_starting_a_process_is_refused_and_recorded(guard: Guard, start: object) -> None:
    with pytest.raises(ProcessRefused, match="--quick runs in-process only"):
        start()  # type: ignore[operator]
    assert len(guard.take()) == 1
    assert guard.take() == []  # taken once


async def test_an_asyncio_subprocess_is_refused(guard: Guard) -> None:
    with pytest.raises(ProcessRefused):
        await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    assert guard.take()


def test_a_refusal_caught_by_the_code_under_test_is_still_recorded(guard: Guard) -> None:
    try:
        subprocess.run(["azd", "auth", "token"], check=False)
    except Exception:  # what a careless caller does: the record still fails the test under --quick
        pass
    assert [what for what in guard.take() if "azd" in what]


def test_uninstalled_everything_is_as_it_was() -> None:
    before = (subprocess.Popen.__dict__["_execute_child"], os.fork, os.posix_spawn, os.system)
    on = Guard()
    on.install()
    assert subprocess.Popen.__dict__["_execute_child"] is not before[0] and os.fork is not before[1]
    on.uninstall()
    assert (subprocess.Popen.__dict__["_execute_child"], os.fork, os.posix_spawn, os.system) == before


def test_no_test_kept_by_quick_uses_azurite_or_the_end_to_end_stack(request: pytest.FixtureRequest) -> None:
    """Under --quick (where this matters most) the kept tests; in a full run every test: each one that uses Azurite,
    directly, through the stack's fixtures or as a store parameter, carries a marker that --quick leaves out."""
    unmarked = []
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        needs = PROCESS_FIXTURES & set(getattr(item, "fixturenames", ()))
        if (needs or "azurite" in params.values()) and not (item.get_closest_marker("process") or item.get_closest_marker("e2e")):
            unmarked.append(item.nodeid)
    assert not unmarked
    if request.config.getoption("--quick"):
        assert all(not (i.get_closest_marker("process") or i.get_closest_marker("e2e")) for i in request.session.items)


def test_under_quick_nothing_beyond_loopback_is_reached(request: pytest.FixtureRequest) -> None:
    if not request.config.getoption("--quick"):
        pytest.skip("the network guard is on under --quick only (gateway processes load it in the e2e tests)")
    with socket.socket() as outward, pytest.raises(ConnectionRefusedError, match="netguard"):
        outward.connect(("192.0.2.1", 443))  # TEST-NET-1: never reached
    with pytest.raises(socket.gaierror, match="netguard"):
        socket.getaddrinfo("example.com", 443)
    with socket.socket() as loopback:  # loopback stays open to in-process servers
        loopback.bind(("127.0.0.1", 0))
