"""Runs last (files run in name order): scans everything the gateways logged and exported during the suite for any
consumer key handed out and for the backends' key. A key may appear only as its short non-secret prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import Stack
from tools import stack

pytestmark = pytest.mark.e2e


def test_no_key_was_logged_or_exported(e2e: Stack, log_dir: Path) -> None:
    secrets = [*e2e.keys, stack.SIM_API_KEY]
    assert len(e2e.keys) > 10  # the suite did hand out keys; the scan has something to look for
    files = [p for p in log_dir.iterdir() if p.name.startswith(("gateway", "capture"))]
    assert files
    scanned = 0
    for path in files:
        text = path.read_text(errors="replace")
        scanned += len(text)
        for secret in secrets:
            assert secret not in text, f"a key leaked into {path.name}"
    assert scanned > 0
