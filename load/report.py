"""Results of a benchmark or simulation: per-request records in, summary figures, tables and plots out.

One schema for `kvrouter sim` and `kvrouter bench live` (issue #3, #7):
`{"workload", "replicas", "results": {policy_spec: {"hit_rate", "logical_hit_rate", "ttft_mean_s",
"ttft_p50_s", "ttft_p99_s", "e2e_mean_s", "throughput_tok_s", "imbalance", ...}}}`.

- `hit_rate` is physical: prompt tokens the engines really served from cache over all prompt tokens.
- `logical_hit_rate` is what an infinite cache shared by the whole fleet would have served: the
  ceiling any router could reach. Their gap is the amnesia tax.
- `imbalance` is max/mean busy time over replicas (1.0 is perfect balance).
- `ttft_step_floor_mean_s` (the simulator only: it sees the engines' steps) is the mean TTFT each request
  would have had without queueing on the replica it was sent to: the rest of the engine step running
  there when it arrived, plus the whole next step, the first that can schedule it. TTFT minus it is
  queueing behind other requests' prefills (or for free KV); where the two are equal, the only way to a
  lower TTFT is shorter steps, that is a smaller decode batch per replica, which the fleet's load sets.
- Percentiles use the nearest-rank method on the completed requests.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What happened to one request."""

    request_id: str
    replica: str
    arrival_s: float
    first_token_s: float
    done_s: float
    prompt_tokens: int
    cached_tokens: int
    logical_cached_tokens: int
    expected_cached_tokens: int
    output_tokens: int
    step_floor_s: float | None = None  # the simulator's: see `ttft_step_floor_mean_s` above

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float:
        return self.done_s - self.arrival_s


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(
    records: Sequence[RequestRecord],
    busy_s: Mapping[str, float],
    *,
    makespan_s: float,
    rejected: int = 0,
    settle_s: float | None = None,
) -> dict[str, Any]:
    """The per-policy figures of the shared schema, from completed requests and replica busy times;
    with `settle_s`, also the steady-state TTFT figures of `settled_figures`."""
    prompt = sum(r.prompt_tokens for r in records)
    ttfts = [r.ttft_s for r in records]
    e2es = [r.e2e_s for r in records]
    busy = list(busy_s.values())
    mean_busy = sum(busy) / len(busy) if busy else 0.0
    per_replica: dict[str, int] = dict.fromkeys(busy_s, 0)
    for r in records:
        per_replica[r.replica] = per_replica.get(r.replica, 0) + 1
    output = sum(r.output_tokens for r in records)
    figures: dict[str, Any] = {
        "requests": len(records),
        "rejected": rejected,
        "hit_rate": _ratio(sum(r.cached_tokens for r in records), prompt),
        "logical_hit_rate": _ratio(sum(r.logical_cached_tokens for r in records), prompt),
        "expected_hit_rate": _ratio(sum(r.expected_cached_tokens for r in records), prompt),
        "ttft_mean_s": _mean(ttfts),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "ttft_p99_s": percentile(ttfts, 99),
        "e2e_mean_s": _mean(e2es),
        "e2e_p99_s": percentile(e2es, 99),
        "throughput_tok_s": output / makespan_s if makespan_s > 0 else 0.0,
        "imbalance": max(busy) / mean_busy if mean_busy > 0 else 1.0,
        "requests_per_replica": per_replica,
    }
    floors = [r.step_floor_s for r in records if r.step_floor_s is not None]
    if records and len(floors) == len(records):
        figures["ttft_step_floor_mean_s"] = _mean(floors)
    if settle_s is not None:
        figures.update(settled_figures(records, settle_s))
    return figures


def settled_figures(records: Sequence[RequestRecord], settle_s: float) -> dict[str, Any]:
    """TTFT mean and p99 over the requests that arrived `settle_s` or more after the first one.

    Why: a run starts with every cache cold, so its first seconds are each prefix group's first,
    uncached prefill and what queues behind it. That transient is the same under every router (no
    replica holds anything yet), and on a short run it is the whole-run p99 (the simulator's
    hot-prefix at 4 x `demo`, 60 req/s: p99 2.743 s for `kvaware` with and without migration, whatever
    the steady state). These figures show the steady state; the whole-run ones stay the headline."""
    first = min((r.arrival_s for r in records), default=0.0)
    ttfts = [r.ttft_s for r in records if r.arrival_s - first >= settle_s]
    return {
        "settle_s": settle_s,
        "settled_requests": len(ttfts),
        "ttft_mean_settled_s": _mean(ttfts),
        "ttft_p99_settled_s": percentile(ttfts, 99),
    }


def add_settle_argument(parser: argparse.ArgumentParser) -> None:
    """`--settle S`, shared by `kvrouter sim` and `kvrouter bench live` (see settled_figures)."""
    parser.add_argument(
        "--settle",
        type=float,
        metavar="S",
        help="also report TTFT mean and p99 over the requests that arrived S s or more after the first "
        "(`ttft_mean_settled_s`, `ttft_p99_settled_s`): the steady state without the cold start, whose "
        "first uncached prefills are the same under every router; the whole-run figures are unchanged",
    )


