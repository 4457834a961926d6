"""What the token tables cost a worker, and what counting without tiktoken's Rust core would cost instead (issue 25's
RSS goal: <= 100 MB after start with keys only).

    .venv/bin/python -m bench.tokenizer_memory [--repeat 20] [--write]

Each figure of memory comes from a fresh Python process (RSS from /proc/self/status, after a garbage collection and
the gateway's own malloc_trim):
- the floor: every module the gateway imports at start (the local host, function_app's imports, the gateway's modules)
  without building any token table;
- each supported encoding alone, built the way the gateway builds it (shared/flow/tokens.py), and its build time.
Then the CPU side of the alternative: a counter that matches tiktoken exactly must split text with the encoding's own
pattern (the `regex` module is the only Python engine that runs it); the split alone is timed against tiktoken's whole
count of the same text, in one process, interleaved.
And that counter itself (bench/exact_bpe.py), its ranks held as a dict and as sorted lists: in a fresh process each, the
memory it adds to the same floor, that it counts the sample as tiktoken does, and its CPU against tiktoken's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from bench.harness import ROOT, machine, stamp, update_doc

FLOOR = """
import gc, json, tools.localhost, azure.functions, azurefunctions.extensions.http.fastapi, shared.app
gc.collect()
from shared.flow.tokens import _release_memory
_release_memory()
print(json.dumps({"rss_mb": rss(), "tables": len(__import__("shared.flow.tokens").flow.tokens._encodings)}))
"""

ENCODING = """
import gc, json, time, tools.localhost, azure.functions, azurefunctions.extensions.http.fastapi, shared.app
from shared.flow import tokens
tokens._release_memory()
before = rss()
started = time.perf_counter()
tokens.get_encoding({name!r})
built = time.perf_counter() - started
print(json.dumps({{"rss_mb": rss(), "added_mb": rss() - before, "build_s": built}}))
"""

OWN_COUNTER = """
import gc, json, time, tools.localhost, azure.functions, azurefunctions.extensions.http.fastapi, shared.app
from shared.flow import tokens
from bench.exact_bpe import Counter, pattern_of
from bench.tokenizer_memory import sample_text
text = sample_text()
pattern_of({name!r})  # the split pattern, compiled before the baseline: a worker's import, not the counter's tables
tokens._release_memory()
before = rss()
counter = Counter({name!r}, {form!r})
ours = counter.count(text)
tokens._release_memory()
added = rss() - before
cold = warm = theirs_s = 0.0
encoding = tokens.get_encoding({name!r})
theirs = len(encoding.encode_ordinary(text))
for _ in range({repeat}):  # interleaved: the machine's load falls on all three alike
    counter.pieces.clear()
    started = time.perf_counter(); counter.count(text); cold += time.perf_counter() - started
    started = time.perf_counter(); counter.count(text); warm += time.perf_counter() - started
    started = time.perf_counter(); encoding.encode_ordinary(text); theirs_s += time.perf_counter() - started
print(json.dumps({{"added_mb": added, "exact": ours == theirs, "tokens": ours, "cold_over_tiktoken": cold / theirs_s,
                  "warm_over_tiktoken": warm / theirs_s, "cold_ms": cold / {repeat} * 1000}}))
"""

RSS = """
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
"""


def in_fresh_process(code: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", RSS + code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def sample_text() -> str:
    """English prose, code and a little of other scripts: the repository's own README and token counter, and a line
    of Japanese and accented Latin."""
    return ((ROOT / "README.md").read_text() + (ROOT / "shared" / "flow" / "tokens.py").read_text()
            + "Ünïcödé, 日本語のテキスト, 1234567. " * 50)


def split_against_count(repeat: int) -> dict[str, Any]:
    import regex

    from shared.flow import tokens

    text = sample_text()
    result: dict[str, Any] = {"chars": len(text)}
    for name in ("o200k_base", "cl100k_base"):
        encoding = tokens.get_encoding(name)
        pattern = regex.compile(encoding._pat_str)
        count_s = split_s = 0.0
        for _ in range(repeat):  # interleaved: the machine's load falls on both alike
            started = time.perf_counter()
            counted = len(encoding.encode_ordinary(text))
            count_s += time.perf_counter() - started
            started = time.perf_counter()
            pieces = pattern.findall(text)
            split_s += time.perf_counter() - started
        result[name] = {"tokens": counted, "pieces": len(pieces), "tiktoken_ms": round(count_s / repeat * 1000, 2),
                        "regex_split_ms": round(split_s / repeat * 1000, 2),
                        "split_over_count": round(split_s / count_s, 2)}
    return result


def run(repeat: int) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "date": stamp(), "floor": in_fresh_process(FLOOR)}
    for name in ("o200k_base", "cl100k_base"):
        results[name] = in_fresh_process(ENCODING.format(name=name))
    results["cpu"] = split_against_count(repeat)
    results["own"] = {f"{name} {form}": in_fresh_process(OWN_COUNTER.format(name=name, form=form, repeat=max(1, repeat // 4)))
                      for name in ("o200k_base", "cl100k_base") for form in ("dict", "sorted")}
    return results


def markdown(r: dict[str, Any]) -> str:
    floor = r["floor"]["rss_mb"]
    o200k, cl100k = r["o200k_base"], r["cl100k_base"]
    cpu = r["cpu"]
    rows = "\n".join(
        f"| {name} | {r[name]['added_mb']:.1f} MB | {r[name]['build_s']:.2f} s | {cpu[name]['tiktoken_ms']} ms | "
        f"{cpu[name]['regex_split_ms']} ms | {cpu[name]['split_over_count']}x |" for name in ("o200k_base", "cl100k_base"))
    return f"""## Token tables: what they cost a worker, and the alternative (issue 25's RSS goal)

