"""What bench live reads from replicas, and how the simulator's prediction is held against it.

- The replica counters are parsed from a page the emulator's own collector renders for a real engine
  that ran requests, so the parser is checked against the exact names and labels a replica exports.
- The workload digest is what makes "the same requests" checkable: bench live bounds its workload by
  duration, `kvrouter sim` by count and duration, and the two must give equal lists.
"""

from __future__ import annotations

import math

import pytest

from load.replica_metrics import (
    ReplicaCounters,
    hit_rate,
    parse_replica_metrics,
    parse_router_migrations,
    replica_ttft_mean,
)
from load.sim_vs_live import TOLERANCE, compare, format_comparison, workload_digest
from load.workloads import make_workload
from router.metrics import RouterMetrics
from workers.emulator.metrics import ReplicaCollector, RequestStats, make_registry, render
from workers.engine import Engine, get_preset


def _rendered_page(prompts: list[list[int]]) -> tuple[bytes, Engine, RequestStats]:
    engine = Engine(get_preset("tiny"))
    stats = RequestStats()
    now = 0.0
    for i, prompt in enumerate(prompts):
        engine.submit(f"r{i}", prompt, 2, now)
        while engine.has_work():  # one request at a time, so the second finds the first's blocks
            step = engine.step(now)
            now = step.end
            for first in step.first_tokens:
                stats.ttft.observe(first.time - first.arrival_time)
            for done in step.finished:
                stats.e2e.observe(done.finish_time - done.arrival_time)
                stats.finished_reasons[done.finish_reason] += 1
    collector = ReplicaCollector("m", lambda: (engine.metrics(), stats))
    return render(make_registry(collector)), engine, stats


def test_migrations_parse_from_the_page_kvrouter_renders() -> None:
    metrics = RouterMetrics()
    assert parse_router_migrations(metrics.render().decode()) == {"started": 0, "completed": 0, "failed": 0}
    for outcome in ("started", "started", "started", "completed", "completed", "failed"):
        metrics.migrations.labels(outcome).inc()
    page = metrics.render().decode()
    assert parse_router_migrations(page) == {"started": 3, "completed": 2, "failed": 1}


def test_counters_parse_from_a_page_the_emulator_renders() -> None:
    shared = list(range(100, 164))  # 64 tokens: 4 blocks of 16
    page, engine, stats = _rendered_page([[*shared, 1, 2, 3], [*shared, 4, 5, 6]])
    counters = parse_replica_metrics(page.decode())
    m = engine.metrics()
    assert m.prefix_cache_hits > 0  # the second prompt reused the first one's blocks
    assert counters.prefix_cache_queries == m.prefix_cache_queries
    assert counters.prefix_cache_hits == m.prefix_cache_hits
    assert counters.prompt_tokens == m.prompt_tokens
    assert counters.generation_tokens == m.generation_tokens == 4
    assert counters.requests_finished == 2
    assert counters.e2e_seconds == pytest.approx(stats.e2e.sum)
    assert counters.first_tokens == 2
    assert stats.ttft.sum > 0
    assert replica_ttft_mean([counters]) == pytest.approx(stats.ttft.sum / 2)
    assert counters.running == counters.waiting == 0
    assert hit_rate([counters]) == m.prefix_cache_hits / m.prefix_cache_queries


def test_since_subtracts_counters_and_keeps_gauges() -> None:
    before = ReplicaCounters(prefix_cache_queries=100, prefix_cache_hits=40, running=9, waiting=9)
    after = ReplicaCounters(prefix_cache_queries=300, prefix_cache_hits=190, running=2, waiting=1)
    delta = after.since(before)
    assert (delta.prefix_cache_queries, delta.prefix_cache_hits) == (200, 150)
    assert (delta.running, delta.waiting, delta.in_flight) == (2, 1, 3)
    assert hit_rate([delta, ReplicaCounters()]) == 0.75
    assert hit_rate([]) == 0.0
    assert math.isnan(replica_ttft_mean([delta]))  # no first token, no mean


