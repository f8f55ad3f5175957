"""`kvrouter bench live`: routers side by side on a LIVE emulated fleet, the same seeded workload.

One row per kvrouter policy (`--policies`), and with --peers one per peer router users would pick
instead (load/peers.py): `smg:cache_aware` (the SGLang model gateway), `vllm-router:cache_aware` and
`vllm-router:kv_aware` (vLLM's router, the latter fed by the replicas' ZMQ KV events). For each row:
a FRESH emulated fleet in this process (cold caches, KV events on for every row, so every router
sees the same fleet), the router as a process of its own (`kvrouter serve --policy SPEC`, or the
peer's binary), the workload driven through it open-loop over HTTP with streaming (load/live.py
`drive`), then the router and the fleet stopped — on every path out, Ctrl-C and SIGTERM included.

Every figure is measured the same way for every row, so that no row depends on its router's
cooperation (kvrouter's own metrics have no counterpart in the peers):
    client side    TTFT, end-to-end latency, inter-token latency (`itl_*`), output tokens/s, errors,
                   and `request_hit_rate` (the answers' `usage.prompt_tokens_details.cached_tokens`)
    replica side   `hit_rate`, requests and busy request-seconds per replica (`imbalance`),
                   `replica_ttft_mean_s` (TTFT from the engine's arrival), and `inflight_over_time`
                   (running + waiting, sampled), from each replica's /metrics (load/replica_metrics.py)
    router process `router_cpu_ms_per_request` (its CPU while the workload ran, from /proc); for
                   kvrouter's rows also `migrations_completed` / `migrations_failed`, the hot-prefix
                   migrations it ran (its /metrics: a warm-up is a request the replicas count too)
`logical_hit_rate` is the workload's ceiling (load/sim.py `prepare`). A row that cannot run (binary
missing, a flag it lacks, a crash, no answers) keeps its place with an `error`. The JSON has the
`kvrouter sim` schema (load/report.py) plus, per row, `router`, `command`, `errors`, `wall_s` and the
extras above, and at the top `sim_command`: the `kvrouter sim` run of the very same requests (rate,
count, preset, output length), to compare with (`kvrouter sim ... --compare-live FILE`). With
--report DIR: table.md, ttft_cdf.png, hit_rate.png and inflight.png.

Repeated measurements (--rounds R, default 1): round r (0-based) runs every row again, each on a
fresh fleet, with the workload seeded `--seed + r`; rows run round-major (every row of round 0, then
every row of round 1, ...), so that the shared machine's slow drift touches every row alike. With
R > 1 each row's entry in `results` holds the MEDIAN over the rounds it ran of every numeric figure
(`median_of_rounds`: those rounds), its other fields (`requests_per_replica`, `inflight_over_time`,
`command`; the TTFT CDF too) from one round (`series_from_round`: the first that ran; `notes` from all),
`seeds`, and `rounds`: the figures of each round, numbers only (with `error` where it failed; the
failures again in `failures`). A row that failed in every round keeps its `error` as with one round.
At the top, `paired`: per row and round the ratio of its `ttft_mean_s` to the reference row's (the
first of --policies) and the difference of their `hit_rate`s, and the median, min and max of those
over the rounds where both ran; pairing by round cancels the workload's seed-to-seed variation, so
"A ties B within noise" reads from the spread of A/B, not from two single runs. Also `rounds`, `seeds`,
`requests_per_round`, `workload_digests` and `sim_commands` (one per round); `requests`, `seed`,
`offered_rate`, `workload_digest` and `sim_command` stay round 0's. The table shows the medians, and for
hit and TTFT mean `median (min-max)` over rounds, then the paired table.

Defaults: the `demo` preset (llama-8b-h100 slowed 4x, load/demo.py: a load that one Python process
on 2 cores can drive still queues), 16 output tokens, and the workload's default rate (round robin
at 1.2x the fleet's capacity, load/workloads/base.py) capped at MAX_DEFAULT_RATE, the most this
process drives as client and fleet at once without the client becoming the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from load.peers import PEER_SPECS, Target, add_peer_arguments
from load.report import add_settle_argument, format_table, layout_table, percentile, plot_results, summarize
from load.sim import DEFAULT_COPY_BYTES_PER_S
from load.sim_vs_live import workload_digest
from load.workloads import WORKLOADS, make_workload, workload_spec
from workers.engine import PRESETS, Preset, get_preset

if TYPE_CHECKING:
    from load.live import LiveResult
    from load.replica_metrics import ReplicaCounters
    from load.workloads import WorkloadRequest

DEFAULT_POLICIES = "round_robin,kvaware"
MAX_DEFAULT_RATE = 20.0  # requests/s (see the module docstring)
MODEL = "kvrouter-bench"
INFLIGHT_SAMPLES = 200  # points of the in-flight series per row (at most one every 50 ms)
# The readiness probe: a 1-token request, sent before the replicas' counters are read for the run.
READY_BODY = json.dumps({"model": MODEL, "prompt": "kvrouter bench live: ready?", "max_tokens": 1}).encode()


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "live",
        help="routers side by side on a live emulated fleet: hit rate, TTFT, ITL, load per replica",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS), help="seeded workload")
    parser.add_argument(
        "--policies", default=DEFAULT_POLICIES, help=f"kvrouter policy specs (default {DEFAULT_POLICIES})"
    )
    add_peer_arguments(parser)
    parser.add_argument("--replicas", type=int, default=4, help="emulated replicas (default 4)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per row (20)")
    parser.add_argument(
        "--rate", type=float, help=f"requests/s (default: the workload's, <= {MAX_DEFAULT_RATE:g})"
    )
    parser.add_argument("--output-tokens", type=int, default=16, help="output tokens per request (16)")
    parser.add_argument(
        "--preset", default="demo", choices=["demo", *sorted(PRESETS)], help="engine preset (default demo)"
    )
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    parser.add_argument(
        "--kv-transfer",
        choices=["warmup", "p2p"],
        default="warmup",
        help="how kvrouter's hot-prefix migrations put a prefix on a replica: warmup (a 1-token prefill "
        "on the target; kvrouter serve's default) or p2p (a KV copy from the holder over the emulator's "
        "export/import, modeled at the simulator's 25 GB/s: no compute on the target); default warmup",
    )
    add_settle_argument(parser)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="R",
        help="run every row R times, round r with seed --seed + r, round-major (default 1); with R > 1 "
        "each figure is the median over rounds (per-round figures in `rounds`), the table shows "
        "median (min-max) for hit and TTFT mean, and `paired` gives each row's per-round TTFT-mean "
        "ratio and hit-rate difference to the first --policies row, with median, min and max",
    )
    parser.add_argument("--json", type=Path, required=True, help="write the results as JSON here")
    parser.add_argument("--report", type=Path, help="write table.md and PNG plots into this folder")
    parser.set_defaults(func=run)


def preset_named(name: str) -> Preset:
    """An engine preset by name, `demo` included (load/demo.py), for bench live and the simulator."""
    if name == "demo":
        from load.demo import demo_preset

        return demo_preset()
    return get_preset(name)


def output_params(workload: str, tokens: int) -> dict[str, Any]:
    """The workload's output-length parameter set to `tokens` (multi-turn calls it answer_tokens)."""
    fields = {f.name for f in dataclasses.fields(WORKLOADS[workload])}
    for name in ("answer_tokens", "output_tokens"):
        if name in fields:
            return {name: tokens}
    return {}


