"""`kvrouter bench live --rounds 2` end to end: every row twice, seeds S and S + 1, round-major.

Real processes on loopback (the bench, a `kvrouter serve` per row and round, the emulated fleet inside
the bench), kept short: 2 replicas, 2 s of arrivals at 4 req/s, two rows.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

KVROUTER = [sys.executable, "-m", "router.cli"]
RANGE = r"\d+\.\d{3} \(\d+\.\d{3}-\d+\.\d{3}\)"  # median (min-max)


def test_two_rounds_run_every_row_twice_and_report_medians_and_pairs(tmp_path: Path) -> None:
    out = tmp_path / "live.json"
    report = tmp_path / "report"
    result = subprocess.run(
        [*KVROUTER, "bench", "live", "--workload", "shared-prefix", "--policies", "kvaware,round_robin",
         "--replicas", "2", "--duration", "2", "--rate", "4", "--seed", "3", "--rounds", "2",
         "--json", str(out), "--report", str(report)],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert (data["rounds"], data["seeds"]) == (2, [3, 4])
    assert data["seed"] == 3 and data["requests"] == data["requests_per_round"][0]
    # Two seeds, two different workloads (each round's own requests), and a sim command for each.
    assert len(set(data["workload_digests"])) == 2 and data["workload_digest"] == data["workload_digests"][0]
    assert data["sim_command"] == data["sim_commands"][0]
    commands = zip(data["seeds"], data["requests_per_round"], data["sim_commands"], strict=True)
    for seed, requests, command in commands:
        args = shlex.split(command)
        assert args[args.index("--seed") + 1] == str(seed)
        assert args[args.index("--requests") + 1] == str(requests)

    # Round-major: both rows of round 0 (seed 3), then both of round 1 (seed 4).
    stderr = result.stderr
    order = [stderr.index(s) for s in ("round 1/2: seed 3", "1/4 kvaware", "2/4 round_robin",
                                       "round 2/2: seed 4", "3/4 kvaware", "4/4 round_robin")]  # fmt: skip
    assert order == sorted(order), stderr[-3000:]

    results = data["results"]
    assert list(results) == ["kvaware", "round_robin"]
    for spec, row in results.items():
        assert row["seeds"] == [3, 4] and "failures" not in row and "error" not in row, (spec, row)
        assert row["median_of_rounds"] == [0, 1] and row["series_from_round"] == 0
        rounds = row["rounds"]
        assert [(r["round"], r["seed"]) for r in rounds] == [(0, 3), (1, 4)]
        # Each round drove its own seed's requests, all of them.
        assert [r["requests"] for r in rounds] == data["requests_per_round"], (spec, rounds)
        assert all(r["errors"] == 0 for r in rounds)
        assert "inflight_over_time" not in rounds[0] and "requests_per_replica" not in rounds[0]
        # Every figure is the median (here the mean) of the two rounds'.
        for key in ("ttft_mean_s", "ttft_p99_s", "hit_rate", "logical_hit_rate", "e2e_mean_s", "requests"):
            assert row[key] == (rounds[0][key] + rounds[1][key]) / 2, (spec, key)
        # The series comes from round 0: as many requests per replica as round 0 drove.
        assert sum(row["requests_per_replica"].values()) == rounds[0]["requests"]
        assert row["inflight_over_time"]["times_s"]

    paired = data["paired"]
    assert paired["reference"] == "kvaware"
    ref = paired["rows"]["kvaware"]
    assert ref["ttft_mean_ratio"]["per_round"] == [1.0, 1.0] and ref["ttft_mean_ratio"]["median"] == 1.0
    assert ref["hit_rate_diff"]["per_round"] == [0.0, 0.0]
    rr, kv = results["round_robin"]["rounds"], results["kvaware"]["rounds"]
    ratios = paired["rows"]["round_robin"]["ttft_mean_ratio"]
    assert ratios["per_round"] == [rr[i]["ttft_mean_s"] / kv[i]["ttft_mean_s"] for i in range(2)]
    assert (ratios["min"], ratios["max"]) == (min(ratios["per_round"]), max(ratios["per_round"]))
    diffs = paired["rows"]["round_robin"]["hit_rate_diff"]["per_round"]
    assert diffs == [rr[i]["hit_rate"] - kv[i]["hit_rate"] for i in range(2)]

    # The tables: medians with their range over rounds, then the pairs; printed and in table.md.
    table = (report / "table.md").read_text()
    for spec in ("kvaware", "round_robin"):
        assert re.search(rf"^\| {spec} \| {RANGE} \| \d\.\d{{3}} \| {RANGE} \|", table, re.M), table
        assert re.search(rf"^{spec} +{RANGE} +\d\.\d{{3}} +{RANGE} ", result.stdout, re.M), result.stdout
    assert "| kvaware | 1.000 (1.000-1.000) | +0.000 (+0.000 to +0.000) | 2/2 |" in table
    assert "paired by round against kvaware" in result.stdout
    for name in ("ttft_cdf.png", "hit_rate.png", "inflight.png"):
        assert (report / name).stat().st_size > 0, name
