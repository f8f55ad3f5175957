"""kvaware: TTFT arithmetic, fresh + stale load without double counting, ring placement, and the
anchors' known failures it must avoid (a: miss onto a busy replica, b: a burst on stale metrics)."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from router.fleet import Fleet, FleetConfig
from router.policies.base import Decision, RequestView, make_request
from router.policies.kvaware import KvAware, KvAwareParams, group_key
from router.policies.llmd import Llmd
from router.policies.registry import parse_policy_spec
from router.policies.sglang import Sglang

RATE = 1000.0  # prefill tokens/s, a round number for the arithmetic
# The prefill-only model (no step overhead, no decode cost, no progress through the queue): the
# arithmetic of the tests written for it stays exact; the step-time terms are tested on their own.
PREFILL_ONLY = {
    "step_base_tokens": 0.0,
    "decode_seq_tokens": 0.0,
    "context_token_cost": 0.0,
    "prefill_progress": False,
}
_ids = itertools.count()


def chars(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))


def text_req(text: str, model: str = "m") -> RequestView:
    return make_request(f"q-{next(_ids)}", model, prompt=text)


def bare_fleet(*names: str) -> Fleet:
    fleet = Fleet(config=FleetConfig(prefill_tokens_per_s=RATE))
    for name in names:
        fleet.add_replica(name)
    return fleet


def add_prefill_load(fleet: Fleet, replica: str, tokens: int, decoding: bool = False) -> None:
    r = text_req("~" * (4 * tokens), model="load")
    fleet.routed(r, Decision(replica, 0, "load"), now=0.0)
    if decoding:
        fleet.first_token(r.request_id, 0.0)


# -- the estimate ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "a_queue", "expected_ttft", "expected_score", "winner", "reason"),
    [
        # a holds 320 of 400 tokens behind a_queue tokens; b's engine has 2 waiting requests that are
        # not ours (priced at 400 tokens each); c is idle. score = TTFT + weight * uncached / rate.
        (0.0, 500, {"a": 0.58, "b": 1.2, "c": 0.4}, {"a": 0.58, "b": 1.2, "c": 0.4}, "c", "spill"),
        (4.0, 500, {"a": 0.58, "b": 1.2, "c": 0.4}, {"a": 0.9, "b": 2.8, "c": 2.0}, "a", "prefix-hit"),
        (4.0, 2000, {"a": 2.08, "b": 1.2, "c": 0.4}, {"a": 2.4, "b": 2.8, "c": 2.0}, "c", "spill"),
        (0.0, 0, {"a": 0.08, "b": 1.2, "c": 0.4}, {"a": 0.08, "b": 1.2, "c": 0.4}, "a", "prefix-hit"),
    ],
)
def test_ttft_and_score_arithmetic(
    weight: float,
    a_queue: int,
    expected_ttft: dict[str, float],
    expected_score: dict[str, float],
    winner: str,
    reason: str,
) -> None:
    fleet = bare_fleet("a", "b", "c")
    r = text_req(chars(1, 1600))  # 25 chunks of 64 characters, 16 tokens each
    assert (r.prompt_tokens, len(r.hashes)) == (400, 25)
    fleet.index.insert("a", r.hashes.chained[:20], 0.0)
    if a_queue:
        add_prefill_load(fleet, "a", a_queue)
    fleet.update_engine_metrics("b", now=0.0, num_requests_waiting=2)
    # Attached after the load, so the typical uncached size is still this request's own.
    policy = KvAware(KvAwareParams(recompute_weight=weight, **PREFILL_ONLY))
    fleet.attach(policy)
    estimates = {e.replica: e for e in policy.estimates(r, fleet, now=1.0)}
    assert {n: e.ttft_s for n, e in estimates.items()} == pytest.approx(expected_ttft)
    assert {n: e.score_s for n, e in estimates.items()} == pytest.approx(expected_score)
    assert estimates["a"].cached_tokens == 320
    d = policy.choose(r, fleet, now=1.0)
    assert (d.replica, d.reason) == (winner, reason)
    assert d.expected_cached_tokens == (320 if winner == "a" else 0)


def test_stale_scrape_is_ignored() -> None:
    fleet = bare_fleet("a", "b")
    fleet.update_engine_metrics("a", now=0.0, num_requests_waiting=50)
    policy = KvAware(KvAwareParams(scrape_max_age_s=10.0))
    fleet.attach(policy)
    r = text_req(chars(2, 800))
    fresh = {e.replica: e.queue_tokens for e in policy.estimates(r, fleet, now=5.0)}
    stale = {e.replica: e.queue_tokens for e in policy.estimates(r, fleet, now=20.0)}
    assert fresh == {"a": 50 * r.prompt_tokens, "b": 0}
    assert stale == {"a": 0, "b": 0}


def test_our_own_queued_requests_are_not_counted_twice() -> None:
    """The engine's waiting count includes our 3 prefilling requests: only the fresh count is used."""
    fleet = bare_fleet("a")
    for _ in range(3):
        add_prefill_load(fleet, "a", 100)
    fleet.update_engine_metrics("a", now=0.0, num_requests_waiting=3)
    policy = KvAware(KvAwareParams(**PREFILL_ONLY))  # no progress: the queue is as routed
    fleet.attach(policy)
    (estimate,) = policy.estimates(text_req(chars(3, 400)), fleet, now=0.5)
    assert estimate.queue_tokens == 300
    # Later the engine also shows 2 requests from another router: those are added, ours still once.
    fleet.update_engine_metrics("a", now=1.0, num_requests_waiting=5)
    (estimate,) = policy.estimates(text_req(chars(3, 400)), fleet, now=1.5)
    assert estimate.queue_tokens == 300 + 2 * 100


