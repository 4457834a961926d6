"""Ledgers over several storage accounts (GATEWAY_LEDGER_ACCOUNTS, shared/storage/ledger_shards.py; issue 32): each
ledger in the one account its key hashes to, the same on every instance and in every process; the limit held across
instances as on one account; one account down leaves the others' consumers on the shared ledger.

In-memory ledger stores (the same contract as the Table store), fake clock; nothing sleeps."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Mapping

import pytest

from bench.figures import most_in_any_window
from shared.clock import FakeClock
from shared.config import ConfigError, load_settings
from shared.limits.limiter import TokenLimiter
from shared.outcomes import Refusal
from shared.records.consumers import Consumer, Limits
from shared.storage.ledger_shards import ShardedLedgerStore, ledger_account
from shared.storage.ledger_table import TableLedgerStore
from shared.storage.memory import MemoryLedgerStore
from shared.telemetry.protocol import NullTelemetry
from shared.wiring import table_stores

D = "gpt-4o"
T0 = 1_700_000_000.0
AZURITE = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
           "TableEndpoint=http://127.0.0.1:10002/devstoreaccount1;")
BACKEND = {"id": "uk", "endpoint": "https://uk.openai.azure.com/", "region": "uksouth", "deployments": ["gpt-4o"],
           "auth": "identity"}


def consumer(name: str, tpm: int) -> Consumer:
    return Consumer(id=name, name=name, key_hash=f"h-{name}", key_prefix="gw-x", limits=Limits(tokens_per_minute=tpm))


class Counting(MemoryLedgerStore):
    def __init__(self) -> None:
        super().__init__()
        self.keys: set[str] = set()

    async def read(self, consumer_id: str) -> tuple[dict[str, object] | None, str | None]:
        self.keys.add(consumer_id)
        return await super().read(consumer_id)

    async def write(self, consumer_id: str, row: Mapping[str, object], etag: str | None) -> str:
        self.keys.add(consumer_id)
        return await super().write(consumer_id, row, etag)


def test_a_ledgers_account_is_the_same_in_every_process_and_the_accounts_share_the_ledgers() -> None:
    keys = [f"c{n}" for n in range(4000)] + [f"team|t{n}" for n in range(100)] + ["user|c1|" + "ab" * 16]
    here = [ledger_account(k, 4) for k in keys]
    # Another process, with another hash seed (Python's own `hash` of a string would differ there).
    code = ("import json,sys; from shared.storage.ledger_shards import ledger_account; "
            "print(json.dumps([ledger_account(k, 4) for k in json.load(sys.stdin)]))")
    other = subprocess.run([sys.executable, "-c", code], input=json.dumps(keys), capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": "12345"}, cwd=os.getcwd())
    assert json.loads(other.stdout) == here
    shares = [here.count(a) / len(keys) for a in range(4)]
    assert all(0.2 < share < 0.3 for share in shares), shares
    assert {ledger_account(k, 1) for k in keys} == {0}


async def test_many_instances_never_split_a_ledger_across_accounts_and_the_limit_holds() -> None:
    """8 instances, each with its own ShardedLedgerStore over the same 3 accounts, 12 consumers at twice their
    limit: every ledger lives in one account only, and no consumer gets more than its limit in any 60 s."""
    limit = 6_000
    accounts = [Counting() for _ in range(3)]
    clock = FakeClock(start=T0)
    lims = [TokenLimiter(ShardedLedgerStore(accounts), clock, NullTelemetry(), background=False, instance_count=8,
                         instance_id=f"i{i}") for i in range(8)]
    consumers = [consumer(f"c{n}", limit) for n in range(12)]
    rng = random.Random(6)
    admitted: dict[str, list[tuple[float, int]]] = {c.id: [] for c in consumers}
    for step in range(1500):  # 150 s
        clock.advance(0.1)
        for c in consumers:
            if rng.random() < 0.35:  # about 3.5 requests/s of 300: 63,000 a minute asked of 6,000
                try:
                    ticket = await rng.choice(lims).admit(c, D, 300)
                except Refusal:
                    continue
                used = rng.randint(100, 300)
                ticket.settle(used)
                admitted[c.id].append((clock.now(), used))
        if step % 2 == 0:
            for lim in lims:
                await lim.tick()
    for c in consumers:
        holding = [a for a, store in enumerate(accounts) if c.id in store.keys]
        assert holding == [ledger_account(c.id, 3)]
        assert most_in_any_window(admitted[c.id]) <= limit
        assert most_in_any_window(admitted[c.id]) >= 0.8 * limit
    assert all(store.keys for store in accounts)  # the consumers were spread over all three


async def test_one_account_down_leaves_the_other_accounts_consumers_on_their_shared_ledgers() -> None:
    accounts = [MemoryLedgerStore(), MemoryLedgerStore()]
    clock = FakeClock(start=T0)
    lim = TokenLimiter(ShardedLedgerStore(accounts), clock, NullTelemetry(), background=False, instance_count=4,
                       instance_id="i0")
    names = [f"c{n}" for n in range(40)]
    on = {a: [n for n in names if ledger_account(n, 2) == a] for a in (0, 1)}
    assert on[0] and on[1]
    accounts[1].unavailable = True
    for n in names:
        (await lim.admit(consumer(n, 40_000), D, 300)).settle(300)
    # Those on the account that answers claimed from their shared ledgers; the others fell back (a quarter of the
    # limit on this instance, GATEWAY_INSTANCE_COUNT=4), each of them, and not one more.
    assert lim.fallback_admissions == len(on[1])
    assert set(accounts[0].ledgers) == set(on[0])
    assert not accounts[1].ledgers
    # The account comes back: what was admitted meanwhile reaches its ledgers (no usage unrecorded).
    accounts[1].unavailable = False
    for _ in range(40):
        clock.advance(0.1)
        await lim.tick()
    assert set(accounts[1].ledgers) == set(on[1])
    for n in on[1]:
        row, _ = await accounts[1].read(n)
        assert row is not None and "300" in str(row["windows"])


def env(**extra: str) -> dict[str, str]:
    return {"GATEWAY_BACKENDS": json.dumps([BACKEND]), "GATEWAY_TABLE_CONNECTION_STRING": AZURITE, **extra}


def test_the_setting_lists_endpoints_or_connection_strings_and_the_ledgers_are_spread_over_them() -> None:
    assert load_settings(env()).ledger_accounts == ()
    listed = "https://a.table.core.windows.net/, https://b.table.core.windows.net/\n" + AZURITE
    settings = load_settings(env(GATEWAY_LEDGER_ACCOUNTS=listed))
    assert settings.ledger_accounts == ("https://a.table.core.windows.net/", "https://b.table.core.windows.net/",
                                        AZURITE)
    assert "a2V5" not in repr(settings)  # an account key is never shown
    stores = table_stores(settings)
    assert isinstance(stores.ledger, ShardedLedgerStore) and len(stores.ledger.stores) == 3
    assert all(isinstance(s, TableLedgerStore) for s in stores.ledger.stores)
    assert len(stores.ledger_tables) == 3
    assert isinstance(table_stores(load_settings(env())).ledger, TableLedgerStore)


@pytest.mark.parametrize(("value", "message"), [
    ("ftp://a.example", "entry 1 is neither"),
    ("https://a.table.core.windows.net https://a.table.core.windows.net", "listed twice"),
    (" ".join(f"https://s{n}.table.core.windows.net" for n in range(33)), "at most 32"),
    ("https://a.table.core.windows.net secret", "entry 2 is neither"),
])
def test_a_bad_ledger_accounts_setting_is_refused_without_echoing_it(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        load_settings(env(GATEWAY_LEDGER_ACCOUNTS=value))
    assert "secret" not in str(refused.value)
