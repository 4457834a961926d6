"""Table Storage's 503 ServerBusy reaches the gateway as StoreBusy (throttled), every other failure as plain
StoreUnavailable (issue 32): the real azure-data-tables client against a loopback server answering as the service does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from shared.storage.protocols import StoreBusy, StoreUnavailable
from shared.storage.tables import Tables

KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class Service:
    """Answers table creation with 409 TableAlreadyExists and everything else with `status` / `code`."""

    def __init__(self) -> None:
        self.status = 503
        self.code = "ServerBusy"
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.decode().split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if length:
            await reader.readexactly(length)
        self.requests += 1
        creating = head.startswith(b"POST /devstoreaccount1/Tables")
        status, code = (409, "TableAlreadyExists") if creating else (self.status, self.code)
        body = json.dumps({"odata.error": {"code": code, "message": {"lang": "en-US", "value": code}}}).encode()
        reason = {409: "Conflict", 500: "Internal Server Error", 503: "Service Unavailable"}[status]
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json;odata=minimalmetadata\r\n"
            f"x-ms-error-code: {code}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
        )
        await writer.drain()
        writer.close()


@pytest.fixture
async def served() -> AsyncIterator[tuple[Service, Tables]]:
    from azure.data.tables.aio import TableServiceClient

    service = Service()
    server = await asyncio.start_server(service.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={KEY};"
                  f"TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")
    client = TableServiceClient.from_connection_string(connection, retry_total=0)
    tables = Tables(client, "t", 5.0)
    try:
        yield service, tables
    finally:
        await tables.close()
        server.close()
        await server.wait_closed()


async def test_a_503_server_busy_is_store_busy(served: tuple[Service, Tables]) -> None:
    service, tables = served
    with pytest.raises(StoreBusy):
        await tables.call("ledger", lambda t: t.get_entity("consumer-a", "ledger"))
    assert service.requests == 2  # the creation, then the read: no SDK retry


@pytest.mark.parametrize(("status", "code"), [(503, "ServiceUnavailable"), (500, "InternalError")])
async def test_other_service_failures_stay_plain_store_unavailable(
    served: tuple[Service, Tables], status: int, code: str
) -> None:
    service, tables = served
    service.status, service.code = status, code
    with pytest.raises(StoreUnavailable) as caught:
        await tables.call("ledger", lambda t: t.get_entity("consumer-a", "ledger"))
    assert not isinstance(caught.value, StoreBusy)
