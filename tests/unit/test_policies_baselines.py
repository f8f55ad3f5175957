"""Each baseline reproduces its published rule (docs anchors.md) on hand-built fleets."""

from __future__ import annotations

import itertools
import random

import pytest

from router.fleet import Fleet
from router.policies.base import Decision, NoReplicaAvailable, Policy, RequestView, make_request
from router.policies.chwbl import Chwbl, ChwblParams
from router.policies.dynamo import Dynamo, DynamoParams
from router.policies.least_load import LeastLoad
from router.policies.llmd import Llmd, LlmdParams
from router.policies.power_of_two import PowerOfTwo, PowerOfTwoParams
from router.policies.random_choice import RandomChoice, RandomParams
from router.policies.round_robin import RoundRobin
from router.policies.sglang import Sglang, SglangParams

_ids = itertools.count()


def fleet_of(policy: Policy, *names: str, block_size: int = 16) -> Fleet:
    fleet = Fleet(policy)
    for name in names:
        fleet.add_replica(name, block_size=block_size)
    return fleet


def add_load(fleet: Fleet, replica: str, requests: int = 1, tokens: int = 4, decoding: bool = False) -> None:
    """Router-side load on `replica`, from requests of another model (they touch no tree of model m)."""
    for _ in range(requests):
        rid = f"load-{next(_ids)}"
        r = make_request(rid, "load", prompt="~" * (4 * tokens))
        fleet.routed(r, Decision(replica, 0, "load"), now=0.0)
        if decoding:
            fleet.first_token(rid, 0.0)


def text_req(text: str, rid: str | None = None) -> RequestView:
    return make_request(rid or f"q-{next(_ids)}", "m", prompt=text)


def chars(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))


# -- simple load balancers ---------------------------------------------------------------------


def test_round_robin_cycles_over_healthy_candidates() -> None:
    fleet = fleet_of(RoundRobin(), "a", "b", "c")
    assert [fleet.route(text_req("x"), 0.0).replica for _ in range(6)] == list("abcabc")
    fleet.set_healthy("b", False)
    assert [fleet.route(text_req("x"), 0.0).replica for _ in range(4)] == list("acac")


def test_no_candidate_raises_for_every_policy() -> None:
    for policy in (RoundRobin(), LeastLoad(), Sglang(), Llmd(), Dynamo(), Chwbl(), RandomChoice()):
        fleet = fleet_of(policy, "a")
        fleet.set_draining("a", True)
        with pytest.raises(NoReplicaAvailable):
            fleet.route(text_req("x"), 0.0)


def test_random_is_reproducible_from_its_seed() -> None:
    def picks(seed: int) -> list[str]:
        fleet = fleet_of(RandomChoice(RandomParams(seed=seed)), "a", "b", "c", "d")
        return [fleet.route(text_req("x"), 0.0).replica for _ in range(40)]

    assert picks(1) == picks(1)
    assert picks(1) != picks(2)
    assert set(picks(1)) == {"a", "b", "c", "d"}


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        ({"a": (2, 4), "b": (1, 4), "c": (3, 4)}, "b"),  # fewest requests
        ({"a": (1, 50), "b": (1, 10), "c": (1, 30)}, "b"),  # tie on requests: fewest tokens
        ({"a": (1, 10), "b": (1, 10), "c": (1, 10)}, "a"),  # full tie: name
        ({"a": (0, 0), "b": (1, 1), "c": (0, 0)}, "a"),
    ],
)
def test_least_load_order(loads: dict[str, tuple[int, int]], expected: str) -> None:
    fleet = fleet_of(LeastLoad(), "a", "b", "c")
    for name, (requests, tokens) in loads.items():
        for _ in range(requests):
            add_load(fleet, name, 1, tokens)
    assert fleet.policy.choose(text_req("x"), fleet, 0.0).replica == expected


