"""The engine's scheduler: prefix reuse, chunked prefill, batching limits, abort, preemption, LRU."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from workers.engine import Engine, StepResult, get_preset

TINY = get_preset("tiny")  # block 16, 256 blocks, budget 512 tokens, 16 sequences


def run(engine: Engine, now: float = 0.0, *, check: bool = True) -> list[StepResult]:
    """Step until idle, each step starting when the previous one ended."""
    results = []
    while engine.has_work():
        result = engine.step(now)
        if check:
            engine.pool.check_invariants()
        results.append(result)
        now = result.end
    return results


def prompt(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


@pytest.mark.parametrize(
    ("length", "cached"),
    [(16, 0), (17, 16), (31, 16), (32, 16), (33, 32), (48, 32), (50, 48), (100, 96)],
)
def test_identical_prompt_hits_all_full_blocks_but_recomputes_the_last_token(
    length: int, cached: int
) -> None:
    engine = Engine(TINY)
    engine.submit("a", prompt(length), 1, 0.0)
    first = run(engine)
    engine.submit("b", prompt(length), 1, first[-1].end)
    second = run(engine, first[-1].end)
    assert first[0].first_tokens[0].cached_tokens == 0
    assert second[0].first_tokens[0].cached_tokens == cached
    assert second[-1].finished[0].cached_tokens == cached
    assert second[0].num_prefill_tokens == length - cached
    metrics = engine.metrics()
    assert (metrics.prefix_cache_queries, metrics.prefix_cache_hits) == (2 * length, cached)


@pytest.mark.parametrize(("diverge_at", "cached"), [(0, 0), (15, 0), (16, 16), (40, 32), (47, 32), (48, 48)])
def test_shared_prefix_hits_block_granularly(diverge_at: int, cached: int) -> None:
    engine = Engine(TINY)
    a = prompt(80)
    b = a[:diverge_at] + prompt(80 - diverge_at, start=5000)
    engine.submit("a", a, 1, 0.0)
    end = run(engine)[-1].end
    engine.submit("b", b, 1, end)
    assert run(engine, end)[0].first_tokens[0].cached_tokens == cached


def test_a_request_admitted_in_the_same_step_hits_blocks_scheduled_before_it() -> None:
    # vLLM caches blocks when they are scheduled, so the second identical prompt reuses them at once.
    engine = Engine(TINY)
    engine.submit("a", prompt(50), 1, 0.0)
    engine.submit("b", prompt(50), 1, 0.0)
    step = engine.step(0.0)
    assert [f.cached_tokens for f in step.first_tokens] == [0, 48]
    assert step.num_prefill_tokens == 50 + 2


def test_chunked_prefill_respects_the_token_budget_and_the_first_token_ends_the_prefill() -> None:
    engine = Engine(TINY)  # 512 tokens a step
    for i in range(3):
        engine.submit(f"r{i}", prompt(700, start=10_000 * (i + 1)), 4, 0.0)
    results = run(engine)
    for r in results:
        assert r.num_prefill_tokens + r.num_decode_seqs <= TINY.max_num_batched_tokens
    firsts = {f.request_id: i for i, r in enumerate(results) for f in r.first_tokens}
    # Steps: r0 512 | r0 188 (done), r1 324 | r0 1, r1 376 (done), r2 135 | ... r2 510 | ... r2 55 (done)
    assert firsts == {"r0": 1, "r1": 2, "r2": 4}
    assert results[0].num_prefill_tokens == 512 and results[0].first_tokens == ()


def test_each_request_gets_one_token_per_step_after_its_first() -> None:
    engine = Engine(TINY)
    for i in range(5):
        engine.submit(f"r{i}", prompt(30 + i, start=100 * i), 7, 0.0)
    per_request: dict[str, list[int]] = {}
    for index, r in enumerate(run(engine)):
        counts = Counter(rid for rid, _ in r.new_tokens)
        assert max(counts.values(), default=0) <= 1
        assert r.num_new_tokens == len(r.new_tokens)
        for rid in counts:
            per_request.setdefault(rid, []).append(index)
    for steps in per_request.values():
        assert len(steps) == 7 and steps == list(range(steps[0], steps[0] + 7))


def test_outputs_are_stamped_with_the_end_of_their_step() -> None:
    engine = Engine(TINY)
    engine.submit("r", prompt(40), 3, 5.0)
    results = run(engine, 5.0)
    first = results[0].first_tokens[0]
    assert first.time == results[0].end > 5.0 == first.arrival_time == first.first_scheduled_time
    done = results[-1].finished[0]
    assert (done.prompt_tokens, done.completion_tokens, done.finish_time) == (40, 3, results[-1].end)
    assert done.first_token_time == first.time


def test_max_num_seqs_bounds_the_running_batch() -> None:
    engine = Engine(replace(TINY, max_num_seqs=2))
    for i in range(5):
        engine.submit(f"r{i}", prompt(20, start=100 * i), 3, 0.0)
    now = 0.0
    while engine.has_work():
        result = engine.step(now)
        assert engine.metrics().num_requests_running <= 2
        assert len({f.request_id for f in result.first_tokens}) <= 2
        now = result.end
    assert engine.metrics().request_success == 5


def test_abort_releases_blocks_at_any_time() -> None:
    engine = Engine(TINY)
    engine.submit("long", prompt(900), 10, 0.0)
    engine.submit("queued", prompt(900, start=9000), 10, 0.0)
    end = engine.step(0.0).end  # "long" holds 512 tokens of blocks, mid-prefill
    assert engine.metrics().kv_cache_usage_perc > 0
    assert engine.abort("long") and engine.abort("queued")
    assert engine.metrics().kv_cache_usage_perc == 0.0
    assert engine.pool.num_free_blocks == TINY.num_gpu_blocks
    assert not engine.has_work() and not engine.abort("long")
    engine.pool.check_invariants()
    # The aborted request's full blocks stay cached.
    assert engine.held_prefix_tokens(prompt(900)) == 512
    assert engine.step(end).duration == 0.0


def test_preemption_when_kv_is_too_small_and_everything_still_finishes() -> None:
    engine = Engine(replace(TINY, num_gpu_blocks=12))  # 192 tokens for 4 requests of 100 tokens
    for i in range(4):
        engine.submit(f"r{i}", prompt(40, start=1000 * i), 60, 0.0)
    results = run(engine)
    finished = [f for r in results for f in r.finished]
    assert sorted(f.request_id for f in finished) == ["r0", "r1", "r2", "r3"]
    assert all(f.completion_tokens == 60 for f in finished)
    preempted = [rid for r in results for rid in r.preempted]
    metrics = engine.metrics()
    assert metrics.num_preemptions == len(preempted) == sum(f.num_preemptions for f in finished) > 0
    assert metrics.generation_tokens == 4 * 60 and metrics.prompt_tokens == 4 * 40
    # Recompute preemption: the last admitted is the victim, and requeued at the head of the queue.
    assert preempted[0] == "r3"


def test_lru_evicts_the_least_recently_finished_blocks_first() -> None:
    engine = Engine(replace(TINY, num_gpu_blocks=8))  # 128 tokens
    now = 0.0
    for name in ("a", "b", "c"):  # 48 tokens = 3 blocks each; c needs one of a's
        engine.submit(name, prompt(48, start=ord(name) * 1000), 1, now)
        now = run(engine, now)[-1].end
    assert engine.held_prefix_tokens(prompt(48, start=ord("a") * 1000)) == 32  # its tail block went first
    assert engine.held_prefix_tokens(prompt(48, start=ord("b") * 1000)) == 48
    assert engine.held_prefix_tokens(prompt(48, start=ord("c") * 1000)) == 48


def test_a_blocked_head_is_looked_up_again_every_step_as_vllm_counts_it() -> None:
    engine = Engine(replace(TINY, num_gpu_blocks=10))  # 160 tokens
    engine.submit("big", prompt(120), 30, 0.0)
    engine.submit("next", prompt(100, start=5000), 1, 0.0)
    results = run(engine)
    blocked_steps = next(
        i for i, r in enumerate(results) if any(f.request_id == "next" for f in r.first_tokens)
    )
    assert blocked_steps == 30  # "big" frees its blocks when its 30th token ends step 29
    assert engine.metrics().prefix_cache_queries == 120 + 100 * (blocked_steps + 1)


def test_step_may_not_start_before_the_previous_step_ended() -> None:
    engine = Engine(TINY)
    engine.submit("r", prompt(40), 5, 0.0)
    result = engine.step(0.0)
    with pytest.raises(ValueError, match="before the previous step"):
        engine.step(result.end / 2)
    engine.step(result.end)


@pytest.mark.parametrize(
    ("request_id", "tokens", "max_tokens", "match"),
    [
        ("dup", [1, 2, 3], 1, "already"),
        ("empty", [], 1, "empty"),
        ("zero", [1, 2, 3], 0, "max_tokens"),
        ("long", list(range(2000)), 49, "max_model_len"),
    ],
)
def test_submit_refuses_invalid_requests(
    request_id: str, tokens: list[int], max_tokens: int, match: str
) -> None:
    engine = Engine(TINY)  # max_model_len 2048
    engine.submit("dup", [9], 1, 0.0)
    with pytest.raises(ValueError, match=match):
        engine.submit(request_id, tokens, max_tokens, 0.0)


def test_import_prefix_makes_the_next_request_hit_without_counting_a_query() -> None:
    engine = Engine(TINY, enable_kv_cache_events=True)
    p = prompt(50)
    assert engine.import_prefix(p, 0.0) == 48
    assert engine.held_prefix_tokens(p) == 48
    assert engine.metrics().prefix_cache_queries == 0
    assert engine.metrics().kv_cache_usage_perc == 0.0  # imported blocks are cached but free
    assert len(engine.drain_events()) == 1
    engine.submit("r", [*p, 7], 1, 0.0)
    assert run(engine)[0].first_tokens[0].cached_tokens == 48


def test_reset_prefix_cache_is_refused_while_requests_hold_blocks() -> None:
    engine = Engine(TINY)
    engine.submit("r", prompt(40), 5, 0.0)
    end = engine.step(0.0).end
    assert engine.reset_prefix_cache() is False
    end = run(engine, end)[-1].end
    assert engine.reset_prefix_cache() is True
    engine.submit("again", prompt(40), 1, end)
    assert run(engine, end)[0].first_tokens[0].cached_tokens == 0


def test_step_duration_is_the_presets_time_model_of_what_was_scheduled() -> None:
    engine = Engine(get_preset("llama-8b-h100"))
    for i in range(3):
        engine.submit(f"r{i}", prompt(300, start=1000 * i), 4, 0.0)
    results = run(engine, check=False)
    for r in results:
        expected = engine.preset.step_duration(r.num_prefill_tokens, r.num_decode_seqs, r.num_context_tokens)
        assert r.duration == pytest.approx(expected)
    assert results[0].num_prefill_tokens == 900 and results[0].num_decode_seqs == 0
    assert results[1].num_decode_seqs == 3 and results[1].num_context_tokens == 3 * 300


def test_an_idle_step_takes_no_time() -> None:
    result = Engine(TINY).step(3.0)
    assert (result.duration, result.end, result.new_tokens) == (0.0, 3.0, ())


def test_without_token_emission_counts_remain() -> None:
    engine = Engine(TINY, emit_token_ids=False)
    engine.submit("r", prompt(40), 5, 0.0)
    results = run(engine)
    assert all(r.new_tokens == () for r in results)
    assert sum(r.num_new_tokens for r in results) == 5


def test_prefix_caching_can_be_disabled() -> None:
    engine = Engine(TINY, enable_prefix_caching=False, enable_kv_cache_events=True)
    for name in ("a", "b"):
        engine.submit(name, prompt(50), 1, 0.0)
    results = run(engine)
    assert [f.cached_tokens for f in results[0].first_tokens] == [0, 0]
    assert engine.metrics().prefix_cache_queries == 0 and engine.drain_events() == []


def test_metrics_report_the_queue_and_the_cache() -> None:
    engine = Engine(replace(TINY, max_num_seqs=1))
    engine.submit("a", prompt(64), 2, 0.0)
    engine.submit("b", prompt(64, start=7000), 2, 0.0)
    engine.step(0.0)
    m = engine.metrics()
    assert (m.num_requests_running, m.num_requests_waiting) == (1, 1)
    assert m.kv_cache_usage_perc == pytest.approx(4 / TINY.num_gpu_blocks)
    assert (m.block_size, m.num_gpu_blocks) == (16, 256)
