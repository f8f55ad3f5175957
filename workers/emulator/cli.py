"""`kvrouter emulate`: N emulated vLLM replicas served from one process (uvloop) until SIGINT/SIGTERM.

Replica i listens on http://HOST:PORT+i; with --kv-events it publishes on tcp://HOST:Q+i and answers
replay requests on tcp://HOST:Q+N+i (Q = --kv-events-port). Port 0 makes every port ephemeral. One line
per replica is printed once all are up:
    replica 0 http://127.0.0.1:8100 events tcp://127.0.0.1:5557 replay tcp://127.0.0.1:5561
then `ready`. On SIGINT or SIGTERM every replica stops (in-flight requests aborted) and it exits 0.

Faults (workers/emulator/faults.py) can be set at start with --fault, repeatable:
    --fault latency_s=0.2            every replica
    --fault 1:error_rate=0.1,hang=1  replica 1 only
and changed at run time with POST /kvrouter/faults.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from workers.engine import PRESETS


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "emulate",
        help="serve emulated vLLM replicas (OpenAI API, /metrics, KV events) from one process",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--replicas", type=int, default=1, help="replicas to serve (default 1)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8100, help="first HTTP port; 0: ephemeral (default 8100)")
    parser.add_argument(
        "--profile", default="tiny", choices=sorted(PRESETS), help="engine preset (default tiny)"
    )
    parser.add_argument("--model", help="served model name (default kvrouter-emulated)")
    parser.add_argument(
        "--hash-algo", choices=["mmh3", "sha256"], default="mmh3", help="block hash (sha256: vLLM's exact)"
    )
    parser.add_argument("--block-size", type=int, help="override the preset's block size")
    parser.add_argument("--num-gpu-blocks", type=int, help="override the preset's KV capacity in blocks")
    parser.add_argument("--max-model-len", type=int, help="override the preset's max_model_len")
    parser.add_argument("--kv-events", action="store_true", help="publish KV-cache events on ZMQ")
    parser.add_argument(
        "--kv-events-port", type=int, default=5557, help="first PUB port; 0: ephemeral (default 5557)"
    )
    parser.add_argument(
        "--kv-events-encoding",
        choices=["map", "array"],
        default="map",
        help="map: vLLM 0.26+; array: 0.11-0.24",
    )
    parser.add_argument("--kv-events-topic", default="", help='ZMQ topic (default "", as vLLM)')
    parser.add_argument(
        "--kv-bandwidth",
        type=float,
        help="bytes/s of a modeled P2P KV link (default: real bytes over loopback)",
    )
    parser.add_argument("--fault", action="append", default=[], metavar="[I:]K=V,...", help="inject a fault")
    parser.add_argument("--seed", type=int, default=0, help="seed of the error-rate fault (default 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from workers.emulator.faults import Faults, parse_fault_spec

    if args.replicas < 1:
        print("--replicas must be positive", file=sys.stderr)
        return 2
    faults: dict[int, Faults] = {}
    try:
        for spec in args.fault:
            index, fault = parse_fault_spec(spec)
            for i in range(args.replicas) if index is None else [index]:
                faults[i] = fault
    except ValueError as exc:
        print(f"--fault: {exc}", file=sys.stderr)
        return 2
    import uvloop

    try:
        return uvloop.run(_serve(args, faults))
    except (OSError, ValueError) as exc:  # a port in use, a bad override
        print(f"kvrouter emulate: {exc}", file=sys.stderr)
        return 1


async def _serve(args: argparse.Namespace, faults: dict[int, Any]) -> int:
    from workers.emulator.fleet import EmulatedFleet
    from workers.emulator.replica import DEFAULT_MODEL

    fleet = EmulatedFleet(
        args.replicas,
        args.profile,
        model=args.model or DEFAULT_MODEL,
        kv_events=args.kv_events,
        kv_events_encoding=args.kv_events_encoding,
        kv_events_topic=args.kv_events_topic,
        hash_algo=args.hash_algo,
        host=args.host,
        port=args.port,
        kv_events_port=args.kv_events_port,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        max_model_len=args.max_model_len,
        kv_bandwidth=args.kv_bandwidth,
        faults=faults,
        seed=args.seed,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with fleet:
        for i, replica in enumerate(fleet.replicas):
            line = f"replica {i} {replica.url}"
            if replica.events_endpoint is not None:
                line += f" events {replica.events_endpoint} replay {replica.replay_endpoint}"
            print(line)
        print(
            f"ready: {args.replicas} replica(s), preset {fleet.preset.name}, model {fleet.model}", flush=True
        )
        await stop.wait()
    return 0
