"""`--settle S` (load/report.py `settled_figures`): TTFT mean and p99 over the requests that arrived S
seconds or more after the first, in `kvrouter sim` and `kvrouter bench live` alike, and their columns."""

from __future__ import annotations

import math
import shlex

from load.bench_live import sim_command
from load.report import RequestRecord, format_table, settled_figures, summarize


def record(i: int, arrival_s: float, ttft_s: float) -> RequestRecord:
    return RequestRecord(
        request_id=f"r{i}",
        replica="a",
        arrival_s=arrival_s,
        first_token_s=arrival_s + ttft_s,
        done_s=arrival_s + ttft_s + 0.1,
        prompt_tokens=100,
        cached_tokens=0,
        logical_cached_tokens=0,
        expected_cached_tokens=0,
        output_tokens=4,
    )


# A cold start: the first 3 s are slow (4 s TTFT), the steady state after them fast.
COLD = [record(i, 10.0 + i * 0.5, 4.0 if i < 6 else 0.1 + 0.01 * i) for i in range(20)]


def test_only_arrivals_settle_s_after_the_first_count() -> None:
    figures = settled_figures(COLD, 3.0)
    # Arrivals from 13.0 s (the first was at 10.0 s): i = 6..19, none of the cold ones.
    steady = [0.1 + 0.01 * i for i in range(6, 20)]
    assert figures["settle_s"] == 3.0 and figures["settled_requests"] == 14
    assert math.isclose(figures["ttft_mean_settled_s"], sum(steady) / 14)
    assert math.isclose(figures["ttft_p99_settled_s"], max(steady))
    # The whole-run p99 is the cold start's.
    assert summarize(COLD, {"a": 1.0}, makespan_s=10.0)["ttft_p99_s"] == 4.0
    # 0 s settles nothing away; past the last arrival nothing is left (NaN, not a crash).
    assert settled_figures(COLD, 0.0)["settled_requests"] == 20
    late = settled_figures(COLD, 60.0)
    assert late["settled_requests"] == 0 and math.isnan(late["ttft_p99_settled_s"])


def test_summarize_adds_them_only_when_asked() -> None:
    plain = summarize(COLD, {"a": 1.0}, makespan_s=10.0)
    assert not any("settle" in key for key in plain)
    settled = summarize(COLD, {"a": 1.0}, makespan_s=10.0, settle_s=3.0)
    assert settled == {**plain, **settled_figures(COLD, 3.0)}


def test_the_table_shows_the_settled_columns_when_results_have_them() -> None:
    plain = summarize(COLD, {"a": 1.0}, makespan_s=10.0)
    assert "after" not in format_table({"kvaware": plain})
    table = format_table({"kvaware": summarize(COLD, {"a": 1.0}, makespan_s=10.0, settle_s=3.0)})
    header, row = table.splitlines()[:2]
    assert header.endswith("mean after 3 s  p99 after 3 s")
    assert row.split()[-2:] == ["0.225", "0.290"]  # the steady state's mean and p99, not 4 s


def test_sim_command_carries_the_transfer_and_settle() -> None:
    base = dict(replicas=4, preset="demo", rate=20.0, duration_s=30.0, requests=600, output_tokens=16, seed=0)
    args = shlex.split(sim_command("hot-prefix", ["kvaware"], **base))  # type: ignore[arg-type]
    assert args[args.index("--kv-transfer") + 1] == "warmup" and "--settle" not in args
    args = shlex.split(
        sim_command("hot-prefix", ["kvaware"], **base, kv_transfer="p2p", settle_s=5.0)  # type: ignore[arg-type]
    )
    assert args[args.index("--kv-transfer") + 1] == "p2p" and args[args.index("--settle") + 1] == "5"
