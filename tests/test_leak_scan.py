"""The end-to-end session's leak scan (run by the `e2e` fixture when the session's stack stops): it must find a key in
any gateway log or telemetry capture, and only there."""

from __future__ import annotations

from pathlib import Path

from shared.edge.consumers import key_prefix, new_key
from tests.e2e import leaks


def test_a_key_in_a_gateway_log_or_a_capture_is_found_and_its_prefix_alone_is_not(tmp_path: Path) -> None:
    key, other = new_key(), new_key()
    (tmp_path / "gateway-1.log").write_text(f"INFO consumer {key_prefix(key)}… admitted\n")
    (tmp_path / "capture-export.json").write_text(f'{{"attributes": {{"api-key": "{other}"}}}}')
    (tmp_path / "azurite.log").write_text(key)  # not the gateway's: the store's own debug log holds what it is sent
    leaked, scanned = leaks([key, other], tmp_path)
    assert leaked == ["capture-export.json"] and scanned > 0
    (tmp_path / "gateway-1.log").write_text(f"ERROR request failed for key {key}\n")
    assert leaks([key, other], tmp_path)[0] == ["capture-export.json", "gateway-1.log"]
    assert leaks([new_key()], tmp_path)[0] == []
