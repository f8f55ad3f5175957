"""`kvrouter bench vllm --peers` on real vLLM: the peer routers' rows next to kvrouter's, on one fleet.

A short run of the command itself (2 replicas of its own, 2 groups of 3 requests a row, both prompt
kinds): every row of PEER_SPECS is there for each prompt kind, and each either has the same figures
as kvrouter's rows, read from the replicas, or an `error` saying why it has none; nothing it started
outlives it. The peers come from `make peers`, which `make test-vllm` runs; the test is skipped, saying
so, only where .venv-peers was never installed (pytest run by hand).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from load.peers import PEER_SPECS

ROOT = Path(__file__).resolve().parents[2]
PEERS_VENV = ROOT / ".venv-peers"
PEERS_INSTALLED = all((PEERS_VENV / "bin" / name).exists() for name in ("smg", "vllm-router"))


def _running(command: list[str]) -> bool:
    """Whether a process with exactly this command line is still alive (not a zombie)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")[:-1]
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if [a.decode(errors="replace") for a in argv] == command and state != "Z":
            return True
    return False


@pytest.mark.skipif(
    not PEERS_INSTALLED,
    reason=f"no peer routers in {PEERS_VENV}: `make peers` installs them (make test-vllm does)",
)
def test_peer_rows_on_real_vllm_have_figures_or_say_why_not(tmp_path: Path, model_dir: Path) -> None:
    python = os.environ.get("KVROUTER_VLLM_PYTHON") or pytest.fail("KVROUTER_VLLM_PYTHON is not set")
    out = tmp_path / "peers.json"
    command = [
        sys.executable, "-m", "router.cli", "bench", "vllm", "--policies", "kvaware", "--peers",
        "--peers-venv", str(PEERS_VENV), "--groups", "2", "--per-group", "3", "--replicas", "2",
        "--python", python, "--model", str(model_dir),
        "--json", str(out),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["prompts"], r["policy"]) for r in rows] == [
        (kind, spec) for kind in ("chat", "tokens") for spec in ("kvaware", *PEER_SPECS)
    ]
    ran = set()
    for row in rows:
        name = f"{row['prompts']} {row['policy']}"
        assert f"| {row['prompts']} | {row['policy']} |" in run.stdout, name  # the table has its line
        assert row["requests"] == 6 and row["logical_hit_rate"] > 0, name
        if row["router"] != "kvrouter":
            assert row["command"][0] == str(PEERS_VENV / "bin" / row["router"]), name
            assert not _running(row["command"]), f"{name}: its router outlived the bench"
        if "hit_rate" not in row:  # did not run: the reason, and no figure
            assert row["router"] != "kvrouter" and row["error"], name
            continue
        assert "error" not in row and row["errors"] == 0, (name, row)
        ran.add((row["prompts"], row["policy"]))
        assert 0.0 <= row["hit_rate"] <= 1.0 and isinstance(row["ttft_mean_s"], float), name
        # Where the requests went, from the replicas' own counters: all 6, whatever the router.
        assert set(row["requests_per_replica"]) == {"vllm-0", "vllm-1"}, name
        assert sum(row["requests_per_replica"].values()) == 6, (name, row["requests_per_replica"])
        assert "notes" not in row, (name, row["notes"])  # kv_aware decoded every KV event batch
    assert {("chat", "kvaware"), ("tokens", "kvaware")} <= ran
    # Each peer takes at least one of the two kinds here (anchors.md, "Running the peers here").
    for spec in PEER_SPECS:
        assert {("chat", spec), ("tokens", spec)} & ran, f"{spec} ran for neither prompt kind"
    kv_aware = next(r for r in rows if r["policy"] == "vllm-router:kv_aware")
    assert kv_aware["command"].count("--kv-event-source") == 2  # one per replica
