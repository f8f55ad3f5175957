"""BlockPool: LRU free queue, reference counts, hash map and KV events (no scheduler involved)."""

from __future__ import annotations

import pytest

from workers.engine.hashing import BlockHasher
from workers.engine.kv_cache import AllBlocksCleared, BlockPool, BlockRemoved, BlockStored

BS = 4


def chain(tokens: list[int]) -> list[int]:
    return BlockHasher(BS).hash_prefix(tokens)


def take(pool: BlockPool, tokens: list[int]) -> list[int]:
    """Allocate blocks for `tokens` and cache its full blocks, as a request would."""
    n_blocks = -(-len(tokens) // BS)
    blocks = pool.allocate(n_blocks)
    assert blocks is not None
    pool.cache_blocks(blocks, chain(tokens), tokens, 0, len(tokens) // BS)
    return blocks


def test_initial_free_queue_is_block_id_order_and_allocation_pops_the_head() -> None:
    pool = BlockPool(6, BS)
    assert pool.free_order() == [0, 1, 2, 3, 4, 5]
    assert pool.allocate(2) == [0, 1]
    assert pool.free_order() == [2, 3, 4, 5]
    assert pool.num_free_blocks == 4
    assert pool.usage == pytest.approx(2 / 6)


def test_freed_blocks_go_to_the_tail_in_the_given_order() -> None:
    pool = BlockPool(4, BS)
    a = pool.allocate(2)
    assert a == [0, 1]
    pool.free(reversed(a))  # the engine frees tail-of-chain first
    assert pool.free_order() == [2, 3, 1, 0]


def test_lru_evicts_the_least_recently_freed_cached_block_first() -> None:
    pool = BlockPool(4, BS, enable_events=True)
    first = take(pool, [1, 2, 3, 4, 5, 6, 7, 8])  # blocks 0, 1
    pool.free(reversed(first))
    second = take(pool, [9, 9, 9, 9, 8, 8, 8, 8])  # blocks 2, 3 (the uncached ones come first)
    pool.free(reversed(second))
    pool.drain_events()
    assert pool.free_order() == [1, 0, 3, 2]
    got = pool.allocate(1)
    assert got == [1]  # the first chain's tail block: freed earliest
    evicted = pool.drain_events()
    assert evicted == [BlockRemoved((chain([1, 2, 3, 4, 5, 6, 7, 8])[1],))]
    # The first chain's head is still cached; the second chain is untouched.
    assert len(pool.longest_cached_run(chain([1, 2, 3, 4, 5, 6, 7, 8]), 2)) == 1
    assert len(pool.longest_cached_run(chain([9, 9, 9, 9, 8, 8, 8, 8]), 2)) == 2


def test_a_cache_hit_leaves_the_free_queue_and_is_never_evicted_while_referenced() -> None:
    pool = BlockPool(3, BS)
    tokens = [5, 6, 7, 8]
    blocks = take(pool, tokens)
    pool.free(blocks)
    hit = pool.longest_cached_run(chain(tokens), 1)
    assert hit == blocks
    pool.touch(hit)
    assert pool.ref_count(hit[0]) == 1
    assert hit[0] not in pool.free_order()
    other = pool.allocate(2)
    assert other is not None and hit[0] not in other
    assert pool.allocate(1) is None  # only the referenced block is left: refused, nothing evicted
    assert pool.block_hash(hit[0]) == chain(tokens)[0]


def test_allocation_beyond_the_free_blocks_changes_nothing() -> None:
    pool = BlockPool(2, BS)
    before = pool.free_order()
    assert pool.allocate(3) is None
    assert pool.free_order() == before
    pool.check_invariants()


def test_touch_counts_every_reference() -> None:
    pool = BlockPool(2, BS)
    blocks = take(pool, [1, 2, 3, 4])
    pool.touch(blocks)
    pool.free(blocks)
    assert pool.ref_count(blocks[0]) == 1 and pool.num_free_blocks == 1
    pool.free(blocks)
    assert pool.ref_count(blocks[0]) == 0 and pool.num_free_blocks == 2
    with pytest.raises(RuntimeError):
        pool.free(blocks)


def test_block_stored_chains_parents_and_carries_the_tokens() -> None:
    pool = BlockPool(8, BS, enable_events=True)
    tokens = list(range(100, 112))  # 3 full blocks
    hashes = chain(tokens)
    blocks = pool.allocate(3)
    assert blocks is not None
    pool.cache_blocks(blocks, hashes, tokens, 0, 1)
    pool.cache_blocks(blocks, hashes, tokens, 1, 3)
    assert pool.drain_events() == [
        BlockStored((hashes[0],), None, tuple(tokens[:4]), BS),
        BlockStored((hashes[1], hashes[2]), hashes[0], tuple(tokens[4:12]), BS),
    ]
    assert pool.drain_events() == []


def test_duplicate_blocks_of_one_hash_are_each_announced_and_each_removed() -> None:
    pool = BlockPool(2, BS, enable_events=True)
    a = take(pool, [1, 1, 1, 1])
    b = take(pool, [1, 1, 1, 1])  # computed concurrently: vLLM does not deduplicate
    h = chain([1, 1, 1, 1])[0]
    assert pool.cached_block_counts() == {h: 2}
    pool.free(a + b)
    pool.allocate(1)
    assert pool.cached_block_counts() == {h: 1}
    assert len(pool.longest_cached_run([h], 1)) == 1  # the survivor still serves hits
    pool.allocate(1)
    assert pool.cached_block_counts() == {}
    events = pool.drain_events()
    assert [type(e) for e in events] == [BlockStored, BlockStored, BlockRemoved, BlockRemoved]
    pool.check_invariants()


def test_reset_is_refused_while_blocks_are_referenced_and_clears_everything_after() -> None:
    pool = BlockPool(4, BS, enable_events=True)
    blocks = take(pool, [1, 2, 3, 4, 5, 6, 7, 8])
    pool.drain_events()
    assert pool.reset() is False
    assert pool.drain_events() == []
    pool.free(blocks)
    assert pool.reset() is True
    assert pool.drain_events() == [AllBlocksCleared()]
    assert pool.cached_block_counts() == {}
    assert pool.longest_cached_run(chain([1, 2, 3, 4]), 1) == []
    pool.check_invariants()


def test_import_chain_holds_missing_blocks_free_and_recent_without_evicting_its_own() -> None:
    pool = BlockPool(6, BS, enable_events=True)
    tokens = list(range(1, 17))  # 4 blocks
    hashes = chain(tokens)
    head = take(pool, tokens[:4])  # block 0 cached, then freed: first in line for eviction
    pool.free(head)
    filler = take(pool, [9] * 8)
    pool.free(filler)
    pool.drain_events()
    assert pool.import_chain(hashes, tokens) == 4
    events = pool.drain_events()
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert stored == [BlockStored(tuple(hashes[1:]), hashes[0], tuple(tokens[4:]), BS)]
    assert len(pool.longest_cached_run(hashes, 4)) == 4
    assert pool.num_free_blocks == 6  # imported blocks belong to no request
    # The chain is now the most recently used, tail first: the filler goes before any of it.
    chain_blocks = pool.longest_cached_run(hashes, 4)
    assert pool.free_order()[-4:] == list(reversed(chain_blocks))
    pool.check_invariants()


def test_import_chain_holds_a_shorter_prefix_when_blocks_are_referenced() -> None:
    pool = BlockPool(3, BS)
    held = pool.allocate(2)
    assert held is not None
    tokens = list(range(1, 17))
    assert pool.import_chain(chain(tokens), tokens) == 1
    pool.check_invariants()


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 16), (4, 0), (-1, 16)])
def test_invalid_sizes_are_refused(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError):
        BlockPool(num_blocks, block_size)


def test_no_events_are_recorded_when_disabled() -> None:
    pool = BlockPool(2, BS)
    blocks = take(pool, [1, 2, 3, 4])
    pool.free(blocks)
    pool.allocate(2)
    assert pool.drain_events() == []