def test_decode_load_breaks_a_ttft_tie() -> None:
    """With the prefill-only model a decoding request adds nothing to TTFT: the load breaks the tie."""
    fleet = bare_fleet("a", "b")
    add_prefill_load(fleet, "a", 1000, decoding=True)  # holds KV, adds no prefill queue
    policy = KvAware(KvAwareParams(**PREFILL_ONLY))
    fleet.attach(policy)
    r = text_req(chars(4, 640))
    for name in "ab":
        fleet.index.insert(name, r.hashes.chained, 0.0)
    assert {e.replica: e.ttft_s for e in policy.estimates(r, fleet, 0.0)} == pytest.approx(
        {"a": 0.0, "b": 0.0}, abs=1e-9
    )
    assert policy.choose(r, fleet, 0.0).replica == "b"


def test_decode_load_lengthens_every_step_of_the_prefill() -> None:
    """Default model: each step also carries the base cost and the decoding sequences' work, so a
    replica decoding 1,000 prompt tokens' worth of context has the longer TTFT."""
    fleet = bare_fleet("a", "b")
    add_prefill_load(fleet, "a", 1000, decoding=True)  # 1 decoding sequence, max_tokens 16
    policy = KvAware()
    fleet.attach(policy)
    r = text_req(chars(4, 640))  # 160 tokens, fully cached on both: 0 uncached, 1 step
    for name in "ab":
        fleet.index.insert(name, r.hashes.chained, 0.0)
    base, seq, ctx = 150.0, 0.8, 1.0 / 800.0
    estimates = {e.replica: e for e in policy.estimates(r, fleet, 0.0)}
    assert estimates["b"].step_tokens == pytest.approx(base)
    assert estimates["a"].step_tokens == pytest.approx(base + seq + ctx * (1000 + 16 / 2))
    assert estimates["b"].ttft_s == pytest.approx(base / RATE)
    assert estimates["a"].ttft_s == pytest.approx(estimates["a"].step_tokens / RATE)
    assert policy.choose(r, fleet, 0.0).replica == "b"


def test_a_long_queue_takes_one_step_overhead_per_budget_of_tokens() -> None:
    fleet = bare_fleet("a")
    policy = KvAware(KvAwareParams(step_token_budget=1000, prefill_progress=False))
    fleet.attach(policy)
    add_prefill_load(fleet, "a", 2500)
    r = text_req(chars(9, 400))  # 100 tokens: 2,600 tokens of work = 3 steps of 1,000
    (e,) = policy.estimates(r, fleet, 0.0)
    assert e.ttft_s == pytest.approx((2600 + 3 * 150.0) / RATE)


def test_queue_progress_since_the_head_started() -> None:
    """The engine has been prefilling our queue since the head was routed: after 1 s at 1,000
    tokens/s less each step's overhead (1,000 / (1,000 + 150) of it), that work is no longer ahead."""
    fleet = bare_fleet("a")
    policy = KvAware()
    fleet.attach(policy)
    add_prefill_load(fleet, "a", 3000)
    assert fleet.replicas["a"].prefill_since == 0.0
    r = text_req(chars(10, 400))
    (at0,) = policy.estimates(r, fleet, 0.0)
    (at1,) = policy.estimates(r, fleet, 1.0)
    assert at0.queue_tokens == 3000
    assert at1.queue_tokens == pytest.approx(3000 - 1000 * 3000 / 3150)
    (late,) = policy.estimates(r, fleet, 100.0)
    assert late.queue_tokens == 0  # never below nothing


