"""Several replicas in one process, P2P KV transfer, and the KV-event wire in exact detail."""

from __future__ import annotations

import asyncio
import hashlib
import pickle
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio

from router.index.kv_events import (
    REPLAY_END_SEQ,
    AllBlocksCleared,
    BlockStored,
    KVEventBatch,
    decode_batch,
    decode_seq,
    encode_seq,
)
from workers.emulator import EmulatedFleet, transfer_prefix
from workers.emulator.p2p import HELD_TOKENS, KV_BYTES

BS = 16  # the tiny preset's block size


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


@pytest.fixture
async def zctx() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.term()


async def complete(
    session: aiohttp.ClientSession, url: str, prompt: Any, max_tokens: int = 1
) -> dict[str, Any]:
    async with session.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens}) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


def cached(body: dict[str, Any]) -> int:
    return int(body["usage"]["prompt_tokens_details"]["cached_tokens"])


async def subscribe(ctx: zmq.asyncio.Context, endpoint: str) -> zmq.asyncio.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    await asyncio.sleep(0.3)  # ZMQ's slow joiner: let the subscription reach the publisher
    return sub


async def next_batch(sub: zmq.asyncio.Socket) -> tuple[int, KVEventBatch]:
    assert await sub.poll(timeout=5000), "no KV event batch within 5 s"
    _topic, seq, payload = await sub.recv_multipart()
    return decode_seq(seq), decode_batch(payload)


async def test_replicas_serve_independently_on_their_own_ports(session: aiohttp.ClientSession) -> None:
    async with EmulatedFleet(3, "tiny", kv_events=True) as fleet:
        assert len(set(fleet.urls)) == 3 and len(set(fleet.event_endpoints + fleet.replay_endpoints)) == 6
        prompt = list(range(1000, 1000 + 3 * BS + 1))
        assert cached(await complete(session, fleet.urls[0], prompt)) == 0
        assert cached(await complete(session, fleet.urls[0], prompt)) == 3 * BS
        assert cached(await complete(session, fleet.urls[1], prompt)) == 0  # caches are per replica
        results = await asyncio.gather(
            *(complete(session, url, [7] * 40, 4) for url in fleet.urls for _ in range(5))
        )
        assert all(r["usage"]["completion_tokens"] == 4 for r in results)


