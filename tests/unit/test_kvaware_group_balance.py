"""kvaware's `group_balance`: a new prefix group goes, among the replicas whose TTFT is within one engine
step of the best, to the one holding the fewest groups per KV token (the ring breaks ties)."""

from __future__ import annotations

import itertools
import random

import pytest

from router.fleet import Fleet, FleetConfig
from router.policies.base import Decision, RequestView, make_request
from router.policies.kvaware import KvAware, KvAwareParams, group_key
from router.policies.registry import parse_policy_spec

RATE = 1000.0  # prefill tokens/s: one engine step's fixed cost (150 tokens) is then 0.15 s
_ids = itertools.count()


def chars(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))


def text_req(text: str) -> RequestView:
    return make_request(f"g-{next(_ids)}", "m", prompt=text)


def fleet_of(policy: KvAware, capacities: dict[str, int | None]) -> Fleet:
    fleet = Fleet(config=FleetConfig(prefill_tokens_per_s=RATE))
    for name, capacity in capacities.items():
        fleet.add_replica(name, kv_capacity_tokens=capacity)
    fleet.attach(policy)
    return fleet


def serve(fleet: Fleet, replica: str, text: str) -> None:
    """A request of its own group, routed to `replica` and finished: its prefix stays indexed there."""
    r = text_req(text)
    fleet.routed(r, Decision(replica, 0, "setup"), now=0.0)
    fleet.done(r.request_id, 0.0)


def owned_by(fleet: Fleet, replica: str, seed: int) -> RequestView:
    """A new group's request whose ring owner is `replica`."""
    return next(
        q
        for q in (text_req(chars(seed + s, 640)) for s in range(500))
        if fleet.ring.owner(group_key(q, 4)) == replica
    )


@pytest.mark.parametrize(("balance", "expected"), [(True, ("a", "fewest-groups")), (False, ("b", "ring"))])
def test_a_new_group_goes_to_the_replica_holding_fewer_groups(
    balance: bool, expected: tuple[str, str]
) -> None:
    """Both idle and holding 40 chunks each: `a` one long prefix, `b` four short ones. The ring's load
    (in-flight + index size) cannot tell them apart and its owner `b` takes the group; counting groups,
    `a` does (each group it holds brings its own later requests)."""
    policy = KvAware(KvAwareParams(group_balance=balance))
    fleet = fleet_of(policy, {"a": None, "b": None})
    serve(fleet, "a", chars(1, 2560))
    for g in range(4):
        serve(fleet, "b", chars(10 + g, 640))
    assert fleet.index.size("a") == fleet.index.size("b") == 40
    assert (policy.held_groups("a", fleet), policy.held_groups("b", fleet)) == ((1, 4) if balance else (0, 0))
    decision = fleet.route(owned_by(fleet, "b", 100), now=1.0)
    assert (decision.replica, decision.reason) == expected


@pytest.mark.parametrize(("a_queue", "winner"), [(100, "a"), (300, "b")])
def test_only_replicas_within_one_engine_step_of_the_best_ttft_compete(a_queue: int, winner: str) -> None:
    """`a` holds fewer groups but has `a_queue` tokens of prefill ahead: 0.1 s is within one step's fixed
    cost (150 tokens at 1,000 tokens/s = 0.15 s), so the TTFT estimate cannot tell the two apart and
    the group count decides; 0.3 s is not, and the faster replica takes the group."""
    policy = KvAware()
    fleet = fleet_of(policy, {"a": None, "b": None})
    for g in range(3):
        serve(fleet, "b", chars(20 + g, 640))
    load = text_req("~" * (4 * a_queue))
    fleet.routed(load, Decision("a", 0, "load"), now=0.0)  # in flight: a prefill queue, and a group
    # As many tokens in flight on `b`, past their prefill (decoding: no queue), so that both stay under
    # the ring's load bound and only the TTFT margin and the group count decide.
    decoding = text_req("^" * (4 * a_queue))
    fleet.routed(decoding, Decision("b", 0, "load"), now=0.0)
    fleet.first_token(decoding.request_id, now=0.0)
    assert (policy.held_groups("a", fleet), policy.held_groups("b", fleet)) == (1, 4)
    r = owned_by(fleet, "b" if winner == "a" else "a", 200)  # the ring alone would pick the other
    ttft = {e.replica: e.ttft_s for e in policy.estimates(r, fleet, now=0.0)}
    # One decoding sequence costs `b` 0.8 prefill-token equivalents a step (decode_seq_tokens).
    assert ttft["a"] - ttft["b"] == pytest.approx(a_queue / RATE, abs=0.002)
    assert policy.choose(r, fleet, now=0.0).replica == winner


