"""`kvrouter bench live --rounds`: how one row's rounds become its entry, and rows pair by round.

Pure helpers, no event loop: the entries fed in have the shape `row_figures` gives a row (numbers,
a per-replica map, a series, a command), one per round.
"""

from __future__ import annotations

import math
from typing import Any

from load.bench_live import (
    failed,
    format_paired,
    format_tables,
    median_over_rounds,
    paired_figures,
    round_ranges,
)
from load.report import format_table


def _row(ttft: float, hit: float, requests: int, *, series: int = 0, **more: Any) -> dict[str, Any]:
    return {
        "router": "kvrouter",
        "what": "kvrouter serve",
        "command": ["kvrouter", "serve", f"--port={9000 + series}"],
        "requests": requests,
        "hit_rate": hit,
        "logical_hit_rate": 0.8,
        "ttft_mean_s": ttft,
        "ttft_p99_s": 2 * ttft,
        "requests_per_replica": {"replica-0": requests - series, "replica-1": series},
        "errors": 0,
        "inflight_over_time": {"step_s": 0.1, "times_s": [0.0], "replicas": {"replica-0": [series]}},
        **more,
    }


def test_each_number_is_the_median_of_its_rounds_and_the_rest_is_round_0s() -> None:
    rounds = [_row(0.30, 0.70, 10, series=0), _row(0.10, 0.90, 12, series=1), _row(0.20, 0.80, 11, series=2)]
    entry = median_over_rounds(rounds, [5, 6, 7])
    assert (entry["ttft_mean_s"], entry["hit_rate"], entry["requests"]) == (0.20, 0.80, 11)
    assert entry["ttft_p99_s"] == 0.40 and entry["errors"] == 0 and entry["logical_hit_rate"] == 0.8
    # series, per-replica map and command from one round, and the entry says which
    assert entry["series_from_round"] == 0 and entry["median_of_rounds"] == [0, 1, 2]
    assert entry["inflight_over_time"] == rounds[0]["inflight_over_time"]
    assert entry["requests_per_replica"] == rounds[0]["requests_per_replica"]
    assert entry["command"] == rounds[0]["command"] and entry["router"] == "kvrouter"
    assert entry["seeds"] == [5, 6, 7] and "failures" not in entry and "error" not in entry
    # each round's numbers, and nothing else
    assert [r["seed"] for r in entry["rounds"]] == [5, 6, 7]
    assert [r["ttft_mean_s"] for r in entry["rounds"]] == [0.30, 0.10, 0.20]
    assert set(entry["rounds"][0]) == {"round", "seed", "requests", "hit_rate", "logical_hit_rate",
                                       "ttft_mean_s", "ttft_p99_s", "errors"}  # fmt: skip


def test_an_even_number_of_rounds_takes_the_mean_of_the_middle_two_and_skips_nan() -> None:
    entry = median_over_rounds([_row(0.1, 0.5, 4), _row(0.3, 0.7, 6, extra=math.nan)], [0, 1])
    assert entry["ttft_mean_s"] == (0.1 + 0.3) / 2 and entry["requests"] == 5
    assert math.isnan(entry["extra"])  # no finite value in any round: NaN
    mixed = median_over_rounds([_row(0.1, 0.5, 4, x=1.0), _row(0.3, 0.7, 6, x=math.nan)], [0, 1])
    assert mixed["x"] == 1.0


def test_a_round_that_failed_is_left_out_of_the_median_and_listed() -> None:
    crashed = {**_row(9.0, 0.0, 1), "error": "router exited with status 1"}
    never = {"router": "kvrouter", "what": "w", "command": ["c"], "error": "not installed"}
    entry = median_over_rounds(
        [never, _row(0.2, 0.8, 10, series=1), crashed, _row(0.4, 0.6, 12)], [0, 1, 2, 3]
    )
    assert entry["ttft_mean_s"] == (0.2 + 0.4) / 2 and entry["hit_rate"] == (0.8 + 0.6) / 2
    assert entry["requests"] == 11
    assert "error" not in entry and entry["median_of_rounds"] == [1, 3]
    assert entry["series_from_round"] == 1 and entry["command"] == ["kvrouter", "serve", "--port=9001"]
    assert entry["failures"] == [
        {"round": 0, "seed": 0, "error": "not installed"},
        {"round": 2, "seed": 2, "error": "router exited with status 1"},
    ]
    assert entry["rounds"][0] == {"round": 0, "seed": 0, "error": "not installed"}
    assert entry["rounds"][2]["ttft_mean_s"] == 9.0 and "error" in entry["rounds"][2]
    assert failed(entry)


def test_a_row_that_failed_in_every_round_keeps_its_error() -> None:
    never = [
        {"router": "smg", "what": "w", "command": ["smg"], "error": f"not installed ({i})"} for i in range(2)
    ]
    entry = median_over_rounds(never, [0, 1])
    assert entry["error"] == "not installed (0)" and "ttft_mean_s" not in entry
    assert [f["error"] for f in entry["failures"]] == ["not installed (0)", "not installed (1)"]
    assert "did not run: not installed (0)" in format_table({"smg": entry})


def test_notes_come_from_every_round() -> None:
    entry = median_over_rounds([_row(0.1, 0.5, 4, notes=["a"]), _row(0.1, 0.5, 4, notes=["a", "b"])], [0, 1])
    assert entry["notes"] == ["a", "b"]


