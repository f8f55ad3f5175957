"""The `kvrouter` command line: one entry point, subcommands registered as they arrive.

Each subcommand lives in its own module exposing `register(subparsers)`, which adds its parser and sets
`func` to a callable taking the parsed arguments and returning an exit code. Heavy imports happen
inside those callables, so `kvrouter --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from router import __version__

DESCRIPTION = """\
kvrouter: a cache-aware load balancer and router for fleets of vLLM replicas.

It sends each request to the replica whose KV cache already holds its prompt's prefix, while
keeping the fleet's load balanced, and shows what the fleet pays for recomputing prefills."""

EPILOG = """\
examples:
  kvrouter sim --workload shared-prefix --replicas 8 --json reports/sim.json --plots reports/sim
  kvrouter bench live --workload multi-turn --policies round_robin,kvaware --json reports/live.json
  kvrouter bench index --blocks 1000000 --replicas 16 --json reports/index.json

See README.md and docs/ for the architecture, benchmarks and operations."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvrouter",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kvrouter {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = commands.add_parser(
        "bench",
        help="measure kvrouter's parts side by side and write JSON reports",
        description="Benchmarks that print ratios measured side by side in one run, and write JSON.",
    )
    bench_commands = bench.add_subparsers(dest="bench", metavar="BENCHMARK")
    from load import bench_core, bench_index, bench_live, bench_proxy, bench_vllm

    bench_core.register(bench_commands)
    bench_index.register(bench_commands)
    bench_proxy.register(bench_commands)
    bench_live.register(bench_commands)
    bench_vllm.register(bench_commands)
    from workers.emulator import bench as bench_emulator

    bench_emulator.register(bench_commands)
    bench.set_defaults(func=lambda _args: _missing(bench))

    from load import demo, sim_cli

    sim_cli.register(commands)
    demo.register(commands)
    from workers.emulator import cli as emulate_cli

    emulate_cli.register(commands)
    from workers.vllm import cli as vllm_cli

    vllm_cli.register(commands)
    from router import serve_cli

    serve_cli.register(commands)
    return parser


def _missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    code = func(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
