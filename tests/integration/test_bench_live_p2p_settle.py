"""`kvrouter bench live --kv-transfer p2p --settle S` end to end: kvrouter serve is started with
`--kv-transfer p2p` (and accepts it: the row runs), the report and its `sim_command` carry both, and
every row gets the settled TTFT figures, in the JSON and as table columns.

Real processes on loopback, kept short: 2 replicas, 3 s of arrivals at 4 req/s, one row.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

KVROUTER = [sys.executable, "-m", "router.cli"]


def test_p2p_and_settle_reach_the_router_the_sim_command_and_the_table(tmp_path: Path) -> None:
    out = tmp_path / "live.json"
    result = subprocess.run(
        [*KVROUTER, "bench", "live", "--workload", "hot-prefix", "--policies", "kvaware",
         "--replicas", "2", "--duration", "3", "--rate", "4", "--kv-transfer", "p2p", "--settle", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["kv_transfer"] == "p2p"
    sim = shlex.split(data["sim_command"])
    assert sim[sim.index("--kv-transfer") + 1] == "p2p" and sim[sim.index("--settle") + 1] == "1"
    row = data["results"]["kvaware"]
    assert "error" not in row and row["errors"] == 0, row
    command = row["command"]
    assert command[command.index("--kv-transfer") + 1] == "p2p", command
    # Arrivals at 4 req/s over 3 s: those of the first second are left out, the rest counted.
    assert row["settle_s"] == 1.0 and 0 < row["settled_requests"] < row["requests"], row
    assert row["ttft_p99_settled_s"] <= row["ttft_p99_s"]
    header = next(line for line in result.stdout.splitlines() if line.startswith("policy"))
    assert header.endswith("mean after 1 s  p99 after 1 s"), result.stdout


def test_settle_must_leave_part_of_the_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [*KVROUTER, "bench", "live", "--workload", "hot-prefix", "--duration", "3", "--settle", "3",
         "--json", str(tmp_path / "x.json")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "--settle must be >= 0 and less than --duration" in result.stderr