def test_a_count_and_duration_bound_gives_bench_lives_requests() -> None:
    live = make_workload("multi-turn", seed=3, replicas=4, rate=12.5, duration_s=8.0, model="kvrouter-bench")
    sim = make_workload("multi-turn", seed=3, replicas=4, rate=12.5, duration_s=8.0, requests=len(live))
    assert workload_digest(live) == workload_digest(sim)  # the model name only labels requests
    slow = make_workload("shared-prefix", seed=3, replicas=4, rate=12.5, duration_s=8.0)
    fast = make_workload("shared-prefix", seed=3, replicas=4, rate=12.6, duration_s=8.0, requests=len(slow))
    assert workload_digest(fast) != workload_digest(slow)  # same ids and prompts, other arrivals
    shorter = make_workload(
        "multi-turn", seed=3, replicas=4, rate=12.5, duration_s=8.0, requests=len(live) - 1
    )
    assert workload_digest(shorter) != workload_digest(live)


@pytest.mark.parametrize(
    ("live", "sim", "ratio", "within"),
    [
        (1.0, 1.15, 1.15, True),  # the bound itself is within
        (1.0, 0.85, 0.85, True),
        (1.0, 1.16, 1.16, False),
        (0.5, 0.2, 0.4, False),
        (0.0, 0.1, None, None),  # no ratio to a live zero
        (0.0, 0.0, 1.0, True),  # but equal zeros agree (no-sharing's hit rates)
        (math.nan, 1.0, None, None),
    ],
)
def test_compare_holds_the_sim_against_live(
    live: float, sim: float, ratio: float | None, within: bool | None
) -> None:
    live_row = {"hit_rate": live, "ttft_mean_s": live}
    sim_row = {"metrics_hit_rate": sim, "ttft_mean_s": sim, "hit_rate": 99.0}
    out = compare({"kvaware": live_row, "gone": {"error": "crashed"}}, {"kvaware": sim_row, "gone": sim_row})
    assert list(out) == ["kvaware"]  # a live row with an error has nothing to compare
    for label in ("hit rate", "TTFT mean"):  # the live hit rate meets the sim's metrics_hit_rate
        cell = out["kvaware"][label]
        assert cell["within"] is within
        assert cell["sim_over_live"] == (None if ratio is None else pytest.approx(ratio))
    assert out["kvaware"]["TTFT p99"]["within"] is None  # absent on both sides
    assert TOLERANCE == 0.15


def test_settled_figures_compare_only_when_both_sides_settled_alike() -> None:
    def row(settle: float | None, p99: float) -> dict[str, float]:
        figures = {"ttft_p99_s": 2.0, "ttft_mean_settled_s": p99 / 2, "ttft_p99_settled_s": p99}
        return figures if settle is None else {**figures, "settle_s": settle}

    out = compare({"kvaware": row(5.0, 0.158)}, {"kvaware": row(5.0, 0.135)})
    cell = out["kvaware"]["p99 after 5 s"]
    assert (cell["live"], cell["sim"], cell["within"]) == (0.158, 0.135, True)
    assert out["kvaware"]["mean after 5 s"]["sim_over_live"] == pytest.approx(0.135 / 0.158)
    table = format_comparison(out, markdown=True)
    assert "| p99 after 5 s |" in table.splitlines()[0] and "0.158 / 0.135 (0.85)" in table
    # a different S on each side, or none on one, is not the same figure: only the whole-run ones
    for sim_settle in (2.0, None):
        out = compare({"kvaware": row(5.0, 0.158)}, {"kvaware": row(sim_settle, 0.135)})
        assert list(out["kvaware"]) == ["hit rate", "TTFT mean", "TTFT p99", "out tok/s"]
        assert "after" not in format_comparison(out, markdown=False)
