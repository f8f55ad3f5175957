"""The simulator's step floor (`ttft_step_floor_mean_s`, load/report.py): each request's TTFT without
queueing on the replica it was sent to — the rest of the step running there at its arrival plus the
next step. TTFT never goes below it; it equals it where nothing queues; it is shown as a column."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from load.report import format_table, summarize
from load.sim import SimConfig, SimResult, Simulation, prepare
from load.workloads import make_workload
from router.cli import main
from workers.engine import get_preset

PRESET = get_preset("llama-8b-h100")


def simulate(spec: str, workload: str, *, replicas: int, rate: float, requests: int) -> SimResult:
    reqs = make_workload(workload, seed=3, replicas=replicas, rate=rate, requests=requests)
    result = Simulation(spec, SimConfig(replicas=replicas, preset=PRESET)).run(
        prepare(reqs, PRESET.block_size)
    )
    assert result.rejected == 0 and len(result.records) == len(reqs)
    return result


def test_sparse_arrivals_have_no_queueing_so_ttft_is_the_floor() -> None:
    # One request every 2 s over 2 replicas: each finds at most decodes running (256-token answers
    # of ~2 s), never another prefill to wait for, so it is scheduled in the step after its arrival.
    result = simulate("round_robin", "no-sharing", replicas=2, rate=0.5, requests=12)
    busy_on_arrival = 0
    for rec in result.records:
        assert rec.step_floor_s is not None
        assert math.isclose(rec.ttft_s, rec.step_floor_s, rel_tol=1e-9, abs_tol=1e-12)
        # The floor holds at least the request's own prefill step.
        assert rec.step_floor_s >= PRESET.step_duration(rec.prompt_tokens - rec.cached_tokens, 0, 0) - 1e-12
        busy_on_arrival += rec.step_floor_s > PRESET.step_duration(rec.prompt_tokens, 0, 0) + 1e-9
    assert busy_on_arrival > 0  # some arrived during another's decode step, and waited for its end


def test_a_burst_on_one_replica_queues_above_the_floor() -> None:
    # 40 uncached prompts at once on one replica: the 8,192-token step budget takes a few at a time,
    # so later ones wait whole steps of earlier ones' prefill: TTFT above the floor, never below.
    result = simulate("round_robin", "no-sharing", replicas=1, rate=1000.0, requests=40)
    gaps = [rec.ttft_s - rec.step_floor_s for rec in result.records if rec.step_floor_s is not None]
    assert len(gaps) == 40
    assert min(gaps) >= -1e-12
    assert max(gaps) > 0.1  # queueing of at least a few prefill steps
    figures = summarize(result.records, result.busy_s, makespan_s=result.makespan_s)
    assert figures["ttft_step_floor_mean_s"] < figures["ttft_mean_s"]


def test_the_column_appears_after_the_ttft_mean_only_where_results_have_it() -> None:
    result = simulate("least_load", "shared-prefix", replicas=2, rate=20.0, requests=40)
    sim = summarize(result.records, result.busy_s, makespan_s=result.makespan_s)
    header = format_table({"least_load": sim}).splitlines()[0]
    assert "TTFT mean s  step floor s  p50 s" in header
    # Live records (bench live, the demo) carry no step floor: no key, no column.
    live_records = [dataclasses.replace(rec, step_floor_s=None) for rec in result.records]
    live = summarize(live_records, result.busy_s, makespan_s=result.makespan_s)
    assert "ttft_step_floor_mean_s" not in live
    assert "step floor" not in format_table({"least_load": live})


def test_kvrouter_sim_writes_the_floor_and_the_engines_busy_time(tmp_path: Path) -> None:
    # The figures the docs derive the mean step from (engine_busy_s / engine_steps) come from the CLI.
    out = tmp_path / "sim.json"
    args = ["sim", "--workload", "shared-prefix", "--replicas", "2", "--requests", "40", "--rate", "20"]
    assert main([*args, "--policies", "round_robin,kvaware", "--json", str(out)]) == 0
    for figures in json.loads(out.read_text())["results"].values():
        assert 0 < figures["ttft_step_floor_mean_s"] <= figures["ttft_mean_s"] + 1e-12
        assert figures["engine_steps"] > 0
        # Every request computes at least one prefill step, and steps are never shorter than base_s.
        assert figures["engine_busy_s"] >= figures["engine_steps"] * PRESET.base_s - 1e-9
