"""One replica's vLLM KV events applied to the PrefixIndex, keyed by the router's own chain hashes. Sans-I/O.

Rules (`EventIndexer`):
- Keys are the router's OWN chain hashes, computed from each BlockStored's `token_ids` by
  `chain_token_blocks` — the code `hash_tokens` runs for a token-id request — never the engine's hash,
  which depends on vLLM's hash algorithm, release and PYTHONHASHSEED. So a request and the event that
  announced its blocks always agree (the robust scheme of vllm-interfaces.md, which llm-d uses).
- Roots: a BlockStored whose parent is None starts a chain at `model_seed(model, cache_salt)`, where
  `model` is the event's `lora_name` when set (vLLM serves an adapter under its own model name, which
  is what requests for it carry and are hashed with), else the replica's model; the salt is read from
  the first block's extra keys (see `_first_block_keys`). A parent we mapped continues from its own
  hash. A parent we never saw (its store was missed: dropped events, or stored before we subscribed)
  cannot be placed: the event's blocks are skipped and counted as `orphan`.
- Extra keys other than the LoRA name and the salt (multimodal identifiers, prompt-embedding hashes)
  change the KV, but a request's token ids do not show them: such a block's root is mixed with a hash
  of those keys, so its chain stays consistent for BlockRemoved yet matches no token-only request.
- The engine -> own hash map applies BlockRemoved. vLLM may hold two blocks with one hash and then
  announces each store and each removal, so an engine hash has a reference count and leaves the map
  with its last block. Distinct engine hashes may share an own hash (extra keys the router reads
  differently, 64-bit truncation), so an own hash leaves the index with the last engine hash mapping
  to it: the index holds an own hash iff some block the replica announced and did not remove has it.
  The map is an LRU bounded by the replica's index capacity (`PrefixIndex.capacity`: its KV capacity in
  chunks once scraped, else the index default of 2**20): the replica holds no more blocks than that,
  so a fuller map has missed removals, and its oldest entries are the likeliest stale. An evicted
  entry's own hash leaves the index too (counted: `map_evictions`).
- Only medium "GPU" (or absent) is indexed. A CPU-offload tier announces its own stores and removals
  with medium "CPU" and the same engine hashes; vLLM must load those blocks back before use, and mixing
  tiers in one map would let a CPU-tier removal drop a block still on the GPU. Counted and ignored.
- Only KV-cache group 0 is indexed: a hybrid model (e.g. sliding window + full attention) publishes
  each group's blocks under the same hashes, and a prefix is not reusable once a group lost it; a
  router cannot model that per group, so the other groups are counted and ignored.
- An event whose block size differs from the router's `block_size` cannot match a request (hashes of
  different chunkings never agree): counted (`block_size`) and skipped.
- AllBlocksCleared empties the replica's index entries (routing-time ones too: the cache is empty) and
  the map. `forget()` drops only what events put there (a resync after lost events); `rebuild()` makes
  the index hold exactly what events put there (back from approximate mode).
- No clock and no I/O: `now` (the index's refresh time) is an argument.

Rules (`SequenceTracker`): vLLM numbers batches from 0 per publisher, +1 a batch. Given a batch's `seq`
and `ts`, `check` says `in_order` (apply it), `gap(expected, got)` (ask the replay for `expected`
onwards; the first batch seen with seq > 0 is a gap from 0), `duplicate` (seq already applied, e.g.
seen again through a replay overlap) or `reset` (seq went backwards: the engine restarted and counts
from 0 again). Both of the last two have seq < expected; a replayed copy carries the very payload, so
the same `ts`, while a restarted engine stamps new batches later than any applied one: `ts` newer than
the last applied batch's means a reset. (A wall clock stepped back across a restart would read as
duplicates until the new sequence passes the old one: a degradation the gap check then repairs.)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import mmh3
import msgpack

from router.index.chunking import chain_token_blocks, model_seed
from router.index.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from router.index.prefix_index import PrefixIndex

EVENT_TYPES = ("BlockStored", "BlockRemoved", "AllBlocksCleared")
# Why blocks of a BlockStored were not indexed (metric label values: a fixed set).
SKIP_REASONS = ("orphan", "medium", "group", "block_size", "malformed")
INDEXED_MEDIA = (None, "GPU")
CACHE_SALT_KEY = "cache_salt"


@dataclass(slots=True)
class BatchReport:
    """What applying some events did (for metrics and logs)."""

    events: dict[str, int] = field(default_factory=dict)  # by type (EVENT_TYPES)
    stored_blocks: int = 0
    removed_blocks: int = 0  # own hashes that left the index because of BlockRemoved
    skipped: dict[str, int] = field(default_factory=dict)  # blocks, by reason (SKIP_REASONS)
    map_evictions: int = 0
    foreign_block_size: int | None = None  # a block size other than the router's, if one was seen

    def skip(self, reason: str, blocks: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + blocks


class EventIndexer:
    """Applies one replica's KV events to `index` under `replica` (see the module rules)."""

    def __init__(
        self,
        index: PrefixIndex,
        replica: str,
        model: str,
        block_size: int,
        *,
        map_capacity: int | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if map_capacity is not None and map_capacity <= 0:
            raise ValueError(f"map_capacity must be positive, got {map_capacity}")
        self.index = index
        self.replica = replica
        self.model = model
        self.block_size = block_size
        self._capacity = map_capacity
        self._own: OrderedDict[int, int] = OrderedDict()  # engine hash -> own hash, LRU (oldest first)
        self._extra_refs: dict[int, int] = {}  # engine hash -> further blocks holding it (usually none)
        self._owners: dict[int, int] = {}  # own hash -> engine hashes in `_own` mapping to it
        self.map_evictions = 0

    # -- reads --------------------------------------------------------------------------------

    @property
    def map_capacity(self) -> int:
        if self._capacity is not None:
            return self._capacity
        if self.replica in self.index:
            return self.index.capacity(self.replica)
        return self.index.default_capacity

    def __len__(self) -> int:
        """Engine hashes mapped (blocks the replica holds, as far as its events told)."""
        return len(self._own)

    def own_hash(self, engine_hash: int) -> int | None:
        return self._own.get(engine_hash)

    def own_hashes(self) -> set[int]:
        """The own hashes events put in the index (whether or not the index has evicted some since)."""
        return set(self._owners)

    # -- writes -------------------------------------------------------------------------------

    def apply(self, events: Iterable[KVEvent], now: float) -> BatchReport:
        """Apply a batch's events in order."""
        report = BatchReport()
        for event in events:
            kind = type(event).__name__
            report.events[kind] = report.events.get(kind, 0) + 1
            if isinstance(event, BlockStored):
                self._stored(event, now, report)
            elif isinstance(event, BlockRemoved):
                self._removed(event, report)
            elif isinstance(event, AllBlocksCleared):
                self.clear()
        return report

    def clear(self) -> int:
        """The replica's cache is empty (AllBlocksCleared, an engine restart): forget all its entries,
        routing-time ones included, and the map. Returns the index entries dropped."""
        self._forget_map()
        return self.index.clear(self.replica)

    def forget(self) -> int:
        """Drop what events put in the index (they may be stale after lost events), keeping routing-time
        entries, and the map. Returns the index entries dropped."""
        owns = self.own_hashes()
        self._forget_map()
        return self.index.remove(self.replica, owns)

    def rebuild(self, now: float) -> int:
        """Make the replica's index entries exactly those events put there, dropping routing-time ones
        (inserted while the stream was silent). Returns the entries held afterwards."""
        self.index.clear(self.replica)
        # Newest first: `insert` refreshes its list last-to-first, so the newest ends most recent.
        self.index.insert(self.replica, list(dict.fromkeys(reversed(self._own.values()))), now)
        return self.index.size(self.replica)

    # -- internals ----------------------------------------------------------------------------

    def _forget_map(self) -> None:
        self._own.clear()
        self._extra_refs.clear()
        self._owners.clear()

    def _stored(self, event: BlockStored, now: float, report: BatchReport) -> None:
        n = len(event.block_hashes)
        if event.medium not in INDEXED_MEDIA:
            report.skip("medium", n)
            return
        if event.group_idx != 0:
            report.skip("group", n)
            return
        bs = event.block_size
        if bs != self.block_size:
            report.skip("block_size", n)
            report.foreign_block_size = bs
            return
        keys = event.extra_keys
        if not n or len(event.token_ids) != n * bs or (keys is not None and len(keys) != n):
            report.skip("malformed", n)
            return
        if event.parent_block_hash is None:
            salt, opaque = _first_block_keys(keys[0] if keys else None, event.lora_name)
            root = model_seed(event.lora_name or self.model, salt)
        else:
            parent = self._own.get(event.parent_block_hash)
            if parent is None:
                report.skip("orphan", n)
                return
            root, opaque = parent, _opaque(keys[0] if keys else None, event.lora_name)
        try:
            own = self._chain(event, root, opaque, keys)
        except ValueError:  # a token id outside [0, 2**32): no vocabulary has one
            report.skip("malformed", n)
            return
        mapped = [self._map(e, o) for e, o in zip(event.block_hashes, own, strict=True)]
        self.index.insert(self.replica, mapped, now)
        report.stored_blocks += n
        report.map_evictions += self._evict_over_capacity()

    def _chain(
        self, event: BlockStored, root: int, opaque: bytes | None, keys: Sequence[object] | None
    ) -> tuple[int, ...]:
        bs = self.block_size
        later = () if keys is None else keys[1:]
        if opaque is None and all(_opaque(k, event.lora_name) is None for k in later):
            return chain_token_blocks(event.token_ids, bs, root)  # the common case: one call for all
        out: list[int] = []
        parent = root
        for i in range(len(event.block_hashes)):
            extra = opaque if i == 0 else _opaque(keys[i] if keys else None, event.lora_name)
            seed = parent if extra is None else parent ^ _mix(extra)
            (parent,) = chain_token_blocks(event.token_ids[i * bs : (i + 1) * bs], bs, seed)
            out.append(parent)
        return tuple(out)

    def _map(self, engine_hash: int, own_hash: int) -> int:
        """Map a stored block; returns the own hash it is indexed under."""
        current = self._own.get(engine_hash)
        if current is None:
            self._own[engine_hash] = own_hash
            self._owners[own_hash] = self._owners.get(own_hash, 0) + 1
            return own_hash
        # The same hash stored again: a second block holding it (vLLM does not deduplicate blocks
        # computed concurrently). It keeps its first own hash: equal engine hashes, equal content.
        self._extra_refs[engine_hash] = self._extra_refs.get(engine_hash, 0) + 1
        self._own.move_to_end(engine_hash)
        return current

    def _removed(self, event: BlockRemoved, report: BatchReport) -> None:
        if event.medium not in INDEXED_MEDIA or event.group_idx != 0:
            return  # not a tier or group we index (see the module rules)
        gone: list[int] = []
        for engine_hash in event.block_hashes:
            extra = self._extra_refs.get(engine_hash)
            if extra:  # another block still holds this hash
                if extra == 1:
                    del self._extra_refs[engine_hash]
                else:
                    self._extra_refs[engine_hash] = extra - 1
                continue
            own_hash = self._own.pop(engine_hash, None)
            if own_hash is not None and self._release(own_hash):
                gone.append(own_hash)
        report.removed_blocks += self.index.remove(self.replica, gone)

    def _release(self, own_hash: int) -> bool:
        """An engine hash mapping to `own_hash` left the map; True if it was the last one."""
        owners = self._owners.pop(own_hash, 1) - 1
        if owners:
            self._owners[own_hash] = owners
        return not owners

    def _evict_over_capacity(self) -> int:
        over = len(self._own) - self.map_capacity
        if over <= 0:
            return 0
        gone: list[int] = []
        for _ in range(over):
            engine_hash, own_hash = self._own.popitem(last=False)
            self._extra_refs.pop(engine_hash, None)
            if self._release(own_hash):
                gone.append(own_hash)
        self.index.remove(self.replica, gone)
        self.map_evictions += over
        return over


def _first_block_keys(keys: object, lora_name: str | None) -> tuple[str | None, bytes | None]:
    """(cache salt, the other extra keys encoded) of a chain's first block.

    vLLM builds a block's extra keys as LoRA name + multimodal keys + cache salt (block 0 only) +
    prompt-embedding hashes (vllm/v1/core/kv_cache_utils.py, generate_block_hash_extra_keys), all
    untagged: the salt is block 0's last string once a leading LoRA name is set aside (multimodal keys
    are (identifier, offset) pairs or identifier strings before it; embedding hashes are bytes). A
    `("cache_salt", salt)` pair is taken as the salt too. When multimodal identifier strings come last
    the "salt" is one of them: the chain then still matches no plain request, which is what it should do.
    """
    items = _without_lora(keys, lora_name)
    salt: str | None = None
    for i, item in enumerate(items):
        if isinstance(item, tuple) and len(item) == 2 and item[0] == CACHE_SALT_KEY:
            salt = str(item[1])
            del items[i]
            break
    else:
        for i in range(len(items) - 1, -1, -1):
            if isinstance(items[i], str):
                salt = items.pop(i)  # type: ignore[assignment]
                break
    return salt, _encode(items)


def _opaque(keys: object, lora_name: str | None) -> bytes | None:
    """A later block's extra keys other than the LoRA name, encoded; None when there are none."""
    return _encode(_without_lora(keys, lora_name))


def _without_lora(keys: object, lora_name: str | None) -> list[object]:
    if keys is None:
        return []
    items = list(keys) if isinstance(keys, tuple) else [keys]
    if lora_name is not None and items and items[0] == lora_name:
        del items[0]
    return items


def _encode(items: list[object]) -> bytes | None:
    return bytes(msgpack.packb(items, use_bin_type=True)) if items else None


def _mix(extra: bytes) -> int:
    return int(mmh3.mmh3_x64_128_utupledigest(extra, 0)[0])


# -- sequence numbers -----------------------------------------------------------------------------

SeqKind = Literal["in_order", "gap", "duplicate", "reset"]


@dataclass(frozen=True, slots=True)
class SeqCheck:
    kind: SeqKind
    expected: int  # the seq that would have been in order (0 before any batch)
    got: int


class SequenceTracker:
    """Where one publisher's sequence stands (see the module rules)."""

    __slots__ = ("expected", "last_ts")

    def __init__(self) -> None:
        self.expected: int | None = None  # the next seq to apply; None before any batch
        self.last_ts: float | None = None  # the `ts` of the last batch applied

    @property
    def last_seq(self) -> int | None:
        return None if self.expected is None or self.expected == 0 else self.expected - 1

    def check(self, seq: int, ts: float) -> SeqCheck:
        expected = self.expected
        if expected is None:
            return SeqCheck("in_order" if seq == 0 else "gap", 0, seq)
        if seq == expected:
            return SeqCheck("in_order", expected, seq)
        if seq > expected:
            return SeqCheck("gap", expected, seq)
        if self.last_ts is not None and ts > self.last_ts:
            return SeqCheck("reset", expected, seq)
        return SeqCheck("duplicate", expected, seq)

    def applied(self, seq: int, ts: float) -> None:
        self.expected = seq + 1
        self.last_ts = ts

    def resume_at(self, seq: int) -> None:
        """Accept `seq` as the next in order (after a resync: what came before is given up)."""
        self.expected = seq

    def forget(self) -> None:
        """Start over (the publisher restarted, or the subscriber changed sources)."""
        self.expected = None
        self.last_ts = None