async def test_consecutive_ports_from_a_base_port(session: aiohttp.ClientSession) -> None:
    async with EmulatedFleet(1, "tiny") as probe:  # an ephemeral port is free; its next few likely are
        base = int(probe.urls[0].rsplit(":", 1)[1])
    try:
        fleet = EmulatedFleet(2, "tiny", port=base, kv_events=True, kv_events_port=base + 2)
        await fleet.start()
    except OSError:
        pytest.skip("the probed port range was taken meanwhile")
    try:
        assert fleet.urls == [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"]
        assert fleet.event_endpoints == [f"tcp://127.0.0.1:{base + 2}", f"tcp://127.0.0.1:{base + 3}"]
        assert fleet.replay_endpoints == [f"tcp://127.0.0.1:{base + 4}", f"tcp://127.0.0.1:{base + 5}"]
        async with session.get(f"{fleet.urls[1]}/health") as r:
            assert r.status == 200
    finally:
        await fleet.stop()


async def test_p2p_transfer_makes_the_target_hit(
    session: aiohttp.ClientSession, zctx: zmq.asyncio.Context
) -> None:
    async with EmulatedFleet(2, "tiny", kv_events=True) as fleet:
        a, b = fleet.urls
        prefix = list(range(2000, 2000 + 40 * BS))  # 640 KiB of KV at 1 KiB a token: several chunks
        await complete(session, a, prefix)  # warm-up prefill on A
        sub = await subscribe(zctx, fleet.event_endpoints[1])
        try:
            result = await transfer_prefix(session, a, b, [*prefix, 5, 6, 7])
            assert (result.exported_tokens, result.held_tokens) == (40 * BS, 40 * BS)
            assert result.kv_bytes == 40 * BS * fleet.preset.kv_bytes_per_token and not result.modeled
            _, batch = await next_batch(sub)  # B announces the imported blocks
            (stored,) = batch.events
            assert isinstance(stored, BlockStored) and list(stored.token_ids) == prefix
            assert stored.parent_block_hash is None and len(stored.block_hashes) == 40
        finally:
            sub.close(linger=0)
        assert cached(await complete(session, b, [*prefix, 9, 9, 9])) == 40 * BS
        # Nothing held, nothing sent: a cold prefix exports zero tokens.
        cold = await transfer_prefix(session, a, b, list(range(9000, 9000 + 2 * BS)))
        assert (cold.exported_tokens, cold.kv_bytes, cold.held_tokens) == (0, 0, 0)


async def test_p2p_transfer_by_prompt_and_with_modeled_bandwidth(session: aiohttp.ClientSession) -> None:
    bandwidth = 2 * BS * 1024 / 0.2  # the tiny preset's 1 KiB a token: 2 blocks in 0.2 s
    async with EmulatedFleet(2, "tiny", kv_bandwidth=bandwidth) as fleet:
        a, b = fleet.urls
        text = "shared system prompt: " * 6  # 132 characters: 33 tokens, 2 full blocks, 4-aligned
        await complete(session, a, text)
        result = await transfer_prefix(session, a, b, prompt=text)
        assert result.modeled and result.exported_tokens == 2 * BS and result.seconds >= 0.2
        assert cached(await complete(session, b, text + "and a question")) == 2 * BS


async def test_p2p_import_checks_its_payload(session: aiohttp.ClientSession) -> None:
    async with EmulatedFleet(1, "tiny") as fleet:
        url = f"{fleet.urls[0]}/kvrouter/kv/import"

        def framed(header: bytes, payload: bytes = b"") -> bytes:
            return len(header).to_bytes(8, "big") + header + payload

        cases = [
            b"\x00\x00",
            framed(b"not json"),
            framed(b'{"token_ids": [1, 2], "kv_bytes": 5, "modeled": false}'),  # wrong size for 2 tokens
            framed(b'{"token_ids": [1, 2], "kv_bytes": 2048, "modeled": false}', b"x" * 100),  # truncated
            framed(b'{"token_ids": "x", "kv_bytes": 0}'),
        ]
        for body in cases:
            async with session.post(url, data=body) as r:
                assert r.status == 400, body
                assert (await r.json())["type"] == "BadRequestError"
        async with session.post(f"{fleet.urls[0]}/kvrouter/kv/export", json={"token_ids": "nope"}) as r:
            assert r.status == 400
        async with session.post(f"{fleet.urls[0]}/kvrouter/kv/export", json={"prompt": "x" * 200}) as r:
            assert r.status == 200 and r.headers[HELD_TOKENS] == "0" and r.headers[KV_BYTES] == "0"


@pytest.mark.parametrize("encoding", ["map", "array"])
async def test_replay_wire_form_per_encoding(
    session: aiohttp.ClientSession, zctx: zmq.asyncio.Context, encoding: Any
) -> None:
    """0.26+ (map) replies carry the topic and end with [b"", b"", -1, b""]; up to 0.24 (array) they
    carry none and end with [b"", -1, b""]."""
    async with EmulatedFleet(
        1, "tiny", kv_events=True, kv_events_encoding=encoding, kv_events_topic="kv"
    ) as fleet:
        for start in (0, 100):
            await complete(session, fleet.urls[0], list(range(100 + start, 100 + start + 2 * BS)))
        await asyncio.sleep(0.05)
        dealer = zctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(fleet.replay_endpoints[0])
        try:
            await dealer.send_multipart([b"", encode_seq(1)])
            replies = []
            for _ in range(10):
                assert await dealer.poll(timeout=5000)
                replies.append(await dealer.recv_multipart())
                if decode_seq(replies[-1][-2]) == REPLAY_END_SEQ:
                    break
        finally:
            dealer.close(linger=0)
    end = encode_seq(REPLAY_END_SEQ)
    if encoding == "map":
        assert [r[:3] for r in replies[:-1]] == [[b"", b"kv", encode_seq(1)]]
        assert replies[-1] == [b"", b"", end, b""]
    else:
        assert [r[:2] for r in replies[:-1]] == [[b"", encode_seq(1)]]
        assert replies[-1] == [b"", end, b""]
    assert isinstance(decode_batch(replies[0][-1]).events[0], BlockStored)


async def test_sha256_hashes_are_vllms(session: aiohttp.ClientSession, zctx: zmq.asyncio.Context) -> None:
    """With --hash-algo sha256 the published hashes are vLLM's exactly (vllm-interfaces.md, [live])."""
    async with EmulatedFleet(1, "tiny", kv_events=True, hash_algo="sha256") as fleet:
        sub = await subscribe(zctx, fleet.event_endpoints[0])
        try:
            prompt = list(range(300, 300 + 2 * BS + 3))
            await complete(session, fleet.urls[0], prompt)
            _, batch = await next_batch(sub)
        finally:
            sub.close(linger=0)
    parent = hashlib.sha256(pickle.dumps("vllm-none-hash", protocol=pickle.HIGHEST_PROTOCOL)).digest()
    expected = []
    for i in range(2):
        parent = hashlib.sha256(
            pickle.dumps(
                (parent, tuple(prompt[i * BS : (i + 1) * BS]), None), protocol=pickle.HIGHEST_PROTOCOL
            )
        ).digest()
        expected.append(int.from_bytes(parent, "big") & (2**64 - 1))
    (stored,) = batch.events
    assert isinstance(stored, BlockStored) and list(stored.block_hashes) == expected


async def test_reset_prefix_cache_publishes_all_blocks_cleared(
    session: aiohttp.ClientSession, zctx: zmq.asyncio.Context
) -> None:
    async with EmulatedFleet(1, "tiny", kv_events=True) as fleet:
        url = fleet.urls[0]
        sub = await subscribe(zctx, fleet.event_endpoints[0])
        try:
            prompt = list(range(500, 500 + 2 * BS + 1))
            await complete(session, url, prompt)
            seq_stored, _ = await next_batch(sub)
            async with session.post(f"{url}/reset_prefix_cache") as r:
                assert r.status == 200
            seq_cleared, batch = await next_batch(sub)
            assert seq_cleared == seq_stored + 1 and batch.events == (AllBlocksCleared(),)
        finally:
            sub.close(linger=0)
        assert cached(await complete(session, url, prompt)) == 0
