"""The prefix index: which replicas hold which chained chunk hashes, bounded per replica.

Rules:
- An entry is a (chained chunk hash, replica) pair: the replica is believed to hold the KV of that
  whole prefix. Entries come from routing (speculative: "I just sent it there") and from the
  replica's KV events (confirmed); both call `insert` / `remove` / `clear`.
- Every replica has a capacity in chunks; past it, its least recently inserted-or-refreshed entries are
  forgotten, as the replica's own LRU would evict them. A prompt's hashes are refreshed last-first,
  so its first chunk is the most recent and a chain is forgotten from its tail: vLLM frees a
  finished request's blocks tail first for the same reason, so that eviction shortens prefixes
  instead of cutting their head off (which would make every later chunk unreachable). Memory is
  therefore bounded by the sum of the capacities whatever the input, and roughly tracks what the
  replicas can really hold.
- `longest_match` counts consecutive chunks from the start only: vLLM reuses a prefix, never a
  middle, so a hole ends the match even if later chunks are present.
- Time is an argument. Entries remember the coarse time (`ttl_granularity_s`) of their last refresh,
  which `expire` uses to forget entries older than a TTL (Dynamo's approximate mode uses 120 s);
  without a TTL, capacity alone bounds the index.

Layout, chosen for memory (`bytes_per_block` in docs/BENCHMARKS.md): one dict maps each hash to a
bitmask of replica slots (Python small ints up to 256 are shared, and other masks are interned, so a
mask costs nothing per entry); each replica keeps an OrderedDict of its hashes in LRU order whose
values are shared epoch ints. Complexity, with k = chunks in the request, R = replicas holding its
first chunk, e = entries evicted:
- `longest_match`: O(k + R) dict lookups and mask operations.
- `insert`: O(k + e) amortized; `remove`: O(k); `expire`: O(e).
- `clear(replica)` / `drop_replica`: O(entries of that replica).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import filterfalse, repeat


def _consume(calls: Iterator[object]) -> None:
    """Run a lazy iterator of calls to the end in C (itertools' `consume` recipe)."""
    deque(calls, maxlen=0)


@dataclass(frozen=True, slots=True)
class IndexStats:
    replicas: int
    entries: int  # (hash, replica) pairs
    unique_hashes: int
    per_replica: Mapping[str, int]
    capacity: Mapping[str, int]
    evictions: int


class _ReplicaEntries:
    """One replica's hashes in LRU order (oldest first), with its capacity and slot bit."""

    __slots__ = ("bit", "capacity", "lru")

    def __init__(self, bit: int, capacity: int) -> None:
        self.bit = bit
        self.capacity = capacity
        self.lru: OrderedDict[int, int] = OrderedDict()


class PrefixIndex:
    """chain hash -> replicas holding it, with per-replica LRU capacity (in chunks)."""

    def __init__(
        self, default_capacity: int = 1 << 20, *, ttl_s: float | None = None, ttl_granularity_s: float = 1.0
    ) -> None:
        if default_capacity <= 0:
            raise ValueError("default_capacity must be positive")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        # 2**20 chunks by default: Dynamo prunes its approximate tree at 2**20 blocks.
        self.default_capacity = default_capacity
        self.ttl_s = ttl_s
        self._granularity = ttl_granularity_s
        self._holders: dict[int, int] = {}
        self._replicas: dict[str, _ReplicaEntries] = {}
        self._slot_names: dict[int, str] = {}  # bit -> replica name
        self._free_bits: list[int] = []
        self._next_bit = 1
        self._masks: dict[int, int] = {}  # interning table: equal masks share one int object
        self._epoch_value = 0
        self.evictions = 0

    # -- replicas -----------------------------------------------------------------------------

    def add_replica(self, replica: str, capacity: int | None = None) -> None:
        """Register a replica (idempotent); `capacity` in chunks, default `default_capacity`."""
        if replica in self._replicas:
            if capacity is not None:
                self.set_capacity(replica, capacity)
            return
        bit = self._free_bits.pop() if self._free_bits else self._take_new_bit()
        cap = self.default_capacity if capacity is None else capacity
        if cap <= 0:
            raise ValueError(f"capacity must be positive, got {cap}")
        self._replicas[replica] = _ReplicaEntries(bit, cap)
        self._slot_names[bit] = replica

    def _take_new_bit(self) -> int:
        bit = self._next_bit
        self._next_bit <<= 1
        return bit

    def set_capacity(self, replica: str, capacity: int) -> None:
        """Change a replica's capacity in chunks, evicting its oldest entries if it shrank."""
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        if replica not in self._replicas:
            self.add_replica(replica, capacity)
            return
        entries = self._replicas[replica]
        entries.capacity = capacity
        self._evict_over_capacity(entries)

    def replicas(self) -> list[str]:
        return list(self._replicas)

    def capacity(self, replica: str) -> int:
        return self._replicas[replica].capacity

    def __contains__(self, replica: object) -> bool:
        return replica in self._replicas

    # -- writes -------------------------------------------------------------------------------

    def insert(self, replica: str, hashes: Iterable[int], now: float) -> None:
        """Record that `replica` holds these chained hashes (in prompt order), refreshing them as most
        recent — the first chunk most recent of all, so eviction takes the chain's tail first."""
        entries = self._replicas.get(replica)
        if entries is None:
            self.add_replica(replica)
            entries = self._replicas[replica]
        epoch = self._epoch(now)
        lru = entries.lru
        bit = entries.bit
        holders = self._holders
        chain = hashes if isinstance(hashes, Sequence) else list(hashes)
        # Every routed request lands here with its whole prompt, most of it usually held already, so
        # the refresh runs in C (filterfalse / map / deque over bound methods) and Python only touches
        # new entries: a held 128-chunk prompt costs ~20 us against ~30 us chunk by chunk (timeit).
        for h in list(filterfalse(lru.__contains__, chain)):
            if h not in lru:  # a chain can repeat a hash (a 64-bit collision): add it once
                lru[h] = epoch
                holders[h] = self._intern(holders.get(h, 0) | bit)
        # Moving each hash to the end, last chunk first, leaves the chain in exactly that LRU order
        # whatever order it was in, new entries included.
        _consume(map(lru.move_to_end, reversed(chain)))
        if self.ttl_s is not None:  # the epoch is read by `expire` only
            lru.update(zip(chain, repeat(epoch)))
        self._evict_over_capacity(entries)

    def remove(self, replica: str, hashes: Iterable[int]) -> int:
        """Forget these hashes on `replica` (a BlockRemoved); returns how many were present."""
        entries = self._replicas.get(replica)
        if entries is None:
            return 0
        removed = 0
        for h in hashes:
            if entries.lru.pop(h, None) is not None:
                self._unset(h, entries.bit)
                removed += 1
        return removed

    def clear(self, replica: str) -> int:
        """Forget everything on `replica` (AllBlocksCleared, an engine restart); keeps it registered."""
        entries = self._replicas.get(replica)
        if entries is None:
            return 0
        n = len(entries.lru)
        for h in entries.lru:
            self._unset(h, entries.bit)
        entries.lru.clear()
        return n

    def drop_replica(self, replica: str) -> None:
        """Forget a replica that left the fleet, and free its slot for a newcomer."""
        if replica not in self._replicas:
            return
        self.clear(replica)
        entries = self._replicas.pop(replica)
        del self._slot_names[entries.bit]
        self._free_bits.append(entries.bit)

    def expire(self, now: float) -> int:
        """Forget entries not refreshed within `ttl_s` of `now`; no-op without a TTL."""
        if self.ttl_s is None:
            return 0
        cutoff = self._epoch_number(now - self.ttl_s)
        expired = 0
        for entries in self._replicas.values():
            lru = entries.lru
            while lru:
                h, epoch = next(iter(lru.items()))
                if epoch >= cutoff:
                    break
                lru.popitem(last=False)
                self._unset(h, entries.bit)
                expired += 1
        return expired

    # -- reads --------------------------------------------------------------------------------

    def longest_match(self, hashes: Sequence[int]) -> dict[str, int]:
        """{replica: consecutive chunks matched from the start}, for replicas matching at least one."""
        if not hashes:
            return {}
        holders = self._holders
        alive = holders.get(hashes[0], 0)
        if not alive:
            return {}
        result: dict[str, int] = {}
        names = self._slot_names
        depth = 1
        for h in hashes[1:]:
            still = holders.get(h, 0) & alive
            if still != alive:
                dropped = alive & ~still
                while dropped:
                    low = dropped & -dropped
                    result[names[low]] = depth
                    dropped ^= low
                alive = still
                if not alive:
                    return result
            depth += 1
        while alive:
            low = alive & -alive
            result[names[low]] = depth
            alive ^= low
        return result

    def holders(self, chunk_hash: int) -> list[str]:
        """Replicas holding this chained hash."""
        mask = self._holders.get(chunk_hash, 0)
        out = []
        while mask:
            low = mask & -mask
            out.append(self._slot_names[low])
            mask ^= low
        return out

    def holds(self, replica: str, chunk_hash: int) -> bool:
        entries = self._replicas.get(replica)
        return entries is not None and chunk_hash in entries.lru

    def size(self, replica: str | None = None) -> int:
        """Entries in the index, or held by one replica."""
        if replica is not None:
            entries = self._replicas.get(replica)
            return 0 if entries is None else len(entries.lru)
        return sum(len(e.lru) for e in self._replicas.values())

    def unique_hashes(self) -> int:
        return len(self._holders)

    def stats(self) -> IndexStats:
        return IndexStats(
            replicas=len(self._replicas),
            entries=self.size(),
            unique_hashes=len(self._holders),
            per_replica={name: len(e.lru) for name, e in self._replicas.items()},
            capacity={name: e.capacity for name, e in self._replicas.items()},
            evictions=self.evictions,
        )

    # -- internals ----------------------------------------------------------------------------

    def _epoch_number(self, now: float) -> int:
        return int(now // self._granularity)

    def _epoch(self, now: float) -> int:
        # One int object per epoch, shared by every entry refreshed in it: the timestamp costs
        # a pointer per entry, not a new int.
        number = self._epoch_number(now)
        if number != self._epoch_value:
            self._epoch_value = number
        return self._epoch_value

    def _intern(self, mask: int) -> int:
        if mask < 256:
            return mask  # CPython shares small ints already
        return self._masks.setdefault(mask, mask)

    def _unset(self, h: int, bit: int) -> None:
        mask = self._holders.get(h, 0) & ~bit
        if mask:
            self._holders[h] = self._intern(mask)
        else:
            self._holders.pop(h, None)

    def _evict_over_capacity(self, entries: _ReplicaEntries) -> None:
        lru = entries.lru
        over = len(lru) - entries.capacity
        for _ in range(max(over, 0)):
            h, _epoch = lru.popitem(last=False)
            self._unset(h, entries.bit)
        if over > 0:
            self.evictions += over
