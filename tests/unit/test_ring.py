"""The bounded-load ring: the load bound, determinism, and ~1/N key movement."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.index.ring import BoundedLoadRing


def make_ring(n: int, vnodes: int = 64, c: float = 1.25) -> BoundedLoadRing:
    ring = BoundedLoadRing(vnodes=vnodes, load_factor=c)
    for i in range(n):
        ring.add(f"r{i}")
    return ring


@settings(max_examples=150, deadline=None)
@given(
    st.integers(min_value=1, max_value=12),
    st.floats(min_value=1.0, max_value=2.0),
    st.lists(st.integers(min_value=0, max_value=50), min_size=12, max_size=12),
    st.integers(min_value=0, max_value=2**64 - 1),
)
def test_never_above_the_bound_while_one_is_below(n: int, c: float, raw_loads: list[int], key: int) -> None:
    ring = make_ring(n, vnodes=16, c=c)
    loads = {f"r{i}": float(raw_loads[i]) for i in range(n)}
    bound = math.ceil(c * (sum(loads.values()) + 1) / n)
    picked = ring.pick(key, loads)
    assert loads[picked] + 1 <= bound
    assert any(loads[r] + 1 <= bound for r in loads)


def test_sequential_placement_stays_within_bound() -> None:
    ring = make_ring(8)
    loads = dict.fromkeys(ring.members, 0.0)
    rng = random.Random(3)
    for _ in range(2000):
        # Every key is the same hot key: without the bound all would land on one replica.
        r = ring.pick(42, loads) if rng.random() < 0.5 else ring.pick(rng.getrandbits(64), loads)
        loads[r] += 1
        assert max(loads.values()) <= math.ceil(1.25 * sum(loads.values()) / 8) + 1


def test_empty_loads_follow_the_plain_ring() -> None:
    ring = make_ring(5)
    for key in (0, 1, 2**63, 2**64 - 1, 12345678901234567):
        assert ring.pick(key, {}) == ring.owner(key)


@pytest.mark.parametrize("n", [4, 10, 20])
def test_join_and_leave_move_about_one_nth_of_keys(n: int) -> None:
    rng = random.Random(n)
    keys = [rng.getrandbits(64) for _ in range(20000)]
    ring = make_ring(n, vnodes=256)
    before = {k: ring.owner(k) for k in keys}
    ring.add("newcomer")
    after = {k: ring.owner(k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "newcomer" for k in moved)  # keys only move to the newcomer
    assert abs(len(moved) / len(keys) - 1 / (n + 1)) < 0.35 / (n + 1)
    ring.remove("newcomer")
    assert {k: ring.owner(k) for k in keys} == before


def test_candidates_restrict_the_choice() -> None:
    ring = make_ring(6)
    for key in range(0, 2**64, 2**58):
        assert ring.pick(key, {}, candidates=["r2", "r4"]) in {"r2", "r4"}
    with pytest.raises(LookupError):
        ring.pick(1, {}, candidates=["not-a-member"])
    with pytest.raises(LookupError):
        BoundedLoadRing().owner(1)


def test_same_members_same_ring_regardless_of_order() -> None:
    a, b = BoundedLoadRing(vnodes=32), BoundedLoadRing(vnodes=32)
    for name in ["x", "y", "z"]:
        a.add(name)
    for name in ["z", "x", "y"]:
        b.add(name)
    assert all(a.owner(k) == b.owner(k) for k in range(0, 2**64, 2**55))


@pytest.mark.parametrize(("vnodes", "c"), [(0, 1.25), (16, 0.9)])
def test_bad_parameters(vnodes: int, c: float) -> None:
    with pytest.raises(ValueError):
        BoundedLoadRing(vnodes=vnodes, load_factor=c)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(min_value=1, max_value=8),
    st.lists(st.integers(min_value=0, max_value=5000), min_size=8, max_size=8),
    st.integers(min_value=1, max_value=20000),
    st.integers(min_value=0, max_value=2**64 - 1),
)
def test_token_costs_keep_the_bound_and_spread_an_idle_fleet(
    n: int, raw_loads: list[int], cost: int, key: int
) -> None:
    ring = make_ring(n, vnodes=16)
    loads = {f"r{i}": float(raw_loads[i]) for i in range(n)}
    bound = ring.bound(loads, loads.keys(), cost)
    assert loads[ring.pick(key, loads, cost=cost)] + cost <= bound
    # On an idle fleet a big request still goes to the key's owner, not to one fallback replica.
    assert ring.pick(key, {}, cost=cost) == ring.owner(key)


def test_order_lists_each_candidate_once_starting_at_the_owner() -> None:
    ring = make_ring(6)
    for key in (0, 2**40, 2**63 + 5):
        order = ring.order(key)
        assert sorted(order) == sorted(ring.members)
        assert order[0] == ring.owner(key)
        assert ring.order(key, ["r1", "r3"]) == [r for r in order if r in {"r1", "r3"}]
