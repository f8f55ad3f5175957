"""The sans-I/O KV-event indexer: own hashes from events equal a request's, removals, clears, skips, the
bounded map, the sequence tracker, and a property test against a brute-force model of the replica."""

from __future__ import annotations

from collections import Counter

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.index.chunking import chain_token_blocks, hash_tokens, model_seed
from router.index.event_indexer import EventIndexer, SequenceTracker
from router.index.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    decode_batch,
    encode_batch,
)
from router.index.prefix_index import PrefixIndex

BS = 4
MODEL = "m"


def engine_hashes(tokens: list[int], variant: int = 0) -> list[int]:
    """A stand-in engine hash per full block: a function of the whole prefix (and a variant), unrelated
    to the router's own hash, as vLLM's sha256 is."""
    out = []
    for i in range(len(tokens) // BS):
        data = repr((variant, tokens[: (i + 1) * BS])).encode()
        out.append(mmh3.mmh3_x64_128_utupledigest(data, 7)[0])
    return out


def stored(tokens: list[int], first: int, last: int, variant: int = 0, **kw: object) -> BlockStored:
    hashes = engine_hashes(tokens, variant)
    return BlockStored(
        block_hashes=tuple(hashes[first:last]),
        parent_block_hash=hashes[first - 1] if first else None,
        token_ids=tuple(tokens[first * BS : last * BS]),
        block_size=BS,
        **kw,  # type: ignore[arg-type]
    )


def make(capacity: int | None = None) -> tuple[PrefixIndex, EventIndexer]:
    index = PrefixIndex(1 << 16)
    index.add_replica("r")
    return index, EventIndexer(index, "r", MODEL, BS, map_capacity=capacity)


def held(index: PrefixIndex, hashes: tuple[int, ...] | list[int]) -> list[bool]:
    return [index.holds("r", h) for h in hashes]


TOKENS = list(range(100, 124))  # 6 blocks of 4


# -- own hashes agree with requests ------------------------------------------------------------------


def test_chain_token_blocks_in_pieces_equals_whole() -> None:
    root = model_seed(MODEL)
    whole = chain_token_blocks(TOKENS, BS, root)
    head = chain_token_blocks(TOKENS[:8], BS, root)
    assert head + chain_token_blocks(TOKENS[8:], BS, head[-1]) == whole
    assert hash_tokens(TOKENS, MODEL, block_size=BS).chained == whole
    with pytest.raises(ValueError):
        chain_token_blocks(TOKENS, 0, root)


def test_a_chain_stored_in_two_events_is_indexed_under_the_request_hashes() -> None:
    index, indexer = make()
    report = indexer.apply([stored(TOKENS, 0, 2), stored(TOKENS, 2, 6)], now=0.0)
    request = hash_tokens(TOKENS, MODEL, block_size=BS).chained
    assert index.longest_match(request) == {"r": 6}
    assert report.stored_blocks == 6 and report.events == {"BlockStored": 2}
    assert indexer.own_hash(engine_hashes(TOKENS)[5]) == request[5]


@pytest.mark.parametrize(
    ("lora_name", "extra_keys", "model", "salt"),
    [
        (None, ((("cache_salt", "tenant-a"),), None, None), MODEL, "tenant-a"),  # a tagged pair
        (None, (("tenant-a",), None, None), MODEL, "tenant-a"),  # vLLM: the bare salt on block 0
        ("ad", (("ad",), ("ad",), ("ad",)), "ad", None),  # vLLM: the LoRA name leads every block's keys
        ("ad", (("ad", "tenant-b"), ("ad",), ("ad",)), "ad", "tenant-b"),
        (None, None, MODEL, None),
    ],
)
def test_roots_follow_lora_name_and_cache_salt(
    lora_name: str | None, extra_keys: tuple[object, ...] | None, model: str, salt: str | None
) -> None:
    index, indexer = make()
    indexer.apply([stored(TOKENS, 0, 3, lora_name=lora_name, extra_keys=extra_keys)], now=0.0)
    request = hash_tokens(TOKENS[:12], model, block_size=BS, cache_salt=salt).chained
    assert held(index, request) == [True, True, True]
    plain = hash_tokens(TOKENS[:12], MODEL, block_size=BS).chained
    assert held(index, plain) == [(model, salt) == (MODEL, None)] * 3


def test_multimodal_keys_make_blocks_no_plain_request_matches_yet_chain_consistently() -> None:
    index, indexer = make()
    image = (("img-1", 0),)  # a multimodal key on block 1
    indexer.apply([stored(TOKENS, 0, 3, extra_keys=(None, image, None))], now=0.0)
    plain = hash_tokens(TOKENS, MODEL, block_size=BS).chained
    assert held(index, plain[:3]) == [True, False, False]
    # A later event chaining on the image block continues from its (mixed) own hash, and can be removed.
    indexer.apply([stored(TOKENS, 3, 4)], now=0.0)
    assert index.size("r") == 4 and len(indexer) == 4
    indexer.apply([BlockRemoved(tuple(engine_hashes(TOKENS)[:4]))], now=0.0)
    assert index.size("r") == 0


# -- what is skipped -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (stored(TOKENS, 2, 4), "orphan"),  # its parent was never stored
        (stored(TOKENS, 0, 2, medium="CPU"), "medium"),
        (stored(TOKENS, 0, 2, group_idx=1), "group"),
        (BlockStored((1, 2), None, tuple(range(16)), 8), "block_size"),
        (BlockStored((1, 2), None, tuple(range(7)), BS), "malformed"),
        (BlockStored((1,), None, (1, 2, 3, 4), BS, extra_keys=(None, None)), "malformed"),
    ],
)
def test_blocks_that_cannot_be_placed_are_counted_and_skipped(event: BlockStored, reason: str) -> None:
    index, indexer = make()
    report = indexer.apply([event], now=0.0)
    assert report.skipped == {reason: len(event.block_hashes)}
    assert index.size("r") == 0 and len(indexer) == 0
    assert (report.foreign_block_size == 8) == (reason == "block_size")


