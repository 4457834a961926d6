"""Sustained load with faults and hostile input, and the books balanced at the end (issue: reliability).

    .venv/bin/python -m bench.soak [--minutes 20] [--write] [--keep DIR]

One gateway process (limits, routing and metrics on) in front of three simulated regions, for `--minutes`: a steady
mix of chat, streamed chat and embeddings from three consumers (one far below its limit, one over it, one running
into its quota). Every 20 s a backend fault is injected on a random region; every 30 s a barrage of malformed and
hostile requests is sent. Every 10 s the gateway's RSS and open file descriptors are sampled. At the end:

- RSS growth after warm-up (target < 5 %), file-descriptor growth (target none), errors of the gateway's own making
  (5xx that are not a backend's fault passed on as designed; target 0);
- tokens charged to consumers (usage rows in Table Storage) = tokens emitted as metrics (captured App Insights
  export) = tokens the backends served (reported usage, plus the prompt and delivered tokens of streams cut mid-way)
  + the charges with no backend usage behind them, named one by one (`UNBILLED`: attempts that ran past the read
  timeout), exactly; and those named charges = the prompts the regions read and never answered (the simulator's
  `unanswered`);
- each burst of 503 answers with its cause (the regions' /health just before it, the faults injected before);
- a table of the faults and bad inputs, with their outcomes. Figures go to docs/reliability.md with --write.

With --keep DIR, the per-request records (JSON lines: start, status, tokens, backend, attempts, seconds, error code),
the injected faults (`faults.jsonl`: time, kind, region) and the gateway's /health every second (`health.jsonl`) stay
in DIR, to explain any answer after the fact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.harness import ROOT, bench_stack, finish_load, machine, save, stamp, start_load, update_doc
from bench.procs import open_fds, rss_mb
from shared.admin.usage_report import summarize
from shared.config import load_settings
from shared.storage.tables import Tables
from shared.storage.usage_table import TableUsageStore
from shared.telemetry import protocol as names
from shared.telemetry.request_log import EVENT_NAME
from tools import stack
from tools.capture import Capture

FAULTS = ("500", "503", "reset", "429", "429-bare", "429-huge", "timeout", "cut")
# Charges with no backend usage behind them, by the status the token metrics carry: the backend read the prompt and
# may bill it (a timed-out attempt may still be generating), but answered nothing the regions count as served.
# A request cancelled while a backend has it keeps its reservation against the consumer's limit, like a timeout, but
# no usage row or metric: the books hold no tokens for it, so it is not among these.
UNBILLED = {"504": "attempts that ran past the read timeout (prompt charged)"}
PROMPT = "Summarise the state of the world in a few words. " * 6


def hostile_requests(rng: random.Random, url: str, key: str) -> list[tuple[str, str, dict[str, str], bytes]]:
    """(label, path, headers, body) of malformed or hostile requests."""
    good = {"api-key": key, "content-type": "application/json"}
    cases = [
        ("malformed JSON", "/v1/chat/completions", good, b'{"model": "gpt-4o", "messages": [}'),
        ("truncated JSON", "/v1/chat/completions", good, json.dumps({"model": "gpt-4o", "messages": [{"role": "user"}]}).encode()[:-7]),
        ("wrong types", "/v1/chat/completions", good, b'{"model": 5, "messages": "hi", "max_tokens": "many"}'),
        ("nulls", "/v1/chat/completions", good, b'{"model": null, "messages": null}'),
        ("deeply nested", "/v1/chat/completions", good, b"[" * 50_000 + b"]" * 50_000),
        ("invalid UTF-8", "/v1/embeddings", good, b'{"model": "text-embedding-3-small", "input": "\xff\xfe"}'),
        ("wrong content type", "/v1/chat/completions", {**good, "content-type": "text/plain"}, b"hello"),
        ("traversal deployment", "/openai/deployments/..%2F..%2Fadmin/chat/completions?api-version=2024-10-21", good, b"{}"),
        ("absolute URL model", "/v1/chat/completions", good, b'{"model": "http://evil.example/x", "messages": [{"role": "user"}]}'),
        ("very long deployment", f"/openai/deployments/{'a' * 5000}/embeddings?api-version=2024-10-21", good, b'{"input": "x"}'),
        ("hostile api-version", "/openai/deployments/gpt-4o/chat/completions?api-version=%0d%0aX:1", good, b'{"messages": [{"role": "user"}]}'),
        ("no key", "/v1/chat/completions", {"content-type": "application/json"}, b'{"model": "gpt-4o", "messages": [{"role": "user"}]}'),
        ("bad key", "/v1/chat/completions", {**good, "api-key": "gw-" + "x" * 43}, b'{"model": "gpt-4o", "messages": [{"role": "user"}]}'),
        ("conflicting keys", "/v1/chat/completions", {**good, "authorization": "Bearer gw-other"}, b'{"model": "gpt-4o", "messages": [{"role": "user"}]}'),
        ("huge body", "/v1/chat/completions", good, b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "' + b"x" * 9_000_000 + b'"}]}'),
        ("unknown path", "/v1/images/generations", good, b"{}"),
        ("random bytes", "/v1/chat/completions", good, bytes(rng.getrandbits(8) for _ in range(200))),
    ]
    return cases


def barrage(url: str, key: str, rng: random.Random, outcomes: Counter[tuple[str, str]]) -> None:
    with httpx.Client(timeout=30) as client:
        for label, path, headers, body in hostile_requests(rng, url, key):
            try:
                status = str(client.post(url + path, content=body, headers=headers).status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            outcomes[(label, status)] += 1


async def charged(env: dict[str, str], consumers: list[str]) -> dict[str, int]:
    tables = Tables.from_settings(load_settings(env, require_backends=False), timeout_s=30)
    try:
        rows = []
        for consumer in consumers:
            rows += await TableUsageStore(tables).query(consumer, "0000", "9999")
    finally:
        await tables.close()
    totals = summarize(rows)
    return {"prompt": sum(t.prompt for t in totals), "completion": sum(t.completion for t in totals),
            "total": sum(t.total for t in totals), "requests": sum(t.requests for t in totals)}


def unbilled_charges(capture: Capture, consumers: set[str]) -> dict[str, dict[str, int]]:
    """The charges of UNBILLED's kinds, from the per-request log (the token metrics carry no status): every record
    with that status (a timed-out attempt is a `lost attempt` record of status 504)."""
    found = {status: {"Prompt Tokens": 0, "Total Tokens": 0, "records": 0} for status in UNBILLED}
    for item in capture.items("EventData"):
        data = item["data"]["baseData"]
        props, measured = data.get("properties", {}), data.get("measurements", {})
        status = props.get(names.STATUS_CODE)
        if data.get("name") != EVENT_NAME or props.get(names.SUBSCRIPTION_ID) not in consumers or status not in found:
            continue
        found[status]["Prompt Tokens"] += int(measured.get("Prompt Tokens", 0))
        found[status]["Total Tokens"] += int(measured.get("Total Tokens", 0))
        found[status]["records"] += 1
    return found


def load_lines(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def explain_bursts(
    unavailable: list[tuple[float, str]], health: list[Any], faults: list[Any], started: float, gap_s: float = 1.0,
) -> list[dict[str, Any]]:
    """503 answers grouped into bursts (no more than `gap_s` apart), each with its cause: what /health said of every
    region just before it began (state, and the reason of an open breaker) and the faults injected in the 60 s before."""
    table: list[dict[str, Any]] = []
    for at, load in sorted(unavailable):
        if table and at - table[-1]["last"] <= gap_s:
            table[-1]["last"] = at
            table[-1]["answers"] += 1
            table[-1]["loads"][load] = table[-1]["loads"].get(load, 0) + 1
        else:
            table.append({"first": at, "last": at, "answers": 1, "loads": {load: 1}})
    for burst in table:
        before = [h for t, h in health if t <= burst["first"]]
        states: dict[str, str] = {}
        for entry in (before[-1]["backends"] if before else []):
            out = [f"{name} {state['state']}" + (f" ({state['reason']})" if state.get("reason") else "")
                   for name, state in sorted(entry["deployments"].items()) if state["state"] != "closed"]
            states[entry["id"]] = ", ".join(out) or "closed"
        burst["regions_before"] = states
        burst["faults_before"] = [f"{kind} on {region} at {t - started:.1f} s" for t, kind, region in faults
                                  if burst["first"] - 60 <= t <= burst["first"]]
        burst["at_s"] = round(burst.pop("first") - started, 1)
        burst["duration_s"] = round(burst.pop("last") - started - burst["at_s"], 1)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--keep", type=Path, help="keep records, the fault log and /health snapshots in this folder")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60
    rng = random.Random(2026)
    capture = Capture()
    results: dict[str, Any] = {"machine": machine(), "date": stamp(), "minutes": args.minutes}
    with bench_stack() as bench, tempfile.TemporaryDirectory() as folder:
        bench.start_azurite()
        breaker = {"trip_s": 2, "max_trip_s": 20}
        regions = [
            stack.Region("uksouth-ptu", "uksouth", stack.free_port(), priority=1, ptu=True, chat_tpm=200_000,
                         timeout_s=2.0, breaker=breaker),
            stack.Region("swedencentral", "swedencentral", stack.free_port(), priority=2, timeout_s=2.0, breaker=breaker),
            stack.Region("francecentral", "francecentral", stack.free_port(), priority=2, timeout_s=2.0, breaker=breaker),
        ]
        sims = [bench.start_simulator(r, latency_ms=50, token_latency_ms=10) for r in regions]
        gateway = bench.start_gateway(regions, {
            "APPLICATIONINSIGHTS_CONNECTION_STRING": capture.connection_string,
            "OTEL_METRIC_EXPORT_INTERVAL": "5000",
            "GATEWAY_USAGE_FLUSH_S": "5",  # the books are compared a few seconds after the load ends
        })
        keys = {
            "soak-steady": bench.consumer("soak-steady", tokens_per_minute=10_000_000),
            "soak-over": bench.consumer("soak-over", tokens_per_minute=3_000),
            "soak-quota": bench.consumer("soak-quota", quota=20_000, quota_period="hourly"),
        }
        url = gateway.url
        chat = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 30}).encode()
        stream = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}], "stream": True}).encode()
        embed = json.dumps({"model": "text-embedding-3-small", "input": [PROMPT, "short"]}).encode()
        records = Path(folder)
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            records = args.keep
        # Kept for every run (in the temporary folder without --keep): each burst of 503s is explained from them.
        fault_log = (records / "faults.jsonl").open("w")
        health_log = (records / "health.jsonl").open("w")
        loads = [
            start_load(f"{url}/v1/chat/completions", chat, 16, seconds, headers={"api-key": keys["soak-steady"]},
                       rate=30, warmup=0, record=str(records / "chat.jsonl")),
            start_load(f"{url}/v1/chat/completions", stream, 16, seconds, headers={"api-key": keys["soak-steady"]},
                       rate=10, stream=True, warmup=0, record=str(records / "stream.jsonl")),
            start_load(f"{url}/v1/embeddings", embed, 4, seconds, headers={"api-key": keys["soak-steady"]},
                       rate=10, warmup=0, record=str(records / "embed.jsonl")),
            start_load(f"{url}/v1/chat/completions", chat, 4, seconds, headers={"api-key": keys["soak-over"]},
                       rate=4, warmup=0, record=str(records / "over.jsonl")),
            start_load(f"{url}/v1/chat/completions", chat, 4, seconds, headers={"api-key": keys["soak-quota"]},
                       rate=3, warmup=0, record=str(records / "quota.jsonl")),
        ]
        samples: list[tuple[float, float, int]] = []
        faults: Counter[str] = Counter()
        bad: Counter[tuple[str, str]] = Counter()
        started = time.monotonic()
        started_wall = time.time()
        next_fault, next_barrage, next_sample = started + 20, started + 30, started
        while time.monotonic() - started < seconds:
            now = time.monotonic()
            if now >= next_sample:
                samples.append((round(now - started, 1), rss_mb(gateway.process.pid), open_fds(gateway.process.pid)))
                next_sample += 10
            if now >= next_fault:
                kind = rng.choice(FAULTS)
                sim = rng.choice(sims)
                spec: dict[str, Any] = {"kind": kind, "count": 3}
                if kind == "timeout":
                    spec["delay_s"] = 5
                httpx.post(f"{sim.url}/_sim/faults", json=spec, timeout=10)
                faults[kind] += 3
                fault_log.write(json.dumps([time.time(), kind, regions[sims.index(sim)].id]) + "\n")
                next_fault += 20
            if now >= next_barrage:
                threading.Thread(target=barrage, args=(url, keys["soak-steady"], rng, bad), daemon=True).start()
                next_barrage += 30
            health = httpx.get(f"{url}/health/details", headers=stack.ADMIN_HEADERS, timeout=10).json()
            health_log.write(json.dumps([time.time(), health]) + "\n")
            time.sleep(0.5)
        fault_log.close()
        health_log.close()
        outputs = [finish_load(process, 300) for process in loads]
        for sim in sims:  # the last faults may not have been used; clear them before the books are closed
            httpx.delete(f"{sim.url}/_sim/faults", timeout=10)
        time.sleep(12)  # usage rows (every 5 s) and metric exports (every 5 s) catch up
        statuses: Counter[str] = Counter()
        codes: Counter[str] = Counter()
        unavailable: list[tuple[float, str]] = []
        for file in records.iterdir():
            if file.name in ("faults.jsonl", "health.jsonl"):
                continue
            for line in file.read_text().splitlines():
                row = json.loads(line)
                statuses[row[1]] += 1
                if row[1] != "200":
                    codes[f"{row[1]} {row[6]}"] += 1
                if row[1] == "503":
                    unavailable.append((row[0], file.stem))
        burst_table = explain_bursts(unavailable, load_lines(records / "health.jsonl"),
                                     load_lines(records / "faults.jsonl"), started_wall)
        stats = [httpx.get(f"{s.url}/_sim/stats", timeout=10).json() for s in sims]
        served = {k: sum(s["billed"][k] for s in stats) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        unanswered = {k: sum(s["unanswered"][k] for s in stats) for k in ("prompt_tokens", "total_tokens", "requests")}
        books = asyncio.run(charged(bench.env(), list(keys)))
        emitted = {name: sum(capture.total(name, **{names.SUBSCRIPTION_ID: c}) for c in keys)
                   for name in (names.PROMPT_TOKENS, names.COMPLETION_TOKENS, names.TOTAL_TOKENS)}
        unbilled = unbilled_charges(capture, set(keys))
        log_text = gateway.log()
    capture.stop()

    warm = [s for s in samples if s[0] >= 120] or samples
    rss_growth = (warm[-1][1] - warm[0][1]) / warm[0][1] * 100
    own_errors = statuses.get("500", 0) + log_text.count("Traceback") + log_text.count("Exception in ASGI")
    results.update({
        "requests": sum(statuses.values()),
        "statuses": dict(statuses),
        "error_codes": dict(codes),
        "rss_mb": {"after_warmup": warm[0][1], "end": warm[-1][1], "max": max(s[1] for s in samples),
                   "growth_percent": round(rss_growth, 2)},
        "fds": {"after_warmup": warm[0][2], "end": warm[-1][2], "max": max(s[2] for s in samples)},
        "own_errors": own_errors,
        "tokens": {"charged": books, "emitted": emitted, "served_by_backends": served, "unbilled": unbilled,
                   "unanswered_by_backends": unanswered},
        "faults": dict(faults),
        "bursts_503": burst_table,
        "bad_inputs": {f"{label} -> {status}": n for (label, status), n in sorted(bad.items())},
        "samples": samples,
        "load": [{k: o.get(k) for k in ("requests", "rps", "statuses")} for o in outputs],
    })
    named = {k: sum(u[name] for u in unbilled.values()) for k, name in
             (("total", names.TOTAL_TOKENS), ("prompt", names.PROMPT_TOKENS))}
    results["books_balance"] = (
        books["total"] == emitted[names.TOTAL_TOKENS] == served["total_tokens"] + named["total"]
        and books["prompt"] == emitted[names.PROMPT_TOKENS] == served["prompt_tokens"] + named["prompt"]
    )
    # The named charges, against what the regions say they read and never answered: the same prompts, counted twice
    # independently (the gateway's tokenizer, the simulator's).
    results["unbilled_match"] = named["total"] == named["prompt"] == unanswered["prompt_tokens"]
    print(json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2))
    save("soak", results)
    if args.write:
        write_report(ROOT / "docs" / "reliability.md", markdown(results))
        update_doc("soak", summary(results))
    return 0 if results["books_balance"] and own_errors == 0 else 1


def summary(r: dict[str, Any]) -> str:
    """The soak's figures for docs/benchmarks.md."""
    tokens = r["tokens"]
    bursts = r["bursts_503"]
    return "\n".join([
        "## Soak: faults, 503 bursts and the books",
        "",
        f"`.venv/bin/python -m bench.soak --minutes {r['minutes']:g} --write` ({r['date']}, {r['machine']}; the machine "
        "was shared with other work, so these are no speed figures). The full table: [reliability.md](reliability.md).",
        "",
        "| | measured |",
        "|---|---|",
        f"| requests | {r['requests']} ({', '.join(f'{k}: {v}' for k, v in sorted(r['statuses'].items()))}) |",
        f"| answers of 503 | {r['statuses'].get('503', 0)} in {len(bursts)} burst(s)"
        + "".join(f"; {b['answers']} at {b['at_s']} s over {b['duration_s']} s" for b in bursts) + " |",
        f"| charged = emitted = served + timed-out attempts' prompts | {tokens['charged']['total']} = "
        f"{int(tokens['emitted']['Total Tokens'])} = {tokens['served_by_backends']['total_tokens']} + "
        f"{sum(u['Total Tokens'] for u in tokens['unbilled'].values())}: {'yes' if r['books_balance'] else 'NO'} |",
        f"| RSS growth after warm-up | {r['rss_mb']['growth_percent']:+.2f} % |",
        f"| errors of the gateway's own making | {r['own_errors']} |",
    ])


