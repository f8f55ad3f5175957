"""KV-cache events on ZMQ: they decode, agree with the cache, chain, and replay with an end marker.

Emulated replicas run once per encoding (map: vLLM 0.26+, array: 0.11–0.24); a real server once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import zmq
import zmq.asyncio

from router.index.kv_events import (
    REPLAY_END_SEQ,
    BlockStored,
    KVEventBatch,
    decode_batch,
    decode_seq,
    encode_seq,
)

if TYPE_CHECKING:
    from conftest import Subscriber, Target

ENCODINGS = pytest.mark.parametrize("target", ["map", "array"], indirect=True)


def stored_chain(
    received: list[tuple[int, bytes, KVEventBatch]], prefix: list[int], bs: int
) -> list[BlockStored]:
    """The BlockStored events, in order, whose blocks make up `prefix` from its first block."""
    chain: list[BlockStored] = []
    covered = 0
    for _seq, _raw, batch in received:
        for event in batch.events:
            if not isinstance(event, BlockStored) or covered >= len(prefix):
                continue
            n = len(event.block_hashes)
            if list(event.token_ids) == prefix[covered : covered + n * bs]:
                chain.append(event)
                covered += n * bs
    return chain


def covered(chain: list[BlockStored]) -> int:
    return sum(len(e.token_ids) for e in chain)


@ENCODINGS
async def test_events_agree_with_the_cache(target: Target, subscriber: Subscriber) -> None:
    bs = target.block_size
    prompt = await target.unique_prompt(3 * bs + 5)
    first = await target.complete(prompt, 1)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    await subscriber.receive_until(lambda got: covered(stored_chain(got, prompt[: 3 * bs], bs)) >= 3 * bs)
    chain = stored_chain(subscriber.received, prompt[: 3 * bs], bs)
    # Chained: the first block has no parent; every later event's parent is the previous block's hash.
    assert chain[0].parent_block_hash is None
    hashes = [h for e in chain for h in e.block_hashes]
    assert len(hashes) == len(set(hashes)) == 3
    position = 0
    for event in chain:
        assert event.block_size == bs and len(event.token_ids) == len(event.block_hashes) * bs
        if position:
            assert event.parent_block_hash == hashes[position - 1]
        position += len(event.block_hashes)
    # Sequence numbers: one per batch, consecutive.
    seqs = [seq for seq, _, _ in subscriber.received]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # The stored blocks are what the next request hits (all 3: 3 * bs < len(prompt)).
    second = await target.complete(prompt, 1)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == len(hashes) * bs


@ENCODINGS
async def test_replay_returns_buffered_batches_and_the_end_marker(
    target: Target, subscriber: Subscriber
) -> None:
    if target.replay_endpoint is None:
        pytest.skip("no replay endpoint (set KVROUTER_CONFORMANCE_REPLAY)")
    bs = target.block_size
    for _ in range(2):
        prompt = await target.unique_prompt(2 * bs + 1)
        await target.complete(prompt, 1)
        await subscriber.receive_until(
            lambda got, p=prompt: covered(stored_chain(got, p[: 2 * bs], bs)) >= 2 * bs
        )
    live = {seq: raw for seq, raw, _ in subscriber.received}
    start = min(live)
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(target.replay_endpoint)
    try:
        await dealer.send_multipart([b"", encode_seq(start)])
        replayed: dict[int, bytes] = {}
        for _ in range(10_000):  # bounded: the buffer holds at most buffer_steps batches
            assert await dealer.poll(timeout=10_000), "no replay answer"
            frames = await dealer.recv_multipart()
            assert frames[0] == b""
            seq, payload = _replay_frames(frames, subscriber.topic)
            if seq == REPLAY_END_SEQ:
                break
            replayed[seq] = payload
        else:
            pytest.fail("no end marker")
    finally:
        dealer.close(linger=0)
        ctx.term()
    seqs = sorted(replayed)
    assert seqs[0] == start and seqs == list(range(start, start + len(seqs)))
    for seq, raw in live.items():
        assert replayed[seq] == raw  # the same bytes as published
    for raw in replayed.values():
        decode_batch(raw)


def _replay_frames(frames: list[bytes], topic: bytes) -> tuple[int, bytes]:
    """(seq, payload) of one reply in either form; (REPLAY_END_SEQ, b"") for the end marker.
    0.26+: [b"", topic, seq, payload], end [b"", b"", -1, b""]; up to 0.24: [b"", seq, payload]."""
    if len(frames) == 4:
        seq = decode_seq(frames[2])
        assert frames[1] == (b"" if seq == REPLAY_END_SEQ else topic)
        return seq, frames[3]
    assert len(frames) == 3, f"unexpected replay reply of {len(frames)} frames"
    return decode_seq(frames[1]), frames[2]


async def test_kv_event_sources_describes_the_publisher(target: Target) -> None:
    async with target.session.get(f"{target.url}/kv_event_sources") as r:
        if r.status == 404:
            pytest.skip("/kv_event_sources arrived in vLLM 0.32")
        body: dict[str, Any] = await r.json()
    config = body["0"]
    for field in (
        "enable_kv_cache_events",
        "publisher",
        "endpoint",
        "replay_endpoint",
        "buffer_steps",
        "hwm",
    ):
        assert field in config, field
    for field in ("max_queue_size", "topic"):
        assert field in config, field
    assert config["enable_kv_cache_events"] is True and config["publisher"] == "zmq"
    if target.emulated:
        assert config["endpoint"] == target.events_endpoint
        assert config["replay_endpoint"] == target.replay_endpoint
        assert config["buffer_steps"] == 10_000 and config["topic"] == ""
