"""`make loadtest` shortened, and `kvrouter bench live` end to end.

The load test starts `kvrouter emulate` and `kvrouter serve` as subprocesses and Locust as a third
(gevent must never share a process with the router; distributed, a master and its workers), for a
few seconds on loopback ports.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from load.check_locust import AGGREGATED, read_stats
from load.loadtest import run_loadtest
from load.replica_metrics import parse_replica_metrics

KVROUTER = [sys.executable, "-m", "router.cli"]


needs_locust = pytest.mark.skipif(
    shutil.which("locust", path=str(Path(sys.executable).parent)) is None, reason="make setup installs locust"
)


@needs_locust
def test_loadtest_runs_locust_headless_with_ttft_rows_and_no_failures(tmp_path: Path) -> None:
    code = run_loadtest(tmp_path, duration_s=5.0, users=5, replicas=2)
    logs = {p.name: p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("*.log")}
    assert code == 0, logs
    rows = [r for r in read_stats(tmp_path / "locust_stats.csv") if r.name != AGGREGATED]
    assert sum(r.failures for r in rows) == 0
    ttft = {r.name: r.count for r in rows if r.type == "TTFT"}
    # Five users over the five user classes: one each, every workload answered.
    assert set(ttft) == {"shared-prefix", "multi-turn", "agentic", "rag", "hot-prefix"}, rows
    assert all(count > 0 for count in ttft.values()), ttft
    kinds = {r.type for r in rows}
    assert {"POST", "TTFT", "ITL", "E2E", "PROMPT_TOKENS", "CACHED_TOKENS"} <= kinds
    html = (tmp_path / "locust.html").read_text(errors="replace")
    for kind in ("TTFT", "ITL", "E2E", "PROMPT_TOKENS", "CACHED_TOKENS"):  # the custom events, in the report
        assert re.search(rf'"method":\s*"{kind}"', html), kind


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _users_over_time(out: Path) -> list[int]:
    """The user count Locust sampled each second (its stats history) while users ran: from the first
    user on, up to the stop (the shape's end, after which the count falls back to 0)."""
    history = _rows(out / "locust_stats_history.csv")
    counts = [int(r["User Count"]) for r in history if r["Name"] == AGGREGATED]
    running = list(itertools.dropwhile(lambda c: c == 0, counts))
    return list(itertools.takewhile(lambda c: c > 0, running))


@needs_locust
def test_loadtest_distributed_master_and_workers_with_a_step_shape(tmp_path: Path) -> None:
    """`--workers 2 --shape step`: the master runs the LoadTestShape and writes the CSVs, the users run in
    two worker processes (the locustfile unchanged), and the user count climbs in steps to the peak."""
    code = run_loadtest(tmp_path, duration_s=6.0, users=5, replicas=2, workers=2, shape="step")
    master_log = (tmp_path / "locust.log").read_text(errors="replace")
    assert code == 0, master_log[-3000:]
    assert "2 workers connected" in master_log and "to 2 ready workers" in master_log, master_log[-3000:]
    rows = [r for r in read_stats(tmp_path / "locust_stats.csv") if r.name != AGGREGATED]
    assert sum(r.failures for r in rows) == 0
    assert sum(r.count for r in rows if r.type == "TTFT") > 0, rows
    users = _users_over_time(tmp_path)
    assert users == sorted(users) and users[0] < 5 and max(users) == 5, users  # 2, 4, 5: steps of 2 s


@needs_locust
def test_loadtest_ramp_shape_climbs_then_holds(tmp_path: Path) -> None:
    code = run_loadtest(tmp_path, duration_s=6.0, users=4, replicas=1, shape="ramp")
    assert code == 0, (tmp_path / "locust.log").read_text(errors="replace")[-3000:]
    users = _users_over_time(tmp_path)
    # One more user every 0.75 s over the first 3 s, then all 4 until the shape ends the run.
    assert users == sorted(users) and users[0] < 4 and users[-1] == 4 and users.count(4) >= 2, users


@needs_locust
def test_loadtest_fails_on_failed_requests_and_names_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every replica answers 500 (`--fault error_rate=1`): each POST is a Locust failure with the router's
    answer as its reason, no TTFT row is written, and the load test exits 1."""
    code = run_loadtest(tmp_path, duration_s=3.0, users=5, replicas=2, faults=["error_rate=1"])
    assert code == 1
    failures = _rows(tmp_path / "locust_failures.csv")
    assert failures and all(r["Error"].startswith("CatchResponseError('HTTP 5") for r in failures), failures
    stats = [r for r in read_stats(tmp_path / "locust_stats.csv") if r.name != AGGREGATED]
    assert not [r for r in stats if r.type == "TTFT" and r.count], stats
    printed = capsys.readouterr().out
    assert "FAIL: no TTFT row" in printed and "failed requests" in printed and "HTTP 5" in printed, printed


def _crash_replica_mid_stream(out: Path, index: int, stop: threading.Event) -> None:
    """Crash replica `index` of the load test's fleet (its `crash` fault) while it is streaming: once it
    has generated 30 tokens, fewer than one answer's 300, so none of its answers is over and the ones
    those tokens went to are past their first bytes, where the router cannot retry."""
    url = None
    while url is None and not stop.wait(0.05):
        log = out / "emulator.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        url = next((line.split()[2] for line in lines if line.startswith(f"replica {index} ")), None)
    while url is not None and not stop.wait(0.01):
        try:
            with urllib.request.urlopen(url + "/metrics", timeout=1.0) as resp:
                metrics = resp.read().decode()
        except OSError:
            continue
        if parse_replica_metrics(metrics).generation_tokens >= 30:
            body = json.dumps({"crash": True}).encode()
            urllib.request.urlopen(urllib.request.Request(url + "/kvrouter/faults", data=body), timeout=2.0)
            return


@needs_locust
def test_loadtest_fails_on_streams_cut_mid_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica dies while streaming (300-token answers: streams of a second or two): the router
    ends each cut stream with its error chunk, Locust counts those POSTs as failures with that reason,
    the other users' requests keep being answered by the other replica, and the load test exits 1."""
    monkeypatch.setenv("KVROUTER_LOCUST_MAX_TOKENS", "300")
    stop = threading.Event()
    crasher = threading.Thread(target=_crash_replica_mid_stream, args=(tmp_path, 1, stop), daemon=True)
    crasher.start()
    try:
        code = run_loadtest(tmp_path, duration_s=6.0, users=5, replicas=2)
    finally:
        stop.set()
        crasher.join(timeout=5)
    assert code == 1
    failures = _rows(tmp_path / "locust_failures.csv")
    assert any("upstream_stream_interrupted" in r["Error"] for r in failures), failures
    stats = [r for r in read_stats(tmp_path / "locust_stats.csv") if r.name != AGGREGATED]
    assert sum(r.count for r in stats if r.type == "TTFT") > 0, stats


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
