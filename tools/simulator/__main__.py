"""Run one or more simulated Azure OpenAI regions.

    python -m tools.simulator --port 18101 --region uksouth --api-key KEY --latency-ms 50 --token-latency-ms 10 \\
        --deployment gpt-4o:tpm=30000,model=gpt-4o-2024-11-20 --deployment text-embedding-3-small:tpm=350000

    python -m tools.simulator --regions-json regions.json    # [{"port": 18101, "region": "uksouth", ...}, ...]

A deployment is NAME[:key=value,...] with keys tpm, rpm, model, completion (tokens generated when the request sets no
max_tokens) and dimensions (embeddings). Each region prints "simulator REGION listening on URL" once it accepts
connections. Control endpoints (faults, capacity, latency, stats, recorded requests, reset) are under /_sim/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from tools.simulator.server import DeploymentConfig, RegionConfig, start


def parse_deployment(text: str) -> DeploymentConfig:
    name, _, options = text.partition(":")
    values: dict[str, Any] = {}
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        if key in ("tpm", "rpm", "completion", "dimensions"):
            values[{"completion": "completion_tokens"}.get(key, key)] = int(value)
        elif key == "model":
            values["model"] = value
        else:
            raise argparse.ArgumentTypeError(f"unknown deployment option {key!r}")
    return DeploymentConfig(name=name, **values)


def region_from_json(spec: dict[str, Any]) -> tuple[RegionConfig, str, int]:
    deployments = [parse_deployment(d) if isinstance(d, str) else DeploymentConfig(**d) for d in spec["deployments"]]
    config = RegionConfig(
        region=spec["region"],
        deployments={d.name: d for d in deployments},
        api_key=spec.get("api_key"),
        latency_ms=float(spec.get("latency_ms", 50)),
        token_latency_ms=float(spec.get("token_latency_ms", 10)),
    )
    return config, spec.get("host", "127.0.0.1"), int(spec["port"])


async def serve(regions: list[tuple[RegionConfig, str, int]]) -> None:
    runners = []
    for config, host, port in regions:
        runners.append(await start(config, host, port))
        print(f"simulator {config.region} listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for runner in runners:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18101)
    parser.add_argument("--region", default="uksouth")
    parser.add_argument("--api-key")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--token-latency-ms", type=float, default=10.0)
    parser.add_argument("--deployment", action="append", type=parse_deployment, default=[])
    parser.add_argument("--regions-json", help="a JSON list of regions, or a file holding one")
    args = parser.parse_args(argv)

    if args.regions_json:
        text = args.regions_json
        if not text.lstrip().startswith("["):
            text = Path(text).read_text()
        regions = [region_from_json(spec) for spec in json.loads(text)]
    else:
        deployments = args.deployment or [DeploymentConfig("gpt-4o", model="gpt-4o-2024-11-20")]
        config = RegionConfig(
            region=args.region, deployments={d.name: d for d in deployments}, api_key=args.api_key,
            latency_ms=args.latency_ms, token_latency_ms=args.token_latency_ms,
        )
        regions = [(config, args.host, args.port)]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(regions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
