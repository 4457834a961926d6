"""A local stand-in for Application Insights' ingestion endpoint: it records what azure-monitor-opentelemetry exports.

Point the gateway at it with
    APPLICATIONINSIGHTS_CONNECTION_STRING="InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint=http://127.0.0.1:PORT/"
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Capture:
    def __init__(self) -> None:
        self.envelopes: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                length = int(self.headers.get("content-length", "0"))
                raw = self.rfile.read(length)
                if self.headers.get("content-encoding") == "gzip":
                    raw = gzip.decompress(raw)
                items = json.loads(raw) if raw else []
                items = items if isinstance(items, list) else [items]
                with capture._lock:
                    capture.paths.append(self.path)
                    capture.envelopes.extend(items)
                body = json.dumps({"itemsReceived": len(items), "itemsAccepted": len(items), "errors": []}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def connection_string(self) -> str:
        return (
            "InstrumentationKey=00000000-0000-0000-0000-000000000000;"
            f"IngestionEndpoint=http://127.0.0.1:{self.port}/;LiveEndpoint=http://127.0.0.1:{self.port}/"
        )

    def items(self, base_type: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.envelopes if e.get("data", {}).get("baseType") == base_type]

    def metrics(self, name: str | None = None) -> Iterator[tuple[str, float, int, dict[str, str]]]:
        """(name, value, count, dimensions) for every exported metric point."""
        for envelope in self.items("MetricData"):
            data = envelope["data"]["baseData"]
            for point in data.get("metrics", []):
                if name is None or point["name"] == name:
                    yield point["name"], float(point["value"]), int(point.get("count", 1)), data.get("properties", {})

    def total(self, name: str, **dimensions: str) -> float:
        return sum(
            value for _, value, _, props in self.metrics(name)
            if all(props.get(k) == v for k, v in dimensions.items())
        )

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