def test_power_of_two_takes_the_less_loaded_of_its_two_draws() -> None:
    policy = PowerOfTwo(PowerOfTwoParams(seed=5))
    fleet = fleet_of(policy, "a", "b", "c", "d")
    for name, n in {"a": 3, "b": 1, "c": 7, "d": 2}.items():
        add_load(fleet, name, n)
    mirror = random.Random(5)
    states = fleet.candidates("m")
    for _ in range(50):
        x, y = mirror.sample(states, 2)
        expected = y if y.inflight_requests < x.inflight_requests else x
        assert policy.choose(text_req("x"), fleet, 0.0).replica == expected.name
    # The most loaded replica can never win a comparison, so it is never chosen.
    assert "c" not in {policy.choose(text_req("x"), fleet, 0.0).replica for _ in range(100)}


# -- chwbl -------------------------------------------------------------------------------------


def test_chwbl_keys_on_the_first_user_message() -> None:
    fleet = fleet_of(Chwbl(), *"abcdefgh")
    first = "Summarise the attached contract for a busy lawyer. " * 3

    def chat(extra: str) -> RequestView:
        messages: list[dict[str, object]] = [
            {"role": "system", "content": extra},
            {"role": "user", "content": first + extra},
        ]
        return make_request(f"c-{next(_ids)}", "m", messages=messages)

    assert len({fleet.policy.choose(chat(chars(i, 30)), fleet, 0.0).replica for i in range(20)}) == 1
    # Completions prompts key on the text: different first 100 characters spread over the ring.
    spread = {fleet.policy.choose(text_req(chars(i, 120)), fleet, 0.0).replica for i in range(40)}
    assert len(spread) >= 5


@pytest.mark.parametrize(
    ("owner_load", "other_load", "owner_keeps_it"),
    [
        (0, 0, True),
        (1, 0, False),  # 1 > (1 + 1) / 3 * 1.25 = 0.83
        (2, 2, True),  # 2 <= 7 / 3 * 1.25 = 2.92
        (3, 2, True),  # 3 <= 8 / 3 * 1.25 = 3.33
        (4, 2, False),  # 4 > 9 / 3 * 1.25 = 3.75
    ],
)
def test_chwbl_bounded_load_rule(owner_load: int, other_load: int, owner_keeps_it: bool) -> None:
    fleet = fleet_of(Chwbl(ChwblParams(mean_load_factor=125)), "a", "b", "c")
    r = text_req("the same key every time " * 5)
    owner = fleet.policy.choose(r, fleet, 0.0).replica
    for name in "abc":
        add_load(fleet, name, owner_load if name == owner else other_load)
    assert (fleet.policy.choose(r, fleet, 0.0).replica == owner) is owner_keeps_it


# -- sglang ------------------------------------------------------------------------------------


def test_sglang_picks_the_deepest_holder_without_looking_at_load() -> None:
    fleet = fleet_of(Sglang(), "a", "b", "c")
    base = chars(1, 400)
    fleet.routed(text_req(base[:200]), Decision("a", 0, "seed"), 0.0)
    fleet.routed(text_req(base), Decision("b", 0, "seed"), 0.0)
    add_load(fleet, "b", 20)  # busier, but within the 32-request imbalance threshold
    d = fleet.policy.choose(text_req(base + "tail"), fleet, 0.0)
    assert (d.replica, d.reason) == ("b", "prefix-hit")
    assert d.expected_cached_tokens == pytest.approx(len(base) / 4, abs=2)
    # Matching only the first 200 of 400 characters is not above the 0.5 threshold: a miss.
    d = fleet.policy.choose(text_req(base[:200] + chars(2, 200)), fleet, 0.0)
    assert d.reason == "smallest-tree"


