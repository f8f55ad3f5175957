"""PrefixIndex against a brute-force model, under random insert/remove/clear/evict sequences."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.index.prefix_index import PrefixIndex

REPLICAS = ["a", "b", "c", "d"]


class ModelIndex:
    """The obvious implementation: one LRU list per replica, scanned in full."""

    def __init__(self, capacities: dict[str, int]) -> None:
        self.capacity = dict(capacities)
        self.lru: dict[str, OrderedDict[int, None]] = {r: OrderedDict() for r in capacities}

    def insert(self, replica: str, hashes: list[int]) -> None:
        lru = self.lru[replica]
        for h in reversed(hashes):  # the first chunk becomes the most recent
            lru.pop(h, None)
            lru[h] = None
        while len(lru) > self.capacity[replica]:
            lru.popitem(last=False)

    def remove(self, replica: str, hashes: list[int]) -> None:
        for h in hashes:
            self.lru[replica].pop(h, None)

    def clear(self, replica: str) -> None:
        self.lru[replica].clear()

    def longest_match(self, hashes: list[int]) -> dict[str, int]:
        out = {}
        for r, lru in self.lru.items():
            n = 0
            while n < len(hashes) and hashes[n] in lru:
                n += 1
            if n:
                out[r] = n
        return out


hash_values = st.integers(min_value=0, max_value=30)  # a small universe, so entries collide a lot
ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.sampled_from(REPLICAS), st.lists(hash_values, max_size=12)),
        st.tuples(st.just("remove"), st.sampled_from(REPLICAS), st.lists(hash_values, max_size=5)),
        st.tuples(st.just("clear"), st.sampled_from(REPLICAS), st.just([])),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    ops,
    st.lists(st.integers(min_value=1, max_value=10), min_size=4, max_size=4),
    st.lists(st.lists(hash_values, max_size=10), min_size=1, max_size=5),
)
def test_agrees_with_brute_force_and_respects_capacity(
    operations: list[tuple[str, str, list[int]]], capacities: list[int], queries: list[list[int]]
) -> None:
    caps = dict(zip(REPLICAS, capacities, strict=True))
    index = PrefixIndex()
    for r, cap in caps.items():
        index.add_replica(r, cap)
    model = ModelIndex(caps)
    for now, (op, replica, hashes) in enumerate(operations):
        if op == "insert":
            index.insert(replica, hashes, float(now))
            model.insert(replica, hashes)
        elif op == "remove":
            index.remove(replica, hashes)
            model.remove(replica, hashes)
        else:
            index.clear(replica)
            model.clear(replica)
        for r in REPLICAS:
            assert index.size(r) <= caps[r]
            assert index.size(r) == len(model.lru[r])
    for q in queries:
        assert index.longest_match(q) == model.longest_match(q)
    for h in range(31):
        assert sorted(index.holders(h)) == sorted(r for r in REPLICAS if h in model.lru[r])


def test_match_stops_at_the_first_hole() -> None:
    index = PrefixIndex()
    index.insert("a", [1, 2, 3, 4], 0.0)
    index.insert("b", [1, 2], 0.0)
    index.remove("a", [3])
    assert index.longest_match([1, 2, 3, 4]) == {"a": 2, "b": 2}
    assert index.longest_match([9, 1, 2]) == {}
    assert index.longest_match([]) == {}


def test_lru_evicts_least_recently_refreshed() -> None:
    index = PrefixIndex()
    index.add_replica("a", 3)
    index.insert("a", [1, 2, 3], 0.0)  # recency, oldest first: 3, 2, 1
    index.insert("a", [3], 1.0)  # refresh 3: now 2 is the oldest
    index.insert("a", [4], 2.0)
    assert not index.holds("a", 2)
    assert all(index.holds("a", h) for h in (1, 3, 4))
    assert index.evictions == 1


def test_a_chain_is_forgotten_from_its_tail() -> None:
    index = PrefixIndex()
    index.add_replica("a", 6)
    index.insert("a", [1, 2, 3, 4], 0.0)
    index.insert("a", [10, 11, 12, 13], 1.0)  # two over capacity: the first chain loses its tail
    assert index.longest_match([1, 2, 3, 4]) == {"a": 2}
    assert index.longest_match([10, 11, 12, 13]) == {"a": 4}


def test_shrinking_capacity_evicts_now() -> None:
    index = PrefixIndex()
    index.insert("a", list(range(10)), 0.0)
    index.set_capacity("a", 4)
    assert index.size("a") == 4
    assert index.longest_match(list(range(10))) == {"a": 4}  # the tail went first
    assert index.longest_match([6, 7, 8, 9]) == {}


def test_drop_replica_frees_its_slot_for_a_newcomer() -> None:
    index = PrefixIndex()
    index.insert("a", [1, 2], 0.0)
    index.insert("b", [1], 0.0)
    index.drop_replica("a")
    assert "a" not in index
    assert index.longest_match([1, 2]) == {"b": 1}
    index.insert("c", [2], 0.0)  # reuses a's bit: must not inherit a's entries
    assert index.longest_match([1, 2]) == {"b": 1}
    assert index.holders(2) == ["c"]


def test_many_replicas_beyond_a_machine_word() -> None:
    index = PrefixIndex()
    names = [f"r{i}" for i in range(130)]
    for i, name in enumerate(names):
        index.insert(name, list(range(i % 7 + 1)), 0.0)
    result = index.longest_match(list(range(7)))
    assert len(result) == 130
    assert all(result[name] == i % 7 + 1 for i, name in enumerate(names))


def test_ttl_expiry_forgets_only_old_entries() -> None:
    index = PrefixIndex(ttl_s=120.0)
    index.insert("a", [1, 2], 0.0)
    index.insert("a", [3], 100.0)
    index.insert("b", [1], 110.0)
    assert index.expire(125.0) == 2
    assert index.holders(1) == ["b"]
    assert index.holds("a", 3)
    assert PrefixIndex().expire(1e9) == 0


def test_inserting_again_refreshes_the_ttl_of_entries_already_held() -> None:
    index = PrefixIndex(ttl_s=120.0)
    index.insert("a", [1, 2, 3], 0.0)
    index.insert("a", [1, 2], 100.0)  # held already: only their time moves
    assert index.expire(125.0) == 1
    assert index.longest_match([1, 2, 3]) == {"a": 2}


@pytest.mark.parametrize("bad", [0, -5])
def test_capacity_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError):
        PrefixIndex(default_capacity=bad)
    with pytest.raises(ValueError):
        PrefixIndex().add_replica("a", bad)


def test_stats() -> None:
    index = PrefixIndex(default_capacity=100)
    index.insert("a", [1, 2, 3], 0.0)
    index.insert("b", [1], 0.0)
    stats = index.stats()
    assert stats.entries == 4 and stats.unique_hashes == 3 and stats.replicas == 2
    assert stats.per_replica == {"a": 3, "b": 1}
