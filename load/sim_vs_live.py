"""The simulator's prediction against a live run of the very same requests (`kvrouter sim --compare-live`).

Rules:
- Only runs of the same requests compare: both reports carry `workload_digest`, a hash of every
  request's id, arrival, prompt length and output length (not the model name, which only labels
  them), and a comparison of two different workloads is refused, not computed.
- A figure is within tolerance when |sim / live - 1| <= TOLERANCE (15%, issue #7): the live run is
  the reference, the simulator the prediction being checked.
- Runs with `--settle S` on both sides (the same S) also compare TTFT mean and p99 over the arrivals S s
  after the first (load/report.py `settled_figures`): the steady state a migration is meant to change.
- Like is compared with like: the live `hit_rate` is read from the replicas' /metrics counters
  (load/replica_metrics.py), so the simulator's side is `metrics_hit_rate`, the same counters of the
  same engine model; TTFT and throughput are per-request figures on both sides.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

from load.workloads import WorkloadRequest

TOLERANCE = 0.15
# (label, live key, sim key)
FIGURES = (
    ("hit rate", "hit_rate", "metrics_hit_rate"),
    ("TTFT mean", "ttft_mean_s", "ttft_mean_s"),
    ("TTFT p99", "ttft_p99_s", "ttft_p99_s"),
    ("out tok/s", "throughput_tok_s", "throughput_tok_s"),
)


def figures_of(
    live: Mapping[str, Mapping[str, Any]], sim: Mapping[str, Mapping[str, Any]]
) -> tuple[tuple[str, str, str], ...]:
    """FIGURES, and the settled TTFT figures when every row on both sides settled at the same S."""
    settles = {
        _number(row.get("settle_s")) for side in (live, sim) for row in side.values() if "error" not in row
    }
    if len(settles) != 1 or (settle := settles.pop()) is None:
        return FIGURES
    return (
        *FIGURES,
        (f"mean after {settle:g} s", "ttft_mean_settled_s", "ttft_mean_settled_s"),
        (f"p99 after {settle:g} s", "ttft_p99_settled_s", "ttft_p99_settled_s"),
    )


def workload_digest(requests: Sequence[WorkloadRequest]) -> str:
    """A short hash that two runs drove the same requests (ids, arrivals, prompt and output lengths)."""
    h = hashlib.sha256()
    for r in requests:
        h.update(f"{r.request_id}|{r.arrival_s!r}|{r.prompt_chars}|{r.max_tokens}\n".encode())
    return h.hexdigest()[:16]


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def compare(
    live: Mapping[str, Mapping[str, Any]], sim: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per policy present in both (and run live without an error): per figure live, sim, the
    ratio sim/live and whether it is within TOLERANCE (None where either side has no value)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    compared = figures_of(live, sim)
    for spec, figures in live.items():
        if spec not in sim or "error" in figures:
            continue
        row: dict[str, dict[str, Any]] = {}
        for label, live_key, sim_key in compared:
            a, b = _number(figures.get(live_key)), _number(sim[spec].get(sim_key))
            ratio = None
            if a is not None and b is not None:
                ratio = 1.0 if a == b else b / a if a > 0 else None  # equal zeros agree exactly
            row[label] = {
                "live": a,
                "sim": b,
                "sim_over_live": ratio,
                "within": None if ratio is None else abs(ratio - 1.0) <= TOLERANCE + 1e-12,
            }
        out[spec] = row
    return out


def format_comparison(comparison: Mapping[str, Mapping[str, Mapping[str, Any]]], *, markdown: bool) -> str:
    """One row per policy, one column per figure: `live / sim (sim/live)`, flagged when beyond 15%."""
    labels = list(next(iter(comparison.values()), {label: {} for label, _, _ in FIGURES}))
    header = ["policy", *labels]
    rows = [header]
    for spec, row in comparison.items():
        cells = [spec]
        for label in labels:
            c = row[label]
            if c["sim_over_live"] is None:
                cells.append("-")
                continue
            digits = 0 if label == "out tok/s" else 3
            mark = "" if c["within"] else " **x**" if markdown else " x"
            cells.append(f"{c['live']:.{digits}f} / {c['sim']:.{digits}f} ({c['sim_over_live']:.2f}){mark}")
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([*text, f"(live / sim (sim/live); x: beyond {TOLERANCE:.0%})"])
