"""Hot-prefix controller: threshold math, detection (in each replica's own engine steps), hysteresis,
cooldown, budget, planning, shrink.

No event loop: a Fleet and the controller, driven by hand with explicit times.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re

import pytest

from load.demo import demo_preset
from router.fleet import Fleet, FleetConfig
from router.hot_prefix import (
    DEFAULT_STEP_BASE_TOKENS,
    POLICY_OWNED,
    RENAMED_PARAMS,
    TUNABLE_PARAMS,
    WAITING_REASONS,
    HotPrefixController,
    HotPrefixParams,
    copy_min_tokens,
    copy_s,
    idle_step_s,
    replica_wait_s,
    replica_wait_steps,
)
from router.policies.base import Decision, RequestView, make_request
from router.policies.kvaware import KvAware, KvAwareParams
from workers.engine import get_preset

RATE = 1000.0  # prefill tokens/s
NO_STEP = KvAwareParams(step_base_tokens=0.0, decode_seq_tokens=0.0, context_token_cost=0.0)
# A step of 10 tokens' fixed cost and nothing else: an idle step is 10 ms at RATE, so a replica with `t`
# tokens queued waits (t + 10) / RATE s = t / 10 + 1 steps.
STEP = KvAwareParams(step_base_tokens=10.0, decode_seq_tokens=0.0, context_token_cost=0.0)
_ids = itertools.count()


def chars(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))


PREFIX = chars(1, 1024)  # 16 chunks of 64 characters = 256 tokens


def params(**kw: object) -> HotPrefixParams:
    base: dict[str, object] = {
        "half_life_s": 1.0,
        "hot_wait_steps": 5.0,  # 50 ms at RATE
        "cool_wait_steps": 2.0,
        "headroom_wait_steps": 2.0,
        "min_rate_rps": 1.0,
        "cooldown_s": 1.0,
        "max_concurrent": 2,
        "shrink_after_s": 5.0,
        "kv_bytes_per_token": 1000,
        "copy_bytes_per_s": 1e7,  # 1e-4 s a token: 10x faster than recomputing at 1000 tokens/s
        "copy_overhead_s": 0.01,
        "step": STEP,
    }
    base.update(kw)
    return HotPrefixParams(**base)  # type: ignore[arg-type]


def fleet(*names: str) -> Fleet:
    f = Fleet(KvAware(STEP), FleetConfig(prefill_tokens_per_s=RATE))
    for n in names:
        f.add_replica(n, kv_capacity_tokens=100_000)
    return f


def group_req(prefix: str = PREFIX) -> RequestView:
    return make_request(f"g-{next(_ids)}", "m", prompt=prefix + chars(next(_ids) + 100, 256))


def route_group(f: Fleet, c: HotPrefixController, replica: str, now: float, n: int = 3) -> None:
    """n requests of the group to `replica`, all cached there (they add no prefill queue)."""
    for _ in range(n):
        r = group_req()
        d = Decision(replica, r.prompt_tokens, "prefix-hit")
        f.routed(r, d, now)
        c.observe_routed(r, d, now)


def load(f: Fleet, replica: str, tokens: int, now: float) -> str:
    """Queue `tokens` uncached prefill tokens on `replica` (wait = tokens / 10 + 1 steps at RATE)."""
    r = make_request(f"load-{next(_ids)}", "m", prompt=chars(next(_ids), 4 * tokens), prompt_tokens=tokens)
    f.routed(r, Decision(replica, 0, "x"), now)
    return r.request_id


# -- math ----------------------------------------------------------------------------------------


def test_copy_threshold_is_computed_from_link_and_target() -> None:
    p = params()
    # gain per token = 1/1000 - 1000/1e7 = 0.0009 s; overhead 0.01 s -> 11.1 tokens.
    assert copy_min_tokens(p, RATE) == pytest.approx(0.01 / 0.0009)
    assert copy_s(p, 256) == pytest.approx(0.01 + 256 * 1e-4)
    # A link slower per token than the target's prefill never pays.
    assert copy_min_tokens(params(copy_bytes_per_s=1e6), RATE) == math.inf
    assert copy_min_tokens(params(copy_bytes_per_s=None), RATE) == math.inf
    # Defaults (llama-8b: 128 KiB a token, 25 GB/s, 25K tokens/s): about 144 tokens.
    assert copy_min_tokens(HotPrefixParams(), 25_000.0) == pytest.approx(143.8, abs=0.5)


def test_replica_wait_counts_queue_and_step_work() -> None:
    f = fleet("a")
    load(f, "a", 500, 0.0)
    s = f.replicas["a"]
    assert replica_wait_s(s, 0.0, params(step=NO_STEP)) == pytest.approx(0.5)
    p = params(step=KvAwareParams(step_base_tokens=100.0, decode_seq_tokens=0.0, context_token_cost=0.0))
    assert replica_wait_s(s, 0.0, p) == pytest.approx(0.6)


def test_wait_in_steps_is_the_wait_over_the_replicas_idle_step() -> None:
    f = fleet("a", "b")
    load(f, "a", 500, 0.0)
    a, b = f.replicas["a"], f.replicas["b"]
    assert idle_step_s(a, params()) == pytest.approx(0.01)  # 10 step tokens at 1,000 tokens/s
    assert replica_wait_steps(a, 0.0, params()) == pytest.approx(51.0)  # (500 + 10) / 10
    assert replica_wait_steps(b, 0.0, params()) == pytest.approx(1.0)  # idle: its own step
    f.set_prefill_rate("a", 4 * RATE)  # the rate cancels: the same work is the same number of steps
    assert idle_step_s(a, params()) == pytest.approx(0.0025)
    assert replica_wait_steps(a, 0.0, params()) == pytest.approx(51.0)
    # The step model off (the prefill-only estimate): the unit is the default step's 150 tokens.
    assert DEFAULT_STEP_BASE_TOKENS == KvAwareParams().step_base_tokens == 150.0
    assert idle_step_s(b, params(step=NO_STEP)) == pytest.approx(0.15)
    assert replica_wait_steps(a, 0.0, params(step=NO_STEP)) == pytest.approx(500 / 150)
    # The defaults at the router's default rate (25K tokens/s) are the former 30 and 15 ms.
    d = HotPrefixParams()
    s = Fleet(KvAware(d.step), FleetConfig()).add_replica("x")
    step = idle_step_s(s, d)
    assert step == pytest.approx(0.006)
    assert (d.hot_wait_steps * step, d.cool_wait_steps * step) == pytest.approx((0.03, 0.015))
    assert d.headroom_wait_steps * step == pytest.approx(0.015)


BAD_PARAMS: list[tuple[dict[str, object], str]] = [
    ({"cool_wait_steps": 5.0}, "cool_wait_steps (5.0) must be below hot_wait_steps (5.0)"),
    ({"half_life_s": 0.0}, "half_life_s must be a finite number > 0, got 0.0"),
    ({"copy_bytes_per_s": 0.0}, "copy_bytes_per_s must be a finite number > 0 (or None"),
    ({"cooldown_s": -1}, "cooldown_s must be a finite number >= 0, got -1"),
    ({"cooldown_s": True}, "cooldown_s must be a finite number >= 0, got True"),  # YAML's `yes`
    ({"cooldown_s": "2"}, "cooldown_s must be a finite number >= 0, got '2'"),
    ({"migration_timeout_s": math.inf}, "migration_timeout_s must be a finite number > 0, got inf"),
    ({"migration_timeout_s": math.nan}, "migration_timeout_s must be a finite number > 0, got nan"),
    ({"max_concurrent": 1.0}, "max_concurrent must be an integer >= 0, got 1.0"),
    ({"max_concurrent": -1}, "max_concurrent must be an integer >= 0, got -1"),
    ({"max_holders": 0}, "max_holders must be an integer >= 1, got 0"),
    ({"warmup": 1}, "warmup must be true or false, got 1"),
    ({"hot_wait_steps": 0}, "hot_wait_steps must be a finite number > 0, got 0"),
    ({"headroom_wait_steps": -1}, "headroom_wait_steps must be a finite number > 0, got -1"),
    ({"group_chunks": 0}, "group_chunks must be a positive integer, got 0"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_PARAMS)
def test_params_validated(bad: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        params(**bad)


def test_zero_is_allowed_where_it_means_something() -> None:
    p = params(cool_wait_steps=0, cooldown_s=0, max_concurrent=0, copy_overhead_s=0, kv_bytes_per_token=0)
    assert (p.cool_wait_steps, p.cooldown_s, p.max_concurrent) == (0, 0, 0)
    assert params(copy_bytes_per_s=None).copy_bytes_per_s is None


def test_every_field_but_the_policys_is_tunable_and_checked() -> None:
    names = [f.name for f in dataclasses.fields(HotPrefixParams)]
    assert set(POLICY_OWNED) == {"group_chunks", "step"}
    assert list(TUNABLE_PARAMS) == [n for n in names if n not in POLICY_OWNED]
    assert {
        "cooldown_s",
        "migration_timeout_s",
        "hot_wait_steps",
        "cool_wait_steps",
        "max_concurrent",
    } <= set(TUNABLE_PARAMS)
    # The thresholds' former names (seconds) are gone, each mapped to its replacement.
    assert set(RENAMED_PARAMS.values()) <= set(TUNABLE_PARAMS)
    assert not set(RENAMED_PARAMS) & set(names)


def test_rates_decay_and_prefix_is_the_common_prefix() -> None:
    c = HotPrefixController(params())
    f = fleet("a")
    route_group(f, c, "a", 0.0, n=2)
    (g,) = c.groups(f, 0.0)
    assert g.request_rate == pytest.approx(2 * math.log(2))
    assert g.prefix_tokens == 256  # the shared 1,024 characters, not the questions
    (g,) = c.groups(f, 1.0)
    assert g.request_rate == pytest.approx(math.log(2))  # one half-life later


def test_groups_rank_by_the_rate_now_not_by_the_last_update() -> None:
    c = HotPrefixController(params())  # half-life 1 s
    f = fleet("a")
    other = chars(2, 1024)
    for _ in range(8):  # busy at 0 s, then silent
        r = group_req()
        c.observe_routed(r, Decision("a", 0, "x"), 0.0)
    for _ in range(2):  # a little at 3 s
        r = group_req(other)
        c.observe_routed(r, Decision("a", 0, "x"), 3.0)
    busy, quiet = c.groups(f, 3.0)
    # 8 requests three half-lives ago weigh 1 now, 2 requests now weigh 2: the recent group leads.
    assert busy.request_rate == pytest.approx(2 * math.log(2))
    assert quiet.request_rate == pytest.approx(math.log(2))


# -- detection and planning ------------------------------------------------------------------------


def test_hot_group_plans_copy_and_index_learns_only_on_completion() -> None:
    c = HotPrefixController(params())
    f = fleet("a", "b")
    route_group(f, c, "a", 0.0)
    load(f, "a", 100, 0.0)  # wait 11 steps >= hot 5; b idle, 1 step <= headroom 2
    (plan,) = c.tick(0.0, f)
    assert (plan.target, plan.source, plan.mechanism, plan.prefix_tokens) == ("b", "a", "copy", 256)
    assert plan.prefix_text == PREFIX and plan.bytes == 256 * 1000
    key = c.group_of(group_req())
    assert f.index.holders(key) == ["a"]  # not before the copy completes
    assert c.completed(plan.plan_id, f, 0.1, held_tokens=256)
    assert sorted(f.index.holders(key)) == ["a", "b"]
    assert (c.started, c.completed_count, c.bytes_moved) == (1, 1, 256_000)
    assert not c.completed(plan.plan_id, f, 0.1)  # repeated


def test_not_hot_without_overload_rate_or_headroom() -> None:
    c = HotPrefixController(params())
    f = fleet("a", "b")
    route_group(f, c, "a", 0.0)
    load(f, "a", 30, 0.0)  # wait 4 steps < hot 5
    assert c.tick(0.0, f) == []
    load(f, "b", 100, 0.0)
    load(f, "a", 100, 0.0)  # a overloaded, but b too: no headroom
    assert c.tick(0.0, f) == []
    assert not c.groups(f, 0.0)[0].hot


def test_too_few_requests_are_not_hot() -> None:
    c = HotPrefixController(params())
    f = fleet("a", "b")
    route_group(f, c, "a", 0.0, n=1)  # 0.69 requests/s < 1
    load(f, "a", 100, 0.0)
    assert c.tick(0.0, f) == []


# -- thresholds in each replica's own engine steps ---------------------------------------------------

FAST = get_preset("llama-8b-h100").prefill_tokens_per_s  # 24.6K tokens/s: an idle step is 6.1 ms
SLOW = demo_preset().prefill_tokens_per_s  # `demo`, llama-8b-h100 slowed 4x (load/demo.py): 24 ms


def step_fleet(rate: float, *names: str) -> Fleet:
    """Replicas the router believes prefill at `rate`, with kvaware's default step model (150 tokens)."""
    f = Fleet(KvAware(KvAwareParams()), FleetConfig(prefill_tokens_per_s=rate))
    for n in names:
        f.add_replica(n)
    return f


