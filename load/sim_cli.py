"""`kvrouter sim`: every policy over the same seeded workload on a virtual clock, side by side.

The default rate is the workload's `default_rate` for the fleet (load/workloads/base.py), priced by
the engine preset's `service_s`: the rate at which round robin's work (the prefill it cannot reuse,
plus decode) is 1.2x what the fleet can do, so round robin saturates while a policy that keeps
prefixes where they are cached has room to spare.

To predict a live run (`kvrouter bench live`), give the flags its JSON's `sim_command` lists (rate,
--duration and --requests, --output-tokens, --preset demo, and --kv-transfer and --settle as the live
run had them; the router's prefill speed is the preset's by default, as bench live tells its kvrouter
serve): they generate the very same requests and give the simulated router what the live one knows.
`--compare-live FILE` then prints how far each figure is from the live one (load/sim_vs_live.py; with
the same --settle on both sides, the settled TTFT mean and p99 too) and refuses a live run of other
requests.
Besides the shared schema each policy gets `metrics_hit_rate`: the engines' prefix-cache counters
(hits / queries, what a replica's /metrics reports, and what bench live's `hit_rate` reads), and
`ttft_step_floor_mean_s` (the `step floor s` column): the mean TTFT without queueing, each request's
rest of the step running on its replica at arrival plus the next step (load/report.py); TTFT above it
is queueing, TTFT equal to it can only drop with shorter steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from load.bench_live import output_params, preset_named
from load.report import add_settle_argument, draw_progress, format_table, plot_results, summarize
from load.sim import DEFAULT_COPY_BYTES_PER_S, DEFAULT_SCRAPE_INTERVAL_S, SimConfig, Simulation, prepare
from load.sim_vs_live import TOLERANCE, compare, format_comparison, workload_digest
from load.workloads import WORKLOADS, make_workload
from router.policies.registry import checked_policy_specs
from workers.engine import PRESETS

DEFAULT_POLICIES = "round_robin,random,least_load,power_of_two,chwbl,sglang,llmd,dynamo,kvaware"


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "sim",
        help="simulate policies side by side on a virtual clock (same workload, same engines)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workload", choices=sorted(WORKLOADS), help="a built-in seeded workload")
    source.add_argument("--trace", type=Path, help="replay a trace file instead")
    parser.add_argument("--trace-format", choices=["mooncake"], default="mooncake", help="trace format")
    parser.add_argument("--replicas", type=int, default=8, help="replicas in the fleet (default 8)")
    parser.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated policy specs")
    parser.add_argument("--rate", type=float, help="requests a second (default: where round robin saturates)")
    parser.add_argument("--requests", type=int, default=2000, help="requests to simulate (default 2000)")
    parser.add_argument(
        "--duration", type=float, help="also stop at arrivals this many seconds in (as bench live does)"
    )
    parser.add_argument(
        "--output-tokens", type=int, help="output tokens per request (default: the workload's own)"
    )
    parser.add_argument(
        "--preset",
        default="llama-8b-h100",
        choices=["demo", *sorted(PRESETS)],
        help="replica preset (demo: llama-8b-h100 slowed 4x, bench live's default)",
    )
    parser.add_argument(
        "--kv-transfer",
        choices=["p2p", "warmup"],
        default="p2p",
        help="how kvaware's hot-prefix migration copies a prefix: p2p KV copies at 25 GB/s, or warm-up "
        "prefills on the target (kvrouter serve's default for backends; default p2p)",
    )
    parser.add_argument("--scrape-interval", type=float, default=DEFAULT_SCRAPE_INTERVAL_S, help="seconds")
    parser.add_argument(
        "--router-prefill-rate",
        type=float,
        metavar="TOKENS_PER_S",
        help="prefill speed the router assumes (default: the preset's, as bench live tells its kvrouter "
        "serve with --prefill-rate; give kvrouter serve's own default, 25000, to simulate a router that "
        "was not told)",
    )
    parser.add_argument("--seed", type=int, default=0, help="workload and simulation seed (default 0)")
    add_settle_argument(parser)
    parser.add_argument("--json", type=Path, help="write results as JSON here")
    parser.add_argument("--plots", type=Path, help="write PNG plots (TTFT CDF, hit rate) into this folder")
    parser.add_argument(
        "--compare-live", type=Path, metavar="FILE", help="a `kvrouter bench live` JSON of the same requests"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.replicas <= 0 or args.requests <= 0:
        print("kvrouter sim: --replicas and --requests must be positive", file=sys.stderr)
        return 2
    if args.router_prefill_rate is not None and not args.router_prefill_rate > 0:
        print("kvrouter sim: --router-prefill-rate must be positive", file=sys.stderr)
        return 2
    if args.output_tokens is not None and args.output_tokens < 1:
        print("kvrouter sim: --output-tokens must be positive", file=sys.stderr)
        return 2
    if args.settle is not None and not args.settle >= 0:
        print("kvrouter sim: --settle must be >= 0", file=sys.stderr)
        return 2
    if args.trace is not None and (args.duration is not None or args.output_tokens is not None):
        print("kvrouter sim: --duration and --output-tokens need --workload", file=sys.stderr)
        return 2
    try:
        specs = checked_policy_specs(args.policies)
    except ValueError as exc:
        print(f"kvrouter sim: {exc}", file=sys.stderr)
        return 2
    live: dict[str, Any] | None = None
    if args.compare_live is not None:
        try:
            live = json.loads(args.compare_live.read_text())
        except (OSError, ValueError) as exc:
            print(f"kvrouter sim: --compare-live: {exc}", file=sys.stderr)
            return 2
    preset = preset_named(args.preset)
    rate = args.rate
    if args.trace is not None:
        from load.trace import load_mooncake

        requests = load_mooncake(args.trace, limit=args.requests)
        name = f"trace:{args.trace.name}"
    else:
        name = args.workload
        try:
            requests = make_workload(
                name,
                seed=args.seed,
                replicas=args.replicas,
                rate=rate,
                requests=args.requests,
                duration_s=args.duration,
                prefill_tokens_per_s=preset.prefill_tokens_per_s,
                service_s=preset.service_s,
                params=None if args.output_tokens is None else output_params(name, args.output_tokens),
            )
        except ValueError as exc:
            print(f"kvrouter sim: {exc}", file=sys.stderr)
            return 2
    if not requests:
        print("kvrouter sim: the workload produced no request", file=sys.stderr)
        return 2
    digest = workload_digest(requests)
    if live is not None and live.get("workload_digest") != digest:
        print(
            f"kvrouter sim: --compare-live {args.compare_live} drove other requests ({live.get('requests')} "
            f"at {live.get('rate')} req/s, digest {live.get('workload_digest')}; here {len(requests)}, "
            f"digest {digest}): give the flags of its sim_command",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    prepared = prepare(requests, preset.block_size)
    span = requests[-1].arrival_s - requests[0].arrival_s
    offered = len(requests) / span if span > 0 else float("inf")
    print(
        f"{name}: {len(requests)} requests at {offered:.1f} req/s over {args.replicas} x {preset.name}"
        f" (prepared in {time.perf_counter() - started:.1f} s)",
        file=sys.stderr,
    )
    results: dict[str, dict[str, Any]] = {}
    ttfts: dict[str, list[float]] = {}
    for spec in specs:
        t0 = time.perf_counter()
        sim = Simulation(
            spec,
            SimConfig(
                replicas=args.replicas,
                preset=preset,
                scrape_interval_s=args.scrape_interval,
                seed=args.seed,
                copy_bytes_per_s=None if args.kv_transfer == "warmup" else DEFAULT_COPY_BYTES_PER_S,
                router_prefill_tokens_per_s=args.router_prefill_rate,
            ),
        )

        shown = [-1]

        def progress(done: int, total: int, spec: str = spec, shown: list[int] = shown) -> None:
            # Redraw one line at most every 1% of the requests, and never twice for the same count.
            if done != shown[0] and (done - shown[0] >= max(1, total // 100) or done == total):
                first, shown[0] = shown[0] == -1, done
                draw_progress(f"  {spec:<24} {done:>7}/{total}", keep=first or done == total)

        outcome = sim.run(prepared, progress)
        figures = summarize(
            outcome.records,
            outcome.busy_s,
            makespan_s=outcome.makespan_s,
            rejected=outcome.rejected,
            settle_s=args.settle,
        )
        metrics = [engine.metrics() for engine in sim.engines.values()]
        queries = sum(m.prefix_cache_queries for m in metrics)
        figures["metrics_hit_rate"] = sum(m.prefix_cache_hits for m in metrics) / queries if queries else 0.0
        figures["sim_wall_s"] = round(time.perf_counter() - t0, 2)
        figures["engine_steps"] = outcome.steps
        figures["engine_busy_s"] = sum(outcome.busy_s.values())  # / engine_steps: the mean step
        if sim.controller is not None:
            outcomes = [o for _, _, o in outcome.migrations]
            figures["migrations_completed"] = outcomes.count("completed")
            figures["migrations_failed"] = outcomes.count("failed")
        results[spec] = figures
        ttfts[spec] = [r.ttft_s for r in outcome.records]
        print(f"  {figures['sim_wall_s']:.1f} s", file=sys.stderr)
    print(format_table(results))
    report = {
        "workload": name,
        "replicas": args.replicas,
        "requests": len(requests),
        "rate": offered,
        "preset": preset.name,
        "seed": args.seed,
        "workload_digest": digest,
        "results": results,
    }
    if live is not None:
        comparison = compare(live["results"], results)
        report["live_comparison"] = {
            "live": str(args.compare_live),
            "tolerance": TOLERANCE,
            "policies": comparison,
        }
        print(f"\nsimulated vs live ({args.compare_live}):")
        print(format_comparison(comparison, markdown=False))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plots is not None:
        for path in plot_results(ttfts, results, args.plots, title=f"{name}, {args.replicas} replicas"):
            print(f"wrote {path}", file=sys.stderr)
    return 0
