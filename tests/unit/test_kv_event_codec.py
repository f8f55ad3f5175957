"""KV-event codec: both vLLM encodings, round trips, sequence frames, and malformed payloads."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.index.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventDecodeError,
    decode_batch,
    decode_seq,
    encode_batch,
    encode_seq,
)

u64 = st.integers(min_value=0, max_value=2**64 - 1)
stored = st.builds(
    BlockStored,
    block_hashes=st.lists(u64, min_size=1, max_size=4).map(tuple),
    parent_block_hash=st.one_of(st.none(), u64),
    token_ids=st.lists(st.integers(min_value=0, max_value=2**31), max_size=8).map(tuple),
    block_size=st.integers(min_value=1, max_value=256),
    medium=st.sampled_from(["GPU", "CPU"]),
    lora_id=st.one_of(st.none(), st.integers(min_value=0, max_value=100)),
)
removed = st.builds(BlockRemoved, block_hashes=st.lists(u64, max_size=4).map(tuple), medium=st.just("GPU"))
events = st.lists(st.one_of(stored, removed, st.just(AllBlocksCleared())), max_size=6)


@given(events, st.floats(min_value=0, max_value=2e9), st.sampled_from(["map", "array"]))
def test_round_trip_in_both_encodings(evs: list[object], ts: float, encoding: str) -> None:
    batch = decode_batch(encode_batch(evs, ts, encoding=encoding))  # type: ignore[arg-type]
    assert batch.events == tuple(evs)
    assert batch.ts == ts
    assert batch.data_parallel_rank == 0


def test_decodes_the_0_32_map_form_as_seen_live() -> None:
    payload = msgpack.packb(
        [
            1732000000.5,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [123, 456],
                    "parent_block_hash": None,
                    "token_ids": list(range(256)),
                    "block_size": 128,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": None,
                    "extra_keys": [],
                    "group_idx": 0,
                },
                {"type": "BlockRemoved", "block_hashes": [123], "medium": "GPU"},
                {"type": "AllBlocksCleared"},
                {"type": "SomethingNewIn0_34", "x": 1},
            ],
            0,
        ]
    )
    batch = decode_batch(payload)
    assert batch.events == (
        BlockStored((123, 456), None, tuple(range(256)), 128, "GPU", None),
        BlockRemoved((123,), "GPU"),
        AllBlocksCleared(),
    )


def test_decodes_the_0_11_array_form_with_optional_trailing_fields() -> None:
    payload = msgpack.packb(
        [
            1.0,
            [
                ["BlockStored", [7], 6, [1, 2, 3, 4], 4, None, "GPU", None, [], 0],
                ["BlockStored", [8], 7, [5, 6, 7, 8], 4],
                ["BlockRemoved", [7, 8]],
                ["AllBlocksCleared"],
            ],
            None,
        ]
    )
    batch = decode_batch(payload)
    assert batch.events[0] == BlockStored((7,), 6, (1, 2, 3, 4), 4, "GPU", None)
    assert batch.events[1] == BlockStored((8,), 7, (5, 6, 7, 8), 4)
    assert batch.events[2] == BlockRemoved((7, 8))
    assert batch.events[3] == AllBlocksCleared()
    assert batch.data_parallel_rank is None


def test_bytes_hashes_fold_to_their_low_64_bits() -> None:
    digest = bytes(range(32))
    payload = msgpack.packb([0.0, [{"type": "BlockRemoved", "block_hashes": [digest]}], 0], use_bin_type=True)
    (event,) = decode_batch(payload).events
    assert isinstance(event, BlockRemoved)
    assert event.block_hashes == (int.from_bytes(digest[-8:], "little"),)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never used in msgpack
        msgpack.packb({"not": "a batch"}),
        msgpack.packb([1.0]),
        msgpack.packb(["ts", []]),
        msgpack.packb([1.0, [42]]),
        msgpack.packb([1.0, [{"no": "type"}]]),
        msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": "nope"}]]),
        msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": ["x"]}]]),
        msgpack.packb([1.0, [["BlockStored", [1]]]]),
        msgpack.packb([1.0, [{"type": "BlockRemoved", "block_hashes": [1.5]}]]),
    ],
)
def test_malformed_payloads_raise_a_decode_error(payload: bytes) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_batch(payload)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_raise_anything_but_a_decode_error(payload: bytes) -> None:
    with contextlib.suppress(KVEventDecodeError):
        decode_batch(payload)


@pytest.mark.parametrize("seq", [0, 1, 2**40, 2**64 - 2, -1])
def test_sequence_frames(seq: int) -> None:
    frame = encode_seq(seq)
    assert len(frame) == 8
    assert decode_seq(frame) == seq
    with pytest.raises(KVEventDecodeError):
        decode_seq(frame[:7])


def test_the_map_form_carries_lora_id_and_lora_name_as_vllm_does() -> None:
    # vLLM declares them without defaults, so its omit_defaults never drops them, and vllm-router's
    # kv_aware rejects a batch without them ("missing KV event field: lora_id").
    stored = BlockStored((1, 2), None, tuple(range(32)), 16, "GPU", None)
    (event,) = msgpack.unpackb(encode_batch([stored], 1.0, encoding="map"), raw=False)[1]
    assert event["lora_id"] is None and event["lora_name"] is None
    assert decode_batch(encode_batch([stored], 1.0, encoding="map")).events == (stored,)
