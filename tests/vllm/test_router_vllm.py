"""kvrouter in front of real vLLM replicas (CPU build, tiny local model): events, routing, resync.

The fleet (conftest.py): vllm-0 and vllm-1 publish KV events (bound on tcp://*:PORT, found by the router
at GET /kv_event_sources), vllm-2 publishes none. The router runs in this process in token-precise
mode with the model's own tokenizer (`tokenizer: <model dir>`) and the replicas' block size, so the
index is keyed by the very token blocks the events describe. Prompts carry a random nonce first, so no
test depends on what another cached.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families
from vllm_tier import BLOCK_SIZE, MODEL_NAME

from router.config import BackendConfig, RouterConfig
from router.index.chunking import hash_tokens
from router.index.kv_events import BlockStored, decode_batch
from router.server import RouterServer
from router.tokenize import LocalTokenizer
from workers.engine.hashing import BlockHasher
from workers.vllm.launch import VLLMFleet

TOKEN = "vllm-tier-admin"
_WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()

RouterMaker = Callable[..., Awaitable[RouterServer]]


def text_of(words: int, rng: random.Random | None = None) -> str:
    """A prompt no other test shares a block with: a random nonce first."""
    rng = rng or random.Random()
    return f"n{rng.getrandbits(64):x} " + " ".join(rng.choice(_WORDS) for _ in range(words))


@pytest.fixture
async def routers(vllm_fleet: VLLMFleet, model_dir: Path) -> AsyncIterator[RouterMaker]:
    started: list[RouterServer] = []

    async def make(names: tuple[str, ...] = ("vllm-0", "vllm-1", "vllm-2"), **overrides: Any) -> RouterServer:
        backends = tuple(
            BackendConfig(name=n, url=vllm_fleet.spec(n).url, models=(MODEL_NAME,)) for n in names
        )
        settings: dict[str, Any] = {
            "backends": backends,
            "port": 0,
            "tokenizer": str(model_dir),
            "block_size": BLOCK_SIZE,
            "admin_token": TOKEN,
            "kv_events_silence_s": 2.0,
            **overrides,
        }
        server = await RouterServer(RouterConfig(**settings)).start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop()


async def admin(http: aiohttp.ClientSession, router: RouterServer, path: str) -> Any:
    async with http.get(f"{router.url}/admin{path}", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def replica_states(http: aiohttp.ClientSession, router: RouterServer) -> dict[str, dict[str, Any]]:
    body = await admin(http, router, "/replicas")
    rows = body["replicas"] if isinstance(body, dict) else body
    return {row["name"]: row for row in rows}


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def router_metric(http: aiohttp.ClientSession, router: RouterServer, name: str, **labels: str) -> float:
    async with http.get(f"{router.url}/metrics") as r:
        text = await r.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def complete(
    http: aiohttp.ClientSession, base: str, prompt: str | list[int], max_tokens: int = 2
) -> tuple[str, dict[str, Any]]:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    async with http.post(f"{base}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        return r.headers.get("x-kvrouter-replica", "direct"), await r.json()


def cached(answer: dict[str, Any]) -> int:
    details = answer["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


async def vllm_tokens(http: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> list[int]:
    async with http.post(f"{url}/tokenize", json={"model": MODEL_NAME, **payload}) as r:
        assert r.status == 200, await r.text()
        tokens: list[int] = (await r.json())["tokens"]
        return tokens


async def test_local_tokenizer_matches_vllm(
    vllm_fleet: VLLMFleet, model_dir: Path, http: aiohttp.ClientSession
) -> None:
    """Token-precise mode hashes what vLLM computes: the router's tokenizer gives vLLM's exact ids."""
    tokenizer = LocalTokenizer(model_dir)
    url = vllm_fleet.urls[0]
    texts = [text_of(40), "Ünïcödé — 漢字 and emoji 🙂 ok", "  leading spaces\nand\ttabs  "]
    for text in texts:
        assert await tokenizer.completion_ids(MODEL_NAME, text, {}) == await vllm_tokens(
            http, url, {"prompt": text}
        )
        messages = [{"role": "system", "content": text}, {"role": "user", "content": "and " + text}]
        got = await tokenizer.chat_ids(MODEL_NAME, messages, {})
        assert got == await vllm_tokens(http, url, {"messages": messages, "add_generation_prompt": True})
    await tokenizer.close()


async def test_engine_block_hashes_are_reproduced(vllm_fleet: VLLMFleet, http: aiohttp.ClientSession) -> None:
    """vLLM's own sha256 block hashes (PYTHONHASHSEED=0) are reproduced exactly, and the router's chain
    hash of the events' token_ids is the request's own `hash_tokens`: the two key spaces agree."""
    spec = vllm_fleet.specs[0]
    assert spec.events_endpoint is not None
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, spec.topic.encode())
    sock.connect(spec.events_endpoint)
    try:
        await asyncio.sleep(0.5)  # ZMQ's slow joiner
        ids = await vllm_tokens(http, spec.url, {"prompt": text_of(200)})
        ids = ids[: 5 * BLOCK_SIZE + 7]
        await complete(http, spec.url, ids, max_tokens=1)
        stored: list[BlockStored] = []
        while sum(len(e.block_hashes) for e in stored) < 5:
            assert await sock.poll(timeout=10_000), "no KV events from vllm-0"
            _topic, _seq, payload = await sock.recv_multipart()
            stored += [e for e in decode_batch(payload).events if isinstance(e, BlockStored)]
    finally:
        sock.close(linger=0)
        ctx.term()
    engine_hashes = [h for e in stored for h in e.block_hashes]
    event_tokens = [t for e in stored for t in e.token_ids]
    assert event_tokens == ids[: 5 * BLOCK_SIZE]
    assert engine_hashes == BlockHasher(BLOCK_SIZE, "sha256", none_hash_seed=spec.hash_seed).hash_prefix(ids)
    from router.index.chunking import chain_token_blocks, model_seed

    own = chain_token_blocks(event_tokens, BLOCK_SIZE, model_seed(MODEL_NAME))
    assert own == hash_tokens(ids, MODEL_NAME, block_size=BLOCK_SIZE).chained


async def test_events_steer_a_request_to_the_replica_that_cached_it(
    routers: RouterMaker, vllm_fleet: VLLMFleet, http: aiohttp.ClientSession
) -> None:
    """A prefix cached on vllm-1 behind the router's back (sent to it directly) is known from vllm-1's
    events alone, and the router sends the next request with that prefix there: the router's
    prediction equals the engine's reported cached_tokens."""
    router = await routers()
    await wait_for(lambda: _event_fed(http, router, ("vllm-0", "vllm-1")), what="vllm-0 and vllm-1 event-fed")
    ids = await vllm_tokens(http, vllm_fleet.spec("vllm-1").url, {"prompt": text_of(300)})
    prefix = ids[: 8 * BLOCK_SIZE]
    _, first = await complete(http, vllm_fleet.spec("vllm-1").url, prefix)
    assert cached(first) == 0

    async def mapped() -> bool:
        state = (await replica_states(http, router))["vllm-1"]["kv_event_state"]
        return int(state["mapped_blocks"]) >= 8

    await wait_for(mapped, what="vllm-1's BlockStored at the router")
    expected_before = await router_metric(http, router, "router_expected_cached_tokens_total")
    replica, answer = await complete(http, router.url, prefix + ids[8 * BLOCK_SIZE : 10 * BLOCK_SIZE])
    assert replica == "vllm-1"
    predicted = await router_metric(http, router, "router_expected_cached_tokens_total") - expected_before
    assert cached(answer) == 8 * BLOCK_SIZE == predicted


