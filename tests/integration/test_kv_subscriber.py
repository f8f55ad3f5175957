"""The router following emulated replicas' KV events over real ZMQ sockets on loopback.

Prompts are token ids in blocks of the emulator's block size (16, the router's `block_size` default),
so a request's own hashes (`hash_tokens`) are what the events must put in the index. Token-precise
mode (`tokenizer="replica"`) makes the replicas event-fed: routing then inserts nothing, and whatever
the index holds came from events.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
import zmq.asyncio
from fake_upstream import TEST_DEFAULTS, RouterFactory, eventually, metric, post, scrape

from router.config import BackendConfig, RouterConfig
from router.forward import REPLICA_HEADER
from router.index.chunking import hash_tokens
from router.server import RouterServer
from workers.emulator import EmulatedFleet, Faults
from workers.emulator.replica import Replica, ReplicaConfig
from workers.engine import get_preset

BLOCK = 16
TOKEN = "kv-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RouterStarter = Callable[..., Any]


def prompt(seed: int, blocks: int = 4) -> list[int]:
    """`blocks` full blocks of token ids, distinct per seed (ids inside the emulator's vocabulary)."""
    return [1000 + seed * 100 + i for i in range(blocks * BLOCK)]


def dead_endpoint() -> str:
    """A loopback ZMQ endpoint where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
async def emulated() -> AsyncIterator[EmulatedFleet]:
    async with EmulatedFleet(2, "tiny", kv_events=True, block_size=BLOCK) as fleet:
        yield fleet


@pytest.fixture
def start_router(routers: RouterFactory) -> RouterStarter:
    """`routers` with the emulator's block size, so token-id prompts chunk as its KV events do."""
    return functools.partial(routers, block_size=BLOCK)


def backends(fleet: EmulatedFleet, **keys: Any) -> list[BackendConfig]:
    return [BackendConfig(f"r{i}", url, **keys) for i, url in enumerate(fleet.urls)]


def hashes(fleet: EmulatedFleet, tokens: list[int]) -> tuple[int, ...]:
    return hashes_of(fleet.model, tokens)


def hashes_of(model: str, tokens: list[int]) -> tuple[int, ...]:
    return hash_tokens(tokens, model, block_size=BLOCK).chained


def holds_all(router: RouterServer, name: str, chained: tuple[int, ...]) -> bool:
    return all(router.fleet.index.holds(name, h) for h in chained)


def holds_none(router: RouterServer, name: str, chained: tuple[int, ...]) -> bool:
    return not any(router.fleet.index.holds(name, h) for h in chained)


def state_of(router: RouterServer, name: str) -> str | None:
    sub = router.kv_events.get(name)
    return None if sub is None else sub.state


async def complete(
    http: aiohttp.ClientSession, url: str, model: str, tokens: list[int]
) -> tuple[int, str | None]:
    status, headers, _ = await post(
        http, url + "/v1/completions", {"model": model, "prompt": tokens, "max_tokens": 2}
    )
    return status, headers.get(REPLICA_HEADER)


async def test_blocks_are_indexed_from_discovered_events_and_the_repeat_follows_them(
    emulated: EmulatedFleet, start_router: RouterStarter, http: aiohttp.ClientSession
) -> None:
    router = await start_router(*backends(emulated), tokenizer="replica")
    for i, endpoint in enumerate(emulated.event_endpoints):
        await eventually(lambda i=i: state_of(router, f"r{i}") == "connected")
        sub = router.kv_events.get(f"r{i}")
        assert sub is not None and sub.source is not None
        assert (sub.source.origin, sub.source.endpoint) == ("discovered", endpoint)  # /kv_event_sources
        assert sub.source.replay_endpoint == emulated.replay_endpoints[i]
        assert router.fleet.replicas[f"r{i}"].event_fed
    tokens = prompt(1)
    chained = hashes(emulated, tokens)
    status, chosen = await complete(http, router.url, emulated.model, tokens)
    assert status == 200 and chosen is not None
    other = "r1" if chosen == "r0" else "r0"
    # Event-fed: routing inserted nothing, so these entries came from the replica's BlockStored.
    await eventually(lambda: holds_all(router, chosen, chained))
    assert holds_none(router, other, chained)
    assert router.fleet.index.size(chosen) == len(chained)
    for _ in range(3):
        assert await complete(http, router.url, emulated.model, tokens) == (200, chosen)
    text = await scrape(http, router.url)
    assert metric(text, "router_kv_events_total", replica=chosen, type="BlockStored") >= 1
    assert metric(text, "router_kv_event_batches_total", replica=chosen) >= 1
    assert metric(text, "router_kv_events_approximate", replica=chosen) == 0
    assert metric(text, "router_kv_event_resyncs_total") == 0


async def test_a_dropped_batch_is_detected_as_a_gap_and_replayed(
    emulated: EmulatedFleet, start_router: RouterStarter, http: aiohttp.ClientSession
) -> None:
    replica = emulated.replicas[0]
    backend = BackendConfig(
        "r0",
        replica.url,
        kv_events=emulated.event_endpoints[0],
        kv_events_replay=emulated.replay_endpoints[0],
    )
    router = await start_router(backend, tokenizer="replica")
    await eventually(lambda: state_of(router, "r0") == "connected")
    warm, first, second = prompt(0), prompt(1), prompt(2)
    assert (await complete(http, router.url, emulated.model, warm))[0] == 200
    await eventually(lambda: holds_all(router, "r0", hashes(emulated, warm)))  # batch 0 applied
    await replica.set_faults(Faults(drop_events=1))  # the next batch is not sent, but is buffered
    assert (await complete(http, router.url, emulated.model, first))[0] == 200
    await eventually(lambda: replica.publisher is not None and replica.publisher.dropped == 1)
    assert holds_none(router, "r0", hashes(emulated, first))
    assert (await complete(http, router.url, emulated.model, second))[0] == 200
    # Batch 2 arrives after batch 0: a gap; the replay brings batch 1 back.
    await eventually(lambda: holds_all(router, "r0", hashes(emulated, first) + hashes(emulated, second)))
    assert holds_all(router, "r0", hashes(emulated, warm))
    text = await scrape(http, router.url)
    assert metric(text, "router_kv_event_gaps_total", replica="r0") == 1
    assert metric(text, "router_kv_event_replays_total", replica="r0") == 2  # on connect, and the gap
    assert metric(text, "router_kv_event_resyncs_total", replica="r0") == 0
    assert router.fleet.replicas["r0"].event_fed


async def test_a_gap_the_replay_cannot_close_is_a_resync(
    start_router: RouterStarter, http: aiohttp.ClientSession
) -> None:
    ctx = zmq.asyncio.Context()
    preset = replace(get_preset("tiny"), block_size=BLOCK)
    replica = Replica(ReplicaConfig(preset, kv_events=True, buffer_steps=1), ctx)  # replays 1 batch
    try:
        await replica.start()
        router = await start_router(BackendConfig("r0", replica.url), tokenizer="replica")
        await eventually(lambda: state_of(router, "r0") == "connected")
        warm, lost, last = prompt(0), prompt(1), prompt(2)
        assert (await complete(http, router.url, replica.model, warm))[0] == 200
        await eventually(lambda: holds_all(router, "r0", hashes_of(replica.model, warm)))
        await replica.set_faults(Faults(drop_events=1))
        assert (await complete(http, router.url, replica.model, lost))[0] == 200
        assert (await complete(http, router.url, replica.model, last))[0] == 200
        # The replay holds only the last batch: the lost one is gone for good, and the entries the
        # events had put there may be stale, so they go; the stream goes on from the last batch.
        await eventually(lambda: holds_all(router, "r0", hashes_of(replica.model, last)))
        assert holds_none(router, "r0", hashes_of(replica.model, warm) + hashes_of(replica.model, lost))
        text = await scrape(http, router.url)
        assert metric(text, "router_kv_event_resyncs_total", replica="r0", reason="replay_incomplete") == 1
        assert router.fleet.replicas["r0"].event_fed
    finally:
        await replica.stop()
        ctx.destroy(linger=0)


async def test_a_silent_replica_goes_approximate_and_comes_back_when_batches_flow(
    emulated: EmulatedFleet, start_router: RouterStarter, http: aiohttp.ClientSession
) -> None:
    replica = emulated.replicas[0]
    backend = BackendConfig("r0", replica.url, kv_events=emulated.event_endpoints[0])  # no replay
    router = await start_router(backend, tokenizer="replica", kv_events_silence_s=0.3)
    await eventually(lambda: state_of(router, "r0") == "connected")
    await replica.set_faults(Faults(drop_events=2))
    lost, routed, flowing = prompt(1), prompt(2), prompt(3)
    assert (await complete(http, router.url, emulated.model, lost))[0] == 200
    await eventually(lambda: state_of(router, "r0") == "approximate", timeout_s=3.0)
    assert (await complete(http, router.url, emulated.model, routed))[0] == 200
    assert holds_all(router, "r0", hashes(emulated, routed))  # a routing-time insert
    await eventually(lambda: replica.publisher is not None and replica.publisher.dropped == 2)
    assert (await complete(http, router.url, emulated.model, flowing))[0] == 200
    # Its batch flows: the routing-time entries go, the events' take over again.
    await eventually(lambda: state_of(router, "r0") == "connected")
    assert router.fleet.replicas["r0"].event_fed
    await eventually(lambda: holds_all(router, "r0", hashes(emulated, flowing)))
    assert holds_none(router, "r0", hashes(emulated, routed))
    assert metric(await scrape(http, router.url), "router_kv_events_approximate", replica="r0") == 0


async def test_an_engine_restart_resets_the_sequence_and_drops_the_replicas_entries(
    emulated: EmulatedFleet, start_router: RouterStarter, http: aiohttp.ClientSession
) -> None:
    replica = emulated.replicas[0]
    router = await start_router(BackendConfig("r0", replica.url), tokenizer="replica")
    await eventually(lambda: state_of(router, "r0") == "connected")
    before, after = prompt(1), prompt(2)
    assert (await complete(http, router.url, emulated.model, before))[0] == 200
    await eventually(lambda: holds_all(router, "r0", hashes(emulated, before)))
    await replica.set_faults(Faults(crash=True))
    await replica.set_faults(Faults())  # back as a fresh process: empty cache, sequence from 0
    # Straight to the replica: its first batch after the restart (seq 0) is a sequence reset.
    assert (await complete(http, replica.url, emulated.model, after))[0] == 200
    await eventually(lambda: holds_all(router, "r0", hashes(emulated, after)))
    assert holds_none(router, "r0", hashes(emulated, before))
    text = await scrape(http, router.url)
    assert metric(text, "router_kv_event_resyncs_total", replica="r0", reason="restart") == 1
    sub = router.kv_events.get("r0")
    assert sub is not None and sub.tracker.last_seq == 0


async def test_a_replica_whose_events_never_arrive_becomes_approximate_and_routes_by_routing(
    start_router: RouterStarter, http: aiohttp.ClientSession
) -> None:
    async with EmulatedFleet(1, "tiny", block_size=BLOCK) as fleet:  # no publisher at all
        backend = BackendConfig("r0", fleet.urls[0], kv_events=dead_endpoint())
        router = await start_router(backend, tokenizer="replica", kv_events_silence_s=0.3, admin_token=TOKEN)
        await eventually(lambda: state_of(router, "r0") == "connected")
        assert router.fleet.replicas["r0"].event_fed
        tokens = prompt(3)
        assert (await complete(http, router.url, fleet.model, tokens))[0] == 200
        assert router.fleet.index.size("r0") == 0  # event-fed: routing did not insert
        # A request finished there and no batch came within 0.3 s: approximate.
        await eventually(lambda: state_of(router, "r0") == "approximate", timeout_s=3.0)
        assert not router.fleet.replicas["r0"].event_fed
        text = await scrape(http, router.url)
        assert metric(text, "router_kv_events_approximate", replica="r0") == 1
        assert (await complete(http, router.url, fleet.model, tokens))[0] == 200
        assert holds_all(router, "r0", hashes(fleet, tokens))  # a routing-time insert
        async with http.get(router.url + "/admin/replicas", headers=AUTH) as resp:
            (described,) = (await resp.json())["replicas"]
        assert described["kv_event_state"]["state"] == "approximate"
        assert described["kv_event_state"]["event_fed"] is False


async def test_a_replica_naming_no_event_source_is_off_and_routed_by_routing(
    start_router: RouterStarter, http: aiohttp.ClientSession
) -> None:
    async with EmulatedFleet(1, "tiny", block_size=BLOCK) as fleet:  # /kv_event_sources answers {}
        router = await start_router(BackendConfig("r0", fleet.urls[0]), tokenizer="replica")
        await eventually(lambda: state_of(router, "r0") == "off")
        tokens = prompt(4)
        assert (await complete(http, router.url, fleet.model, tokens))[0] == 200
        assert holds_all(router, "r0", hashes(fleet, tokens))
        assert metric(await scrape(http, router.url), "router_kv_events_approximate", replica="r0") == 1


async def test_in_text_mode_events_are_applied_but_routing_keeps_inserting(
    emulated: EmulatedFleet, start_router: RouterStarter, http: aiohttp.ClientSession
) -> None:
    replica = emulated.replicas[0]
    router = await start_router(BackendConfig("r0", replica.url))  # tokenizer None: text chunks
    await eventually(lambda: state_of(router, "r0") == "connected")
    assert not router.fleet.replicas["r0"].event_fed
    tokens = prompt(5)
    assert (await complete(http, router.url, emulated.model, tokens))[0] == 200
    assert holds_all(router, "r0", hashes(emulated, tokens))  # inserted at routing time
    sub = router.kv_events.get("r0")
    await eventually(lambda: sub is not None and sub.indexer is not None and len(sub.indexer) == 4)
    # The cache is emptied on the replica: AllBlocksCleared drops every entry, routing-time ones too.
    async with http.post(replica.url + "/reset_prefix_cache") as resp:
        assert resp.status == 200
    await eventually(lambda: router.fleet.index.size("r0") == 0)
    assert metric(await scrape(http, router.url), "router_kv_events_total", type="AllBlocksCleared") == 1


async def test_subscribers_follow_admin_changes_and_reloads(
    emulated: EmulatedFleet, start_router: RouterStarter, http: aiohttp.ClientSession
) -> None:
    r0, r1 = emulated.replicas
    router = await start_router(BackendConfig("r0", r0.url), admin_token=TOKEN)
    await eventually(lambda: state_of(router, "r0") == "connected")
    body = {"name": "r1", "url": r1.url, "kv_events": "auto"}
    async with http.post(router.url + "/admin/replicas", json=body, headers=AUTH) as resp:
        assert resp.status == 201
    await eventually(lambda: state_of(router, "r1") == "connected")
    assert (await complete(http, r1.url, emulated.model, prompt(6)))[0] == 200
    await eventually(lambda: router.fleet.index.size("r1") == 4)
    async with http.get(router.url + "/admin/replicas", headers=AUTH) as resp:
        described = {d["name"]: d["kv_event_state"] for d in (await resp.json())["replicas"]}
    assert described["r1"]["state"] == "connected" and described["r1"]["last_seq"] == 0
    async with http.delete(router.url + "/admin/replicas/r1", headers=AUTH) as resp:
        assert resp.status == 200
    assert router.kv_events.get("r1") is None
    assert 'replica="r1"' not in await scrape(http, router.url)  # its series went with it
    await router.reload(RouterConfig(**{**TEST_DEFAULTS, "block_size": BLOCK}, admin_token=TOKEN))
    assert router.kv_events.get("r0") is None
    await router.reload(
        RouterConfig(
            backends=(BackendConfig("r0", r0.url, kv_events="off"),), **TEST_DEFAULTS, block_size=BLOCK
        )
    )
    await eventually(lambda: state_of(router, "r0") == "off")