def _itl(values: Sequence[float]) -> dict[str, float]:
    return {
        "itl_mean_s": sum(values) / len(values) if values else math.nan,
        "itl_p50_s": percentile(values, 50),
        "itl_p99_s": percentile(values, 99),
    }


def plot_inflight(series: Mapping[str, Mapping[str, Any]], out_dir: Path, *, title: str) -> Path:
    """One panel per row: requests in flight per replica over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.6 * len(series)), sharex=True, squeeze=False)
    for ax, (spec, s) in zip(axes[:, 0], series.items(), strict=True):
        times = s.get("times_s")
        for name, row in sorted(s["replicas"].items()):
            xs = times if times is not None else [i * s["step_s"] for i in range(len(row))]
            ax.plot(xs, row, label=name, linewidth=1)
        ax.set_title(spec, fontsize=9)
        ax.set_ylabel("in flight")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("seconds")
    fig.suptitle(f"Requests in flight per replica — {title}", fontsize=10)
    path = out_dir / "inflight.png"
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.35 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- one row


@dataclass(frozen=True, slots=True)
class Row:
    spec: str  # the row's name: a kvrouter policy spec, or a peer's ROUTER:POLICY
    router: str  # kvrouter, smg or vllm-router


@dataclass
class RowRun:
    """What one row's live run left behind."""

    target: Target
    live: list[LiveResult] = field(default_factory=list)
    elapsed_s: float = 0.0
    deltas: list[ReplicaCounters] = field(default_factory=list)
    sample_step_s: float = 0.0
    sample_times: list[float] = field(default_factory=list)
    samples: list[list[int]] = field(default_factory=list)  # in flight per replica, per sample
    router_cpu_s: float | None = None  # CPU the router process used while the workload ran
    migrations: dict[str, int] | None = None  # kvrouter's hot-prefix migrations by outcome
    notes: list[str] = field(default_factory=list)