async def _event_fed(http: aiohttp.ClientSession, router: RouterServer, names: tuple[str, ...]) -> bool:
    states = await replica_states(http, router)
    return all(states[n]["kv_event_state"]["event_fed"] for n in names)


async def test_streaming_through_kvrouter_with_the_openai_client(routers: RouterMaker) -> None:
    router = await routers()
    client = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": text_of(120)}, {"role": "user", "content": "Say something."}]
    chunks, usage = [], None
    stream = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(chunks) >= 2  # streamed chunk by chunk, not one buffered body
    assert usage is not None and usage.completion_tokens == 6
    # The same conversation again is a prefix-cache hit, on the replica the router chose before.
    again = await client.chat.completions.with_raw_response.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=1,  # type: ignore[arg-type]
    )
    parsed = again.parse()
    assert parsed.usage is not None and parsed.usage.prompt_tokens_details is not None
    assert (parsed.usage.prompt_tokens_details.cached_tokens or 0) >= BLOCK_SIZE
    await client.close()


async def test_replica_without_events_routes_in_approximate_mode(
    routers: RouterMaker, http: aiohttp.ClientSession
) -> None:
    """vllm-2 publishes no events: the router says so (metric and admin) and routes to it with
    routing-time inserts, so a repeated prefix is still predicted and is still a physical hit."""
    router = await routers(names=("vllm-2",))

    async def approximate() -> bool:
        return await router_metric(http, router, "router_kv_events_approximate", replica="vllm-2") == 1.0

    await wait_for(approximate, what="vllm-2 approximate")
    states = await replica_states(http, router)
    assert not states["vllm-2"]["kv_event_state"]["event_fed"]
    prompt = text_of(200)
    replica, first = await complete(http, router.url, prompt)
    assert replica == "vllm-2" and cached(first) == 0
    expected_before = await router_metric(http, router, "router_expected_cached_tokens_total")
    _, second = await complete(http, router.url, prompt)
    predicted = await router_metric(http, router, "router_expected_cached_tokens_total") - expected_before
    assert cached(second) >= 4 * BLOCK_SIZE
    assert predicted > 0


