"""`kvrouter bench live --peers` end to end: the peer rows, their schema, and cleanup on interruption.

Real processes on loopback: the bench, the routers it starts, the emulated fleet inside it. The peers
come from `make peers` (.venv-peers); the default CI has none, and then the peer rows must still be
there, each with an `error` that says why — so the same test checks whichever case this machine is.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from load.peers import PEER_SPECS

KVROUTER = [sys.executable, "-m", "router.cli"]
PEERS_VENV = Path(__file__).resolve().parents[2] / ".venv-peers"
PEERS_INSTALLED = all((PEERS_VENV / "bin" / name).exists() for name in ("smg", "vllm-router"))
SHORT = ["--workload", "shared-prefix", "--policies", "round_robin", "--replicas", "2", "--rate", "4"]
FIGURES = ("hit_rate", "request_hit_rate", "logical_hit_rate", "ttft_mean_s", "ttft_p99_s", "e2e_mean_s",
           "itl_mean_s", "throughput_tok_s", "imbalance", "replica_ttft_mean_s",
           "router_cpu_ms_per_request")  # fmt: skip


def bench_live(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "live.json"
    run = subprocess.run(
        [*KVROUTER, "bench", "live", *SHORT, *args, "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run, json.loads(out.read_text())


def assert_ran(spec: str, row: dict[str, Any], requests: int, replicas: int) -> None:
    assert "error" not in row, (spec, row["error"])
    assert row["errors"] == 0 and row["requests"] == requests, (spec, row)
    for key in FIGURES:
        assert isinstance(row[key], float), (spec, key)
    assert 0.0 <= row["hit_rate"] <= 1.0 and 0.0 <= row["request_hit_rate"] <= 1.0
    per_replica = row["requests_per_replica"]  # read from the replicas' counters, not from the router
    assert set(per_replica) == {f"replica-{i}" for i in range(replicas)}
    assert sum(per_replica.values()) == requests, (spec, per_replica)
    series = row["inflight_over_time"]
    assert series["times_s"] and all(len(v) == len(series["times_s"]) for v in series["replicas"].values())


def test_peer_rows_run_when_installed_and_say_why_not_otherwise(tmp_path: Path) -> None:
    run, data = bench_live(tmp_path, "--duration", "1.5", "--peers", "--peers-venv", str(PEERS_VENV))
    results = data["results"]
    assert list(results) == ["round_robin", *PEER_SPECS]
    assert [row["router"] for row in results.values()] == ["kvrouter", "smg", "vllm-router", "vllm-router"]
    assert_ran("round_robin", results["round_robin"], data["requests"], 2)
    # kvrouter's own hot-prefix migrations (read from its /metrics; the controller runs for kvaware only)
    assert (results["round_robin"]["migrations_completed"], results["round_robin"]["migrations_failed"]) == (
        0,
        0,
    )
    for spec in PEER_SPECS:
        row = results[spec]
        assert "migrations_completed" not in row  # a peer has no counterpart
        assert row["command"][0] == str(PEERS_VENV / "bin" / spec.partition(":")[0])
        assert spec in run.stdout  # the table has a line for it either way
        if PEERS_INSTALLED:
            assert_ran(spec, row, data["requests"], 2)
        else:
            assert "not installed" in row["error"] and "make peers" in row["error"], row
            assert "ttft_mean_s" not in row
    if PEERS_INSTALLED:
        # kv_aware follows the replicas' KV events; a batch it cannot decode would be a note here.
        assert "notes" not in results["vllm-router:kv_aware"], results["vllm-router:kv_aware"]["notes"]
        assert "--kv-event-source" in results["vllm-router:kv_aware"]["command"]
    # The simulator's twin of this run: the same request count and rate, flags it understands.
    sim = data["sim_command"].split()
    assert sim[sim.index("--requests") + 1] == str(data["requests"])
    assert float(sim[sim.index("--rate") + 1]) == data["rate"] == 4.0
    assert "smg" not in data["sim_command"]  # peers are not simulated


def test_missing_peers_keep_their_rows_in_json_table_and_plots(tmp_path: Path) -> None:
    report = tmp_path / "report"
    absent = tmp_path / "no-such-venv"
    _, data = bench_live(
        tmp_path, "--duration", "1", "--peers", "--peers-venv", str(absent), "--report", str(report)
    )
    results = data["results"]
    assert list(results) == ["round_robin", *PEER_SPECS]  # exit status 0: only kvrouter's rows count
    for spec in PEER_SPECS:
        assert results[spec]["error"].startswith(f"not installed: {absent / 'bin'}"), results[spec]
    table = (report / "table.md").read_text()
    assert "| smg:cache_aware | did not run: not installed" in table
    assert "| round_robin | " in table
    for name in ("ttft_cdf.png", "hit_rate.png", "inflight.png"):
        assert (report / name).stat().st_size > 0, name

    # The simulator's twin: its sim_command drives the same requests and compares; other flags, refused.
    sim = shlex.split(data["sim_command"])[2:]  # after "kvrouter sim"
    sim_json = tmp_path / "sim.json"
    compare = ["--compare-live", str(tmp_path / "live.json"), "--json", str(sim_json)]
    ok = subprocess.run(
        [*KVROUTER, "sim", *sim, *compare], capture_output=True, text=True, timeout=60, check=False
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    simulated = json.loads(sim_json.read_text())
    assert (
        simulated["workload_digest"] == data["workload_digest"] and simulated["requests"] == data["requests"]
    )
    figures = simulated["live_comparison"]["policies"]["round_robin"]  # peers are not simulated
    assert set(figures) == {"hit rate", "TTFT mean", "TTFT p99", "out tok/s"}
    assert figures["TTFT mean"]["live"] == results["round_robin"]["ttft_mean_s"]
    other = [*sim[: sim.index("--rate") + 1], "5", *sim[sim.index("--rate") + 2 :]]
    refused = subprocess.run(
        [*KVROUTER, "sim", *other, *compare], capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode == 2 and "drove other requests" in refused.stderr, refused.stderr


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # ppid, field 4 of stat
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_stops_the_router_it_started(tmp_path: Path, sig: signal.Signals) -> None:
    err = tmp_path / "stderr"
    with err.open("wb") as stderr:
        # A session of its own: the signal reaches the bench alone, not its router as a terminal's
        # Ctrl-C would, so what stops the router is the bench's own cleanup. SIGINT is reset to its
        # default first: a process started in the background by a non-interactive shell (`make test &`,
        # a CI runner) inherits SIGINT ignored, and Python then leaves it ignored, as a user's would be.
        bench = subprocess.Popen(
            [*KVROUTER, "bench", "live", *SHORT, "--duration", "60", "--json", str(tmp_path / "x.json")],
            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True, preexec_fn=_default_sigint,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not re.search(rb"\d+/\d+ requests", err.read_bytes()):  # the progress bar: the router is up
            assert bench.poll() is None and time.monotonic() < deadline, err.read_text()[-2000:]
            time.sleep(0.2)
        children = _children(bench.pid)
        assert children, "the router should be a child process of the bench"
        bench.send_signal(sig)
        assert bench.wait(timeout=30) == 130, err.read_text()[-2000:]
        assert "interrupted" in err.read_text()
        assert not [pid for pid in children if _alive(pid)]
        assert not (tmp_path / "x.json").exists()
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