def test_same_load_in_steps_turns_hot_whatever_the_engine_speed() -> None:
    """Two fleets alike but for the engines' speed (llama-8b-h100 and `demo`, 4x slower), the same work
    queued on the holder: the group turns hot in both and the copy goes to the idle replica. In seconds
    (the former 30 and 15 ms) only the fast fleet did: the slow idle replica waits 24 ms > 15 ms, and
    no replica had headroom (docs/BENCHMARKS.md, issue #8)."""
    idle_s = {}
    for rate in (FAST, SLOW):
        c = HotPrefixController()  # the defaults: hot at 5 steps, headroom 2.5
        f = step_fleet(rate, "a", "b")
        route_group(f, c, "a", 0.0, n=8)  # 1.1 requests/s (half-life 5 s) >= min_rate_rps 1
        load(f, "a", 1000, 0.0)
        a, b = f.replicas["a"], f.replicas["b"]
        assert replica_wait_steps(a, 0.0, c.params) == pytest.approx((1000 + 150) / 150)  # >= 5
        assert replica_wait_steps(b, 0.0, c.params) == pytest.approx(1.0)  # <= 2.5
        (plan,) = c.tick(0.0, f)
        assert plan.target == "b" and c.hot_count() == 1
        idle_s[rate] = replica_wait_s(b, 0.0, c.params)
    assert idle_s[SLOW] == pytest.approx(4 * idle_s[FAST])
    assert idle_s[FAST] <= 0.015 < idle_s[SLOW]  # the former headroom_wait_s: no target when slow


