"""Creating many consumers at once: `python -m shared.admin consumers create-many FILE --keys-out KEYS`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from shared.admin.cli import consumer_from_spec, read_specs
from shared.edge.consumers import hash_key
from tests.conftest import unique
from tests.e2e import Stack

ROOT = Path(__file__).resolve().parent.parent


def test_a_bad_file_names_every_bad_line_and_creates_nothing() -> None:
    lines = [
        '{"name": "Team A", "tokens_per_minute": 1000, "deployments": "*"}',
        "not json",
        '{"name": "Team B", "tpm": 5}',  # unknown field
        '{"name": "Team C", "tokens_per_minute": -1}',
        '{"name": "Team D", "tokens_per_minute": true}',
        '{"name": "Team E", "quota": 100}',  # no period
        '{"name": "Team A"}',  # the same id as line 1
        '{"name": "x", "id": "Bad Id!"}',
        '{"name": "x", "priority": "urgent"}',
        "[1, 2]",
        '{"name": "Team F"}',  # no deployments: access is never implied
        '{"name": "Team G", "deployments": ["gpt-4o\\n"]}',
        "",
    ]
    with pytest.raises(SystemExit) as caught:
        read_specs(lines)
    message = str(caught.value)
    assert message.startswith("nothing created")
    for number in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12):
        assert f"line {number}:" in message
    assert "line 1:" not in message and "line 13:" not in message


def test_a_line_makes_a_consumer_with_its_own_key_and_limits() -> None:
    consumer, key = consumer_from_spec({
        "name": "Team A", "tokens_per_minute": 1000, "deployment_tokens_per_minute": {"gpt-4o": 300},
        "quota": 50_000, "quota_period": "monthly", "deployments": ["gpt-4o"], "priority": "high",
    })
    assert consumer.id == "team-a" and consumer.key_hash == hash_key(key) and key.startswith("gw-")
    assert consumer.limits.tokens_per_minute == 1000 and consumer.limits.deployment_tokens_per_minute == {"gpt-4o": 300}
    assert consumer.limits.quota_period == "monthly" and consumer.deployments == frozenset({"gpt-4o"})
    assert consumer.priority == "high"
    other, other_key = consumer_from_spec({"name": "Team A", "deployments": "*"})
    assert other_key != key and other.limits.tokens_per_minute == 0 and other.deployments is None


def admin(e2e: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **e2e.env}
    return subprocess.run([sys.executable, "-m", "shared.admin", "--settings", "/nonexistent.json", "consumers", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.e2e
def test_three_hundred_consumers_from_a_file_call_the_gateway_with_their_keys(e2e: Stack, tmp_path: Path) -> None:
    tag = unique("bulk")
    spec = tmp_path / "consumers.jsonl"
    spec.write_text("".join(json.dumps({"name": f"{tag} {n}", "tokens_per_minute": 1000 + n, "deployments": "*"}) + "\n" for n in range(300)))
    keys = tmp_path / "keys.jsonl"
    done = admin(e2e, "create-many", str(spec), "--keys-out", str(keys))
    assert done.returncode == 0, done.stderr
    assert "created 300 consumers" in done.stderr and done.stdout == ""
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    made = [json.loads(line) for line in keys.read_text().splitlines()]
    assert len(made) == 300 and len({m["key"] for m in made}) == 300
    # A key works at once (a key not yet in the gateway's directory is looked up), with its own limit.
    last = made[-1]
    client = openai.OpenAI(base_url=e2e.url + "/v1", api_key=last["key"], max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert raw.headers["x-ratelimit-limit-tokens"] == "1299"
    # Again: every id exists, so nothing is created, and an existing keys file is never overwritten.
    again = admin(e2e, "create-many", str(spec), "--keys-out", str(tmp_path / "other.jsonl"))
    assert again.returncode != 0 and "exist already" in again.stderr
    assert not (tmp_path / "other.jsonl").exists()
    spec.write_text(json.dumps({"name": f"{tag} extra", "deployments": "*"}) + "\n")
    clobber = admin(e2e, "create-many", str(spec), "--keys-out", str(keys))
    assert clobber.returncode != 0 and "never written over" in clobber.stderr
    assert len(keys.read_text().splitlines()) == 300
