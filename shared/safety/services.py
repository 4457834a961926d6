"""Azure AI Content Safety (text:shieldPrompt, text:analyze) and Azure AI Language (PiiEntityRecognition), as the
request flow asks them: each answer kept for a while by the digest of what was asked (retries and repeated system
prompts are checked once), each service behind a breaker that its own 429s and failures trip, as a backend's do.

The HTTP exchange is injected (a Poster): shared/safety/http.py has the aiohttp one; tests use the local stand-in
(tools/simulator/safety.py) or a fake. Nothing here reads the environment or builds a client per request."""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import orjson

from shared.clock import Clock
from shared.safety.texts import LANGUAGE_CHARS, LANGUAGE_DOCUMENTS
from shared.safety.verdicts import Analysis, Shield
from shared.waits import retry_after_s

CONTENT_SAFETY_VERSION = "2024-09-01"
LANGUAGE_VERSION = "2023-04-01"
CONTENT_SAFETY = "content_safety"
LANGUAGE = "language"
TRIP_S = 10.0
MAX_TRIP_S = 300.0
CACHE_ENTRIES = 20_000  # verdicts kept per worker (a digest and a few small values each)
CONCURRENT_CALLS = 8  # per request: a long conversation's uncached pieces are asked this many at a time


class ServiceFailure(Exception):
    """A safety service could not give an answer (refused, failed, timed out, or its breaker is open)."""

    def __init__(self, service: str, detail: str, retry_after_s: float = TRIP_S) -> None:
        super().__init__(f"{service}: {detail}")
        self.service = service
        self.detail = detail
        self.retry_after_s = retry_after_s


class Poster(Protocol):
    async def post(self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
                   ) -> tuple[int, Mapping[str, str], bytes]:
        """Status, lower-cased headers and body; ServiceFailure when no answer came (connection, timeout)."""
        ...


Auth = Callable[[], Awaitable[Mapping[str, str]]]


class Breaker:
    """Open after a failure, for the service's Retry-After or TRIP_S, doubling while it keeps failing (to MAX_TRIP_S);
    once the time is up calls go through again, and the first success resets the trip time. Per worker: the service
    is one and nearby, and an open breaker costs a request one comparison."""

    def __init__(self, service: str, clock: Clock) -> None:
        self.service = service
        self._clock = clock
        self.open_until = 0.0
        self._trip_s = TRIP_S
        self.trips = 0

    def check(self) -> None:
        now = self._clock.monotonic()
        if now < self.open_until:
            raise ServiceFailure(self.service, "breaker open", self.open_until - now)

    def success(self) -> None:
        if self._clock.monotonic() < self.open_until:
            return  # a call that began before another failed: the failure decides
        self._trip_s = TRIP_S

    def failure(self, retry_after_s: float | None) -> float:
        now = self._clock.monotonic()
        if now < self.open_until:
            # Calls of one request fail together: one trip, lengthened only by a longer Retry-After.
            if retry_after_s is not None:
                self.open_until = max(self.open_until, now + min(MAX_TRIP_S, retry_after_s))
            return self.open_until - now
        trip = min(MAX_TRIP_S, retry_after_s if retry_after_s is not None else self._trip_s)
        self.open_until = now + trip
        self._trip_s = min(MAX_TRIP_S, self._trip_s * 2)
        self.trips += 1
        return trip

    @property
    def state(self) -> str:
        return "open" if self.open_until > self._clock.monotonic() else "closed"