def test_a_mixed_fleet_compares_each_replica_with_its_own_step() -> None:
    """A fast and a slow replica in one fleet (the router told each one's rate): each one's wait meets the
    thresholds in its own steps, so neither engine's speed makes it look busier or idler."""
    c = HotPrefixController()
    f = step_fleet(FAST, "fast")
    f.add_replica("slow", prefill_tokens_per_s=SLOW)
    route_group(f, c, "slow", 0.0, n=8)
    load(f, "slow", 450, 0.0)  # (450 + 150) / 150 = 4 of its steps: 97 ms, 3x the former 30 ms
    assert replica_wait_s(f.replicas["slow"], 0.0, c.params) > 0.09
    assert c.tick(0.0, f) == [] and c.hot_count() == 0  # busy for a slow engine, not overloaded
    load(f, "slow", 200, 0.0)  # 5.3 steps: hot, and the fast idle replica (1 step) takes a copy
    (plan,) = c.tick(0.0, f)
    assert (plan.source, plan.target) == ("slow", "fast")

    c = HotPrefixController()
    f = step_fleet(FAST, "fast")
    f.add_replica("slow", prefill_tokens_per_s=SLOW)
    route_group(f, c, "fast", 0.0, n=8)
    load(f, "fast", 1000, 0.0)  # 7.7 steps, 47 ms
    # The slow idle replica waits one of its steps, 24 ms, over the former 15 ms headroom: a target now.
    assert replica_wait_s(f.replicas["slow"], 0.0, c.params) > 0.015
    (plan,) = c.tick(0.0, f)
    assert (plan.source, plan.target) == ("fast", "slow")