def test_groups_the_index_no_longer_holds_stop_counting() -> None:
    """With room for 20 chunks, five 10-chunk groups leave only the last two (LRU): the first three
    are forgotten, and their keys dropped, not just skipped."""
    policy = KvAware()
    fleet = fleet_of(policy, {"a": 20 * 16, "b": None})  # 16 tokens an index chunk
    for g in range(5):
        serve(fleet, "a", chars(30 + g, 640))
    assert fleet.index.size("a") == 20
    assert policy.held_groups("a", fleet) == 2
    assert len(policy._groups["a"]) == 2


def test_an_event_fed_replica_holds_a_group_while_it_computes_it() -> None:
    """Before its KV events an event-fed replica's index holds nothing of a group it is prefilling, but
    the group is its own: counted while a request computes it, and not dropped as evicted."""
    policy = KvAware()
    fleet = Fleet(config=FleetConfig(prefill_tokens_per_s=RATE))
    for name in ("a", "b"):
        fleet.add_replica(name, event_fed=True)
    fleet.attach(policy)
    first = fleet.route(text_req(chars(60, 640)), now=0.0)
    assert fleet.index.size(first.replica) == 0
    assert policy.held_groups(first.replica, fleet) == 1


def test_groups_are_shared_out_per_kv_token() -> None:
    """A replica with twice the KV takes twice the new groups: 6 groups on an idle fleet split 4 : 2."""
    policy = KvAware()
    fleet = fleet_of(policy, {"big": 200_000, "small": 100_000})
    placed = []
    for g in range(6):
        r = text_req(chars(40 + g, 640))
        placed.append(fleet.route(r, now=float(g)).replica)
        fleet.done(r.request_id, float(g))
    assert (placed.count("big"), placed.count("small")) == (4, 2)


def test_a_removed_replica_is_forgotten() -> None:
    policy = KvAware()
    fleet = fleet_of(policy, {"a": None, "b": None})
    serve(fleet, "a", chars(50, 640))
    assert "a" in policy._groups
    fleet.remove_replica("a")
    assert "a" not in policy._groups


@pytest.mark.parametrize(("spec", "enabled"), [("kvaware", True), ("kvaware:group_balance=false", False)])
def test_group_balance_is_a_real_parameter(spec: str, enabled: bool) -> None:
    policy = parse_policy_spec(spec)
    assert isinstance(policy, KvAware)
    assert policy.params.group_balance is enabled


def test_group_keys_stay_within_the_index_capacity_when_the_oldest_is_never_evicted() -> None:
    """A one-chunk prompt's group is its only chunk, which every later prompt opening with it refreshes
    in the index: the oldest key stays held, so pruning from the oldest end stops there, and only the
    capacity bound keeps the evicted groups behind it from piling up."""
    policy = KvAware(KvAwareParams())
    fleet = fleet_of(policy, {"a": None})
    fleet.index.set_capacity("a", 8)
    head = chars(1, 64)  # exactly one chunk
    serve(fleet, "a", head)
    for seed in range(2, 40):
        serve(fleet, "a", head + chars(seed, 64 * 5))
    assert fleet.index.holds("a", group_key(text_req(head), 4))
    assert len(policy._groups["a"]) <= 8


def test_a_new_group_skips_a_replica_over_the_load_bound_even_holding_the_fewest_groups() -> None:
    """`a` serves one hot group: four of its requests decoding, no prefill queued, so its TTFT for a
    new prompt is within one step of the idle replicas' and it holds the fewest groups (1 against 2).
    Its 640 in-flight tokens are over the ring's bound (1.25 x the mean with the new request), so the
    new group goes elsewhere instead of piling onto the hot replica."""
    policy = KvAware()
    fleet = fleet_of(policy, {"a": None, "b": None, "c": None})
    for i, name in enumerate(("b", "b", "c", "c")):
        serve(fleet, name, chars(70 + i, 640))
    hot = chars(80, 640)
    for _ in range(4):
        r = text_req(hot)
        fleet.routed(r, Decision("a", 0, "hot"), now=0.0)
        fleet.first_token(r.request_id, now=0.0)
    held = {name: policy.held_groups(name, fleet) for name in ("a", "b", "c")}
    assert held == {"a": 1, "b": 2, "c": 2}
    new = owned_by(fleet, "a", 300)  # the ring, too, would name the hot replica
    estimates = {e.replica: e for e in policy.estimates(new, fleet, now=0.0)}
    step_s = 150 / RATE
    assert estimates["a"].ttft_s - min(e.ttft_s for e in estimates.values()) < step_s  # close by TTFT
    loads = {name: float(e.load_tokens) for name, e in estimates.items()}
    bound = fleet.ring.bound(loads, loads.keys(), cost=new.prompt_tokens)
    assert loads["a"] + new.prompt_tokens > bound >= new.prompt_tokens
    decision = policy.choose(new, fleet, now=0.0)
    assert decision.replica in ("b", "c") and decision.reason in ("ring", "fewest-groups")
