"""`kvrouter bench core`: kvrouter's own per-request logic in a loop, every stage timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from load.bench_core import STAGES
from router.cli import main


@pytest.mark.parametrize("policy", ["kvaware", "round_robin"])
def test_bench_core_times_every_stage(
    policy: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "core.json"
    args = ["bench", "core", "--policy", policy, "--requests", "50", "--batches", "3", "--json", str(out)]
    assert main(args) == 0
    results = json.loads(out.read_text())
    figures = results["us_per_request"]
    assert set(figures) == {*STAGES, "total"}
    assert all(figures[stage] > 0 for stage in STAGES)
    assert figures["total"] == pytest.approx(sum(figures[s] for s in STAGES), rel=0.5)
    assert results["chunks_per_request"] == 8192 // 64  # bench proxy's 8 KB prompts in 64-character chunks
    assert results["config"]["requests"] == 150
    assert "µs/request" in capsys.readouterr().out


def test_bench_core_refuses_empty_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "core", "--requests", "0"]) == 2
    assert "positive" in capsys.readouterr().err
