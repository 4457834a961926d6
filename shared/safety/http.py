"""The aiohttp exchange with the safety services: one session per worker, made at the first call; every aiohttp and
socket error translated here, once, into ServiceFailure."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from shared.safety.services import ServiceFailure

MAX_ANSWER_BYTES = 4 * 1024 * 1024


class AiohttpPoster:
    def __init__(self, service: str) -> None:
        self._service = service
        self._session: aiohttp.ClientSession | None = None

    async def post(self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
                   ) -> tuple[int, Mapping[str, str], bytes]:
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=True, trust_env=False)
        try:
            async with self._session.post(url, data=body, headers=dict(headers), allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                data = await response.content.read(MAX_ANSWER_BYTES + 1)
                if len(data) > MAX_ANSWER_BYTES:
                    raise ServiceFailure(self._service, "answer too large")
                return response.status, {k.lower(): v for k, v in response.headers.items()}, data
        except TimeoutError:
            raise ServiceFailure(self._service, "timeout") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ServiceFailure(self._service, type(exc).__name__) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