def rows_for(specs: Sequence[str], peers: bool) -> list[Row]:
    rows = [Row(spec, "kvrouter") for spec in specs]
    if peers:
        rows += [Row(spec, spec.partition(":")[0]) for spec in PEER_SPECS]
    return rows


async def _sample_inflight(urls: Sequence[str], step_s: float, run: RowRun, started: float) -> None:
    """Append every replica's running + waiting gauges to `run` every `step_s` until cancelled."""
    import aiohttp

    from load.replica_metrics import scrape

    timeout = aiohttp.ClientTimeout(total=max(1.0, step_s))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            asked = time.perf_counter()
            try:
                counters = await scrape(session, urls)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass  # a missed sample is a gap in the plot, not a reason to stop the run
            else:
                run.sample_times.append(round(asked - started, 3))
                run.samples.append([c.in_flight for c in counters])
            await asyncio.sleep(max(0.0, step_s - (time.perf_counter() - asked)))


async def run_row(
    row: Row,
    requests: Sequence[WorkloadRequest],
    *,
    preset: Preset,
    replicas: int,
    duration_s: float,
    peers_bin: Path,
    logs: Path,
    started: list[Target],
    give_up: threading.Event,
    label: str | None = None,
    kv_transfer: str = "warmup",
) -> RowRun:
    """One row: a fresh fleet, its router started, the workload driven through it, both stopped."""
    import aiohttp

    from load.live import drive, progress_line
    from load.peers import (
        KvEventSources,
        cpu_seconds,
        exit_problem,
        kv_aware_notes,
        kvrouter_target,
        peer_target,
        start_target,
        stop,
    )
    from load.replica_metrics import parse_router_migrations, scrape
    from workers.emulator.fleet import EmulatedFleet

    # p2p: the exporter sleeps for the copy at the simulator's link speed instead of sending the bytes
    # (512 MiB for a 4,096-token prefix of this model would eat the CPU the fleet runs on; p2p.py).
    bandwidth = DEFAULT_COPY_BYTES_PER_S if kv_transfer == "p2p" else None
    async with EmulatedFleet(
        replicas=replicas, preset=preset, model=MODEL, kv_events=True, kv_bandwidth=bandwidth
    ) as fleet:
        urls = fleet.urls
        if row.router == "kvrouter":
            # max_inflight as `kvrouter demo`'s: the client's own bound (512) governs, not the proxy's.
            backends = [f"replica-{i}={url}" for i, url in enumerate(urls)]
            # Told the replicas' prefill speed, as an operator would: kvaware prices queues with it.
            rate = f"{fleet.preset.prefill_tokens_per_s:g}"
            target = kvrouter_target(
                row.spec,
                row.spec,
                backends,
                *("--max-inflight", "4096", "--prefill-rate", rate, "--kv-transfer", kv_transfer),
            )
        else:
            sources = KvEventSources(
                MODEL,
                fleet.preset.block_size,
                tuple(zip(urls, fleet.event_endpoints, fleet.replay_endpoints, strict=True)),
            )
            target = peer_target(row.spec, row.spec, urls, peers_bin, sources)
        run = RowRun(target)
        started.append(target)
        try:
            await asyncio.to_thread(start_target, target, logs, READY_BODY, give_up)
            if target.failure is not None:
                return run
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                before = await scrape(session, urls)
            assert target.proc is not None  # every row's router is a process
            cpu0 = cpu_seconds(target.proc.pid)
            t0 = time.perf_counter()
            run.sample_step_s = min(0.5, max(0.05, duration_s / INFLIGHT_SAMPLES))
            sampler = asyncio.create_task(_sample_inflight(urls, run.sample_step_s, run, t0))
            try:
                run.live = await drive(
                    target.url,
                    requests,
                    concurrency=512,
                    deadline_s=duration_s + 60.0,
                    progress=progress_line(label or row.spec, t0),
                )
            finally:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
            run.elapsed_s = time.perf_counter() - t0
            run.router_cpu_s = cpu_seconds(target.proc.pid) - cpu0
            print(f"  ({run.elapsed_s:.0f} s)", file=sys.stderr)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                after = await scrape(session, urls)
                if row.router == "kvrouter":
                    async with session.get(target.url + "/metrics") as resp:
                        run.migrations = parse_router_migrations(await resp.text())
            run.deltas = [a.since(b) for a, b in zip(after, before, strict=True)]
            target.failure = exit_problem(target)
            if row.spec == "vllm-router:kv_aware":
                run.notes += kv_aware_notes(target)
            return run
        finally:
            await asyncio.to_thread(stop, target.proc)