def test_hysteresis_and_cooldown() -> None:
    c = HotPrefixController(params())
    f = fleet("a", "b", "c")
    route_group(f, c, "a", 0.0, n=6)
    big = load(f, "a", 100, 0.0)
    (p1,) = c.tick(0.0, f)
    c.completed(p1.plan_id, f, 0.0, 256)
    load(f, p1.target, 100, 0.0)  # the new holder is overloaded too
    assert c.tick(0.5, f) == []  # within the cooldown
    assert c.groups(f, 0.5)[0].waiting_for == "cooldown"
    f.done(big, 0.5)
    load(f, "a", 30, 0.5)  # a: 4 steps, between cool 2 and hot 5 -> still hot (b is 11)
    # min holder wait is 4 steps >= cool: stays hot, so after the cooldown it plans the third replica.
    (p2,) = c.tick(1.1, f)
    assert p2.target == "c"
    c.completed(p2.plan_id, f, 1.1, 256)
    assert c.groups(f, 1.1)[0].hot
    # c is idle: min holder wait 1 step < cool 2 -> no longer hot.
    assert c.tick(1.2, f) == []
    assert not c.groups(f, 1.2)[0].hot and c.groups(f, 1.2)[0].waiting_for is None


def test_budget_and_forbid() -> None:
    other = chars(7, 1024)
    c = HotPrefixController(params(max_concurrent=1))
    f = fleet("a", "b", "c")
    route_group(f, c, "a", 0.0)
    for _ in range(3):
        r = group_req(other)
        d = Decision("a", r.prompt_tokens, "prefix-hit")
        f.routed(r, d, 0.0)
        c.observe_routed(r, d, 0.0)
    load(f, "a", 100, 0.0)
    assert len(c.tick(0.0, f)) == 1  # two hot groups, budget of one
    assert sorted(str(v.waiting_for) for v in c.groups(f, 0.0)) == ["None", "max_concurrent"]
    counts = c.waiting_counts()
    assert set(counts) == set(WAITING_REASONS) and counts["max_concurrent"] == 1 and sum(counts.values()) == 1
    assert c.tick(0.1, f) == []
    assert sorted(str(v.waiting_for) for v in c.groups(f, 0.1)) == ["in_flight", "max_concurrent"]
    (pending,) = c.in_flight
    c.failed(pending.plan_id, 0.1)
    assert c.failed_count == 1
    for view in c.groups(f, 0.1):
        c.forbid(view.group)
    assert c.tick(5.0, f) == []
    assert [v.waiting_for for v in c.groups(f, 5.0)] == ["forbidden", "forbidden"]
    assert c.waiting_counts()["forbidden"] == 2
    with pytest.raises(ValueError, match="forbidden"):
        c.plan_manual(view.group, "b", f, 5.0)