def test_removals_of_other_tiers_or_groups_leave_the_gpu_blocks() -> None:
    index, indexer = make()
    indexer.apply([stored(TOKENS, 0, 2)], now=0.0)
    hashes = tuple(engine_hashes(TOKENS)[:2])
    indexer.apply([BlockRemoved(hashes, "CPU"), BlockRemoved(hashes, "GPU", group_idx=1)], now=0.0)
    assert index.size("r") == 2
    indexer.apply([BlockRemoved(hashes, None)], now=0.0)
    assert index.size("r") == 0


# -- removals, duplicates, clears ----------------------------------------------------------------------


def test_a_hash_stored_twice_goes_with_its_second_removal() -> None:
    index, indexer = make()
    indexer.apply([stored(TOKENS, 0, 1), stored(TOKENS, 0, 1)], now=0.0)
    (h,) = engine_hashes(TOKENS)[:1]
    own = indexer.own_hash(h)
    assert own is not None
    indexer.apply([BlockRemoved((h,))], now=0.0)
    assert index.holds("r", own)
    report = indexer.apply([BlockRemoved((h,)), BlockRemoved((h,))], now=0.0)  # the third is unknown
    assert not index.holds("r", own) and report.removed_blocks == 1


def test_clear_forget_and_rebuild_treat_routing_time_entries_differently() -> None:
    index, indexer = make()
    indexer.apply([stored(TOKENS, 0, 2)], now=0.0)
    index.insert("r", [11, 12], now=0.0)  # routing-time entries (text chunks, say)
    assert indexer.rebuild(now=1.0) == 2  # only the event-derived entries stay
    assert not index.holds("r", 11)
    index.insert("r", [11, 12], now=0.0)
    assert indexer.forget() == 2  # the event-derived entries go, the routing-time ones stay
    assert index.size("r") == 2 and len(indexer) == 0
    indexer.apply([stored(TOKENS, 0, 2), AllBlocksCleared()], now=0.0)
    assert index.size("r") == 0 and len(indexer) == 0  # the cache is empty: everything goes


def test_the_map_is_bounded_and_its_evictions_leave_the_index() -> None:
    index, indexer = make(capacity=3)
    report = indexer.apply([stored(TOKENS, 0, 2), stored(TOKENS, 2, 5)], now=0.0)
    assert len(indexer) == 3 and report.map_evictions == 2 and indexer.map_evictions == 2
    request = hash_tokens(TOKENS, MODEL, block_size=BS).chained
    assert held(index, request[:5]) == [False, False, True, True, True]
    # The capacity follows the replica's index capacity when none is given.
    index.set_capacity("r", 2)
    assert EventIndexer(index, "r", MODEL, BS).map_capacity == 2


# -- the brute-force model -------------------------------------------------------------------------------

