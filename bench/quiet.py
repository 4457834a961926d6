"""Many quiet consumers (issue 20): Table round trips per request, the limiter's added latency, and the limit's
accuracy for one consumer bursting beside a thousand quiet ones.

    .venv/bin/python -m bench.quiet [--shapes 100x1,100x4,1000x1,1000x4] [--warmup 60] [--seconds 180]
                                    [--burst-minutes 4] [--write]

Azurite behind the counting TCP proxy (tools/tcpproxy.py), two simulated regions (50 ms, ample capacity), 1 or 4
gateway processes. Per shape (consumers x gateways): the consumers are created with the admin command's bulk
creation (`consumers create-many`, timed), each limited to 100,000 tokens/minute and sending one request every 2 s
(about 7.5% of its limit), its requests going round the gateways in turn; beside them, unlimited consumers (a tenth as
many, at least 10) at the same rate measure latency without the limiter. After a warm-up the proxy's counts are reset
and, over the measured span, reported:

- Table round trips per request (every table: ledger, usage rows, breakers, consumers), target <= 0.3,
- p50 of limited minus unlimited requests: the limiter's added latency, target <= 0.2 ms.

The burst shape: 1,000 quiet consumers and one consumer asking twice its limit from 32 clients over 4 gateways, with
bench.limits' accuracy figures: the most admitted in any 60 s / the limit (<= 1.02), each full minute (>= 0.95).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.harness import ROOT, Bench, bench_stack, chat_body, finish_load, machine, save, stamp, start_load, update_doc
from bench.limits import analyse
from tools import stack

QUIET_TPM = 100_000
INTERVAL_S = 2.0
BURST_TPM = 300_000
BURST_CLIENTS = 32
END_USER_TPM = 20_000  # each end user's tokens per minute in the end-users shape
USERS_INTERVAL_S = 40.0
TEAM_TPM = 120_000  # the team two bursting consumers share in the end-users shape


def create(bench: Bench, folder: Path, name: str, specs: list[dict[str, Any]]) -> tuple[list[str], float, float]:
    """Create consumers with the admin command; return their keys, the command's wall time and its store time."""
    spec_file, keys_file = folder / f"{name}.jsonl", folder / f"{name}-keys.jsonl"
    spec_file.write_text("".join(json.dumps(s) + "\n" for s in specs))
    empty = settings_file(folder)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "shared.admin", "--settings", str(empty), "consumers", "create-many", str(spec_file),
         "--keys-out", str(keys_file)],
        cwd=ROOT, env={**os.environ, **bench.env()}, capture_output=True, text=True, timeout=300, check=True,
    )
    wall = time.monotonic() - started
    store_s = float(done.stderr.split(" in ", 1)[1].split(" s", 1)[0])
    keys = [json.loads(line)["key"] for line in keys_file.read_text().splitlines()]
    (folder / f"{name}.keys").write_text("\n".join(keys) + "\n")
    return keys, round(wall, 2), round(store_s, 2)


# Azurite (one Node process) stalls for seconds when the shared machine is saturated; with the default 1 s timeout a
# stall turns into store fallbacks and their catch-up writes, which measure the machine, not the design.
STORE_TIMEOUT_S = "5"


def start_gateways(bench: Bench, regions: list[stack.Region], count: int, tag: str) -> list[stack.Child]:
    extra = {"GATEWAY_INSTANCE_COUNT": str(count), "GATEWAY_STORE_TIMEOUT_S": STORE_TIMEOUT_S}
    return [bench.start_gateway(regions, extra, name=f"gateway-{tag}-{i}") for i in range(count)]


def stop(bench: Bench, children: list[stack.Child]) -> None:
    for child in children:
        child.stop()
        bench.children.remove(child)


def table_figures(tables: dict[str, int], requests: int) -> dict[str, Any]:
    by_kind = {kind: sum(n for t, n in tables.items() if t.endswith(kind)) for kind in ("ledger", "usage", "breakers", "consumers")}
    by_kind["usage"] += tables.get("$batch", 0)  # the gateway's only batches are usage rows (the proxy sees "/$batch")
    by_kind["other"] = sum(tables.values()) - sum(by_kind.values())
    return {
        "table_round_trips_per_request": round(sum(tables.values()) / max(1, requests), 4),
        "by_table_per_request": {k: round(v / max(1, requests), 4) for k, v in by_kind.items()},
        "table_requests": tables,
    }