def test_warmup_when_copy_cannot_pay_and_when_no_link() -> None:
    f = fleet("a", "b")
    for p in (params(copy_bytes_per_s=None), params(copy_bytes_per_s=1e6), params(copy_overhead_s=1.0)):
        c = HotPrefixController(p)
        route_group(f, c, "a", 0.0)
        busy = load(f, "a", 300, 0.0)  # a waits 0.31 s >= b's 0.01 s + half the warm-up's 0.256 s
        (plan,) = c.tick(0.0, f)
        assert (plan.mechanism, plan.source, plan.bytes) == ("warmup", None, 0)
        assert plan.estimated_s == pytest.approx(256 / RATE)
        f.done(busy, 0.0)
    c = HotPrefixController(params(copy_bytes_per_s=None, warmup=False))
    route_group(f, c, "a", 0.0)
    load(f, "a", 300, 0.0)
    assert c.tick(0.0, f) == [] and c.groups(f, 0.0)[0].waiting_for == "no_mechanism"


def test_a_warmup_must_pay_for_its_own_prefill() -> None:
    """Hot by the thresholds (a waits 11 steps, b 1), but a's 0.11 s backlog is shorter than b's 0.01 s
    wait plus half the 0.256 s warm-up: no warm-up. A copy (0.036 s, no compute on b) is planned at once,
    the warm-up once a's backlog outgrows it (0.15 s >= 0.138 s; a whole warm-up, 0.266 s, would still
    hold it back), and an operator's warm-up is never held back."""
    f = fleet("a", "b")
    c = HotPrefixController(params(copy_bytes_per_s=None))
    route_group(f, c, "a", 0.0)
    load(f, "a", 100, 0.0)
    assert c.tick(0.0, f) == []
    (view,) = c.groups(f, 0.0)
    assert view.hot and view.waiting_for == "warmup_would_not_pay"
    plan = c.plan_manual(c.groups(f, 0.0)[0].group, "b", f, 0.0)
    assert (plan.reason, plan.mechanism) == ("manual", "warmup")

    f = fleet("a", "b")
    c = HotPrefixController(params(copy_bytes_per_s=None))
    route_group(f, c, "a", 0.0)
    load(f, "a", 100, 0.0)
    assert c.tick(0.0, f) == []
    load(f, "a", 40, 0.0)  # a now waits 0.15 s >= 0.01 + 0.256 / 2
    (plan,) = c.tick(0.0, f)
    assert (plan.mechanism, plan.target) == ("warmup", "b")
    assert plan.plan_id == 1  # the plan held back at the first tick took no id

    f = fleet("a", "b")
    c = HotPrefixController(params())
    route_group(f, c, "a", 0.0)
    load(f, "a", 100, 0.0)
    (plan,) = c.tick(0.0, f)
    assert plan.mechanism == "copy"