class VerdictCache:
    """Answers by the digest of what was asked, for `ttl_s`, at most CACHE_ENTRIES (the oldest out first)."""

    def __init__(self, clock: Clock, ttl_s: float, entries: int = CACHE_ENTRIES) -> None:
        self._clock = clock
        self._ttl_s = ttl_s
        self._entries = entries
        self._items: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(orjson.dumps(parts)).hexdigest()

    def get(self, key: str) -> Any:
        item = self._items.get(key)
        if item is None or item[0] <= self._clock.monotonic():
            if item is not None:
                del self._items[key]
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[1]

    def put(self, key: str, value: Any) -> None:
        if self._ttl_s <= 0:
            return
        self._items[key] = (self._clock.monotonic() + self._ttl_s, value)
        self._items.move_to_end(key)
        while len(self._items) > self._entries:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class _Service:
    def __init__(self, service: str, endpoint: str, poster: Poster, auth: Auth, clock: Clock, cache: VerdictCache,
                 timeout_s: float) -> None:
        self.service = service
        self._endpoint = endpoint
        self._poster = poster
        self._auth = auth
        self._clock = clock
        self.breaker = Breaker(service, clock)
        self.cache = cache
        self._timeout_s = timeout_s
        self.calls = 0

    async def close(self) -> None:
        close = getattr(self._poster, "close", None)
        if close is not None:
            await close()

    async def _call(self, path: str, payload: dict[str, Any]) -> Any:
        self.breaker.check()
        self.calls += 1
        headers = {"content-type": "application/json", **(await self._auth())}
        try:
            status, answer_headers, body = await self._poster.post(
                self._endpoint + path, headers, orjson.dumps(payload), self._timeout_s)
        except ServiceFailure as failure:
            trip = self.breaker.failure(None)
            raise ServiceFailure(self.service, failure.detail, trip) from None
        if status == 429 or status >= 500:
            trip = self.breaker.failure(retry_after_s(answer_headers, self._clock.now()))
            raise ServiceFailure(self.service, f"status {status}", trip)
        if status != 200:
            # A refusal of the request itself (401/403: the gateway's credential or role; 400: a body it would not
            # take) says nothing about the service's health, and retrying will not help: not checked, failed.
            raise ServiceFailure(self.service, f"status {status}", TRIP_S)
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            trip = self.breaker.failure(None)
            raise ServiceFailure(self.service, "answer not JSON", trip) from None
        self.breaker.success()
        return parsed


class ContentSafety(_Service):
    def __init__(self, endpoint: str, poster: Poster, auth: Auth, clock: Clock, cache: VerdictCache,
                 timeout_s: float) -> None:
        super().__init__(CONTENT_SAFETY, endpoint, poster, auth, clock, cache, timeout_s)

    async def shield(self, prompt: str, documents: Sequence[str]) -> Shield:
        key = VerdictCache.key("shield", prompt, list(documents))
        cached: Shield | None = self.cache.get(key)
        if cached is not None:
            return cached
        answer = await self._call(f"/contentsafety/text:shieldPrompt?api-version={CONTENT_SAFETY_VERSION}",
                                  {"userPrompt": prompt, "documents": list(documents)})
        try:
            user = answer.get("userPromptAnalysis") or {}
            docs = answer.get("documentsAnalysis") or []
            shield = Shield(bool(user.get("attackDetected")), any(bool(d.get("attackDetected")) for d in docs))
        except AttributeError:
            raise ServiceFailure(self.service, "unexpected shieldPrompt answer") from None
        self.cache.put(key, shield)
        return shield

    async def analyze(self, text: str, categories: Sequence[str], blocklists: Sequence[str]) -> Analysis:
        key = VerdictCache.key("analyze", text, sorted(categories), sorted(blocklists))
        cached: Analysis | None = self.cache.get(key)
        if cached is not None:
            return cached
        payload: dict[str, Any] = {"text": text, "categories": list(categories), "outputType": "FourSeverityLevels"}
        if blocklists:
            payload.update({"blocklistNames": list(blocklists), "haltOnBlocklistHit": False})
        answer = await self._call(f"/contentsafety/text:analyze?api-version={CONTENT_SAFETY_VERSION}", payload)
        try:
            severities = {str(c["category"]): int(c.get("severity") or 0) for c in answer.get("categoriesAnalysis") or []}
            matched = frozenset(str(m["blocklistName"]) for m in answer.get("blocklistsMatch") or [])
        except (AttributeError, KeyError, TypeError, ValueError):
            raise ServiceFailure(self.service, "unexpected analyze answer") from None
        analysis = Analysis(severities, matched)
        self.cache.put(key, analysis)
        return analysis