def test_lost_requests_in_any_round_fail_the_row() -> None:
    entry = median_over_rounds([_row(0.1, 0.5, 4), _row(0.1, 0.5, 4), _row(0.1, 0.5, 4, errors=2)], [0, 1, 2])
    assert entry["errors"] == 0 and failed(entry)
    assert not failed(median_over_rounds([_row(0.1, 0.5, 4)] * 3, [0, 1, 2]))
    assert failed({"errors": 1}) and failed({"error": "x"}) and not failed({"errors": 0})


def _by_round() -> list[dict[str, dict[str, Any]]]:
    return [
        {"kvaware": _row(0.2, 0.8, 10), "round_robin": _row(0.4, 0.6, 10), "sglang": _row(0.21, 0.8, 10)},
        {"kvaware": _row(0.5, 0.9, 11), "round_robin": _row(1.5, 0.5, 11), "sglang": _row(0.45, 0.91, 11)},
        {
            "kvaware": _row(0.3, 0.7, 9),
            "round_robin": {"router": "kvrouter", "what": "w", "command": [], "error": "crashed"},
            "sglang": _row(0.33, 0.7, 9),
        },
    ]


def test_paired_ratios_are_per_round_against_the_reference() -> None:
    paired = paired_figures(_by_round(), "kvaware")
    assert paired["reference"] == "kvaware" and list(paired["rows"]) == ["kvaware", "round_robin", "sglang"]
    ref = paired["rows"]["kvaware"]
    assert ref["ttft_mean_ratio"]["per_round"] == [1.0, 1.0, 1.0]
    assert (
        ref["ttft_mean_ratio"]["median"],
        ref["ttft_mean_ratio"]["min"],
        ref["ttft_mean_ratio"]["max"],
    ) == (
        1.0,
        1.0,
        1.0,
    )
    assert ref["hit_rate_diff"]["per_round"] == [0.0, 0.0, 0.0]
    rr = paired["rows"]["round_robin"]
    assert rr["ttft_mean_ratio"]["per_round"] == [0.4 / 0.2, 1.5 / 0.5, None]  # round 2: it did not run
    assert rr["ttft_mean_ratio"]["median"] == (0.4 / 0.2 + 1.5 / 0.5) / 2
    assert (rr["ttft_mean_ratio"]["min"], rr["ttft_mean_ratio"]["max"]) == (0.4 / 0.2, 1.5 / 0.5)
    assert rr["hit_rate_diff"]["per_round"] == [0.6 - 0.8, 0.5 - 0.9, None]
    sg = paired["rows"]["sglang"]["ttft_mean_ratio"]
    assert sg["per_round"] == [0.21 / 0.2, 0.45 / 0.5, 0.33 / 0.3]
    assert sg["median"] == 0.21 / 0.2 and sg["min"] == 0.45 / 0.5 and sg["max"] == 0.33 / 0.3


def test_a_reference_that_did_not_run_pairs_nothing() -> None:
    by_round = _by_round()
    by_round[0]["kvaware"] = {"router": "kvrouter", "what": "w", "command": [], "error": "crashed"}
    paired = paired_figures(by_round, "kvaware")
    assert paired["rows"]["sglang"]["ttft_mean_ratio"]["per_round"][0] is None
    assert paired["rows"]["round_robin"]["ttft_mean_ratio"]["per_round"] == [None, 3.0, None]
    text = format_paired(paired, markdown=False)
    assert "1/3" in text and "2/3" in text


def test_the_table_shows_medians_with_ranges_and_the_paired_table() -> None:
    by_round = _by_round()
    seeds = [4, 5, 6]
    results = {spec: median_over_rounds([r[spec] for r in by_round], seeds) for spec in by_round[0]}
    assert round_ranges(results)["round_robin"] == {"hit_rate": (0.5, 0.6), "ttft_mean_s": (0.4, 1.5)}
    report = {"rounds": 3, "seeds": seeds, "paired": paired_figures(by_round, "kvaware"), "results": results}
    table = format_tables(report, markdown=True)
    assert "median of 3 rounds (seeds 4-6)" in table
    assert "| kvaware | 0.800 (0.700-0.900) | 0.800 | 0.300 (0.200-0.500) |" in table
    assert "| round_robin | 0.550 (0.500-0.600) | 0.800 | 0.950 (0.400-1.500) |" in table
    assert "| row | TTFT mean / kvaware | hit - kvaware | rounds |" in table
    assert "| kvaware | 1.000 (1.000-1.000) | +0.000 (+0.000 to +0.000) | 3/3 |" in table
    assert "| round_robin | 2.500 (2.000-3.000) | -0.300 (-0.400 to -0.200) | 2/3 |" in table
    plain = format_tables(report)
    assert "0.300 (0.200-0.500)" in plain and "2.500 (2.000-3.000)" in plain and "|" not in plain


def test_one_round_keeps_todays_table() -> None:
    results = {"kvaware": _row(0.2, 0.8, 10), "round_robin": _row(0.4, 0.6, 10)}
    for markdown in (False, True):
        assert format_tables({"results": results}, markdown=markdown) == format_table(
            results, markdown=markdown
        )
    assert "(" not in format_table(results)
