"""Run one or more simulated Azure OpenAI regions.

    python -m tools.simulator --host 127.0.0.1 --port 18101 --region uksouth --api-key KEY \\
        --latency-ms 50 --token-latency-ms 10 \\
        --deployment gpt-4o:tpm=30000,model=gpt-4o-2024-11-20 \\
        --deployment text-embedding-3-small:tpm=350000,model=text-embedding-3-small

    python -m tools.simulator --regions-json regions.json     # or the JSON text itself

--deployment (repeatable) is NAME[:key=value[,key=value...]] with keys
    tpm         tokens per minute, sliding 60 s window (default 300000); with ptu=1 the rate utilisation drains at
    rpm         requests per minute (default: no request limit)
    model       model name reported in bodies and used to pick the tokenizer (default NAME)
    completion  tokens generated when the request sets no max_tokens (default --completion-tokens)
    dimensions  embedding dimensions when the request sets none (default 1536)
    ptu         1: provisioned, admitted while utilisation (a leaky bucket) is not above 100 %
    burst       provisioned: seconds of the tpm rate that make 100 % utilisation (default 60)
Without --deployment the region has gpt-4o (model gpt-4o-2024-11-20).

--regions-json is a list of regions, each served on its own port:
    [{"region": "uksouth", "port": 18101, "api_key": "KEY", "latency_ms": 50, "token_latency_ms": 10,
      "deployments": ["gpt-4o:tpm=30000,model=gpt-4o-2024-11-20", {"name": "text-embedding-3-small", "tpm": 350000}]}]
(optional per region: host, api_key, latency_ms, token_latency_ms, completion_tokens, pace_non_streaming).

Each region prints "simulator REGION listening on URL" once it accepts connections. Control endpoints (faults,
capacity, latency, stats, recorded requests, reset) are under /_sim/; see tools/simulator/control.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from tools.simulator.config import (
    DEFAULT_COMPLETION_TOKENS,
    DeploymentConfig,
    RegionConfig,
    parse_deployment,
    region_from_json,
)
from tools.simulator.server import Running, start


def _deployment(text: str) -> DeploymentConfig:
    try:
        return parse_deployment(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def load_regions(text: str) -> list[tuple[RegionConfig, str, int]]:
    if not text.lstrip().startswith("["):
        text = Path(text).read_text()
    return [region_from_json(spec) for spec in json.loads(text)]


async def serve(regions: list[tuple[RegionConfig, str, int]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running: list[Running] = []
    try:
        for config, host, port in regions:
            running.append(await start(config, host, port))
            print(f"simulator {config.region} listening on {running[-1].url}", flush=True)
        await stop.wait()
    finally:
        for region in running:
            await region.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.simulator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18101)
    parser.add_argument("--region", default="uksouth")
    parser.add_argument("--api-key", help="require this key (api-key header or Bearer); default: no auth")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="before the response headers")
    parser.add_argument("--token-latency-ms", type=float, default=10.0, help="between streamed tokens")
    parser.add_argument("--completion-tokens", type=int, default=DEFAULT_COMPLETION_TOKENS)
    parser.add_argument("--pace-non-streaming", action="store_true", help="non-streamed answers also wait per token")
    parser.add_argument("--deployment", action="append", type=_deployment, default=[])
    parser.add_argument("--regions-json", help="a JSON list of regions, or a file holding one")
    args = parser.parse_args(argv)

    try:
        if args.regions_json:
            regions = load_regions(args.regions_json)
        else:
            config = RegionConfig(
                region=args.region,
                deployments=tuple(args.deployment) or (DeploymentConfig("gpt-4o", model="gpt-4o-2024-11-20"),),
                api_key=args.api_key, latency_ms=args.latency_ms, token_latency_ms=args.token_latency_ms,
                completion_tokens=args.completion_tokens, pace_non_streaming=args.pace_non_streaming,
            )
            regions = [(config, args.host, args.port)]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        parser.error(f"bad configuration: {exc}")
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    try:
        run(serve(regions))
    except OSError as exc:  # most often: the port is taken
        print(f"simulator: cannot listen: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