def measured(control: int, loads: dict[str, subprocess.Popen[str]], warmup: float,
             seconds: float) -> tuple[dict[str, int], dict[str, Any]]:
    """After the generators' start-up and warm-up, every Table request counted over `seconds`; each load's result."""
    time.sleep(warmup + 0.7)
    stack.proxy_control(control, "reset")
    time.sleep(seconds)
    tables: dict[str, int] = stack.proxy_control(control, "stats")["requests"]
    return tables, {name: finish_load(process, seconds + warmup + 180) for name, process in loads.items()}


def settings_file(folder: Path) -> Path:
    """The admin command's settings file: empty, the store comes from the bench's environment."""
    empty = folder / "empty-settings.json"
    empty.write_text('{"Values": {}}')
    return empty


def run_shape(bench: Bench, regions: list[stack.Region], control: int, folder: Path, consumers: int, gateways: int,
              warmup: float, seconds: float, burst_minutes: float = 0.0, interval: float = INTERVAL_S) -> dict[str, Any]:
    tag = f"{consumers}x{gateways}{'b' if burst_minutes else ''}-{int(time.time()) % 100000}"
    unlimited = max(10, consumers // 10)
    limited_specs = [{"name": f"quiet {tag} {n}", "tokens_per_minute": QUIET_TPM, "deployments": "*"} for n in range(consumers)]
    _, create_wall, create_store = create(bench, folder, f"quiet-{tag}", limited_specs)
    create(bench, folder, f"free-{tag}", [{"name": f"free {tag} {n}", "deployments": "*"} for n in range(unlimited)])
    burst_key = ""
    if burst_minutes:
        burst_key = create(bench, folder, f"burst-{tag}", [{"name": f"burst {tag}", "tokens_per_minute": BURST_TPM, "deployments": "*"}])[0][0]
        seconds = burst_minutes * 60 + 5
    children = start_gateways(bench, regions, gateways, tag)
    urls = [f"{g.url}/v1/chat/completions" for g in children]
    body = chat_body(model="gpt-4o")
    time.sleep(6)  # the gateways' consumer directories have loaded the new consumers
    # One generator for both kinds, interleaved, so both see the same client-side delays: the difference in p50 is
    # the limiter's.
    limited_keys = (folder / f"quiet-{tag}.keys").read_text().split()
    free_keys = (folder / f"free-{tag}.keys").read_text().split()
    mixed: list[str] = []
    for n, key in enumerate(limited_keys):
        mixed.append(f"limited\t{key}")
        if n % 10 == 9 and free_keys:
            mixed.append(f"unlimited\t{free_keys.pop()}")
    mixed += [f"unlimited\t{key}" for key in free_keys]
    (folder / f"mixed-{tag}.keys").write_text("\n".join(mixed) + "\n")
    loads = {
        "quiet": start_load(urls, body, len(mixed), seconds, rate=len(mixed) / interval, warmup=warmup,
                            keys=str(folder / f"mixed-{tag}.keys"), rotate=True),
    }
    record = str(folder / f"burst-{tag}.jsonl")
    per_request = 0
    if burst_minutes:
        probe = chat_body(model="gpt-4o")
        answer = httpx.post(urls[0], content=probe, headers={"api-key": burst_key, "content-type": "application/json"},
                            timeout=120)
        per_request = int(answer.headers["x-gateway-tokens-consumed"])
        demand = 2 * BURST_TPM / 60 / per_request
        loads["burst"] = start_load(urls, body, BURST_CLIENTS, seconds, headers={"api-key": burst_key}, rate=demand,
                                    record=record, warmup=warmup, rotate=True)
    tables, results = measured(control, loads, warmup, seconds)
    stop(bench, children)
    requests = sum(r["requests"] for r in results.values())
    quiet = results["quiet"]
    p50 = {label: figures["p50"] for label, figures in quiet["latency_ms_by_label"].items()}
    figures: dict[str, Any] = {
        "consumers": consumers,
        "gateways": gateways,
        "interval_s": interval,
        "unlimited_consumers": unlimited,
        "create_consumers_s": create_wall,
        "create_consumers_store_s": create_store,
        "seconds": seconds,
        "requests": requests,
        "rps": round(requests / seconds, 1),
        "quiet_statuses": quiet["statuses"],
        "ok_by_label": quiet["ok_by_label"],
        "limited_p50_ms": p50.get("limited"),
        "unlimited_p50_ms": p50.get("unlimited"),
        **table_figures(tables, requests),
    }
    figures["added_p50_ms"] = round(figures["limited_p50_ms"] - figures["unlimited_p50_ms"], 3)
    if burst_minutes:
        records = [tuple(json.loads(line)) for line in Path(record).read_text().splitlines()]
        figures["burst"] = {"limit_tpm": BURST_TPM, "tokens_per_request": per_request,
                            **analyse(records, BURST_TPM, seconds)}
    return figures


def admin(bench: Bench, folder: Path, *argv: str) -> Any:
    """Run the admin command (--json) against the bench's store; its JSON result."""
    empty = settings_file(folder)
    done = subprocess.run([sys.executable, "-m", "shared.admin", "--settings", str(empty), "--json", *argv], cwd=ROOT,
                          env={**os.environ, **bench.env()}, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


def run_users(bench: Bench, regions: list[stack.Region], control: int, folder: Path, users: int, gateways: int,
              warmup: float, seconds: float, interval: float = USERS_INTERVAL_S) -> dict[str, Any]:
    """Issue 27: `users` end users of one consumer (each limited to END_USER_TPM, one request every `interval` s each,
    named by x-gateway-user, round the gateways), beside unlimited consumers at the same rate for latency; and at the
    same time one of those end users asking twice its limit, and two consumers of one team (TEAM_TPM) each asking the
    team's whole limit. Table round trips per request over everything, added p50, and the accuracy of both limits."""
    tag = f"u{users}x{gateways}-{int(time.time()) % 100000}"
    seconds = max(seconds, 185.0)  # two full minutes after the first, for the per-minute figures
    consumer = admin(bench, folder, "consumers", "create", f"end users {tag}", "--all-deployments",
                     "--user-tpm", str(END_USER_TPM), "--user-sources", "header", "--user-required", "yes")
    team = admin(bench, folder, "teams", "create", f"team {tag}", "--all-deployments", "--tpm", str(TEAM_TPM))
    members = [admin(bench, folder, "consumers", "create", f"member {n} {tag}", "--all-deployments", "--team", team["id"])
               for n in range(2)]
    unlimited = max(10, users // 100)
    create(bench, folder, f"free-{tag}", [{"name": f"free {tag} {n}", "deployments": "*"} for n in range(unlimited)])
    children = start_gateways(bench, regions, gateways, tag)
    urls = [f"{g.url}/v1/chat/completions" for g in children]
    body = chat_body(model="gpt-4o")
    time.sleep(6)
    free_keys = (folder / f"free-{tag}.keys").read_text().split()
    mixed: list[str] = []
    for n in range(users):
        mixed.append(f"limited\t{consumer['key']}\tend-user-{n}")
        if n % (users // unlimited) == 0 and free_keys:
            mixed.append(f"unlimited\t{free_keys.pop()}")
    mixed += [f"unlimited\t{key}" for key in free_keys]
    (folder / f"mixed-{tag}.keys").write_text("\n".join(mixed) + "\n")
    probe = httpx.post(urls[0], content=body, headers={"api-key": consumer["key"], "x-gateway-user": "probe",
                                                        "content-type": "application/json"}, timeout=120)
    per_request = int(probe.headers["x-gateway-tokens-consumed"])
    (folder / f"busy-{tag}.keys").write_text("".join(f"busy\t{consumer['key']}\tbusy-user\n" for _ in range(8)))
    records = {name: str(folder / f"{name}-{tag}.jsonl") for name in ("user", "team0", "team1")}
    loads = {
        "quiet": start_load(urls, body, len(mixed), seconds, rate=len(mixed) / interval, warmup=warmup,
                            keys=str(folder / f"mixed-{tag}.keys"), rotate=True),
        "user": start_load(urls, body, 8, seconds, rate=2 * END_USER_TPM / 60 / per_request, warmup=warmup,
                           keys=str(folder / f"busy-{tag}.keys"), rotate=True, record=records["user"]),
        **{f"team{n}": start_load(urls, body, 8, seconds, headers={"api-key": m["key"]}, rate=TEAM_TPM / 60 / per_request,
                                  warmup=warmup, rotate=True, record=records[f"team{n}"]) for n, m in enumerate(members)},
    }
    tables, results = measured(control, loads, warmup, seconds)
    stop(bench, children)
    requests = sum(r["requests"] for r in results.values())
    quiet = results["quiet"]
    p50 = {label: figures["p50"] for label, figures in quiet["latency_ms_by_label"].items()}

    def recorded(*names: str) -> list[tuple[Any, ...]]:
        return [tuple(json.loads(line)) for name in names for line in Path(records[name]).read_text().splitlines()]

    figures: dict[str, Any] = {
        "end_users": users, "gateways": gateways, "interval_s": interval, "unlimited_consumers": unlimited,
        "seconds": seconds, "requests": requests, "rps": round(requests / seconds, 1),
        "quiet_statuses": quiet["statuses"], "ok_by_label": quiet["ok_by_label"],
        "limited_p50_ms": p50.get("limited"), "unlimited_p50_ms": p50.get("unlimited"),
        "tokens_per_request": per_request,
        "busy_end_user": {"limit_tpm": END_USER_TPM, **analyse(recorded("user"), END_USER_TPM, seconds)},
        "team": {"limit_tpm": TEAM_TPM, **analyse(recorded("team0", "team1"), TEAM_TPM, seconds)},
        **table_figures(tables, requests),
    }
    figures["added_p50_ms"] = round(figures["limited_p50_ms"] - figures["unlimited_p50_ms"], 3)
    return figures


async def limiter_cost(consumers: int, rounds: int) -> dict[str, float]:
    """The limiter's own time per request on the request path, in-process: `consumers` quiet consumers (one request
    every 2 s each, on a fake clock), a ledger store in memory (so a request that waits for a claim counts its
    bookkeeping, not a Table round trip); after a warm-up of `rounds` rounds, `rounds` more are measured."""
    from shared.clock import FakeClock
    from shared.limits.limiter import TokenLimiter
    from shared.records.consumers import Consumer, Limits
    from shared.storage.memory import MemoryLedgerStore
    from shared.telemetry.protocol import NullTelemetry

    clock = FakeClock()
    limiter = TokenLimiter(MemoryLedgerStore(), clock, NullTelemetry(), background=False)
    people = [Consumer(f"c{n}", f"c{n}", f"h{n}", "gw-x", limits=Limits(tokens_per_minute=QUIET_TPM))
              for n in range(consumers)]
    times: list[float] = []
    step = INTERVAL_S / consumers
    ticks = 0.0
    for round_ in range(2 * rounds):
        for person in people:
            clock.advance(step)
            ticks += step
            if ticks >= 0.1:
                ticks = 0.0
                await limiter.tick()
            started = time.perf_counter()
            ticket = await limiter.admit(person, "gpt-4o", 230)
            ticket.settle(215)
            if round_ >= rounds:
                times.append(time.perf_counter() - started)
    times.sort()
    return {"p50_us": round(times[len(times) // 2] * 1e6, 2), "p99_us": round(times[int(len(times) * 0.99)] * 1e6, 2),
            "mean_us": round(sum(times) / len(times) * 1e6, 2), "syncs_per_request": round(limiter.syncs / (2 * rounds * consumers), 4)}


async def end_user_cost(users: int, rounds: int, instances: int = 1) -> dict[str, float]:
    """Issue 27 in-process: `users` end users of one consumer (and the same requests from a consumer without end-user
    limits), one request every USERS_INTERVAL_S each on a fake clock, round `instances` limiters sharing a ledger in
    memory; the limiter's own time per request with and without the end-user level, and ledger round trips per request."""
    from shared.clock import FakeClock
    from shared.limits.limiter import TokenLimiter
    from shared.records.consumers import Consumer, Limits, UserLimits
    from shared.storage.memory import MemoryLedgerStore
    from shared.telemetry.protocol import NullTelemetry

    clock = FakeClock()
    store = MemoryLedgerStore()
    limiters = [TokenLimiter(store, clock, NullTelemetry(), background=False, instance_id=f"i{n}",
                             instance_count=instances) for n in range(instances)]
    with_users = Consumer("people", "people", "h", "gw-x", limits=Limits(tokens_per_minute=10_000_000),
                          users=UserLimits(tokens_per_minute=END_USER_TPM))
    without = Consumer("plain", "plain", "h", "gw-x", limits=Limits(tokens_per_minute=10_000_000))
    times: dict[bool, list[float]] = {True: [], False: []}
    step = USERS_INTERVAL_S / users
    ticks = 0.0
    base = 0
    for round_ in range(2 * rounds):
        if round_ == rounds:
            base = store.reads + store.writes
        for n in range(users):
            clock.advance(step)
            ticks += step
            if ticks >= 0.1:
                ticks = 0.0
                for limiter in limiters:
                    await limiter.tick()
            limiter = limiters[(n + round_) % instances]
            for named in (True, False):
                started = time.perf_counter()
                if named:
                    ticket = await limiter.admit(with_users, "gpt-4o", 230, user=f"u{n}")
                else:
                    ticket = await limiter.admit(without, "gpt-4o", 230)
                ticket.settle(215)
                if round_ >= rounds:
                    times[named].append(time.perf_counter() - started)
    for values in times.values():
        values.sort()
    p50 = {k: v[len(v) // 2] * 1e6 for k, v in times.items()}
    return {"users": users, "instances": instances, "p50_us_with_end_users": round(p50[True], 2),
            "p50_us_without": round(p50[False], 2), "added_p50_us": round(p50[True] - p50[False], 2),
            "ledger_round_trips_per_request": round((store.reads + store.writes - base) / (2 * rounds * users), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="100x1,100x4,1000x1,1000x4",
                        help="consumers x gateways[@seconds between a consumer's requests, default 2], comma-separated")
    parser.add_argument("--burst-interval", type=float, default=INTERVAL_S,
                        help="seconds between a quiet consumer's requests in the burst shape")
    parser.add_argument("--warmup", type=float, default=60.0)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--burst-minutes", type=float, default=4.0, help="0: no burst shape")
    parser.add_argument("--users", default="", help="end-users shapes (issue 27): END-USERSxGATEWAYS[@seconds between "
                        "an end user's requests, default 40], comma-separated, e.g. 10000x1")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"machine": machine(), "date": stamp(), "warmup": args.warmup, "seconds": args.seconds,
                               "argv": argv if argv is not None else sys.argv[1:], "shapes": []}
    if args.shapes:
        results["in_process"] = {str(n): asyncio.run(limiter_cost(n, 200)) for n in (100, 1000)}
        print(json.dumps(results["in_process"]), flush=True)
    if args.users:
        results["end_users_in_process"] = [asyncio.run(end_user_cost(10_000, 4, n)) for n in (1, 4)]
        print(json.dumps(results["end_users_in_process"]), flush=True)
    with bench_stack() as bench, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        control = bench.start_counted_store()
        regions = bench.start_unlimited_regions()
        for shape in filter(None, args.shapes.split(",")):
            size, _, every = shape.partition("@")
            consumers, gateways = (int(x) for x in size.split("x"))
            figures = run_shape(bench, regions, control, folder, consumers, gateways, args.warmup, args.seconds,
                                interval=float(every or INTERVAL_S))
            results["shapes"].append(figures)
            print(json.dumps({k: v for k, v in figures.items() if k != "table_requests"}), flush=True)
            save("quiet", results)  # kept if a later shape fails
        for shape in filter(None, args.users.split(",")):
            size, _, every = shape.partition("@")
            users, gateways = (int(x) for x in size.split("x"))
            figures = run_users(bench, regions, control, folder, users, gateways, args.warmup, args.seconds,
                                float(every or USERS_INTERVAL_S))
            results.setdefault("users", []).append(figures)
            print(json.dumps({k: v for k, v in figures.items() if k != "table_requests"}), flush=True)
            save("quiet", results)
        if args.burst_minutes:
            figures = run_shape(bench, regions, control, folder, 1000, 4, args.warmup, 0, args.burst_minutes,
                                interval=args.burst_interval)
            results["burst"] = figures
            print(json.dumps({k: v for k, v in figures.items() if k != "table_requests"}), flush=True)
    save("quiet", results)
    if args.write:
        update_doc("quiet", markdown(results))
    return 0


def markdown(results: dict[str, Any]) -> str:
    argv = " ".join(results["argv"])
    lines = [
        "## Many quiet consumers",
        "",
        f"`.venv/bin/python -m bench.quiet {argv}` — {results['date']}, {results['machine']}; the machine's 2 cores were "
        "shared with other work (other sessions' tests and benchmarks) during the run.",
        "Azurite behind the counting proxy, two 50 ms simulated regions, 1 or 4 gateway processes. Each consumer is limited "
        f"to {QUIET_TPM:,} tokens/minute and sends one request every {INTERVAL_S:g} s (about 7.5% of its limit; the "
        "interval is in the table where the machine could not carry that rate), its "
        "requests going round the gateways; unlimited consumers (a tenth as many, at least 10) at the same rate give the "
        f"latency without the limiter (one load generator for both, interleaved). Warm-up {results['warmup']:g} s, then "
        f"every Table request counted over {results['seconds']:g} s. `GATEWAY_STORE_TIMEOUT_S={STORE_TIMEOUT_S}`: on this "
        "shared machine Azurite stalls for seconds at times, and with the default 1 s a stall becomes store fallbacks.",
        "",
        "| consumers x gateways | s between a consumer's requests | requests/s | Table round trips per request (target <= 0.3) | ledger / usage / breakers / consumers | "
        "p50 limited / unlimited ms | added p50 ms (target <= 0.2) | creating the consumers (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in results["shapes"]:
        t = f["by_table_per_request"]
        lines.append(
            f"| {f['consumers']} x {f['gateways']} | {f['interval_s']:g} | {f['rps']} | {f['table_round_trips_per_request']} | "
            f"{t['ledger']} / {t['usage']} / {t['breakers']} / {t['consumers']} | {f['limited_p50_ms']} / "
            f"{f['unlimited_p50_ms']} | {f['added_p50_ms']} | {f['create_consumers_s']} (store {f['create_consumers_store_s']}) |"
        )
    cost = results.get("in_process", {})
    if cost:
        lines += [
            "",
            "The limiter's own time on the request path, in-process (admit + settle, quiet consumers at one request every "
            "2 s on a fake clock, ledger in memory; `limiter_cost` in bench/quiet.py): "
            + "; ".join(f"{n} consumers: p50 {c['p50_us']} µs, p99 {c['p99_us']} µs, {c['syncs_per_request']} ledger "
                        "writes per request" for n, c in cost.items()) + ".",
        ]
    burst = results.get("burst")
    if burst:
        b = burst["burst"]
        lines += [
            "",
            f"One consumer limited to {b['limit_tpm']:,} tokens/minute asks twice that from {BURST_CLIENTS} clients over 4 "
            f"gateways while the 1,000 quiet consumers (one request every {burst['interval_s']:g} s each) run beside it "
            f"({burst['rps']} requests/s in all; p50 limited / unlimited {burst['limited_p50_ms']} / "
            f"{burst['unlimited_p50_ms']} ms):",
            "",
            "| | target | figure |",
            "|---|---|---|",
            f"| requests / admitted / refused 429 (burst consumer) | | {b['requests']} / {b['admitted']} / {b['refused_429']} |",
            f"| max tokens admitted in any 60 s / limit | <= 1.02 | {b['max_any_60s_over_limit']} |",
            f"| tokens admitted per full minute / limit | >= 0.95 | {b['per_full_minute_over_limit']} |",
            f"| Table round trips per request (all consumers) | | {burst['table_round_trips_per_request']} |",
            f"| added p50 of the quiet consumers' limiter (ms) | | {burst['added_p50_ms']} |",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
