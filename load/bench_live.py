"""`kvrouter bench live`: policies side by side on a LIVE emulated fleet, the same seeded workload.

For each policy: a FRESH emulated fleet (cold caches) and a router in this process, the workload
driven through the router open-loop over HTTP with streaming (load/live.py `run_policy`, as
`kvrouter demo`), then both stopped. The JSON has the `kvrouter sim` schema (load/report.py) plus,
per policy: inter-token latency (`itl_mean_s`, `itl_p50_s`, `itl_p99_s`), requests per replica,
`errors`, `wall_s`, and `inflight_over_time` (requests in flight per replica, sampled every
`step_s` from the records' [arrival, done] intervals). With --report DIR: table.md (markdown),
ttft_cdf.png and hit_rate.png (load/report.py) and inflight.png (load per replica over time).

Defaults: the `demo` preset (llama-8b-h100 slowed 4x, load/demo.py: a load that one Python process
on 2 cores can drive still queues), 16 output tokens, and the workload's default rate (round robin
at 1.2x the fleet's capacity, load/workloads/base.py) capped at MAX_DEFAULT_RATE, the most this
process drives as client, router and fleet at once without the client becoming the bottleneck.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from load.report import RequestRecord, format_table, percentile, plot_results, summarize
from load.workloads import WORKLOADS, make_workload, workload_spec
from workers.engine import PRESETS, Preset, get_preset

DEFAULT_POLICIES = "round_robin,kvaware"
MAX_DEFAULT_RATE = 20.0  # requests/s (see the module docstring)
MODEL = "kvrouter-bench"
INFLIGHT_SAMPLES = 200  # points of the in-flight series per policy


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "live",
        help="policies side by side on a live emulated fleet: hit rate, TTFT, ITL, load per replica",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS), help="seeded workload")
    parser.add_argument(
        "--policies", default=DEFAULT_POLICIES, help=f"policy specs (default {DEFAULT_POLICIES})"
    )
    parser.add_argument("--replicas", type=int, default=4, help="emulated replicas (default 4)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per policy (20)")
    parser.add_argument(
        "--rate", type=float, help=f"requests/s (default: the workload's, <= {MAX_DEFAULT_RATE:g})"
    )
    parser.add_argument("--output-tokens", type=int, default=16, help="output tokens per request (16)")
    parser.add_argument(
        "--preset", default="demo", choices=["demo", *sorted(PRESETS)], help="engine preset (default demo)"
    )
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    parser.add_argument("--json", type=Path, required=True, help="write the results as JSON here")
    parser.add_argument("--report", type=Path, help="write table.md and PNG plots into this folder")
    parser.set_defaults(func=run)


def _preset(name: str) -> Preset:
    if name == "demo":
        from load.demo import demo_preset

        return demo_preset()
    return get_preset(name)


def _output_params(workload: str, tokens: int) -> dict[str, Any]:
    """The workload's output-length parameter set to `tokens` (multi-turn calls it answer_tokens)."""
    fields = {f.name for f in dataclasses.fields(WORKLOADS[workload])}
    for name in ("answer_tokens", "output_tokens"):
        if name in fields:
            return {name: tokens}
    return {}


def inflight_series(
    records: Sequence[RequestRecord], replicas: Sequence[str], end_s: float, samples: int = INFLIGHT_SAMPLES
) -> dict[str, Any]:
    """Requests in flight per replica at `samples` evenly spaced times in [0, end_s]."""
    step = end_s / samples if end_s > 0 else 1.0
    counts: dict[str, list[int]] = {name: [0] * (samples + 1) for name in replicas}
    for r in records:
        row = counts.setdefault(r.replica, [0] * (samples + 1))
        first = max(0, math.ceil(r.arrival_s / step))
        last = min(samples, math.floor(r.done_s / step))
        for i in range(first, last + 1):
            row[i] += 1
    return {"step_s": step, "replicas": counts}


def _itl(values: Sequence[float]) -> dict[str, float]:
    return {
        "itl_mean_s": sum(values) / len(values) if values else math.nan,
        "itl_p50_s": percentile(values, 50),
        "itl_p99_s": percentile(values, 99),
    }