def draw_progress(line: str, *, keep: bool) -> None:
    """Redraw a run's one progress line on stderr. Where stderr is no terminal (CI logs, a file) only
    the states marked `keep` (a run's first and last) are written, so that a log holds two states per
    run instead of hundreds of carriage returns, and still shows when each run began to answer."""
    if keep or sys.stderr.isatty():
        print(f"\r{line}", end="", file=sys.stderr, flush=True)


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


TABLE_COLUMNS = (
    ("hit_rate", "hit", "{:.3f}"),
    ("logical_hit_rate", "logical", "{:.3f}"),
    ("ttft_mean_s", "TTFT mean s", "{:.3f}"),
    ("ttft_p50_s", "p50 s", "{:.3f}"),
    ("ttft_p99_s", "p99 s", "{:.3f}"),
    ("e2e_mean_s", "e2e mean s", "{:.2f}"),
    ("throughput_tok_s", "out tok/s", "{:,.0f}"),
    ("imbalance", "imbalance", "{:.2f}"),
)
# Shown after the TTFT mean where the results carry it (the simulator's).
FLOOR_COLUMN = ("ttft_step_floor_mean_s", "step floor s", "{:.3f}")
# Shown after those where the results carry them (`--settle S`); "{settle}" is S.
SETTLED_COLUMNS = (
    ("ttft_mean_settled_s", "mean after {settle} s", "{:.3f}"),
    ("ttft_p99_settled_s", "p99 after {settle} s", "{:.3f}"),
)


def table_columns(results: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """TABLE_COLUMNS (with the step floor after the TTFT mean when any result has it), then the
    settled columns when any result has them."""
    columns = list(TABLE_COLUMNS)
    if any(FLOOR_COLUMN[0] in f for f in results.values()):
        after_mean = next(i for i, (key, _, _) in enumerate(columns) if key == "ttft_mean_s") + 1
        columns.insert(after_mean, FLOOR_COLUMN)
    settle = next((f["settle_s"] for f in results.values() if "settle_s" in f), None)
    if settle is None:
        return columns
    settled = [(key, title.format(settle=f"{settle:g}"), fmt) for key, title, fmt in SETTLED_COLUMNS]
    return [*columns, *settled]


def format_table(
    results: Mapping[str, Mapping[str, Any]],
    *,
    markdown: bool = False,
    ranges: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
) -> str:
    """A side-by-side table, one row per policy (plain text, or markdown for docs/BENCHMARKS.md).

    `ranges` (policy -> figure -> (min, max)), where given, follows a figure's value in its cell as
    `value (min-max)`: `kvrouter bench live --rounds` shows medians with their spread over rounds."""
    columns = table_columns(results)
    header = ["policy", *(title for _, title, _ in columns)]
    rows = [header]
    notes: list[str] = []
    for spec, figures in results.items():
        if "error" in figures and "ttft_mean_s" not in figures:
            rows.append([spec, f"did not run: {figures['error']}", *([""] * (len(columns) - 1))])
            continue
        if "error" in figures:  # it ran, then failed (a crash mid-run): its figures, and why they stop
            notes.append(f"{spec}: {figures['error']}")
        spread = (ranges or {}).get(spec, {})
        cells = [spec]
        for key, _, fmt in columns:
            value = figures.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("-")
                continue
            cell = fmt.format(value)
            if key in spread:
                lo, hi = spread[key]
                cell += f" ({fmt.format(lo)}-{fmt.format(hi)})"
            cells.append(cell)
        rows.append(cells)
    return layout_table(rows, markdown=markdown, notes=notes)


def layout_table(rows: Sequence[Sequence[str]], *, markdown: bool, notes: Sequence[str] = ()) -> str:
    """Rows of cells (the first is the header) as a markdown table, or as plain text with the first
    column left-aligned and the others right-aligned; `notes` follow the table, one a line."""
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "|".join("---" for _ in rows[0]) + "|")
        return "\n".join([*lines, *(f"\n{note}" for note in notes)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        [
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        + list(notes)
    )


def plot_results(
    ttfts: Mapping[str, Sequence[float]],
    results: Mapping[str, Mapping[str, Any]],
    out_dir: Path,
    *,
    title: str,
) -> list[Path]:
    """PNG plots: TTFT CDF per policy, and physical vs logical hit rate per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec, values in ttfts.items():
        if not values:
            continue
        ordered = sorted(values)
        n = len(ordered)
        ax.plot(ordered, [(i + 1) / n for i in range(n)], label=spec)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"TTFT CDF — {title}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = out_dir / "ttft_cdf.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    specs = [s for s in results if "error" not in results[s]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = range(len(specs))
    ax.bar([x - 0.2 for x in xs], [results[s]["hit_rate"] for s in specs], width=0.4, label="physical")
    ax.bar([x + 0.2 for x in xs], [results[s]["logical_hit_rate"] for s in specs], width=0.4, label="logical")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(specs, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("prompt tokens served from cache")
    ax.set_ylim(0, 1)
    ax.set_title(f"Hit rate — {title}")
    ax.legend()
    path = out_dir / "hit_rate.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