def row_figures(
    row: Row,
    run: RowRun,
    logical: Mapping[str, int],
    names: Sequence[str],
    settle_s: float | None = None,
) -> dict[str, Any]:
    """The row's figures: client-side from the answers, replica-side from the counters' increase."""
    from load.live import to_records
    from load.replica_metrics import hit_rate, replica_ttft_mean

    head: dict[str, Any] = {"router": row.router, "what": run.target.what, "command": run.target.command}
    if not run.live:  # never ran
        return {**head, "error": run.target.failure or "no request was sent"}
    records = to_records(run.live, logical)
    busy = {name: d.e2e_seconds for name, d in zip(names, run.deltas, strict=True)}
    figures = summarize(
        records, busy, makespan_s=run.elapsed_s, rejected=len(run.live) - len(records), settle_s=settle_s
    )
    # summarize's hit rate is the answers' cached_tokens; the replicas' own counters are the headline.
    figures["request_hit_rate"] = figures["hit_rate"]
    figures["hit_rate"] = hit_rate(run.deltas)
    figures["requests_per_replica"] = {
        name: round(d.requests_finished) for name, d in zip(names, run.deltas, strict=True)
    }
    gaps = [r.inter_token_s for r in run.live if r.error is None and r.inter_token_s is not None]
    figures.update(_itl(gaps))
    # What the replicas themselves measured: the client's TTFT minus this is the path's share.
    figures["replica_ttft_mean_s"] = replica_ttft_mean(run.deltas)
    if run.router_cpu_s is not None and records:
        figures["router_cpu_ms_per_request"] = 1000.0 * run.router_cpu_s / len(run.live)
    if run.migrations is not None:  # the simulator's keys, for --compare-live and the docs
        figures["migrations_completed"] = run.migrations["completed"]
        figures["migrations_failed"] = run.migrations["failed"]
    errors = [r.error for r in run.live if r.error is not None]
    figures["errors"] = len(errors)
    if errors:
        print(f"  {row.spec}: {len(errors)} failed, e.g. {errors[0]}", file=sys.stderr)
    figures["wall_s"] = round(run.elapsed_s, 2)
    figures["inflight_over_time"] = {
        "source": "replica /metrics: vllm:num_requests_running + vllm:num_requests_waiting",
        "step_s": run.sample_step_s,
        "times_s": run.sample_times,
        "replicas": {name: [s[i] for s in run.samples] for i, name in enumerate(names)},
    }
    if run.notes:
        figures["notes"] = run.notes
    problem = run.target.failure
    if problem is None and not records:
        problem = f"no request completed: {errors[0] if errors else 'no answer'}"
    if problem is not None:
        figures["error"] = problem
    return {**head, **figures}