async def test_a_restarted_replica_is_resynced(
    routers: RouterMaker, vllm_fleet: VLLMFleet, http: aiohttp.ClientSession
) -> None:
    """vllm-1 restarts (its cache empty, its event sequence back at 0): the router drops what it knew of
    vllm-1, follows the new stream, and learns vllm-1's blocks again from it."""
    # A short breaker ceiling: vllm-1 is down for most of a minute, and the test waits for its return.
    router = await routers(names=("vllm-0", "vllm-1"), breaker_max_cooldown_s=5.0)
    await wait_for(lambda: _event_fed(http, router, ("vllm-0", "vllm-1")), what="event-fed")
    url = vllm_fleet.spec("vllm-1").url

    async def mapped(n: int) -> bool:
        state = (await replica_states(http, router))["vllm-1"]["kv_event_state"]
        return bool(state["event_fed"]) and int(state["mapped_blocks"]) >= n

    old = (await vllm_tokens(http, url, {"prompt": text_of(300)}))[: 8 * BLOCK_SIZE]
    await complete(http, url, old)
    await wait_for(lambda: mapped(8), what="vllm-1's blocks mapped")
    await asyncio.to_thread(vllm_fleet.restart, "vllm-1")

    # A new prefix on the restarted vllm-1: the router follows the new stream (a sequence reset).
    new = (await vllm_tokens(http, url, {"prompt": text_of(300)}))[: 8 * BLOCK_SIZE]
    await complete(http, url, new)

    async def only_new_mapped() -> bool:
        state = (await replica_states(http, router))["vllm-1"]["kv_event_state"]
        return bool(state["event_fed"]) and int(state["mapped_blocks"]) == 8

    await wait_for(only_new_mapped, timeout=30.0, what="vllm-1 resynced on its new stream")

    async def healthy_again() -> bool:  # its breaker ejected it while it was down
        return bool((await replica_states(http, router))["vllm-1"]["available"])

    await wait_for(healthy_again, timeout=90.0, what="vllm-1 back in the router's rotation")
    # What vllm-1 held before the restart is no longer predicted (nor, truly, cached anywhere)...
    expected_before = await router_metric(http, router, "router_expected_cached_tokens_total")
    _, answer = await complete(http, router.url, old + [7] * 40)
    assert cached(answer) == 0
    assert await router_metric(http, router, "router_expected_cached_tokens_total") == expected_before
    # ...and what it holds now is: the new prefix goes to vllm-1, as predicted.
    replica, answer = await complete(http, router.url, new + [7] * 40)
    assert replica == "vllm-1" and cached(answer) == 8 * BLOCK_SIZE


async def test_warmup_replication_on_real_vllm(
    routers: RouterMaker, vllm_fleet: VLLMFleet, http: aiohttp.ClientSession
) -> None:
    """Issue #8 on real vLLM: a warm-up replication (a 1-token prefill of the group's prefix as token
    ids, the executor any vLLM supports) makes the target's next request show cached_tokens > 0, and the
    router then sends that group's requests to both holders."""
    router = await routers(names=("vllm-0", "vllm-1"), policy="kvaware")
    await wait_for(lambda: _event_fed(http, router, ("vllm-0", "vllm-1")), what="event-fed")
    url0 = vllm_fleet.spec("vllm-0").url
    prefix = (await vllm_tokens(http, url0, {"prompt": text_of(400)}))[: 16 * BLOCK_SIZE]
    holders = set()
    for i in range(3):
        replica, _ = await complete(http, router.url, prefix + [11 + i] * 40)
        holders.add(replica)
    assert len(holders) == 1, holders  # one group, one holder until it is replicated
    (holder,) = holders
    target = "vllm-1" if holder == "vllm-0" else "vllm-0"
    hot = await admin(http, router, "/hot")
    (group,) = [g for g in hot["groups"] if g["holders"] == [holder]]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"group": group["group"], "target": target}
    async with http.post(f"{router.url}/admin/migrations", json=body, headers=auth) as r:
        assert r.status == 202, await r.text()
        plan = await r.json()
    # vLLM backends copy no KV here (no kv_transfer): a warm-up prefill, which has no source.
    assert (plan["mechanism"], plan["source"], plan["target"]) == ("warmup", None, target)

    async def completed() -> bool:
        return await router_metric(http, router, "router_migrations_total", outcome="completed") >= 1

    await wait_for(completed, timeout=60.0, what="the warm-up to complete")
    assert await router_metric(http, router, "router_migrations_total", outcome="failed") == 0
    # The target's engine holds the prefix (every full block of it).
    _, answer = await complete(http, vllm_fleet.spec(target).url, prefix + [99] * 40)
    assert cached(answer) == 16 * BLOCK_SIZE
    # And the router spreads the group over both holders: a burst of its requests lands on each.
    results = await asyncio.gather(
        *(complete(http, router.url, prefix + [30 + i] * 40, max_tokens=8) for i in range(8))
    )
    assert {replica for replica, _ in results} == {holder, target}
    assert all(cached(a) >= 16 * BLOCK_SIZE for _, a in results)