def test_target_needs_free_kv() -> None:
    c = HotPrefixController(params())
    f = fleet("a", "b")
    f.update_engine_metrics("b", now=0.0, num_gpu_blocks=10, block_size=16)  # 160 tokens < 256
    route_group(f, c, "a", 0.0)
    load(f, "a", 100, 0.0)
    assert c.tick(0.0, f) == [] and c.groups(f, 0.0)[0].waiting_for == "no_target"


def test_shrink_forgets_added_holders_when_cool() -> None:
    c = HotPrefixController(params())
    f = fleet("a", "b", "c", "d")
    route_group(f, c, "a", 0.0)
    busy = load(f, "a", 100, 0.0)
    (plan,) = c.tick(0.0, f)
    c.completed(plan.plan_id, f, 0.0, 256)
    key = plan.group
    f.done(busy, 0.0)
    # another group takes most of the traffic, so this one needs a single holder
    other = chars(9, 1024)
    for t in range(8):
        for _ in range(10):
            r = group_req(other)
            d = Decision("c", r.prompt_tokens, "prefix-hit")
            f.routed(r, d, float(t))
            c.observe_routed(r, d, float(t))
        route_group(f, c, "a", float(t), n=1)
        c.tick(float(t), f)
    assert f.index.holders(key) == ["a"]
    assert c.groups(f, 8.0)[1].added_holders == ()


def test_manual_plan_and_timeout() -> None:
    c = HotPrefixController(params(migration_timeout_s=2.0))
    f = fleet("a", "b")
    route_group(f, c, "a", 0.0, n=1)
    g = c.groups(f, 0.0)[0].group
    with pytest.raises(ValueError, match="already holds"):
        c.plan_manual(g, "a", f, 0.0)
    plan = c.plan_manual(g, "b", f, 0.0)
    assert (plan.reason, plan.mechanism, plan.source) == ("manual", "copy", "a")
    c.tick(3.0, f)
    assert c.in_flight == [] and c.failed_count == 1
    assert not c.completed(plan.plan_id, f, 3.0)