@pytest.mark.parametrize(
    ("load_a", "load_b", "imbalanced"),
    [
        (40, 0, True),  # 40 - 0 > 32 and 40 > 1.1 * 0
        (30, 0, False),  # difference within 32
        (100, 60, True),  # 40 > 32 and 100 > 66
        (1000, 960, False),  # 40 > 32 but 1000 < 1.1 * 960
        (33, 0, True),
        (32, 0, False),
    ],
)
def test_sglang_imbalance_rule(load_a: int, load_b: int, imbalanced: bool) -> None:
    fleet = fleet_of(Sglang(), "a", "b")
    prompt = chars(3, 300)
    fleet.routed(text_req(prompt), Decision("a", 0, "seed"), 0.0)
    add_load(fleet, "a", load_a - 1)
    add_load(fleet, "b", load_b)
    d = fleet.policy.choose(text_req(prompt + "!"), fleet, 0.0)
    assert (d.replica, d.reason) == (("b", "imbalance") if imbalanced else ("a", "prefix-hit"))


@pytest.mark.parametrize(("miss", "expected"), [("smallest_tree", "a"), ("least_load", "b")])
def test_sglang_miss_rule(miss: str, expected: str) -> None:
    """On a miss the smallest tree wins even when it is the busy one (SGLang's reported failure)."""
    fleet = fleet_of(Sglang(SglangParams(miss=miss)), "a", "b")
    fleet.routed(text_req(chars(4, 50)), Decision("a", 0, "seed"), 0.0)
    for i in range(5):
        fleet.routed(text_req(chars(10 + i, 500)), Decision("b", 0, "seed"), 0.0)
        fleet.done(f"q-{next(_ids) - 1}", 0.0)
    add_load(fleet, "a", 20)
    d = fleet.policy.choose(text_req(chars(99, 300)), fleet, 0.0)
    assert d.replica == expected


def test_sglang_evicts_to_max_tree_size_at_its_interval() -> None:
    policy = Sglang(SglangParams(max_tree_size=1000, eviction_interval_s=30.0))
    fleet = fleet_of(policy, "a")
    prompts = [chr(ord("A") + i) + chars(i, 399) for i in range(11)]  # no two share a first character
    for i, prompt in enumerate(prompts[:10]):
        fleet.routed(text_req(prompt), Decision("a", 0, "seed"), now=float(i))
    assert policy.tree("m").tenant_size("a") == 4000  # grows freely between eviction runs
    fleet.routed(text_req(prompts[10]), Decision("a", 0, "seed"), now=31.0)
    assert policy.tree("m").tenant_size("a") == 800
    # Least recently used leaves went first: the two newest prompts survive.
    tree = policy.tree("m")
    assert [tree.matched_chars(p, "a") for p in prompts] == [0] * 9 + [400, 400]


def test_sglang_forgets_a_removed_replica() -> None:
    policy = Sglang()
    fleet = fleet_of(policy, "a", "b")
    prompt = chars(7, 300)
    fleet.routed(text_req(prompt), Decision("a", 0, "seed"), 0.0)
    fleet.remove_replica("a")
    assert policy.tree("m").tenant_size("a") == 0
    assert policy.tree("m").match(prompt) == (0, None)


# -- llmd --------------------------------------------------------------------------------------


