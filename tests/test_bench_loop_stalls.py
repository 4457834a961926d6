"""bench.loop_stalls: the hook it puts in the gateway process times every step of the standard event loop, counts it in
its bucket and names the ones of a millisecond or more (a task by its coroutine), and starts again when told."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench.loop_stalls import BUCKETS_S, HOOK, SLOW_S, report

pytestmark = pytest.mark.process

PROGRAM = """
import asyncio, os, pathlib, time

async def holds_the_loop():
    time.sleep(0.006)  # one step of 6 ms

async def main():
    out = pathlib.Path(os.environ["LOOP_STALLS_OUT"])
    for _ in range(200):
        asyncio.get_running_loop().call_soon(lambda: None)  # quick steps
    await asyncio.sleep(0)
    await asyncio.create_task(holds_the_loop())
    await asyncio.sleep(0.5)  # dumped
    pathlib.Path(f"{out}.reset").touch()
    while pathlib.Path(f"{out}.reset").exists():
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)

asyncio.run(main())
"""


def run(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    (tmp_path / "sitecustomize.py").write_text(HOOK.format(bounds=BUCKETS_S, slow=SLOW_S))
    out = tmp_path / "stalls.json"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "LOOP_STALLS_OUT": str(out)}
    child = subprocess.Popen([sys.executable, "-c", PROGRAM], env=env)
    first: dict[str, Any] = {}
    deadline = time.monotonic() + 20
    while child.poll() is None and time.monotonic() < deadline:
        if out.exists() and not first:
            seen = json.loads(out.read_text())
            if seen["slow"]:
                first = seen
        time.sleep(0.05)
    child.wait(timeout=10)
    return first, json.loads(out.read_text())


def test_a_step_that_holds_the_loop_is_counted_in_its_bucket_and_named_and_a_reset_starts_again(tmp_path: Path) -> None:
    first, last = run(tmp_path)
    histogram = first["histogram"]
    assert sum(histogram) >= 200 and histogram[0] >= 190  # the quick steps, under half a millisecond
    assert histogram[BUCKETS_S.index(0.01)] >= 1  # the 6 ms step: in [5, 10) ms
    named = [name for name in first["slow"] if "holds_the_loop" in name]
    assert named and first["slow"][named[0]][2] >= 0.006
    assert not any("holds_the_loop" in name for name in last["slow"])  # after the reset: only what came later
    text = report({"load": {"requests": 1, "seconds": 1, "rps": 1}, **first})
    assert "holds_the_loop" in text and "| >= 50 ms |" in text
