"""The installed `kvrouter` command: help, errors, and `bench index` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

KVROUTER = [sys.executable, "-m", "router.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KVROUTER, *args], capture_output=True, text=True, timeout=120, check=False)


def test_help_lists_the_subcommands() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert "bench" in result.stdout and "cache-aware" in result.stdout
    bench = run("bench", "--help")
    assert bench.returncode == 0 and "index" in bench.stdout


def test_no_subcommand_is_a_usage_error() -> None:
    assert run().returncode == 2
    assert run("bench").returncode == 2
    assert run("no-such-command").returncode == 2


def test_bench_index_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "index.json"
    result = run(
        "bench", "index", "--blocks", "20000", "--replicas", "4", "--repeat", "3", "--json", str(out)
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["blocks"] == 20000 and data["replicas"] == 4
    for key in (
        "bytes_per_block",
        "hash_128kb_ms_p50",
        "match_128kb_ms_p50",
        "insert_128kb_ms_p50",
        "ring_pick_us_p50",
        "similarity_query_ms_p50",
    ):
        assert data[key] > 0, key
        assert key in result.stdout
    assert data["chunks_per_128kb_prompt"] == 2048


def test_bench_index_rejects_bad_sizes() -> None:
    result = run("bench", "index", "--blocks", "0")
    assert result.returncode == 2
    assert "positive" in result.stdout


def test_demo_runs_both_policies_and_prints_the_table() -> None:
    result = subprocess.run(
        [*KVROUTER, "demo", "--duration", "3"], capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("policy"))
    assert "hit" in header and "logical" in header and "p99" in header
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("round_robin", "kvaware"))}
    assert set(rows) == {"round_robin", "kvaware"}
    for cells in rows.values():
        hit, logical = float(cells[1]), float(cells[2])
        assert 0.0 <= hit <= logical + 1e-9 <= 1.0 + 1e-9


def test_demo_rejects_bad_arguments() -> None:
    assert run("demo", "--duration", "0").returncode == 2
    assert run("demo", "--policies", "no_such_policy").returncode == 2
