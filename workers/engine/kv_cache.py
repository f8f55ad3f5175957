"""The paged prefix cache of one replica: KV blocks, reference counts, LRU free queue, KV events.

Modelled on vLLM V1's BlockPool / FreeKVCacheBlockQueue (vllm/v1/core/block_pool.py, kv_cache_utils.py).

Rules (the invariants `check_invariants` asserts):
- There are `num_blocks` blocks of `block_size` token slots. Every block is either *referenced*
  (ref count > 0: held by running requests) or *free* (ref count 0, in the free queue) — never both,
  so `referenced + free == num_blocks` and capacity can never be exceeded.
- A free block may still be *cached*: it keeps its hash until it is reused. The free queue is the LRU
  order of eviction: allocation pops from the HEAD (evicting the block's hash, one BlockRemoved each);
  a request's freed blocks are appended at the TAIL, in the order the caller gives (vLLM passes them
  tail-of-chain first, so a chain is evicted from its end and its shared head survives longest); a cache
  hit takes a block back OUT of the queue (`touch`). Initially the queue holds every block by id order.
- A referenced block is never evicted: only free blocks are in the queue.
- Only full blocks get a hash. The cache maps hash -> block; like vLLM it does not deduplicate, so two
  requests that computed the same block concurrently hold two blocks with the same hash: each was
  announced by a BlockStored and each eviction announces a BlockRemoved. An index that counts
  Stored minus Removed per hash therefore agrees with the cache exactly.
- A prefix lookup returns the longest run of consecutive cached blocks from block 0.
- Events are appended in the order things happened and handed over by `drain_events()`; none are
  recorded when events are disabled (vLLM's `enable_kv_cache_events` defaults to false).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence

# The events are the wire codec's own types: the engine emits exactly what the emulator publishes
# and what the router decodes, with no second definition to drift.
from router.index.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

_NO_HASH = -1  # block hashes are unsigned 64-bit, so -1 can never be one


class BlockPool:
    """KV blocks with ref counts, a hash -> block map and an LRU free queue. Pure bookkeeping, no I/O."""

    def __init__(
        self, num_blocks: int, block_size: int, *, enable_events: bool = False, medium: str = "GPU"
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_events = enable_events
        self.medium = medium
        self._ref = [0] * num_blocks
        self._hash = [_NO_HASH] * num_blocks
        # OrderedDict gives O(1) pop-from-head, append-at-tail and removal from the middle, like vLLM's
        # doubly linked list, in C. Keys are block ids; first key = next block to evict.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # hash -> a block holding it (the one lookups return)
        self._dups: dict[int, list[int]] = {}  # hash -> further blocks holding the same hash
        self._events: list[KVEvent] = []

    # -- queries ---------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks not referenced by any request (cached or not): what allocation may use."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """vLLM's kv_cache_usage_perc: the fraction of blocks referenced (cached free blocks count as free).

        vLLM also reserves one null block and divides by num_gpu_blocks - 1; that is not modelled.
        """
        return 1.0 - len(self._free) / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> int | None:
        h = self._hash[block_id]
        return None if h == _NO_HASH else h

    def longest_cached_run(self, block_hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Block ids of the longest run of cached blocks matching `block_hashes` from block 0.

        At most `max_blocks`. No side effect: the caller `touch`es what it uses.
        """
        cached = self._cached
        out: list[int] = []
        for h in block_hashes[:max_blocks]:
            b = cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def free_order(self) -> list[int]:
        """The free queue, head (next evicted) first. O(num_blocks): for tests and debugging."""
        return list(self._free)

    def cached_block_counts(self) -> Counter[int]:
        """hash -> how many blocks hold it. O(num_blocks): for tests and debugging."""
        return Counter(h for h in self._hash if h != _NO_HASH)

    # -- mutations -------------------------------------------------------------------------------------

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cache-hit blocks; a free one leaves the free queue (so it can't be evicted)."""
        ref = self._ref
        free = self._free
        for b in block_ids:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks from the head of the free queue, referenced once; None (and no change) if too few.

        A reused block that was cached loses its hash: one BlockRemoved per evicted block, as vLLM emits.
        """
        free = self._free
        if n > len(free):
            return None
        out: list[int] = []
        ref = self._ref
        hashes = self._hash
        for _ in range(n):
            b, _unused = free.popitem(last=False)
            if hashes[b] != _NO_HASH:
                self._evict(b)
            ref[b] = 1
            out.append(b)
        return out

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference on each block; those reaching 0 go to the TAIL of the free queue, in order.

        Pass them in eviction-priority order (first = evicted first); the engine passes a request's
        blocks reversed, as vLLM does, so the tail of a chain is evicted before its head.
        """
        ref = self._ref
        free = self._free
        for b in block_ids:
            r = ref[b] - 1
            if r < 0:
                raise RuntimeError(f"block {b} freed more often than referenced")
            ref[b] = r
            if r == 0:
                free[b] = None

    def cache_blocks(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[int],
        token_ids: Sequence[int],
        first: int,
        last: int,
    ) -> None:
        """Blocks [first, last) of a request (its `block_ids`, chained `block_hashes`) became full: cache
        them and emit one BlockStored whose parent is block first-1's hash (None when first == 0)."""
        if last <= first:
            return
        hashes = self._hash
        cached = self._cached
        for i in range(first, last):
            b = block_ids[i]
            h = block_hashes[i]
            hashes[b] = h
            if h in cached:
                self._dups.setdefault(h, []).append(b)
            else:
                cached[h] = b
        if self.enable_events:
            bs = self.block_size
            self._events.append(
                BlockStored(
                    block_hashes=tuple(block_hashes[first:last]),
                    parent_block_hash=block_hashes[first - 1] if first > 0 else None,
                    token_ids=tuple(token_ids[first * bs : last * bs]),
                    block_size=bs,
                    medium=self.medium,
                )
            )

    def import_chain(self, block_hashes: Sequence[int], token_ids: Sequence[int]) -> int:
        """Hold the chain `block_hashes` (of full blocks of `token_ids`) as cached-and-free blocks.

        For P2P KV migration: the blocks already cached are kept, the missing ones are taken from the
        free queue's head (evicting LRU blocks, never this chain's own) and announced with one
        BlockStored; then every free block of the chain moves to the queue's tail, tail-of-chain first,
        as if a request had just finished with it. If too few blocks are free, a shorter prefix is held.
        Returns the number of leading blocks of the chain held afterwards.
        """
        held = self.longest_cached_run(block_hashes, len(block_hashes))
        ref = self._ref
        free = self._free
        for b in held:  # out of the queue first, so the allocation below cannot evict them
            if ref[b] == 0:
                del free[b]
        n_new = min(len(block_hashes) - len(held), len(free))
        new = self.allocate(n_new) or []
        for b in new:
            ref[b] = 0  # allocate() referenced them; an imported block belongs to no request
        chain = held + new
        self.cache_blocks(chain, block_hashes, token_ids, len(held), len(chain))
        for b in reversed(chain):
            if ref[b] == 0:
                free[b] = None
        return len(chain)

    def reset(self) -> bool:
        """Drop every cached hash (vLLM's reset_prefix_cache). Refused (False) while any block is referenced,
        as vLLM refuses it while requests hold blocks."""
        if len(self._free) != self.num_blocks:
            return False
        self._hash = [_NO_HASH] * self.num_blocks
        self._cached.clear()
        self._dups.clear()
        if self.enable_events:
            self._events.append(AllBlocksCleared())
        return True

    def drain_events(self) -> list[KVEvent]:
        """The events since the last drain, oldest first."""
        events = self._events
        self._events = []
        return events

    def _evict(self, b: int) -> None:
        h = self._hash[b]
        self._hash[b] = _NO_HASH
        if self._cached.get(h) == b:
            others = self._dups.get(h)
            if others:
                self._cached[h] = others.pop()
                if not others:
                    del self._dups[h]
            else:
                del self._cached[h]
        else:
            others = self._dups[h]
            others.remove(b)
            if not others:
                del self._dups[h]
        if self.enable_events:
            self._events.append(BlockRemoved(block_hashes=(h,), medium=self.medium))

    # -- checks ----------------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert the module's rules. O(num_blocks): for tests, never on a hot path."""
        free = self._free
        for b in range(self.num_blocks):
            assert self._ref[b] >= 0, f"block {b} has a negative ref count"
            assert (self._ref[b] == 0) == (b in free), f"block {b}: ref {self._ref[b]} vs free queue"
        owners: dict[int, list[int]] = {}
        for b, h in enumerate(self._hash):
            if h != _NO_HASH:
                owners.setdefault(h, []).append(b)
        mapped = {h: sorted([b, *self._dups.get(h, [])]) for h, b in self._cached.items()}
        assert set(self._dups) <= set(self._cached), "duplicate list for an uncached hash"
        assert mapped == {h: sorted(bs) for h, bs in owners.items()}, "hash map disagrees with block hashes"