def test_a_replica_whose_first_tokens_are_overdue_is_charged_the_overdue_time() -> None:
    """A holder whose queued prefill should have finished by now but has not sent a first token (its KV
    is full, say) is not an idle replica: the time past due counts, and the group spills once that
    outweighs recomputing its prefix. Without it (stall_wait=false), the progress credited to the
    queue made a stuck holder look idle and kept sending it the group (simulator: llmd-prefix, 4 x
    llama-8b-h100, 600 requests: a dozen requests queued 22 s behind one full replica)."""
    prefix = chars(12, 2000)  # 500 tokens
    for stall_wait, spilled in ((True, True), (False, False)):
        fleet = bare_fleet("a", "b")
        policy = KvAware(KvAwareParams(stall_wait=stall_wait))
        fleet.attach(policy)
        first = text_req(prefix + chars(13, 40))
        fleet.routed(first, policy.choose(first, fleet, 0.0), now=0.0)
        holder = next(n for n, st in fleet.replicas.items() if st.inflight_requests)
        other = "b" if holder == "a" else "a"
        follower = text_req(prefix + chars(14, 40))
        queued = fleet.replicas[holder].inflight_prefill_tokens  # one step's prefill: under the budget
        # Its queue at the rate less each step's fixed work, after the step the engine may have been in.
        due = queued / (RATE * queued / (queued + 150.0)) + (queued + 150.0) / RATE
        (on_time,) = [e for e in policy.estimates(follower, fleet, due) if e.replica == holder]
        assert on_time.stall_s == 0.0
        late = {e.replica: e for e in policy.estimates(follower, fleet, due + 5.0)}
        assert late[holder].stall_s == pytest.approx(5.0 if stall_wait else 0.0)
        assert late[other].stall_s == 0.0  # nothing of ours queued there
        decision = policy.choose(follower, fleet, due + 5.0)
        assert (decision.replica, decision.reason) == (
            (other, "spill") if spilled else (holder, "prefix-hit")
        )


def test_kv_wait_when_the_request_does_not_fit() -> None:
    """Opt-in (`kv_wait`): on a replica whose in-flight requests have committed its KV, the request
    waits for the share of that KV it needs to be freed, a share of a request lifetime."""
    fleet = Fleet(config=FleetConfig(prefill_tokens_per_s=RATE))
    fleet.add_replica("full", kv_capacity_tokens=1200)
    fleet.add_replica("free", kv_capacity_tokens=100_000)
    policy = KvAware(KvAwareParams(kv_wait=True))
    fleet.attach(policy)
    add_prefill_load(fleet, "full", 1000, decoding=True)  # 1,000 prompt + 16 max_tokens committed
    state = fleet.replicas["full"]
    assert state.committed_kv_tokens == pytest.approx(1016)
    r = text_req(chars(11, 800))  # 200 tokens + 16 max_tokens: 32 tokens over capacity
    e = {x.replica: x for x in policy.estimates(r, fleet, 0.0)}
    assert e["free"].kv_wait_s == 0.0
    lifetime_s = 16 * e["full"].step_tokens / RATE
    assert e["full"].kv_wait_s == pytest.approx((1016 + 216 - 1200) / 1016 * lifetime_s)
    assert KvAware().estimates(r, fleet, 0.0)[0].kv_wait_s == 0.0  # off by default


# -- new prefix groups: the ring ---------------------------------------------------------------


def test_group_key_is_the_first_chunks() -> None:
    system = chars(5, 256)  # exactly 4 chunks
    one, two = text_req(system + "one" * 30), text_req(system + "two" * 30)  # 5 chunks each
    assert group_key(one, 4) == group_key(two, 4)
    assert group_key(one, 5) != group_key(two, 5)
    assert group_key(text_req("short"), 4) == group_key(text_req("short"), 4)
    assert group_key(text_req("short"), 4) != group_key(text_req("shorT"), 4)


def test_independent_routers_place_new_groups_alike() -> None:
    routers = [bare_fleet("a", "b", "c", "d") for _ in range(2)]
    for fleet in routers:
        fleet.attach(KvAware())
    placements = []
    for g in range(24):
        r = text_req(chars(100 + g, 300) + "question")
        decisions = [fleet.route(r, now=float(g)) for fleet in routers]
        assert decisions[0] == decisions[1] and decisions[0].reason in {"ring", "fewest-groups"}
        placements.append(decisions[0].replica)
        for fleet in routers:
            fleet.done(r.request_id, float(g))
    assert len(set(placements)) == 4