# -- the driver's copy capability and retuning ------------------------------------------------------


def two_holders(c: HotPrefixController) -> Fleet:
    """The group held by "a" (the lighter-loaded, wait 31 steps: long enough for a warm-up to pay) and
    "b" (41 steps); "c" idle (1)."""
    f = fleet("a", "b", "c")
    route_group(f, c, "a", 0.0)
    route_group(f, c, "b", 0.0)
    load(f, "a", 300, 0.0)
    load(f, "b", 400, 0.0)
    return f


def test_a_copy_needs_a_holder_the_target_can_copy_from() -> None:
    asked: list[tuple[str, str, int]] = []

    def only_from_b(source: str, target: str, tokens: int) -> bool:
        asked.append((source, target, tokens))
        return source == "b"

    c = HotPrefixController(params(), can_copy=only_from_b)
    (plan,) = c.tick(0.0, two_holders(c))
    # "a" has the lower wait but cannot copy to "c": the copy comes from "b".
    assert (plan.mechanism, plan.source, plan.target) == ("copy", "b", "c")
    assert asked == [("a", "c", 256), ("b", "c", 256)]

    c = HotPrefixController(params(), can_copy=lambda source, target, tokens: False)
    f = two_holders(c)
    (plan,) = c.tick(0.0, f)
    # No pair can copy: a warm-up, priced and sized as one (no bytes move).
    assert (plan.mechanism, plan.source, plan.bytes) == ("warmup", None, 0)
    assert plan.estimated_s == pytest.approx(256 / RATE)
    assert c.completed(plan.plan_id, f, 0.0, 256) and c.bytes_moved == 0

    c = HotPrefixController(params(warmup=False), can_copy=lambda source, target, tokens: False)
    f = two_holders(c)
    assert c.tick(0.0, f) == []
    with pytest.raises(ValueError, match="no mechanism can move this prefix"):
        c.plan_manual(c.groups(f, 0.0)[0].group, "c", f, 0.0)


def test_manual_plan_asks_can_copy_too() -> None:
    c = HotPrefixController(params(), can_copy=lambda source, target, tokens: False)
    f = fleet("a", "b")
    route_group(f, c, "a", 0.0, n=1)
    plan = c.plan_manual(c.groups(f, 0.0)[0].group, "b", f, 0.0)
    assert (plan.reason, plan.mechanism, plan.source) == ("manual", "warmup", None)


def test_params_replaced_between_calls_rule_from_then_on() -> None:
    c = HotPrefixController(params(max_groups=10, cooldown_s=10.0))
    f = fleet("a", "b", "c")
    for seed in range(5):
        prefix = chars(100 + seed, 1024)
        r = group_req(prefix)
        c.observe_routed(r, Decision("a", 0, "x"), 0.0)
    assert len(c.groups(f, 0.0, top=100)) == 5
    c.params = dataclasses.replace(c.params, max_groups=2)
    c.observe_routed(group_req(chars(200, 1024)), Decision("a", 0, "x"), 0.0)
    assert len(c.groups(f, 0.0, top=100)) == 2  # lowered: the coldest go until it holds

    c = HotPrefixController(params(cooldown_s=10.0))
    f = fleet("a", "b", "c")
    route_group(f, c, "a", 0.0, n=6)
    load(f, "a", 100, 0.0)
    (p1,) = c.tick(0.0, f)
    c.failed(p1.plan_id, 0.0)
    assert c.tick(1.0, f) == []  # within the 10 s cooldown
    c.params = dataclasses.replace(c.params, cooldown_s=0.5)
    (p2,) = c.tick(1.0, f)  # the retuned cooldown rules at once
    assert p2.group == p1.group