def plot_inflight(series: Mapping[str, Mapping[str, Any]], out_dir: Path, *, title: str) -> Path:
    """One panel per policy: requests in flight per replica over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.6 * len(series)), sharex=True, squeeze=False)
    for ax, (spec, s) in zip(axes[:, 0], series.items(), strict=True):
        for name, row in sorted(s["replicas"].items()):
            ax.plot([i * s["step_s"] for i in range(len(row))], row, label=name, linewidth=1)
        ax.set_title(spec, fontsize=9)
        ax.set_ylabel("in flight")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("seconds")
    fig.suptitle(f"Requests in flight per replica — {title}", fontsize=10)
    path = out_dir / "inflight.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


async def bench(
    workload: str,
    specs: Sequence[str],
    *,
    replicas: int,
    duration_s: float,
    rate: float | None,
    output_tokens: int,
    preset: Preset,
    seed: int,
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """The JSON report (sim schema + live extras) and the TTFTs per policy."""
    from load.live import run_policy, to_records
    from load.sim import prepare

    params = _output_params(workload, output_tokens)
    if rate is None:
        rate = min(
            MAX_DEFAULT_RATE,
            workload_spec(workload, params).default_rate(replicas, service_s=preset.service_s),
        )
    requests = make_workload(
        workload, seed=seed, replicas=replicas, rate=rate, duration_s=duration_s, model=MODEL, params=params
    )
    if not requests:
        raise ValueError("the workload produced no request: raise --duration or --rate")
    logical = {p.source.request_id: p.logical_cached_tokens for p in prepare(requests, preset.block_size)}
    print(
        f"bench live: {workload}, {len(requests)} requests at {rate:.1f} req/s over {duration_s:g} s, "
        f"{replicas} x {preset.name}, policies {', '.join(specs)}",
        file=sys.stderr,
    )
    names = [f"replica-{i}" for i in range(replicas)]
    results: dict[str, Any] = {}
    ttfts: dict[str, list[float]] = {}
    for spec in specs:
        live, elapsed = await run_policy(
            spec, requests, preset, replicas, model=MODEL, deadline_s=duration_s + 60.0
        )
        records = to_records(live, logical)
        busy: dict[str, float] = dict.fromkeys(names, 0.0)
        for rec in records:
            busy[rec.replica] = busy.get(rec.replica, 0.0) + rec.e2e_s  # request-seconds: live busy time
        figures = summarize(records, busy, makespan_s=elapsed, rejected=len(live) - len(records))
        figures.update(
            _itl([r.inter_token_s for r in live if r.error is None and r.inter_token_s is not None])
        )
        errors = [r.error for r in live if r.error is not None]
        figures["errors"] = len(errors)
        if errors:
            print(f"  {len(errors)} failed, e.g. {errors[0]}", file=sys.stderr)
        figures["wall_s"] = round(elapsed, 2)
        figures["inflight_over_time"] = inflight_series(
            records, names, max((r.done_s for r in records), default=0)
        )
        results[spec] = figures
        ttfts[spec] = [r.ttft_s for r in records]
    report = {
        "workload": workload,
        "replicas": replicas,
        "requests": len(requests),
        "rate": rate,
        "duration_s": duration_s,
        "output_tokens": output_tokens,
        "preset": preset.name,
        "seed": seed,
        "mode": "live",
        "results": results,
    }
    return report, ttfts


def run(args: argparse.Namespace) -> int:
    from router.policies.registry import checked_policy_specs

    try:
        specs = checked_policy_specs(args.policies)
    except ValueError as exc:
        print(f"kvrouter bench live: {exc}", file=sys.stderr)
        return 2
    if args.replicas < 1 or args.output_tokens < 1 or not 0 < args.duration <= 600:
        print(
            "kvrouter bench live: need --replicas >= 1, --output-tokens >= 1, 0 < --duration <= 600",
            file=sys.stderr,
        )
        return 2
    if args.rate is not None and not args.rate > 0:
        print("kvrouter bench live: --rate must be positive", file=sys.stderr)
        return 2
    import uvloop

    try:
        report, ttfts = uvloop.run(
            bench(
                args.workload,
                specs,
                replicas=args.replicas,
                duration_s=args.duration,
                rate=args.rate,
                output_tokens=args.output_tokens,
                preset=_preset(args.preset),
                seed=args.seed,
            )
        )
    except ValueError as exc:
        print(f"kvrouter bench live: {exc}", file=sys.stderr)
        return 2
    results = report["results"]
    print(format_table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    if args.report is not None:
        title = f"{args.workload}, {args.replicas} replicas (live)"
        args.report.mkdir(parents=True, exist_ok=True)
        table = args.report / "table.md"
        table.write_text(format_table(results, markdown=True) + "\n")
        written = [table, *plot_results(ttfts, results, args.report, title=title)]
        written.append(
            plot_inflight({s: f["inflight_over_time"] for s, f in results.items()}, args.report, title=title)
        )
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    return 1 if any(f["errors"] for f in results.values()) else 0
