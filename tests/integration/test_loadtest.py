"""`make loadtest` shortened, and `kvrouter bench live` end to end.

The load test starts `kvrouter emulate` and `kvrouter serve` as subprocesses and Locust as a third
(gevent must never share a process with the router), for 5 seconds on loopback ports.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from load.loadtest import run_loadtest

KVROUTER = [sys.executable, "-m", "router.cli"]


@pytest.mark.skipif(
    shutil.which("locust", path=str(Path(sys.executable).parent)) is None, reason="make setup installs locust"
)
def test_loadtest_runs_locust_headless_with_ttft_rows_and_no_failures(tmp_path: Path) -> None:
    code = run_loadtest(tmp_path, duration_s=5.0, users=5, replicas=2)
    logs = {p.name: p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("*.log")}
    assert code == 0, logs
    with (tmp_path / "locust_stats.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] != "Aggregated"]
    assert sum(int(r["Failure Count"]) for r in rows) == 0
    ttft = {r["Name"]: int(r["Request Count"]) for r in rows if r["Type"] == "TTFT"}
    assert ttft and sum(ttft.values()) > 0, rows
    kinds = {r["Type"] for r in rows}
    assert {"POST", "TTFT", "ITL", "E2E", "PROMPT_TOKENS", "CACHED_TOKENS"} <= kinds
    assert (tmp_path / "locust.html").exists()


def test_bench_live_writes_the_sim_schema_with_live_extras(tmp_path: Path) -> None:
    out = tmp_path / "live.json"
    report = tmp_path / "report"
    result = subprocess.run(
        [*KVROUTER, "bench", "live", "--workload", "shared-prefix", "--policies", "round_robin,kvaware",
         "--replicas", "2", "--duration", "3", "--rate", "4", "--json", str(out), "--report", str(report)],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["workload"] == "shared-prefix" and data["replicas"] == 2
    assert list(data["results"]) == ["round_robin", "kvaware"]
    for figures in data["results"].values():
        for key in ("hit_rate", "logical_hit_rate", "ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "e2e_mean_s",
                    "throughput_tok_s", "imbalance", "itl_mean_s", "itl_p50_s", "itl_p99_s"):  # fmt: skip
            assert isinstance(figures[key], float), key
        assert figures["errors"] == 0 and figures["requests"] > 0
        per_replica = figures["requests_per_replica"]
        assert set(per_replica) == {"replica-0", "replica-1"}
        assert sum(per_replica.values()) == figures["requests"]
        assert 0.0 <= figures["hit_rate"] <= figures["logical_hit_rate"] + 1e-9 <= 1.0 + 1e-9
        series = figures["inflight_over_time"]
        assert series["step_s"] > 0 and max(max(row) for row in series["replicas"].values()) >= 1
    for name in ("table.md", "ttft_cdf.png", "hit_rate.png", "inflight.png"):
        assert (report / name).stat().st_size > 0, name
    assert "| round_robin |" in (report / "table.md").read_text()
