"""A TCP proxy on loopback that can slow a service down, cut it off, and count the HTTP requests sent through it.

Used in front of Azurite: to count Table Storage round trips per table (benchmarks), and to make the store slow or
unreachable without touching the gateway (reliability tests).

    python -m tools.tcpproxy --listen PORT --target PORT [--control PORT]

The control port answers `GET /stats` (requests per table), `POST /latency?ms=N`, `POST /down`, `POST /up`,
`POST /reset`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
from collections import Counter
from urllib.parse import parse_qs, urlparse

# Request lines with a path; the operations inside a $batch body carry absolute URLs and are not round trips.
_REQUEST_LINE = re.compile(rb"(?:^|\r\n)(GET|POST|PUT|PATCH|DELETE|MERGE|HEAD|OPTIONS) (/\S*) HTTP/1\.[01]\r\n")


class Proxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.latency_s = 0.0
        self.down = False
        self.requests: Counter[str] = Counter()
        self._connections: set[asyncio.StreamWriter] = set()

    def count(self, data: bytes) -> None:
        for match in _REQUEST_LINE.finditer(data):
            path = match.group(2).decode("latin-1").split("?", 1)[0]
            parts = [p for p in path.split("/") if p]
            table = parts[1] if len(parts) > 1 else (parts[0] if parts else "")
            table = table.split("(", 1)[0]
            self.requests[table] += 1

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.down:
            client_writer.close()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        self._connections.update((client_writer, upstream_writer))

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool) -> None:
            try:
                while True:
                    data = await reader.read(65536)
                    if not data or self.down:
                        break
                    if upstream:
                        self.count(data)
                        if self.latency_s:
                            await asyncio.sleep(self.latency_s)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    writer.close()

        await asyncio.gather(pipe(client_reader, upstream_writer, True), pipe(upstream_reader, client_writer, False))
        self._connections.discard(client_writer)
        self._connections.discard(upstream_writer)

    def cut(self) -> None:
        """Go down: refuse new connections and drop the open ones."""
        self.down = True
        for writer in list(self._connections):
            transport = writer.transport
            with contextlib.suppress(Exception):
                transport.abort()
        self._connections.clear()

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        method, target = request.split(b" ", 2)[:2]
        url = urlparse(target.decode())
        query = parse_qs(url.query)
        if url.path == "/latency":
            self.latency_s = float(query.get("ms", ["0"])[0]) / 1000
        elif url.path == "/down":
            self.cut()
        elif url.path == "/up":
            self.down = False
        elif url.path == "/reset":
            self.requests.clear()
        body = json.dumps({"requests": dict(self.requests), "latency_ms": self.latency_s * 1000, "down": self.down}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        writer.close()


async def serve(listen: int, target: int, control: int | None) -> None:
    proxy = Proxy(target)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", listen)
    servers = [server]
    if control:
        servers.append(await asyncio.start_server(proxy.control, "127.0.0.1", control))
    print(f"tcpproxy 127.0.0.1:{listen} -> 127.0.0.1:{target}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--control", type=int)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.target, args.control))
    return 0


if __name__ == "__main__":
    sys.exit(main())
