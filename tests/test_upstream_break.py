"""A backend's body that breaks off: what arrived before the break reaches the relay before the break does, however late
the relay reads (AiohttpAnswer over a real socket on loopback). aiohttp raises a broken body's error before the bytes
still in its buffer; under load a cut Responses stream reached the client with 0-2 of the 5 deltas sent."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from shared.flow.upstream import AiohttpAnswer, UpstreamBroken

CHUNKS = [f"data: {{\"n\": {n}}}\n\n".encode() for n in range(5)]


async def serve_then_cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An HTTP/1.1 chunked answer: five chunks, then the connection dropped without the last chunk."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    for chunk in CHUNKS:
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    await writer.drain()
    writer.transport.abort()


@pytest.mark.parametrize("late_s", [0.0, 0.3])
async def test_what_arrived_before_a_break_is_read_before_the_break(late_s: float) -> None:
    server = await asyncio.start_server(serve_then_cut, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.get(f"http://127.0.0.1:{port}/")
            answer = AiohttpAnswer(response)
            await asyncio.sleep(late_s)  # a relay that reads late: the chunks and the break are both in already
            received = b""
            with pytest.raises(UpstreamBroken):
                for _ in range(100):
                    received += await answer.next_chunk()
            assert received == b"".join(CHUNKS)
            with pytest.raises(UpstreamBroken):
                await answer.next_chunk()  # the break is still told, every time
            answer.close()
    finally:
        server.close()
        await server.wait_closed()
