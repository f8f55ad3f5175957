"""The simulator: conservation, determinism, the logical ceiling, and the comparison it exists for."""

from __future__ import annotations

import pytest

from load.report import summarize
from load.sim import SimConfig, Simulation, prepare
from load.workloads import make_workload
from workers.engine import get_preset

PRESET = get_preset("llama-8b-h100")


def run(
    spec: str, workload: str, replicas: int, requests: int, rate: float, seed: int = 0
) -> dict[str, object]:
    reqs = make_workload(workload, seed=seed, replicas=replicas, rate=rate, requests=requests)
    prepared = prepare(reqs, PRESET.block_size)
    result = Simulation(spec, SimConfig(replicas=replicas, preset=PRESET, seed=seed)).run(prepared)
    assert len(result.records) + result.rejected == len(reqs)
    return summarize(result.records, result.busy_s, makespan_s=result.makespan_s, rejected=result.rejected)


def test_every_request_completes_and_times_are_causal() -> None:
    reqs = make_workload("multi-turn", seed=1, replicas=3, rate=20.0, requests=120)
    prepared = prepare(reqs, PRESET.block_size)
    result = Simulation("least_load", SimConfig(replicas=3, preset=PRESET)).run(prepared)
    assert result.rejected == 0
    assert sorted(r.request_id for r in result.records) == sorted(r.request_id for r in reqs)
    for rec in result.records:
        assert rec.arrival_s <= rec.first_token_s <= rec.done_s
        assert 0 <= rec.cached_tokens <= rec.prompt_tokens
        assert rec.output_tokens >= 1
    assert sum(result.busy_s.values()) > 0


def test_same_seed_same_result() -> None:
    a = run("kvaware", "shared-prefix", 4, 200, 40.0)
    b = run("kvaware", "shared-prefix", 4, 200, 40.0)
    assert a == b


def test_logical_hit_rate_bounds_the_physical_one() -> None:
    figures = run("round_robin", "shared-prefix", 4, 300, 40.0)
    assert 0 < float(figures["hit_rate"]) <= float(figures["logical_hit_rate"]) + 1e-9  # type: ignore[arg-type]


def test_no_sharing_has_no_logical_reuse() -> None:
    figures = run("round_robin", "no-sharing", 2, 80, 10.0)
    assert figures["logical_hit_rate"] == 0.0
    assert figures["hit_rate"] == 0.0


@pytest.mark.parametrize("workload", ["shared-prefix"])
def test_cache_aware_routing_beats_round_robin_where_prefixes_are_shared(workload: str) -> None:
    # 8 replicas, 64 groups: round robin recomputes each group's prefix on every replica.
    rr = run("round_robin", workload, 8, 600, 150.0)
    kv = run("kvaware", workload, 8, 600, 150.0)
    assert float(kv["hit_rate"]) > float(rr["hit_rate"]) + 0.1  # type: ignore[arg-type]
    assert float(kv["ttft_mean_s"]) < float(rr["ttft_mean_s"])  # type: ignore[arg-type]
