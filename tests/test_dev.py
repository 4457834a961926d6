"""scripts/run's choices (tools/dev.py): local state kept in a folder unless --fresh; an admin key per run unless the
settings name one."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tools import dev


def test_state_is_kept_unless_fresh(tmp_path: Path) -> None:
    state = tmp_path / "azurite"
    assert "new" in dev.prepare_state(state, fresh=False)
    (state / "__azurite_db_table__.json").write_text("{}")
    assert "from earlier runs" in dev.prepare_state(state, fresh=False)
    assert (state / "__azurite_db_table__.json").exists()
    assert "wiped" in dev.prepare_state(state, fresh=True)
    assert state.is_dir() and not any(state.iterdir())


def test_an_admin_key_is_made_for_the_run_unless_one_is_configured() -> None:
    env: dict[str, str] = {"GATEWAY_ADMIN_KEY_SHA256": ""}
    key = dev.admin_key(env)
    assert key is not None and key.startswith("gw-admin-") and len(key) > 40
    assert env["GATEWAY_ADMIN_KEY_SHA256"] == hashlib.sha256(key.encode()).hexdigest()
    assert dev.admin_key({}) != key  # a new one each run
    configured = {"GATEWAY_ADMIN_KEY_SHA256": "a" * 64}
    assert dev.admin_key(configured) is None and configured["GATEWAY_ADMIN_KEY_SHA256"] == "a" * 64


def test_the_simulators_start_for_settings_that_name_their_addresses_even_from_an_older_example() -> None:
    import json

    from tools import stack

    current = stack.backends_setting(stack.EMBEDDED_REGIONS)
    older = json.dumps([{**b, "deployments": ["gpt-4o", "text-embedding-3-small"]} for b in json.loads(current)])
    assert dev._uses_embedded_backends({"GATEWAY_BACKENDS": current})
    assert dev._uses_embedded_backends({"GATEWAY_BACKENDS": older})
    real = json.dumps([{"id": "uk", "endpoint": "https://uk.openai.azure.com", "region": "uksouth", "deployments": ["x"]}])
    assert not dev._uses_embedded_backends({"GATEWAY_BACKENDS": real})
    assert not dev._uses_embedded_backends({"GATEWAY_BACKENDS": "not json"})
    assert not dev._uses_embedded_backends({})