# ---------------------------------------------------------------- rounds

RANGE_KEYS = ("hit_rate", "ttft_mean_s")  # the table's `median (min-max)` cells with --rounds


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _median(values: Sequence[float]) -> float:
    """The median of the finite values (NaN when there is none)."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2


def round_numbers(figures: Mapping[str, Any]) -> dict[str, Any]:
    """A row's numeric figures of one round (no series, no per-replica maps, no strings)."""
    return {key: value for key, value in figures.items() if _is_number(value)}


def median_over_rounds(by_round: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """One row's entry for R > 1 rounds, from its entries of each round (`row_figures`), in order.

    Every numeric figure is the median over the rounds that ran (no `error`); the other fields come
    from the first of them (`series_from_round`), `notes` from all; `rounds` holds each round's
    numbers (and `error` where it failed), `failures` the failed rounds. A row that failed in every
    round is round 0's entry, its `error` included, plus `seeds`, `rounds` and `failures`."""
    per_round: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for r, (figures, seed) in enumerate(zip(by_round, seeds, strict=True)):
        per_round.append({"round": r, "seed": seed, **round_numbers(figures)})
        if "error" in figures:
            per_round[-1]["error"] = figures["error"]
            failures.append({"round": r, "seed": seed, "error": figures["error"]})
    extra: dict[str, Any] = {"seeds": list(seeds), "rounds": per_round}
    if failures:
        extra["failures"] = failures
    ran = [r for r, figures in enumerate(by_round) if "error" not in figures]
    if not ran:
        return {**by_round[0], **extra}
    out: dict[str, Any] = {}
    keys = list(by_round[ran[0]])
    keys += [k for r in ran[1:] for k in by_round[r] if k not in keys]
    for key in dict.fromkeys(keys):
        values = [by_round[r][key] for r in ran if key in by_round[r]]
        if all(_is_number(v) for v in values):
            out[key] = _median(values)
        elif key in by_round[ran[0]]:
            out[key] = by_round[ran[0]][key]
    notes = list(dict.fromkeys(n for figures in by_round for n in figures.get("notes", ())))
    if notes:
        out["notes"] = notes
    return {**out, "median_of_rounds": ran, "series_from_round": ran[0], **extra}


def _spread(values: Sequence[float | None]) -> dict[str, Any]:
    known = [v for v in values if v is not None]
    return {
        "per_round": list(values),
        "median": _median(known) if known else None,
        "min": min(known) if known else None,
        "max": max(known) if known else None,
    }


def _finite(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def paired_figures(by_round: Sequence[Mapping[str, Mapping[str, Any]]], reference: str) -> dict[str, Any]:
    """Per row, per round: its `ttft_mean_s` over the reference row's in the same round (same seed,
    same requests) and its `hit_rate` minus the reference's; None where either did not run. With the
    median, min and max of each over the rounds where both ran."""
    rows: dict[str, Any] = {}
    for spec in by_round[0]:
        ratios: list[float | None] = []
        diffs: list[float | None] = []
        for results in by_round:
            row, ref = results[spec], results[reference]
            ran = "error" not in row and "error" not in ref
            ttft, ref_ttft = _finite(row.get("ttft_mean_s")), _finite(ref.get("ttft_mean_s"))
            hit, ref_hit = _finite(row.get("hit_rate")), _finite(ref.get("hit_rate"))
            if ran and ttft is not None and ref_ttft is not None and ref_ttft > 0:
                ratios.append(ttft / ref_ttft)
            else:
                ratios.append(None)
            diffs.append(hit - ref_hit if ran and hit is not None and ref_hit is not None else None)
        rows[spec] = {"ttft_mean_ratio": _spread(ratios), "hit_rate_diff": _spread(diffs)}
    return {
        "reference": reference,
        "pairing": "per round (same seed, same requests): ttft_mean_ratio = row / reference, "
        "hit_rate_diff = row - reference; median, min and max over the rounds where both ran",
        "rows": rows,
    }


def round_ranges(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per row, the min and max over the rounds it ran of the figures shown with a range (RANGE_KEYS)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for spec, figures in results.items():
        ran = set(figures.get("median_of_rounds", ()))
        spread: dict[str, tuple[float, float]] = {}
        for key in RANGE_KEYS:
            values = [
                v
                for rd in figures.get("rounds", ())
                if rd["round"] in ran and (v := _finite(rd.get(key))) is not None
            ]
            if values:
                spread[key] = (min(values), max(values))
        out[spec] = spread
    return out


def format_paired(paired: Mapping[str, Any], *, markdown: bool) -> str:
    """Each row against the reference, paired by round: `median (min-max)` of the TTFT-mean ratio,
    and of the hit-rate difference, and how many rounds paired."""
    ref = paired["reference"]
    rows = [["row", f"TTFT mean / {ref}", f"hit - {ref}", "rounds"]]
    for spec, row in paired["rows"].items():
        ratio, diff = row["ttft_mean_ratio"], row["hit_rate_diff"]
        n = sum(v is not None for v in ratio["per_round"])
        cells = [spec]
        for s, fmt, sep in ((ratio, "{:.3f}", "-"), (diff, "{:+.3f}", " to ")):
            if s["median"] is None:
                cells.append("-")
            else:
                lo, hi = fmt.format(s["min"]), fmt.format(s["max"])
                cells.append(f"{fmt.format(s['median'])} ({lo}{sep}{hi})")
        cells.append(f"{n}/{len(ratio['per_round'])}")
        rows.append(cells)
    return layout_table(rows, markdown=markdown)


def format_tables(report: Mapping[str, Any], *, markdown: bool = False) -> str:
    """The results table; with R > 1 rounds, medians with ranges, then the paired table."""
    results = report["results"]
    rounds = report.get("rounds", 1)
    if rounds == 1:
        return format_table(results, markdown=markdown)
    seeds = report["seeds"]
    return "\n".join(
        [
            f"median of {rounds} rounds (seeds {seeds[0]}-{seeds[-1]}); hit and TTFT mean: median (min-max)",
            "",
            format_table(results, markdown=markdown, ranges=round_ranges(results)),
            "",
            f"paired by round against {report['paired']['reference']}: median (min-max) over rounds",
            "",
            format_paired(report["paired"], markdown=markdown),
        ]
    )


def failed(figures: Mapping[str, Any]) -> bool:
    """Whether a row failed or lost requests, in any round."""
    if "error" in figures or figures.get("errors"):
        return True
    return any("error" in rd or rd.get("errors") for rd in figures.get("rounds", ()))


# ---------------------------------------------------------------- the run


def sim_command(
    workload: str,
    specs: Sequence[str],
    *,
    replicas: int,
    preset: str,
    rate: float,
    duration_s: float,
    requests: int,
    output_tokens: int,
    seed: int,
    kv_transfer: str = "warmup",
    settle_s: float | None = None,
) -> str:
    """The `kvrouter sim` command that simulates exactly the requests bench live sent: the same
    generator bounds (duration and count), rate (repr: every digit), output length, preset and seed;
    and a router that knows what the live one knows: hot-prefix migration by warm-up prefills
    (kvrouter serve's default for a backend) and the preset's prefill speed (`--prefill-rate`, which
    the simulator's router uses by default); `--kv-transfer` and `--settle` as given to bench live."""
    args = ["kvrouter", "sim", "--workload", workload, "--replicas", str(replicas), "--preset", preset]
    args += ["--rate", repr(rate), "--duration", f"{duration_s:g}", "--requests", str(requests)]
    args += ["--output-tokens", str(output_tokens), "--seed", str(seed), "--kv-transfer", kv_transfer]
    if settle_s is not None:
        args += ["--settle", f"{settle_s:g}"]
    args += ["--policies", ",".join(specs)]
    return shlex.join(args)


@dataclass(frozen=True, slots=True)
class RoundWorkload:
    """One round's requests: its seed, the requests and each one's logical cached tokens."""

    seed: int
    requests: list[WorkloadRequest]
    logical: dict[str, int]


async def bench(
    workload: str,
    specs: Sequence[str],
    *,
    peers: bool,
    peers_venv: Path,
    replicas: int,
    duration_s: float,
    rate: float | None,
    output_tokens: int,
    preset_name: str,
    seed: int,
    started: list[Target],
    rounds: int = 1,
    kv_transfer: str = "warmup",
    settle_s: float | None = None,
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """The JSON report (sim schema + live extras; with rounds > 1 the medians, per-round figures and
    `paired`) and the TTFTs per row (with rounds > 1, of each row's `series_from_round`)."""
    from load.live import to_records
    from load.sim import prepare

    preset = preset_named(preset_name)
    params = output_params(workload, output_tokens)
    if rate is None:
        rate = min(
            MAX_DEFAULT_RATE,
            workload_spec(workload, params).default_rate(replicas, service_s=preset.service_s),
        )
    workloads: list[RoundWorkload] = []
    for r in range(rounds):
        made = make_workload(
            workload,
            seed=seed + r,
            replicas=replicas,
            rate=rate,
            duration_s=duration_s,
            model=MODEL,
            params=params,
        )
        if not made:
            raise ValueError("the workload produced no request: raise --duration or --rate")
        logical = {p.source.request_id: p.logical_cached_tokens for p in prepare(made, preset.block_size)}
        workloads.append(RoundWorkload(seed + r, made, logical))
    requests = workloads[0].requests
    rows = rows_for(specs, peers)
    span = requests[-1].arrival_s - requests[0].arrival_s
    repeat = f", {rounds} rounds (seeds {seed}-{seed + rounds - 1})" if rounds > 1 else ""
    print(
        f"bench live: {workload}, {len(requests)} requests at {rate:.2f} req/s over {duration_s:g} s, "
        f"{replicas} x {preset.name}, rows {', '.join(r.spec for r in rows)}{repeat}",
        file=sys.stderr,
    )
    names = [f"replica-{i}" for i in range(replicas)]
    by_round: list[dict[str, Any]] = [{} for _ in workloads]
    ttfts_by_round: list[dict[str, list[float]]] = [{} for _ in workloads]
    give_up = threading.Event()
    # SIGTERM ends the run as Ctrl-C does: the running row's `finally` stops its router and fleet.
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    with tempfile.TemporaryDirectory(prefix="kvrouter-bench-live-") as logs:
        try:
            # Round-major: every row of round 0, then every row of round 1, ...
            for r, wl in enumerate(workloads):
                if rounds > 1:
                    print(
                        f"round {r + 1}/{rounds}: seed {wl.seed}, {len(wl.requests)} requests",
                        file=sys.stderr,
                    )
                for i, row in enumerate(rows):
                    label = (
                        row.spec
                        if rounds == 1
                        else f"{r * len(rows) + i + 1}/{rounds * len(rows)} {row.spec}"
                    )
                    run = await run_row(
                        row,
                        wl.requests,
                        preset=preset,
                        replicas=replicas,
                        duration_s=duration_s,
                        peers_bin=peers_venv / "bin",
                        logs=Path(logs),
                        started=started,
                        give_up=give_up,
                        label=label,
                        kv_transfer=kv_transfer,
                    )
                    figures = row_figures(row, run, wl.logical, names, settle_s)
                    by_round[r][row.spec] = figures
                    ttfts_by_round[r][row.spec] = [x.ttft_s for x in to_records(run.live, wl.logical)]
                    if "error" in figures:
                        where = f" (round {r + 1}, seed {wl.seed})" if rounds > 1 else ""
                        print(f"  {row.spec}{where}: {figures['error']}", file=sys.stderr)
        except BaseException:
            give_up.set()  # a readiness wait still running in its thread stops waiting
            raise
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
    commands = [
        sim_command(
            workload,
            specs,
            replicas=replicas,
            preset=preset_name,
            rate=rate,
            duration_s=duration_s,
            requests=len(wl.requests),
            output_tokens=output_tokens,
            seed=wl.seed,
            kv_transfer=kv_transfer,
            settle_s=settle_s,
        )
        for wl in workloads
    ]
    report: dict[str, Any] = {
        "workload": workload,
        "replicas": replicas,
        "requests": len(requests),
        "rate": rate,
        "offered_rate": len(requests) / span if span > 0 else None,
        "duration_s": duration_s,
        "output_tokens": output_tokens,
        "preset": preset.name,
        "seed": seed,
        "kv_transfer": kv_transfer,
        "mode": "live",
        "routers": "each row's router is its own process; fleet and client share this one",
        "workload_digest": workload_digest(requests),
        "sim_command": commands[0],
    }
    if rounds == 1:
        report["results"] = by_round[0]
        return report, ttfts_by_round[0]
    seeds = [wl.seed for wl in workloads]
    results = {
        row.spec: median_over_rounds([results[row.spec] for results in by_round], seeds) for row in rows
    }
    report.update(
        {
            "rounds": rounds,
            "seeds": seeds,
            "aggregate": "results: per row the median over the rounds it ran (median_of_rounds) of each "
            "numeric figure, each round's numbers in `rounds`, other fields from series_from_round; "
            "requests, seed, offered_rate, workload_digest and sim_command: round 0's",
            "requests_per_round": [len(wl.requests) for wl in workloads],
            "workload_digests": [workload_digest(wl.requests) for wl in workloads],
            "sim_commands": commands,
            "paired": paired_figures(by_round, specs[0]),
            "results": results,
        }
    )
    ttfts = {spec: ttfts_by_round[f.get("series_from_round", 0)][spec] for spec, f in results.items()}
    return report, ttfts


def run(args: argparse.Namespace) -> int:
    from load.peers import stop
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
    if args.rounds < 1:
        print("kvrouter bench live: --rounds must be >= 1", file=sys.stderr)
        return 2
    if args.settle is not None and not 0 <= args.settle < args.duration:
        print("kvrouter bench live: --settle must be >= 0 and less than --duration", file=sys.stderr)
        return 2
    import uvloop

    started: list[Target] = []
    try:
        report, ttfts = uvloop.run(
            bench(
                args.workload,
                specs,
                peers=args.peers,
                peers_venv=args.peers_venv,
                replicas=args.replicas,
                duration_s=args.duration,
                rate=args.rate,
                output_tokens=args.output_tokens,
                preset_name=args.preset,
                seed=args.seed,
                started=started,
                rounds=args.rounds,
                kv_transfer=args.kv_transfer,
                settle_s=args.settle,
            )
        )
    except ValueError as exc:
        print(f"kvrouter bench live: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\nkvrouter bench live: interrupted; what it started is stopped", file=sys.stderr)
        return 130
    finally:
        for target in started:  # the rows stop their own; this catches one a crash left running
            stop(target.proc)
    results = report["results"]
    print(format_tables(report))
    if args.rounds == 1:
        print(f"simulate the same requests: {report['sim_command']}", file=sys.stderr)
    else:
        for seed, command in zip(report["seeds"], report["sim_commands"], strict=True):
            print(f"simulate the same requests (seed {seed}): {command}", file=sys.stderr)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    if args.report is not None:
        title = f"{args.workload}, {args.replicas} replicas (live)"
        if args.rounds > 1:
            title = f"{args.workload}, {args.replicas} replicas (live, {args.rounds} rounds)"
        args.report.mkdir(parents=True, exist_ok=True)
        table = args.report / "table.md"
        table.write_text(format_tables(report, markdown=True) + "\n")
        written = [table, *plot_results(ttfts, results, args.report, title=title)]
        series = {s: f["inflight_over_time"] for s, f in results.items() if "inflight_over_time" in f}
        if series:
            written.append(plot_inflight(series, args.report, title=title))
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    # Only kvrouter's own rows decide the exit status: a peer that cannot run is reported, not fatal.
    ours = [f for f in results.values() if f["router"] == "kvrouter"]
    return 1 if any(failed(f) for f in ours) else 0