chains = st.lists(st.lists(st.integers(0, 5), min_size=BS, max_size=4 * BS), min_size=1, max_size=3)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[list[int]], list[tuple[str, int, int, int, int]]]:
    seqs = draw(chains)
    ops = []
    for _ in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(["store", "store", "store", "remove", "clear"]))
        c = draw(st.integers(0, len(seqs) - 1))
        n = len(seqs[c]) // BS
        first = draw(st.integers(0, n - 1))
        last = draw(st.integers(first + 1, n))
        ops.append((kind, c, first, last, draw(st.integers(0, 1))))
    return seqs, ops


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_the_index_holds_exactly_what_a_brute_force_model_says(
    scenario: tuple[list[list[int]], list[tuple[str, int, int, int, int]]],
) -> None:
    seqs, ops = scenario
    index, indexer = make()
    live: Counter[int] = Counter()  # engine hash -> blocks holding it (stored minus removed)
    own: dict[int, int] = {}  # engine hash -> the request hash of its prefix
    for kind, c, first, last, variant in ops:
        tokens = seqs[c][: last * BS]
        hashes = engine_hashes(tokens, variant)  # two variants: equal tokens, different engine hashes
        request = hash_tokens(tokens, MODEL, block_size=BS).chained
        if kind == "store":
            event = stored(tokens, first, last, variant)
            indexer.apply([event], now=0.0)
            if first == 0 or live[hashes[first - 1]] > 0:  # else an orphan, skipped
                for i in range(first, last):
                    live[hashes[i]] += 1
                    own.setdefault(hashes[i], request[i])
        elif kind == "remove":
            indexer.apply([BlockRemoved(tuple(hashes[first:last]))], now=0.0)
            for h in hashes[first:last]:
                if live[h] > 0:
                    live[h] -= 1
        else:
            indexer.apply([AllBlocksCleared()], now=0.0)
            live.clear()
        expected = {own[h] for h, n in live.items() if n > 0}
        assert index.size("r") == len(expected)
        assert all(index.holds("r", h) for h in expected)
        assert len(indexer) == sum(1 for n in live.values() if n > 0)


# -- sequence numbers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("applied", "seq", "ts", "kind", "expected"),
    [
        ([], 0, 1.0, "in_order", 0),
        ([], 5, 1.0, "gap", 0),  # first batch seen with seq > 0: ask for a replay from 0
        ([(0, 1.0), (1, 2.0)], 2, 3.0, "in_order", 2),
        ([(0, 1.0), (1, 2.0)], 4, 3.0, "gap", 2),
        ([(0, 1.0), (1, 2.0)], 1, 2.0, "duplicate", 2),  # a replayed copy: same ts
        ([(0, 1.0), (1, 2.0)], 0, 1.0, "duplicate", 2),
        ([(0, 1.0), (1, 2.0)], 0, 9.0, "reset", 2),  # a restarted engine: seq back, ts newer
    ],
)
def test_sequence_tracker(
    applied: list[tuple[int, float]], seq: int, ts: float, kind: str, expected: int
) -> None:
    tracker = SequenceTracker()
    for s, t in applied:
        tracker.applied(s, t)
    check = tracker.check(seq, ts)
    assert (check.kind, check.expected, check.got) == (kind, expected, seq)


def test_sequence_tracker_resume_and_forget() -> None:
    tracker = SequenceTracker()
    assert tracker.last_seq is None
    tracker.resume_at(7)
    assert tracker.check(7, 0.0).kind == "in_order"
    tracker.applied(7, 1.0)
    assert tracker.last_seq == 7
    tracker.forget()
    assert tracker.check(3, 0.0).kind == "gap" and tracker.last_seq is None


# -- the codec's fields this indexer reads -------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["map", "array"])
def test_lora_name_extra_keys_and_group_survive_both_encodings(encoding: str) -> None:
    events = [
        BlockStored((1, 2), None, tuple(range(8)), BS, lora_name="ad", extra_keys=(("ad", "s"), ("ad",))),
        BlockStored((3,), 2, tuple(range(4)), BS, group_idx=1),
        BlockStored((4,), None, tuple(range(4)), BS, lora_name="ad"),
        BlockRemoved((1,), "GPU", group_idx=1),
    ]
    batch = decode_batch(encode_batch(events, 1.0, encoding=encoding))  # type: ignore[arg-type]
    assert list(batch.events) == events