class Language(_Service):
    def __init__(self, endpoint: str, poster: Poster, auth: Auth, clock: Clock, cache: VerdictCache,
                 timeout_s: float) -> None:
        super().__init__(LANGUAGE, endpoint, poster, auth, clock, cache, timeout_s)

    async def pii(self, texts: Sequence[str], categories: Sequence[str]) -> list[tuple[str, dict[str, int]]]:
        """Each text with its PII masked ('*' for each character, Language's default) and the count of each category
        found; texts longer than a document are asked in pieces."""
        results: list[tuple[str, dict[str, int]] | None] = [None] * len(texts)
        wanted: list[tuple[int, list[str]]] = []  # the texts not cached, in documents
        for index, text in enumerate(texts):
            cached = self.cache.get(VerdictCache.key("pii", text, sorted(categories)))
            if cached is not None:
                results[index] = cached
            else:
                wanted.append((index, list(_pieces(text))))
        documents = [(index, n, part) for index, parts in wanted for n, part in enumerate(parts)]
        answers: dict[tuple[int, int], tuple[str, dict[str, int]]] = {}
        groups = [documents[i:i + LANGUAGE_DOCUMENTS] for i in range(0, len(documents), LANGUAGE_DOCUMENTS)]
        limit = asyncio.Semaphore(CONCURRENT_CALLS)

        async def ask(group: list[tuple[int, int, str]]) -> None:
            async with limit:
                answers.update(await self._ask(group, categories))

        await asyncio.gather(*(ask(g) for g in groups))
        for index, parts in wanted:
            redacted = "".join(answers[(index, n)][0] for n in range(len(parts)))
            counts: dict[str, int] = {}
            for n in range(len(parts)):
                for category, count in answers[(index, n)][1].items():
                    counts[category] = counts.get(category, 0) + count
            results[index] = (redacted, counts)
            self.cache.put(VerdictCache.key("pii", texts[index], sorted(categories)), (redacted, counts))
        return [r for r in results if r is not None]

    async def _ask(self, group: list[tuple[int, int, str]], categories: Sequence[str]
                   ) -> dict[tuple[int, int], tuple[str, dict[str, int]]]:
        parameters: dict[str, Any] = {"modelVersion": "latest"}
        if categories:
            parameters["piiCategories"] = list(categories)
        payload = {"kind": "PiiEntityRecognition", "parameters": parameters, "analysisInput": {"documents": [
            {"id": str(i), "language": "en", "text": text} for i, (_, _, text) in enumerate(group)]}}
        answer = await self._call(f"/language/:analyze-text?api-version={LANGUAGE_VERSION}", payload)
        found: dict[tuple[int, int], tuple[str, dict[str, int]]] = {}
        try:
            results = answer["results"]
            if results.get("errors"):
                raise ServiceFailure(self.service, "a document was refused")
            for document in results["documents"]:
                index, n, text = group[int(document["id"])]
                redacted = document["redactedText"]
                if not isinstance(redacted, str) or len(redacted) != len(text):
                    raise ServiceFailure(self.service, "unexpected redactedText")
                counts: dict[str, int] = {}
                for entity in document.get("entities") or []:
                    category = str(entity["category"])
                    counts[category] = counts.get(category, 0) + 1
                found[(index, n)] = (redacted, counts)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            raise ServiceFailure(self.service, "unexpected PiiEntityRecognition answer") from None
        if len(found) != len(group):
            raise ServiceFailure(self.service, "documents missing from the answer")
        return found


def _pieces(text: str) -> list[str]:
    """`text` in pieces Language takes (5,120 characters), cut exactly (no character lost, so the pieces join back)."""
    return [text[i:i + LANGUAGE_CHARS] for i in range(0, len(text), LANGUAGE_CHARS)] or [""]
