"""A local stand-in for Azure AI Content Safety and Azure AI Language PII detection: the documented request and response
shapes, deterministic verdicts, faults on demand. For scripts/run (a demo policy) and the tests; loopback only.

    python -m tools.simulator.safety --host 127.0.0.1 --port 18190 --key KEY [--latency-ms 20]
                                     [--blocklist NAME=term,term ...]

    POST /contentsafety/text:shieldPrompt?api-version=2024-09-01   {"userPrompt", "documents"}
    POST /contentsafety/text:analyze?api-version=2024-09-01        {"text", "categories", "blocklistNames", ...}
    POST /language/:analyze-text?api-version=2023-04-01            {"kind": "PiiEntityRecognition", ...}

Verdicts (case-insensitive):
    attack      a prompt or document containing one of ATTACKS ("ignore previous instructions", "you are now DAN", ...)
    severity    "sim-<category>-<n>" in the text (e.g. sim-violence-4) gives that category severity n; a few words
                give a demo severity (WORDS); severities are reported as 0, 2, 4 or 6 (FourSeverityLevels)
    blocklists  a term of a --blocklist (or the demo list `demo-terms`: "forbidden-word") in the text
    PII         e-mail addresses, phone numbers, US social security numbers, credit card numbers, IPv4 addresses,
                masked with '*' character for character, as Language's default redaction

Control (no auth): POST /_sim/faults {"status": 429|500|503, "count": N (-1: until cleared), "retry_after": s,
"service": "content_safety"|"language"|"*", "delay_ms": N, "drop": true (connection closed, no answer)};
DELETE /_sim/faults; GET /_sim/stats (calls per path, the texts seen); POST /_sim/reset.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

ATTACKS = ("ignore previous instructions", "ignore all previous instructions", "you are now dan",
           "disregard your rules", "developer mode enabled")
WORDS = {"Violence": ("kill them all",), "Hate": ("despise those people",), "SelfHarm": ("hurt myself",),
         "Sexual": ("explicit scene",)}
CATEGORIES = ("Hate", "SelfHarm", "Sexual", "Violence")
_MARKER = re.compile(r"sim-(hate|selfharm|sexual|violence)-([0-7])", re.IGNORECASE)
_NAMES = {"hate": "Hate", "selfharm": "SelfHarm", "sexual": "Sexual", "violence": "Violence"}
PII_PATTERNS = (
    ("Email", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")),
    ("USSocialSecurityNumber", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    ("CreditCardNumber", re.compile(r"\b(?:\d{4}[ -]?){3}\d{4}\b")),
    ("PhoneNumber", re.compile(r"(?<!\d)(?:\+\d{1,3}[ -]?)?\(?\d{3}\)?[ -]\d{3}[ -]\d{4}(?!\d)")),
    ("IPAddress", re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")),
)
CONTENT_SAFETY_LIMIT = 10_000
LANGUAGE_LIMIT = 5_120
LANGUAGE_DOCUMENTS = 5


@dataclass
class Fault:
    status: int = 500
    count: int = 1
    retry_after: float | None = None
    service: str = "*"
    delay_ms: float = 0
    drop: bool = False


@dataclass
class State:
    key: str | None
    latency_ms: float = 0.0
    blocklists: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"demo-terms": ("forbidden-word",)})
    faults: list[Fault] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)  # every text asked about, in order (for tests: what was sent)


STATE = web.AppKey("state", State)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": {"code": code, "message": message}}),
                        content_type="application/json", headers=headers)


def _reply(value: Any) -> web.Response:
    return web.Response(body=orjson.dumps(value), content_type="application/json")


async def _gate(request: web.Request, service: str) -> web.Response | None:
    """Auth, the api-version, latency and faults; None when the call goes on."""
    state = request.app[STATE]
    path = request.path
    state.calls[path] = state.calls.get(path, 0) + 1
    if state.latency_ms:
        await asyncio.sleep(state.latency_ms / 1000)
    for fault in state.faults:
        if fault.count != 0 and fault.service in ("*", service):
            if fault.count > 0:
                fault.count -= 1
            if fault.delay_ms:
                await asyncio.sleep(fault.delay_ms / 1000)
            if fault.drop:
                if request.transport is not None:
                    request.transport.close()
                return web.Response(status=500)
            headers = {"retry-after": str(int(fault.retry_after))} if fault.retry_after is not None else None
            return _error(fault.status, "TooManyRequests" if fault.status == 429 else "InternalServerError",
                          "simulated fault", headers)
    state.faults = [f for f in state.faults if f.count != 0]
    if state.key is not None:
        sent = request.headers.get("Ocp-Apim-Subscription-Key")
        bearer = request.headers.get("Authorization", "")
        if sent != state.key and not bearer.startswith("Bearer "):
            return _error(401, "401", "Access denied due to invalid subscription key or wrong API endpoint.")
    expected = "2024-09-01" if service == "content_safety" else "2023-04-01"
    if request.query.get("api-version") not in (expected, "2024-11-01"):
        return _error(404, "404", "Resource not found")
    return None


async def _json(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None


def attacked(text: str) -> bool:
    lowered = text.lower()
    return any(a in lowered for a in ATTACKS)


def severities(text: str) -> dict[str, int]:
    found = dict.fromkeys(CATEGORIES, 0)
    lowered = text.lower()
    for category, words in WORDS.items():
        if any(w in lowered for w in words):
            found[category] = max(found[category], 4)
    for name, level in _MARKER.findall(text):
        category = _NAMES[name.lower()]
        found[category] = max(found[category], int(level) // 2 * 2)  # FourSeverityLevels: 0, 2, 4, 6
    return found


async def shield_prompt(request: web.Request) -> web.Response:
    refused = await _gate(request, "content_safety")
    if refused is not None:
        return refused
    body = await _json(request)
    if not isinstance(body, dict):
        return _error(400, "InvalidRequestBody", "The request body is not valid JSON.")
    prompt = body.get("userPrompt", "")
    documents = body.get("documents", [])
    if not isinstance(prompt, str) or not isinstance(documents, list) or not all(isinstance(d, str) for d in documents):
        return _error(400, "InvalidRequestBody", "userPrompt is a string and documents a list of strings.")
    if len(prompt) > CONTENT_SAFETY_LIMIT or sum(map(len, documents)) > CONTENT_SAFETY_LIMIT or len(documents) > 5:
        return _error(400, "InvalidRequestBody", "The input is longer than the service takes.")
    state = request.app[STATE]
    state.texts += [prompt, *documents]
    return _reply({"userPromptAnalysis": {"attackDetected": attacked(prompt)},
                   "documentsAnalysis": [{"attackDetected": attacked(d)} for d in documents]})


async def analyze(request: web.Request) -> web.Response:
    refused = await _gate(request, "content_safety")
    if refused is not None:
        return refused
    body = await _json(request)
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text or len(text) > CONTENT_SAFETY_LIMIT:
        return _error(400, "InvalidRequestBody", "text: a string of 1 to 10000 characters.")
    state = request.app[STATE]
    state.texts.append(text)
    wanted = body.get("categories") or list(CATEGORIES)
    found = severities(text)
    matches = []
    for name in body.get("blocklistNames") or []:
        terms = state.blocklists.get(name)
        if terms is None:
            return _error(404, "NotFound", f"Blocklist {name} is not found.")
        for term in terms:
            if term.lower() in text.lower():
                matches.append({"blocklistName": name, "blocklistItemId": f"{name}-{term}", "blocklistItemText": term})
    return _reply({"blocklistsMatch": matches,
                   "categoriesAnalysis": [{"category": c, "severity": found[c]} for c in CATEGORIES if c in wanted]})


def redact(text: str, categories: list[str]) -> tuple[str, list[dict[str, Any]]]:
    masked = list(text)
    entities: list[dict[str, Any]] = []
    taken: set[int] = set()
    for category, pattern in PII_PATTERNS:
        if categories and category not in categories:
            continue
        for match in pattern.finditer(text):
            span = range(match.start(), match.end())
            if taken.intersection(span):
                continue
            taken.update(span)
            masked[match.start():match.end()] = "*" * (match.end() - match.start())
            entities.append({"text": match.group(), "category": category, "offset": match.start(),
                             "length": match.end() - match.start(), "confidenceScore": 0.9})
    return "".join(masked), sorted(entities, key=lambda e: e["offset"])


async def analyze_text(request: web.Request) -> web.Response:
    refused = await _gate(request, "language")
    if refused is not None:
        return refused
    body = await _json(request)
    if not isinstance(body, dict) or body.get("kind") != "PiiEntityRecognition":
        return _error(400, "InvalidRequest", "kind: only PiiEntityRecognition is simulated.")
    documents = (body.get("analysisInput") or {}).get("documents")
    if not isinstance(documents, list) or not 1 <= len(documents) <= LANGUAGE_DOCUMENTS:
        return _error(400, "InvalidRequest", "analysisInput.documents: 1 to 5 documents.")
    categories = (body.get("parameters") or {}).get("piiCategories") or []
    state = request.app[STATE]
    results, errors = [], []
    for document in documents:
        text = document.get("text") if isinstance(document, dict) else None
        doc_id = str(document.get("id")) if isinstance(document, dict) else "?"
        if not isinstance(text, str) or len(text) > LANGUAGE_LIMIT:
            errors.append({"id": doc_id, "error": {"code": "InvalidArgument", "message": "Invalid document."}})
            continue
        state.texts.append(text)
        masked, entities = redact(text, categories)
        results.append({"id": doc_id, "redactedText": masked, "entities": entities, "warnings": []})
    return _reply({"kind": "PiiEntityRecognitionResults", "results": {
        "documents": results, "errors": errors, "modelVersion": "2023-09-01"}})


async def add_fault(request: web.Request) -> web.Response:
    spec = await _json(request)
    if not isinstance(spec, dict):
        return _error(400, "bad", "a JSON object")
    fault = Fault(int(spec.get("status", 500)), int(spec.get("count", 1)), spec.get("retry_after"),
                  str(spec.get("service", "*")), float(spec.get("delay_ms", 0)), bool(spec.get("drop", False)))
    request.app[STATE].faults.append(fault)
    return _reply({"queued": len(request.app[STATE].faults)})


async def clear_faults(request: web.Request) -> web.Response:
    request.app[STATE].faults.clear()
    return _reply({"queued": 0})


async def stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return _reply({"calls": state.calls, "texts": state.texts})


async def reset(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.faults.clear()
    state.calls.clear()
    state.texts.clear()
    return _reply({"reset": True})


def app(state: State) -> web.Application:
    application = web.Application(client_max_size=1024 * 1024)
    application[STATE] = state
    application.router.add_post("/contentsafety/text:shieldPrompt", shield_prompt)
    application.router.add_post("/contentsafety/text:analyze", analyze)
    application.router.add_post("/language/:analyze-text", analyze_text)
    application.router.add_post("/_sim/faults", add_fault)
    application.router.add_delete("/_sim/faults", clear_faults)
    application.router.add_get("/_sim/stats", stats)
    application.router.add_post("/_sim/reset", reset)
    return application


async def serve(host: str, port: int, state: State) -> web.AppRunner:
    runner = web.AppRunner(app(state), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.simulator.safety", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18190)
    parser.add_argument("--key", help="the key callers must send (Ocp-Apim-Subscription-Key); bearer tokens pass")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--blocklist", action="append", default=[], metavar="NAME=term,term")
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--host: loopback only (a test tool)")
    state = State(args.key, args.latency_ms)
    for spec in args.blocklist:
        name, _, terms = spec.partition("=")
        state.blocklists[name] = tuple(t for t in terms.split(",") if t)

    async def run() -> None:
        runner = await serve(args.host, args.port, state)
        print(f"safety stand-in listening on http://{args.host}:{args.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