def write_report(path: Path, report: str) -> None:
    """Replace the soak's part of the page (up to the end of its last section), keeping the sections after it."""
    kept = ""
    if path.exists():
        old = path.read_text(encoding="utf-8")
        last = old.find("\n## In the test suite")
        following = old.find("\n## ", last + 1) if last >= 0 else -1
        kept = old[following:] if following >= 0 else ""
    path.write_text(report + kept, encoding="utf-8")


def markdown(r: dict[str, Any]) -> str:
    tokens = r["tokens"]
    lines = [
        "# Reliability",
        "",
        "## Soak: sustained load, faults and hostile input",
        "",
        f"`.venv/bin/python -m bench.soak --minutes {r['minutes']:g} --write` — {r['date']}, {r['machine']}.",
        "One gateway process (limits, routing, metrics and traces on) in front of three simulated regions; a steady mix "
        "of chat (30/s), streams (10/s) and embeddings (10/s) from a consumer far below its limit, plus a consumer over "
        "its rate (4/s against 3,000 tokens/minute) and one running into an hourly quota (3/s). A backend fault on a "
        "random region every 20 s; a barrage of malformed and hostile requests every 30 s.",
        "",
        "| | target | measured |",
        "|---|---|---|",
        f"| requests | | {r['requests']} ({', '.join(f'{k}: {v}' for k, v in sorted(r['statuses'].items()))}) |",
        f"| answers other than 200, by code | | {', '.join(f'{k}: {v}' for k, v in sorted(r['error_codes'].items()))} |",
        f"| RSS after warm-up → end (MB) | growth < 5 % | {r['rss_mb']['after_warmup']:.1f} → {r['rss_mb']['end']:.1f} "
        f"({r['rss_mb']['growth_percent']:+.2f} %), max {r['rss_mb']['max']:.1f} |",
        f"| open file descriptors after warm-up → end | no growth | {r['fds']['after_warmup']} → {r['fds']['end']} (max {r['fds']['max']}) |",
        f"| errors of the gateway's own making (500s, tracebacks) | 0 | {r['own_errors']} |",
        f"| tokens charged to consumers (usage rows) | = emitted = served | {tokens['charged']['total']} |",
        f"| tokens emitted as metrics (`Total Tokens`) | | {int(tokens['emitted']['Total Tokens'])} |",
        f"| tokens the backends served (reported + cut streams' prompt and delivered) | | {tokens['served_by_backends']['total_tokens']} |",
        *(f"| + charged with no backend usage: {UNBILLED[status]} | | {u['Total Tokens']} |"
          for status, u in sorted(tokens["unbilled"].items())),
        f"| books balance exactly (total and prompt): charged = emitted = served + the named charges | yes | "
        f"{'yes' if r['books_balance'] else 'NO'} |",
        f"| the named charges = the prompts the regions read and never answered | yes | "
        f"{'yes' if r['unbilled_match'] else 'NO'} ({tokens['unanswered_by_backends']['prompt_tokens']} in "
        f"{tokens['unanswered_by_backends']['requests']} requests) |",
        "",
        "The books name every charge no backend's usage stands behind. An attempt that runs past the backend's read "
        "timeout (the `timeout` fault holds a request 5 s against a 2 s timeout) is charged its prompt: the backend "
        "read it and may still be generating and billing it (and when no other region answers, the consumer's "
        "reservation is not refunded either; README, timeouts). The regions bill nothing for it (nothing was answered), so the simulated regions count such "
        "prompts apart, as read and unanswered; the table checks the named charges against that count, and charged = "
        "emitted = served + named, to the token. A request the client cancels while a backend has it keeps its "
        "reservation against the consumer's limit for the same reason, but adds nothing to the usage rows or the "
        "token metrics, so it is no charge in these books. Nothing else is charged without a backend's usage: cut "
        "streams and broken bodies are billed by the regions for what they sent.",
        "",
        "Other statuses are the designed answers: `429 rate_limit_exceeded` and `403 quota_exceeded` for the consumers over their rate and quota; `429 backends_busy` when every region serving the deployment was throttling; `503 service_unavailable` when every region serving it was out at once for mixed reasons and none only on the gateway's own judgement (a region that asked for a wait, or failed again while out, is not sent a last resort; README, backends); `502`/`504` when a fault hit the last backend left for a request; 4xx for hostile input. An injected fault waits in the simulator until its region gets traffic, so when the PTU goes out (a 429 asking for a day) and its overflow reaches the secondaries, the faults queued on them fire together. Each burst of 503 is listed below with its cause; `--keep DIR` keeps every request, the faults and /health every 0.5 s.",
        "",
        "## Faults injected during the soak",
        "",
        "| fault (3 requests each time) | injected | outcome |",
        "|---|---|---|",
    ]
    outcome = {
        "500": "the breaker trips; the request fails over to the next region, the client sees a 200",
        "503": "as 500, for the backend's Retry-After (1 s)",
        "reset": "connection error: breaker trips, failover",
        "429": "the breaker trips for the backend's Retry-After; failover",
        "429-bare": "trips for the configured trip duration; failover",
        "429-huge": "asks for a day; trip capped at max_trip_s (20 s here); failover",
        "timeout": "no headers within the backend's 2 s timeout: breaker trips, failover",
        "cut": "a stream cut mid-way: the client gets an OpenAI error event and a clean end, prompt + delivered tokens charged; a non-streamed body cut: nothing has reached the client, so the request fails over (502 `backend_error` only when no other region is left), and the broken attempt's prompt is charged with the answer",
    }
    for kind, count in sorted(r["faults"].items()):
        lines.append(f"| {kind} | {count} | {outcome.get(kind, '')} |")
    lines += ["", "## Bursts of 503 during the soak, with their cause", ""]
    if not r["bursts_503"]:
        lines.append("None: no answer of 503.")
    else:
        lines += ["| at (s) | answers | lasted (s) | loads | regions just before (breakers not closed) | faults in the 60 s before |",
                  "|---|---|---|---|---|---|"]
        for b in r["bursts_503"]:
            regions = "; ".join(f"{k}: {v}" for k, v in b["regions_before"].items())
            loads = ", ".join(f"{k} {v}" for k, v in sorted(b["loads"].items()))
            lines.append(f"| {b['at_s']} | {b['answers']} | {b['duration_s']} | {loads} | {regions} | "
                         f"{'; '.join(b['faults_before'])} |")
    lines += ["", "## Hostile input sent during the soak", "", "| input → status | count |", "|---|---|"]
    for label, count in r["bad_inputs"].items():
        lines.append(f"| {label} | {count} |")
    lines += [
        "",
        "## In the test suite",
        "",
        "`tests/test_e2e_reliability.py` (faults, each with its expected behaviour in the test's name), "
        "`tests/test_e2e_bad_input.py` (hypothesis-generated malformed bodies, hostile deployment names, api-versions and "
        "content types, pathological bodies, duplicated credentials, header injection: every one a 4xx, never a 5xx, "
        "nothing unconfigured reaching a backend) and `tests/test_zz_leak_scan.py` (no key in any log or export).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
