"""Hot-prefix controller: threshold math, detection, hysteresis, cooldown, budget, planning, shrink.

No event loop: a Fleet and the controller, driven by hand with explicit times.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re

import pytest

from router.fleet import Fleet, FleetConfig
from router.hot_prefix import (
    POLICY_OWNED,
    TUNABLE_PARAMS,
    HotPrefixController,
    HotPrefixParams,
    copy_min_tokens,
    copy_s,
    replica_wait_s,
)
from router.policies.base import Decision, RequestView, make_request
from router.policies.kvaware import KvAware, KvAwareParams

RATE = 1000.0  # prefill tokens/s
NO_STEP = KvAwareParams(step_base_tokens=0.0, decode_seq_tokens=0.0, context_token_cost=0.0)
_ids = itertools.count()


def chars(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))


PREFIX = chars(1, 1024)  # 16 chunks of 64 characters = 256 tokens


def params(**kw: object) -> HotPrefixParams:
    base: dict[str, object] = {
        "half_life_s": 1.0,
        "hot_wait_s": 0.05,
        "cool_wait_s": 0.02,
        "headroom_wait_s": 0.02,
        "min_rate_rps": 1.0,
        "cooldown_s": 1.0,
        "max_concurrent": 2,
        "shrink_after_s": 5.0,
        "kv_bytes_per_token": 1000,
        "copy_bytes_per_s": 1e7,  # 1e-4 s a token: 10x faster than recomputing at 1000 tokens/s
        "copy_overhead_s": 0.01,
        "step": NO_STEP,
    }
    base.update(kw)
    return HotPrefixParams(**base)  # type: ignore[arg-type]


def fleet(*names: str) -> Fleet:
    f = Fleet(KvAware(NO_STEP), FleetConfig(prefill_tokens_per_s=RATE))
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
    """Queue `tokens` uncached prefill tokens on `replica` (wait = tokens / RATE)."""
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
    assert replica_wait_s(s, 0.0, params()) == pytest.approx(0.5)
    p = params(step=KvAwareParams(step_base_tokens=100.0, decode_seq_tokens=0.0, context_token_cost=0.0))
    assert replica_wait_s(s, 0.0, p) == pytest.approx(0.6)


BAD_PARAMS: list[tuple[dict[str, object], str]] = [
    ({"cool_wait_s": 0.05}, "cool_wait_s (0.05) must be below hot_wait_s (0.05)"),
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
    ({"hot_wait_s": 0}, "hot_wait_s must be a finite number > 0, got 0"),
    ({"group_chunks": 0}, "group_chunks must be a positive integer, got 0"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_PARAMS)
def test_params_validated(bad: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        params(**bad)


def test_zero_is_allowed_where_it_means_something() -> None:
    p = params(cool_wait_s=0, cooldown_s=0, max_concurrent=0, copy_overhead_s=0, kv_bytes_per_token=0)
    assert (p.cool_wait_s, p.cooldown_s, p.max_concurrent) == (0, 0, 0)
    assert params(copy_bytes_per_s=None).copy_bytes_per_s is None


def test_every_field_but_the_policys_is_tunable_and_checked() -> None:
    names = [f.name for f in dataclasses.fields(HotPrefixParams)]
    assert set(POLICY_OWNED) == {"group_chunks", "step"}
    assert list(TUNABLE_PARAMS) == [n for n in names if n not in POLICY_OWNED]
    assert {"cooldown_s", "migration_timeout_s", "hot_wait_s", "cool_wait_s", "max_concurrent"} <= set(
        TUNABLE_PARAMS
    )


def test_rates_decay_and_prefix_is_the_common_prefix() -> None:
    c = HotPrefixController(params())
    f = fleet("a")
    route_group(f, c, "a", 0.0, n=2)
    (g,) = c.groups(f, 0.0)
    assert g.request_rate == pytest.approx(2 * math.log(2))
    assert g.prefix_tokens == 256  # the shared 1,024 characters, not the questions
    (g,) = c.groups(f, 1.0)
    assert g.request_rate == pytest.approx(math.log(2))  # one half-life later


# -- detection and planning ------------------------------------------------------------------------


def test_hot_group_plans_copy_and_index_learns_only_on_completion() -> None:
    c = HotPrefixController(params())
    f = fleet("a", "b")
    route_group(f, c, "a", 0.0)
    load(f, "a", 100, 0.0)  # wait 0.1 s >= hot 0.05
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
    load(f, "a", 40, 0.0)  # wait 0.04 < hot 0.05
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


def test_hysteresis_and_cooldown() -> None:
    c = HotPrefixController(params())
    f = fleet("a", "b", "c")
    route_group(f, c, "a", 0.0, n=6)
    big = load(f, "a", 100, 0.0)
    (p1,) = c.tick(0.0, f)
    c.completed(p1.plan_id, f, 0.0, 256)
    load(f, p1.target, 100, 0.0)  # the new holder is overloaded too
    assert c.tick(0.5, f) == []  # within the cooldown
    f.done(big, 0.5)
    load(f, "a", 30, 0.5)  # a: 0.03, between cool 0.02 and hot 0.05 -> still hot (b is 0.1)
    # min holder wait is 0.03 >= cool: stays hot, so after the cooldown it plans the third replica.
    (p2,) = c.tick(1.1, f)
    assert p2.target == "c"
    c.completed(p2.plan_id, f, 1.1, 256)
    assert c.groups(f, 1.1)[0].hot
    # c is idle: min holder wait 0 < cool -> no longer hot.
    assert c.tick(1.2, f) == []
    assert not c.groups(f, 1.2)[0].hot


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
    assert c.tick(0.1, f) == []
    (pending,) = c.in_flight
    c.failed(pending.plan_id, 0.1)
    assert c.failed_count == 1
    for view in c.groups(f, 0.1):
        c.forbid(view.group)
    assert c.tick(5.0, f) == []
    with pytest.raises(ValueError, match="forbidden"):
        c.plan_manual(view.group, "b", f, 5.0)


def test_warmup_when_copy_cannot_pay_and_when_no_link() -> None:
    f = fleet("a", "b")
    for p in (params(copy_bytes_per_s=None), params(copy_bytes_per_s=1e6), params(copy_overhead_s=1.0)):
        c = HotPrefixController(p)
        route_group(f, c, "a", 0.0)
        busy = load(f, "a", 100, 0.0)
        (plan,) = c.tick(0.0, f)
        assert (plan.mechanism, plan.source, plan.bytes) == ("warmup", None, 0)
        assert plan.estimated_s == pytest.approx(256 / RATE)
        f.done(busy, 0.0)
    c = HotPrefixController(params(copy_bytes_per_s=None, warmup=False))
    route_group(f, c, "a", 0.0)
    load(f, "a", 100, 0.0)
    assert c.tick(0.0, f) == []


def test_target_needs_free_kv() -> None:
    c = HotPrefixController(params())
    f = fleet("a", "b")
    f.update_engine_metrics("b", now=0.0, num_gpu_blocks=10, block_size=16)  # 160 tokens < 256
    route_group(f, c, "a", 0.0)
    load(f, "a", 100, 0.0)
    assert c.tick(0.0, f) == []


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
    """The group held by "a" (the lighter-loaded, wait 0.1 s) and "b" (0.2 s); "c" idle."""
    f = fleet("a", "b", "c")
    route_group(f, c, "a", 0.0)
    route_group(f, c, "b", 0.0)
    load(f, "a", 100, 0.0)
    load(f, "b", 200, 0.0)
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