def test_new_groups_go_where_the_fleet_holds_least_until_the_ring_bound() -> None:
    """Resident KV counts as ring load: with `a` holding 8 groups' prefixes and `b` none, new groups go
    to `b` whatever their hash, until `a` is within the bound (1.25x the mean share: after 5). The ring
    path, without `group_balance` (tests/unit/test_kvaware_group_balance.py has the rule with it)."""
    fleet = bare_fleet("a", "b")
    fleet.attach(KvAware(KvAwareParams(group_balance=False)))
    held = [text_req(chars(500 + g, 640)) for g in range(8)]
    for r in held:
        fleet.routed(r, Decision("a", 0, "setup"), now=0.0)
        fleet.done(r.request_id, 0.0)
    assert fleet.index.size("b") == 0 and fleet.index.size("a") == 8 * 10
    placed = []
    for g in range(5):
        r = text_req(chars(900 + g, 640))
        decision = fleet.route(r, now=1.0)
        assert decision.reason == "ring"
        placed.append(decision.replica)
        fleet.done(r.request_id, 1.0)
    assert placed == ["b"] * 5


def test_a_new_groups_follower_finds_its_event_fed_holder_before_the_events() -> None:
    """In event-fed mode a group's second request, arriving while its first still prefills (no
    BlockStored yet), goes where the first went, not wherever the ring's bound puts a new group: the
    split that computed prefixes twice on real vLLM with small caches (issue #6)."""
    fleet = Fleet(config=FleetConfig(prefill_tokens_per_s=RATE))
    for name in ("a", "b"):
        fleet.add_replica(name, event_fed=True)
    fleet.attach(KvAware(KvAwareParams(**PREFILL_ONLY)))
    prefix = chars(7, 2000)
    first = fleet.route(text_req(prefix + "first question"), now=0.0)
    assert first.reason == "ring"
    # Load the first's replica so that a new group would be placed on the other one.
    add_prefill_load(fleet, first.replica, 300)
    follower = fleet.route(text_req(prefix + "second question"), now=0.1)
    assert follower.replica == first.replica and follower.reason == "prefix-hit"
    assert follower.expected_cached_tokens > 0


# -- known failure (a): a miss must not pile onto a busy replica --------------------------------


@pytest.mark.parametrize(
    ("busy_by", "balance", "kvaware_reason"),
    [
        ("router-side load", False, "ring"),  # the ring's load bound already walks past the busy owner
        ("engine waiting from other clients", False, "least-ttft"),  # only the TTFT check sees it
        # With group_balance only replicas within a step of the best TTFT compete: the idle one alone.
        ("router-side load", True, "least-ttft"),
        ("engine waiting from other clients", True, "least-ttft"),
    ],
)
def test_miss_does_not_go_to_the_busy_small_tree_replica(
    busy_by: str, balance: bool, kvaware_reason: str
) -> None:
    """SGLang sends a miss to the smallest tree even when that replica is the busy one (anchors.md)."""
    decisions = {}
    for policy in (KvAware(KvAwareParams(group_balance=balance)), Sglang()):
        fleet = bare_fleet("busy", "idle")
        fleet.attach(policy)
        for i in range(6):  # the idle replica served a lot, all finished: a big tree, no load
            big = text_req(chars(200 + i, 2000))
            fleet.routed(big, Decision("idle", 0, "history"), 0.0)
            fleet.done(big.request_id, 0.0)
        short = text_req(chars(300, 80))
        fleet.routed(short, Decision("busy", 0, "history"), 0.0)  # a small tree
        fleet.done(short.request_id, 0.0)
        if busy_by == "router-side load":
            for _ in range(10):  # within SGLang's 32-request imbalance threshold
                add_prefill_load(fleet, "busy", 800)
        else:
            fleet.update_engine_metrics("busy", now=0.0, num_requests_waiting=12)
        # A new prefix whose ring owner is the busy replica, so the ring alone would choose it.
        r = next(
            q
            for q in (text_req(chars(1000 + s, 1200)) for s in range(200))
            if fleet.ring.owner(group_key(q, 4)) == "busy"
        )
        decisions[policy.name] = policy.choose(r, fleet, now=1.0)
    assert decisions["sglang"] == Decision("busy", 0, "smallest-tree")
    assert (decisions["kvaware"].replica, decisions["kvaware"].reason) == ("idle", kvaware_reason)


# -- known failure (b): a burst on stale metrics ------------------------------------------------


