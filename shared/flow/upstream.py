"""The one HTTP client to the backends, shared by every request of a worker.

aiohttp, not httpx, on the hot path: on these machines a proxy on one `httpx.AsyncClient` tops out near 100 req/s at
64 concurrent clients where the backend allows 1,260, and one on aiohttp keeps up (see docs/benchmarks.md). Every
aiohttp and socket error is translated here, once, into the gateway's own `UpstreamError`s; nothing above this module
catches `aiohttp.*`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import aiohttp

from shared.config import Backend
from shared.outcomes import FailureKind


class UpstreamError(Exception):
    """The backend could not be reached or did not answer in time. `kind` is TIMEOUT or CONNECTION."""

    def __init__(self, kind: FailureKind, backend_id: str, detail: str) -> None:
        super().__init__(f"{kind.value} talking to backend {backend_id}: {detail}")
        self.kind = kind
        self.backend_id = backend_id


class UpstreamBroken(Exception):
    """The backend's response body broke off after it began."""


class Answer(Protocol):
    """A backend's answer as the request flow sees it: status and headers at once, the body read whole or in pieces."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Lower-cased names."""
        ...

    async def read(self) -> bytes:
        """The whole body (read once; later calls return it again); raises UpstreamBroken if it breaks off."""
        ...

    async def next_chunk(self) -> bytes:
        """Whatever part of the body has arrived; b"" at the end; raises UpstreamBroken if it breaks off."""
        ...

    def close(self) -> None:
        """Drop the connection without reading the rest."""
        ...

    def release(self) -> None:
        """Hand the connection back for reuse (the body was read to its end, or is not wanted)."""
        ...


class UpstreamClient(Protocol):
    """What the request flow sends through; raises UpstreamError when no answer comes."""

    async def send(
        self, backend: Backend, url: str, headers: Mapping[str, str], body: bytes, method: str = "POST"
    ) -> Answer: ...

    async def close(self) -> None: ...


class AiohttpAnswer:
    __slots__ = ("status", "headers", "_response", "_body")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._body: bytes | None = None
        self.status = response.status
        self.headers: Mapping[str, str] = {k.lower(): v for k, v in response.headers.items()}

    async def read(self) -> bytes:
        """The whole body (read once; later calls return it again)."""
        if self._body is not None:
            return self._body
        try:
            self._body = await self._response.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamBroken(type(exc).__name__) from None
        finally:
            self._response.release()
        return self._body

    async def next_chunk(self) -> bytes:
        """Whatever part of the body has arrived (waiting for some); b"" at the end. A plain coroutine rather than an
        async generator: a stream of a thousand small chunks pays for every layer between the socket and the client."""
        content = self._response.content
        try:
            return await content.readany()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # The bytes that arrived ahead of the break are the client's: hand them on first. aiohttp's readany raises
            # a broken body's error before what is still in its buffer, so a relay that reads late (a busy worker) lost
            # the events the backend had sent: a cut stream reached the client with 0-2 of its 5 deltas. The error
            # stays set on the reader: the next call raises it.
            left = _buffered(content)
            if left:
                return left
            raise UpstreamBroken(type(exc).__name__) from None

    def close(self) -> None:
        """Drop the connection (a stream the client abandoned must not be read to its end)."""
        self._response.close()

    def release(self) -> None:
        self._response.release()


def _buffered(content: aiohttp.StreamReader) -> bytes:
    """What a reader whose body broke off still holds. aiohttp has no public call for it (readany and read_nowait raise
    the error first), so this reads its buffer the way read_nowait does after that check; b"" if the reader's inside
    is not what it was written against (tests/test_upstream_break.py fails then)."""
    read = getattr(content, "_read_nowait", None)
    if not getattr(content, "_buffer", None) or read is None:
        return b""
    try:
        data = read(-1)
    except Exception:  # the reader's own timeout, or an inside that changed
        return b""
    return data if isinstance(data, bytes) else b""


class AiohttpUpstream:
    def __init__(self, backends: tuple[Backend, ...]) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._timeouts = {
            b.id: aiohttp.ClientTimeout(total=None, sock_connect=b.connect_timeout_s, sock_read=b.timeout_s)
            for b in backends
        }

    def _client(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30)
            # No cookie jar: one backend's cookie must never ride on another consumer's request (and filtering the
            # jar for every request costs time on the hot path).
            session = self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return session

    async def send(
        self, backend: Backend, url: str, headers: Mapping[str, str], body: bytes, method: str = "POST"
    ) -> AiohttpAnswer:
        try:
            response = await self._client().request(
                method, url, data=body if body or method == "POST" else None, headers=headers,
                timeout=self._timeouts[backend.id], allow_redirects=False,
            )
        except aiohttp.ConnectionTimeoutError:
            # Not reached at all: the backend's (or the network's) fault, like a refused connection.
            raise UpstreamError(FailureKind.CONNECTION, backend.id, "no connection in time") from None
        except TimeoutError:
            raise UpstreamError(FailureKind.TIMEOUT, backend.id, "no response in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(FailureKind.CONNECTION, backend.id, type(exc).__name__) from None
        return AiohttpAnswer(response)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