def test_llmd_weighted_scores() -> None:
    policy = Llmd()
    fleet = fleet_of(policy, "a", "b", "c")
    r = text_req(chars(5, 64 * 8))
    assert len(r.hashes) == 8
    fleet.index.insert("a", r.hashes.chained, 0.0)
    fleet.index.insert("b", r.hashes.chained[:4], 0.0)
    for name, waiting, usage in (("a", 4, 0.5), ("b", 0, 0.9), ("c", 2, 0.0)):
        fleet.update_engine_metrics(name, now=0.0, num_requests_waiting=waiting, kv_cache_usage_perc=usage)
    scores = policy.scores(r, fleet.candidates("m"), fleet)
    # prefix * 3 + queue * 2 + (1 - kv usage) * 2
    assert scores == pytest.approx({"a": 3 * 1 + 0 + 1.0, "b": 3 * 0.5 + 2 * 1 + 0.2, "c": 0 + 2 * 0.5 + 2.0})
    assert policy.choose(r, fleet, 0.0) == Decision("a", r.prompt_tokens // 4 * 4, "prefix-hit")


def test_llmd_queue_scorer_is_one_when_all_equal_and_prefix_caps_blocks() -> None:
    policy = Llmd(LlmdParams(max_prefix_blocks=4))
    fleet = fleet_of(policy, "a", "b")
    r = text_req(chars(6, 64 * 10))
    fleet.index.insert("a", r.hashes.chained[:4], 0.0)
    for name in "ab":
        fleet.update_engine_metrics(name, now=0.0, num_requests_waiting=7, kv_cache_usage_perc=0.0)
    assert policy.scores(r, fleet.candidates("m"), fleet) == pytest.approx({"a": 3 + 2 + 2, "b": 2 + 2})


def test_llmd_breaks_ties_by_seeded_random() -> None:
    def picks(seed: int) -> list[str]:
        policy = Llmd(LlmdParams(seed=seed))
        fleet = fleet_of(policy, "a", "b", "c")
        return [policy.choose(text_req(chars(i, 100)), fleet, 0.0).replica for i in range(30)]

    assert picks(3) == picks(3)
    assert set(picks(3)) == {"a", "b", "c"}


# -- dynamo ------------------------------------------------------------------------------------


def tok_req(tokens: list[int]) -> RequestView:
    return make_request(f"t-{next(_ids)}", "m", prompt=tokens, block_size=16)


def dynamo_fleet(policy: Dynamo) -> tuple[Fleet, RequestView]:
    fleet = fleet_of(policy, "a", "b", "c", block_size=16)
    shared = list(range(64))
    r0 = tok_req(shared)  # decoding on a: 4 blocks active and indexed there
    fleet.routed(r0, Decision("a", 0, "seed"), 0.0)
    fleet.first_token(r0.request_id, 0.0)
    r1 = tok_req(list(range(1000, 1100)))  # 100 tokens still prefilling on b
    fleet.routed(r1, Decision("b", 0, "seed"), 0.0)
    return fleet, tok_req([*shared, *range(500, 532)])  # 96 tokens, first 64 shared with r0


@pytest.mark.parametrize(
    ("weight", "expected"),
    [
        # a: prefill (0 + 96 - 64) / 16 = 2; decode 4 active + 2 new = 6
        # b: prefill (100 + 96) / 16 = 12.25; decode ceil(100 / 16) = 7 active + 6 new = 13
        # c: prefill 96 / 16 = 6; decode 0 + 6 = 6
        (1.0, {"a": 2 + 6, "b": 12.25 + 13, "c": 6 + 6}),
        (3.0, {"a": 3 * 2 + 6, "b": 3 * 12.25 + 13, "c": 3 * 6 + 6}),
        (0.0, {"a": 6, "b": 13, "c": 6}),
    ],
)
def test_dynamo_cost_arithmetic(weight: float, expected: dict[str, float]) -> None:
    policy = Dynamo(DynamoParams(overlap_weight=weight))
    fleet, r = dynamo_fleet(policy)
    assert policy.costs(r, fleet) == pytest.approx(expected)


def test_dynamo_picks_lowest_cost_then_fewest_indexed_blocks() -> None:
    policy = Dynamo()
    fleet, r = dynamo_fleet(policy)
    assert policy.choose(r, fleet, 0.0) == Decision("a", 64, "prefix-hit")
    # weight 0 ties a and c on cost (6); c has indexed nothing, a holds r0's 4 blocks.
    policy0 = Dynamo(DynamoParams(overlap_weight=0.0))
    fleet.attach(policy0)
    assert policy0.choose(r, fleet, 0.0).replica == "c"


def test_dynamo_temperature_samples_reproducibly_favouring_low_cost() -> None:
    def picks(seed: int) -> list[str]:
        policy = Dynamo(DynamoParams(temperature=0.5, seed=seed))
        fleet, r = dynamo_fleet(policy)
        return [policy.choose(r, fleet, 0.0).replica for _ in range(300)]

    first = picks(1)
    assert first == picks(1)
    counts = {name: first.count(name) for name in "abc"}
    assert counts["a"] > counts["c"] > counts["b"] > 0
