"""The simulator runs the hot-prefix controller for kvaware (migration on): on hot-prefix it copies the
hot group to more replicas, its requests spread over them, and the hit rate does not drop."""

from __future__ import annotations

from collections import Counter

import pytest

from load.report import summarize
from load.sim import SimConfig, SimResult, Simulation, prepare
from load.workloads import make_workload
from workers.engine import get_preset

PRESET = get_preset("llama-8b-h100")


@pytest.fixture(scope="module")
def runs() -> tuple[dict[str, SimResult], dict[str, str]]:
    reqs = make_workload(
        "hot-prefix",
        seed=0,
        replicas=8,
        rate=None,
        requests=800,
        prefill_tokens_per_s=PRESET.prefill_tokens_per_s,
        service_s=PRESET.service_s,
    )
    prepared = prepare(reqs, PRESET.block_size)
    out = {
        spec: Simulation(spec, SimConfig(replicas=8, preset=PRESET)).run(prepared)
        for spec in ("kvaware:migration=false", "kvaware")
    }
    return out, {r.request_id: r.group or "" for r in reqs}


def test_migration_runs_only_when_enabled(runs: tuple[dict[str, SimResult], dict[str, str]]) -> None:
    results, _ = runs
    assert results["kvaware:migration=false"].migrations == []
    outcomes = Counter(o for _, _, o in results["kvaware"].migrations)
    assert outcomes["completed"] >= 1 and outcomes["failed"] == 0
    for _, plan, _ in results["kvaware"].migrations:
        assert plan.mechanism == "copy" and plan.prefix_tokens == 4096


def test_hot_group_spreads_without_losing_hits(runs: tuple[dict[str, SimResult], dict[str, str]]) -> None:
    results, group = runs

    def spread(r: SimResult) -> int:
        return len({rec.replica for rec in r.records if group[rec.request_id] == "g0"})

    assert spread(results["kvaware:migration=false"]) == 1
    assert spread(results["kvaware"]) >= 2
    figs = {
        spec: summarize(r.records, r.busy_s, makespan_s=r.makespan_s, rejected=r.rejected)
        for spec, r in results.items()
    }
    assert figs["kvaware"]["hit_rate"] >= figs["kvaware:migration=false"]["hit_rate"]
    # At 800 requests the p99 is the 16 groups' first (cold) prefills for both; the mean and the
    # end-to-end latency show the hot holder's smaller decode batch.
    for key in ("ttft_mean_s", "e2e_mean_s"):
        assert figs["kvaware"][key] < figs["kvaware:migration=false"][key]
