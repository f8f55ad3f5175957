"""Check a headless Locust run of load/locustfile.py from its CSV files; exit non-zero if it failed.

    python -m load.check_locust reports/loadtest/locust      # reads locust_stats.csv, _failures.csv

Fails (exit 1) when: the stats CSV is missing; any row counts a failure; there is no TTFT row or
the TTFT rows count no request; or no request succeeded. Prints one line per workload (requests,
TTFT median / p99 ms, ITL median ms, hit rate) and the failures' reasons.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

AGGREGATED = "Aggregated"


@dataclass(frozen=True, slots=True)
class Row:
    type: str
    name: str
    count: int
    failures: int
    median: float
    p99: float
    mean_length: float


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:  # Locust writes "N/A" for percentiles of empty rows
        return 0.0


def read_stats(path: Path) -> list[Row]:
    with path.open(newline="") as f:
        return [
            Row(
                type=r["Type"],
                name=r["Name"],
                count=int(r["Request Count"]),
                failures=int(r["Failure Count"]),
                median=_number(r["Median Response Time"]),
                p99=_number(r.get("99%", "0")),
                mean_length=_number(r["Average Content Size"]),
            )
            for r in csv.DictReader(f)
        ]


def check(prefix: Path) -> tuple[bool, list[str]]:
    """(passed, lines to print) for the CSVs written with `--csv prefix`."""
    stats_path = prefix.with_name(prefix.name + "_stats.csv")
    if not stats_path.exists():
        return False, [f"no {stats_path}: did Locust run with --csv {prefix}?"]
    rows = [r for r in read_stats(stats_path) if r.name != AGGREGATED]
    lines: list[str] = []
    problems: list[str] = []
    by_kind: dict[tuple[str, str], Row] = {(r.type, r.name): r for r in rows}
    workloads = sorted({r.name for r in rows if r.type == "TTFT"})
    for workload in workloads:
        ttft = by_kind[("TTFT", workload)]
        itl = by_kind.get(("ITL", workload))
        prompt = by_kind.get(("PROMPT_TOKENS", workload))
        cached = by_kind.get(("CACHED_TOKENS", workload))
        hit = (
            cached.mean_length * cached.count / (prompt.mean_length * prompt.count)
            if prompt is not None and cached is not None and prompt.count and prompt.mean_length
            else 0.0
        )
        lines.append(
            f"  {workload:<14} {ttft.count:>6} requests  TTFT p50 {ttft.median:>7.0f} ms  "
            f"p99 {ttft.p99:>7.0f} ms  ITL p50 {itl.median if itl else 0:>5.0f} ms  hit {hit:.3f}"
        )
    if not workloads or sum(by_kind[("TTFT", w)].count for w in workloads) == 0:
        problems.append("no TTFT row with requests in the stats CSV")
    failed = sum(r.failures for r in rows)
    if failed:
        problems.append(f"{failed} failed requests")
        failures_path = prefix.with_name(prefix.name + "_failures.csv")
        if failures_path.exists():
            with failures_path.open(newline="") as f:
                for r in list(csv.DictReader(f))[:5]:
                    lines.append(f"  failure x{r.get('Occurrences')}: {r.get('Name')}: {r.get('Error')}")
    if not any(r.type == "POST" and r.count > r.failures for r in rows):
        problems.append("no successful POST")
    lines.extend(f"FAIL: {p}" for p in problems)
    return not problems, lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("prefix", type=Path, help="the --csv prefix Locust was given")
    args = parser.parse_args(argv)
    passed, lines = check(args.prefix)
    print("\n".join(lines))
    print("locust check: " + ("passed" if passed else "FAILED"))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