`.venv/bin/python -m bench.tokenizer_memory --write` ({r['date']}; {r['machine']}; the machine was shared with other
work: the times move, the memory does not). Every import the gateway makes at start, without any token table:
**{floor:.1f} MB**. Each encoding built on top of that, the way the gateway builds it, and the CPU of counting
{cpu['chars']:,} characters (English prose, code, some Japanese and accented Latin) with tiktoken against only
*splitting* them with the encoding's own pattern in Python (the `regex` module; a counter that matches tiktoken exactly
must split the same way before it merges anything):

| encoding | RSS added | built in | tiktoken counts in | the split alone takes | split / whole count |
|---|---|---|---|---|---|
{rows}

So with both tables loaded at start a worker holds {floor + o200k['added_mb'] + cl100k['added_mb']:.0f} MB, with
o200k_base alone {floor + o200k['added_mb']:.0f} MB: the 100 MB goal leaves {max(0.0, 100 - floor):.0f} MB for token
tables, less than either. tiktoken's Rust core keeps each vocabulary three times (the encoder map, the decoder map and a
sorted list, every token its own allocation), and the Python copy is already dropped. A counter of our own would not
need that memory, but before merging a single pair it would spend {min(cpu[n]['split_over_count'] for n in ("o200k_base", "cl100k_base"))}
to {max(cpu[n]['split_over_count'] for n in ("o200k_base", "cl100k_base"))} times tiktoken's whole count on splitting
alone (the right-hand column; about {cpu['o200k_base']['tiktoken_ms'] / max(1, cpu['o200k_base']['tokens']) * 1000:.2f} µs
a token for tiktoken), on every prompt text not counted before: on a 1,000-token prompt about as much as the 0.4 ms the
gateway's own code costs a request today (docs/profile.md), against the hot path's CPU goal of the same issue. Building
the tables on the first request of each encoding instead (the build time above, on each instance) breaks the rule that
no request pays for set-up.
{own_section(r)}"""


def own_section(r: dict[str, Any]) -> str:
    """The exact counter of our own (bench/exact_bpe.py), measured: its memory and CPU against tiktoken's."""
    own = r.get("own")
    if not own:
        return ""
    rows = "\n".join(
        f"| {key.split()[0]} | {key.split()[1]} | {o['added_mb']:.1f} MB | {'yes' if o['exact'] else '**no**'} | "
        f"{o['cold_over_tiktoken']:.1f}x | {o['warm_over_tiktoken']:.1f}x |" for key, o in own.items())
    floor = r["floor"]["rss_mb"]
    least = floor + sum(min(o["added_mb"] for key, o in own.items() if key.startswith(name))
                        for name in ("o200k_base", "cl100k_base"))
    slowest = max(o["cold_over_tiktoken"] for o in own.values())
    fastest = min(o["cold_over_tiktoken"] for o in own.values())
    return f"""
That counter, built and measured (`bench/exact_bpe.py`: the encoding's split, then pairwise merges lowest rank first,
remembered per piece; each row a fresh process on the same floor; its count of the sample checked against tiktoken's).
"dict" holds the ranks as tiktoken's Python side does, "sorted" as one sorted list and an array of ranks (no hash table).
Its CPU is the sample's count against tiktoken's, with no piece remembered (cold: a prompt text never seen) and with
every piece remembered (warm):

| encoding | ranks held as | RSS added | exact | CPU, cold | CPU, warm |
|---|---|---|---|---|---|
{rows}

With the leanest exact counter of our own, a worker would start at {least:.2f} MB with the two tables the default
deployments need ({"within" if least <= 100 else "still over"} the goal: one Python object per token is the cost that
stays), and would count new text {fastest:.1f} to {slowest:.1f} times slower than tiktoken does. The 100 MB at tiktoken's
speed would take a compact table in native code (the two vocabularies are 1.9 MB of token bytes), which is neither
tiktoken nor anything on the design card; a Rust tokenizer on PyPI tried by hand for it, `bpe-openai`
0.1.4 (GitHub's `bpe` crate; not a dependency), added 145 MB for o200k_base and 104 MB for cl100k_base, more than
tiktoken. So tiktoken's tables stay loaded at start, and the RSS goal is not met: meeting it costs the CPU of counting
(the counter above) or an instance's first requests (building on a request), and that trade is the owner's.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20, help="counts of the sample text per encoding (1-200)")
    parser.add_argument("--write", action="store_true", help="write the figures into docs/benchmarks.md")
    args = parser.parse_args(argv)
    args.repeat = max(1, min(200, args.repeat))
    results = run(args.repeat)
    print(json.dumps(results, indent=2))
    text = markdown(results)
    print(text)
    if args.write:
        update_doc("tokenizer-memory", text)
        out = ROOT / "bench" / "out"
        out.mkdir(exist_ok=True)
        (out / "tokenizer_memory.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
