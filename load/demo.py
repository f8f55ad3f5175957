"""`kvrouter demo` (and `make demo`): the router in front of an embedded emulated fleet, side by side.

What it does, in about two minutes on 2 cores:
1. builds one seeded mixed workload — SGLang-style shared prefixes, multi-turn chats with growing
   histories, and a Zipf hot-prefix group — and sets its rate so that the work a perfect cache would
   leave (the logical limit, priced by the demo preset's `service_s`) fills `TARGET_UTILIZATION` of
   the fleet: a policy that reuses what can be reused has headroom, while round robin, which
   recomputes each prefix on every replica, does not;
2. for each policy (round robin, then kvaware): starts a FRESH emulated fleet (cold caches) and a
   router in this process, drives the same requests through the router open-loop over HTTP with
   streaming (load/live.py), and stops both;
3. prints a table: physical hit rate (the engines' `cached_tokens`), the logical limit (what one
   infinite cache would have reused), TTFT p50/p99 and output throughput.

The demo preset is `llama-8b-h100` with every step-time coefficient multiplied by `SLOWDOWN` (a GPU a
quarter as fast) and outputs shortened to `OUTPUT_TOKENS`: real GPU speeds need hundreds of requests a
second to show queueing, more than one Python process can push through an emulator and a router
while also being the client. Slowing the engines keeps every ratio the same — what matters is how
much prefill each policy leaves the fleet to do — at a load this machine can drive.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from load.live import run_policy, to_records
from load.report import format_table, summarize
from load.sim import prepare
from load.workloads import WorkloadRequest, make_workload, workload_spec
from workers.engine import Preset, get_preset

SLOWDOWN = 4.0  # the demo GPU: a quarter of an H100's speed (see the module docstring)
OUTPUT_TOKENS = 16  # short answers: the demo is about prefill, and each token is an SSE chunk to relay
REPLICAS = 4
# Share of the fleet that the logical limit's work fills. `service_s` leaves out the per-step fixed
# cost that small batches pay, so the real load runs higher than this.
TARGET_UTILIZATION = 0.5
MODEL = "kvrouter-demo"
DEFAULT_POLICIES = ("round_robin", "kvaware")
# Workload mix: (name, share of the rate, parameter overrides). Fewer shared-prefix groups than
# SGLang's 64 so a 30-second run sees each group often enough for reuse to matter.
MIX: tuple[tuple[str, float, dict[str, Any]], ...] = (
    ("shared-prefix", 0.4, {"groups": 16, "output_tokens": OUTPUT_TOKENS}),
    ("multi-turn", 0.3, {"answer_tokens": OUTPUT_TOKENS, "think_time_s": 5.0}),
    ("hot-prefix", 0.3, {"output_tokens": OUTPUT_TOKENS}),
)


def demo_preset() -> Preset:
    base = get_preset("llama-8b-h100")
    return dataclasses.replace(
        base,
        name="demo",
        base_s=base.base_s * SLOWDOWN,
        s_per_prefill_token=base.s_per_prefill_token * SLOWDOWN,
        s_per_decode_seq=base.s_per_decode_seq * SLOWDOWN,
        s_per_context_token=base.s_per_context_token * SLOWDOWN,
        source=f"llama-8b-h100 slowed {SLOWDOWN:g}x for the demo (load/demo.py)",
    )


def _mix(replicas: int, duration_s: float, seed: int, scale: float, service: Preset) -> list[WorkloadRequest]:
    requests: list[WorkloadRequest] = []
    for name, share, params in MIX:
        rate = scale * share * workload_spec(name, params).default_rate(replicas, service_s=service.service_s)
        requests += make_workload(
            name, seed=seed, replicas=replicas, rate=rate, duration_s=duration_s, model=MODEL, params=params
        )
    return sorted(requests, key=lambda r: r.arrival_s)


def ideal_seconds(requests: Sequence[WorkloadRequest], preset: Preset) -> float:
    """Engine seconds the requests cost if every reusable prefix is reused (the logical limit)."""
    total = 0.0
    for p in prepare(requests, preset.block_size):
        prompt = len(p.token_ids)
        total += preset.service_s(prompt - p.logical_cached_tokens, prompt, p.source.max_tokens)
    return total


def build_workload(preset: Preset, replicas: int, duration_s: float, seed: int) -> list[WorkloadRequest]:
    """The mixed workload at the rate where ideal reuse fills TARGET_UTILIZATION of the fleet."""
    probe = _mix(replicas, duration_s, seed, 1.0, preset)
    scale = TARGET_UTILIZATION * replicas * duration_s / ideal_seconds(probe, preset)
    return _mix(replicas, duration_s, seed, scale, preset)


async def run_demo(policies: Sequence[str], duration_s: float, seed: int) -> dict[str, dict[str, Any]]:
    preset = demo_preset()
    requests = build_workload(preset, REPLICAS, duration_s, seed)
    logical = {p.source.request_id: p.logical_cached_tokens for p in prepare(requests, preset.block_size)}
    print(
        f"kvrouter demo: {len(requests)} requests (shared prefixes, multi-turn chats, a hot prefix) over "
        f"{duration_s:g} s, {REPLICAS} emulated replicas, streaming through the router",
        file=sys.stderr,
    )
    table: dict[str, dict[str, Any]] = {}
    for policy in policies:
        results, elapsed = await run_policy(policy, requests, preset, REPLICAS, model=MODEL)
        records = to_records(results, logical)
        busy: dict[str, float] = defaultdict(float)
        for rec in records:
            busy[rec.replica] += rec.e2e_s  # request-seconds per replica: the live stand-in for busy time
        figures = summarize(records, busy, makespan_s=elapsed, rejected=len(results) - len(records))
        errors = [r.error for r in results if r.error is not None]
        if errors:
            figures["errors"] = len(errors)
            print(f"  {len(errors)} failed, e.g. {errors[0]}", file=sys.stderr)
        table[policy] = figures
    return table


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "demo",
        help="an emulated fleet, the router, and a mixed workload through it with two policies",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help="policy specs to compare")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per policy (30)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from router.policies.registry import checked_policy_specs

    try:
        policies = checked_policy_specs(args.policies)
    except ValueError as exc:
        print(f"kvrouter demo: {exc}", file=sys.stderr)
        return 2
    if not 0 < args.duration <= 300:
        print("kvrouter demo: --duration must be in (0, 300] seconds", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep the demo usable without it
        pass
    table = asyncio.run(run_demo(policies, args.duration, args.seed))
    print()
    print(format_table(table))
    print(
        "\nhit: prompt tokens the engines served from cache; logical: what one infinite cache would have "
        "reused (the ceiling); the gap is the amnesia tax."
    )
    failed = sum(int(f.get("errors", 0)) for f in table.values())
    return 1 if failed else 0