def burst(policy: KvAware | Llmd, prompts: list[str], replicas: tuple[str, ...]) -> Counter[str]:
    fleet = bare_fleet(*replicas)
    fleet.attach(policy)
    for name in replicas:  # an all-zero scrape, fresh as of the burst
        fleet.update_engine_metrics(name, now=0.0, num_requests_waiting=0, kv_cache_usage_perc=0.0)
    return Counter(fleet.route(text_req(p), now=0.01).replica for p in prompts)


@pytest.mark.parametrize("weight", [0.0, 4.0])
def test_burst_of_new_prefixes_with_stale_metrics_is_spread_evenly(weight: float) -> None:
    """Forty requests arrive before any scrape moves and before any first token: router-side load
    changes at each routing, so they spread although every scraped signal says the fleet is idle."""
    n, replicas = 40, ("a", "b", "c", "d")
    prompts = [chars(400 + i, 2048) + chars(500 + i, 200) for i in range(n)]
    counts = burst(KvAware(KvAwareParams(recompute_weight=weight)), prompts, replicas)
    assert set(counts) == set(replicas)
    assert max(counts.values()) <= n // len(replicas) + 2


def test_burst_on_one_prefix_leaves_the_holder_once_its_queue_outweighs_recomputing() -> None:
    """llm-d follows the prefix score with stale queues and sends all of a one-prefix burst to one
    replica. kvaware keeps it on the holder only while the holder's queue is worth less than
    recomputing the prefix ((1 + recompute_weight) x cached tokens), then spreads it."""
    n, replicas = 120, ("a", "b", "c", "d")
    system = chars(7, 2048)  # 512 tokens
    prompts = [system + chars(500 + i, 200) for i in range(n)]  # + 50 tokens each
    assert max(burst(Llmd(), prompts, replicas).values()) == n
    spread = burst(KvAware(), prompts, replicas)
    assert len(spread) >= 2 and max(spread.values()) < n // 2
    eager = burst(KvAware(KvAwareParams(recompute_weight=0.0)), prompts, replicas)
    assert max(eager.values()) <= n // len(replicas) + 2  # pure TTFT: spread evenly at once


@pytest.mark.parametrize(("weight", "second_reason"), [(0.0, "spill"), (4.0, "prefix-hit")])
def test_busy_holder_and_locality_after_the_prefill(weight: float, second_reason: str) -> None:
    fleet = bare_fleet("a", "b", "c")
    fleet.attach(KvAware(KvAwareParams(recompute_weight=weight)))
    system = chars(8, 2048)
    r1, r2, r3 = (text_req(system + q) for q in ("first question", "second question", "third question"))
    first = fleet.route(r1, now=0.0)
    second = fleet.route(r2, now=0.0)  # the holder is still prefilling the whole prefix
    assert second.reason == second_reason
    assert (second.replica == first.replica) is (second_reason == "prefix-hit")
    fleet.first_token(r1.request_id, now=0.5)
    fleet.first_token(r2.request_id, now=0.5)
    third = fleet.route(r3, now=1.0)
    assert third.reason == "prefix-hit" and third.replica in {first.replica, second.replica}


# -- parameters --------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "enabled"), [("kvaware", True), ("kvaware:migration=false", False)])
def test_migration_switch_is_a_real_parameter(spec: str, enabled: bool) -> None:
    policy = parse_policy_spec(spec)
    assert isinstance(policy, KvAware)
    assert policy.params.migration is enabled and policy.migration_enabled is enabled


@pytest.mark.parametrize("credit", [0.0, 0.8])
def test_similarity_credit_prefers_the_replica_holding_the_content(credit: float) -> None:
    paragraphs = [chars(600 + i, 128) for i in range(8)]  # chunk-aligned: 2 chunks each
    fleet = bare_fleet("a", "b", "c", "d")
    policy = KvAware(KvAwareParams(similarity_credit=credit))
    fleet.attach(policy)
    first = text_req("".join(paragraphs))
    placed = fleet.route(first, now=0.0)
    fleet.done(first.request_id, now=0.5)
    reordered = text_req("".join(paragraphs[4:] + paragraphs[:4]))
    assert fleet.index.longest_match(reordered.hashes.chained) == {}  # no prefix in common
    estimates = {e.replica: e for e in policy.estimates(reordered, fleet, now=1.0)}
    if credit:
        assert fleet.similarity.size() == 1  # built once: the first request had no prefix match
        assert estimates[placed.replica].credited_tokens > 0.5 * reordered.prompt_tokens
        assert policy.choose(reordered, fleet, now=1.0).replica == placed.replica
    else:
        assert fleet.similarity.size() == 0  # never built when the credit is off
        assert all(e.credited_tokens == 0 for e in estimates.values())
