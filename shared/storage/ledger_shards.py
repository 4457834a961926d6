"""Consumers' ledgers spread over several storage accounts (`GATEWAY_LEDGER_ACCOUNTS`).

A storage account serves about 20,000 requests a second (docs/scale.md); every quiet consumer's request costs its ledger
a read and a write there. Spread over K accounts, each carries 1/K of the ledgers' traffic. A ledger's account is a
stable hash of its key (the same on every instance, in every process, whatever else changes), so one ledger is never
split across two accounts and its ETag conditions hold as on one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from shared.storage.protocols import LedgerStore


def ledger_account(key: str, accounts: int) -> int:
    """Which of `accounts` accounts holds the ledger `key`: stable across instances and processes (not `hash`, which
    is salted per process)."""
    if accounts <= 1:
        return 0
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % accounts


class ShardedLedgerStore:
    """A LedgerStore over several, each ledger in the one its key hashes to."""

    def __init__(self, stores: Sequence[LedgerStore]) -> None:
        if not stores:
            raise ValueError("at least one ledger store")
        self.stores = tuple(stores)

    def account(self, consumer_id: str) -> int:
        return ledger_account(consumer_id, len(self.stores))

    async def read(self, consumer_id: str) -> tuple[dict[str, object] | None, str | None]:
        return await self.stores[self.account(consumer_id)].read(consumer_id)

    async def write(self, consumer_id: str, row: Mapping[str, object], etag: str | None) -> str:
        return await self.stores[self.account(consumer_id)].write(consumer_id, row, etag)
