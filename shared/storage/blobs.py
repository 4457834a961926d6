"""Azure Blob Storage for the response cache: one container in the tables' account, one blob per entry (named by its
key), every call bounded by a timeout and its errors mapped once, as the tables' are."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError

from shared.config import Settings
from shared.storage.protocols import StoreUnavailable

if TYPE_CHECKING:  # the Blob SDK loads cryptography (~9 MB a worker): only once a consumer with the cache calls
    from azure.storage.blob.aio import BlobServiceClient, ContainerClient

log = logging.getLogger(__name__)

WRITE_TIMEOUT_FACTOR = 5  # writes are off the request path: they may take longer than a read


def container_name(table_prefix: str) -> str:
    """Container names are lower case (3-63 letters, digits, hyphens); the table prefix is letters and digits."""
    return f"{table_prefix.lower()}-cache"


def audit_container_name(table_prefix: str) -> str:
    return f"{table_prefix.lower()}-audit"


def names_blob_service(connection_string: str) -> bool:
    """Whether a connection string reaches the account's Blob service: a development-storage shortcut, one that names a
    Blob endpoint, or one that names no endpoint at all (the account's are derived). One naming only a Table endpoint
    does not: the SDK would derive an address on the public cloud for an account that is not there."""
    if "UseDevelopmentStorage=true" in connection_string or "BlobEndpoint=" in connection_string:
        return True
    return "TableEndpoint=" not in connection_string


class BlobAnswerStore:
    def __init__(self, connect: Callable[[], BlobServiceClient], container: str, timeout_s: float) -> None:
        self._connect = connect
        self._container_name = container
        self._service: BlobServiceClient | None = None
        self._client: ContainerClient | None = None
        self.timeout_s = timeout_s
        self._ready = False
        self.reads = 0
        self.writes = 0

    @property
    def _container(self) -> ContainerClient:
        """The client, made at the first call (not when the worker starts: most gateways may never need it)."""
        if self._client is None:
            self._service = self._connect()
            self._client = self._service.get_container_client(self._container_name)
        return self._client

    @classmethod
    def from_settings(cls, settings: Settings, container: str | None = None) -> BlobAnswerStore | None:
        """None where the settings reach no Blob service (the cache then keeps its entries in memory only)."""
        options: dict[str, Any] = {"retry_total": 0, "connection_timeout": settings.store_timeout_s}
        container = container or container_name(settings.table_prefix)
        connection = settings.table_connection_string
        if connection:
            if not names_blob_service(connection):
                log.warning("the storage connection string names no Blob endpoint: cache entries stay in memory")
                return None

            def by_key() -> BlobServiceClient:
                from azure.storage.blob.aio import BlobServiceClient

                return BlobServiceClient.from_connection_string(connection, **options)

            return cls(by_key, container, settings.store_timeout_s)
        endpoint = settings.blob_endpoint
        if endpoint is None:
            return None

        def by_identity() -> BlobServiceClient:
            from azure.identity.aio import DefaultAzureCredential
            from azure.storage.blob.aio import BlobServiceClient

            credential = DefaultAzureCredential(managed_identity_client_id=settings.managed_identity_client_id)
            return BlobServiceClient(endpoint, credential=credential, **options)

        return cls(by_identity, container, settings.store_timeout_s)

    async def _ensure(self) -> None:
        if self._ready:
            return
        try:
            await asyncio.wait_for(self._container.create_container(), self.timeout_s * WRITE_TIMEOUT_FACTOR)
        except ResourceExistsError:
            pass
        except (TimeoutError, AzureError, OSError) as exc:
            raise StoreUnavailable(f"container {self._container_name}: {type(exc).__name__}") from None
        self._ready = True

    async def get(self, key: str) -> bytes | None:
        self.reads += 1

        async def read() -> bytes:
            downloader = await self._container.download_blob(key)
            return await downloader.readall()

        try:
            return await asyncio.wait_for(read(), self.timeout_s)
        except ResourceNotFoundError:
            return None  # no such blob, or no container yet (the first write creates it)
        except (TimeoutError, AzureError, OSError) as exc:
            raise StoreUnavailable(f"blob read: {type(exc).__name__}") from None

    async def put(self, key: str, data: bytes) -> None:
        await self._ensure()
        self.writes += 1
        try:
            await asyncio.wait_for(
                self._container.upload_blob(key, data, overwrite=True), self.timeout_s * WRITE_TIMEOUT_FACTOR
            )
        except ResourceNotFoundError:
            self._ready = False  # the container went away (an emulator restarted): created again next time
            raise StoreUnavailable("blob write: container not found") from None
        except (TimeoutError, AzureError, OSError) as exc:
            raise StoreUnavailable(f"blob write: {type(exc).__name__}") from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._service is not None:
            await self._service.close()


# An append blob takes at most 50,000 blocks of at most 4 MiB each; a block per flush keeps well inside both.
MAX_BLOCK_BYTES = 4 * 1024 * 1024


class BlobAuditStore(BlobAnswerStore):
    """The audit trail: append blobs in their own container of the same account, by the same connection or identity."""

    @classmethod
    def for_audit(cls, settings: Settings) -> BlobAuditStore | None:
        store = cls.from_settings(settings, audit_container_name(settings.table_prefix))
        return store if isinstance(store, BlobAuditStore) else None

    async def append(self, name: str, data: bytes) -> None:
        await self._ensure()
        blob = self._container.get_blob_client(name)
        timeout = self.timeout_s * WRITE_TIMEOUT_FACTOR
        self.writes += 1
        try:
            for start in range(0, len(data), MAX_BLOCK_BYTES):
                block = data[start:start + MAX_BLOCK_BYTES]
                try:
                    await asyncio.wait_for(blob.append_block(block), timeout)
                except ResourceNotFoundError:
                    try:
                        # Only if absent: a plain create replaces a blob another writer made and appended to meanwhile.
                        await asyncio.wait_for(blob.create_append_blob(match_condition=MatchConditions.IfMissing), timeout)
                    except ResourceExistsError:
                        pass  # another writer made it meanwhile
                    await asyncio.wait_for(blob.append_block(block), timeout)
        except ResourceNotFoundError:
            self._ready = False
            raise StoreUnavailable("audit append: container not found") from None
        except (TimeoutError, AzureError, OSError) as exc:
            raise StoreUnavailable(f"audit append: {type(exc).__name__}") from None
