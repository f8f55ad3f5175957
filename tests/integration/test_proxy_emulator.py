"""The router in front of emulated vLLM replicas (workers/emulator): real cache hits, real faults."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from fake_upstream import RouterFactory, eventually, metric, post, scrape

from router.forward import REPLICA_HEADER
from router.server import RouterServer
from workers.emulator import EmulatedFleet, Faults

SYSTEM = "You are the support assistant of a bicycle shop. Answer politely and briefly. " * 12


@pytest.fixture
async def emulated() -> AsyncIterator[EmulatedFleet]:
    async with EmulatedFleet(3, "tiny") as fleet:
        yield fleet


async def start(routers: RouterFactory, fleet: EmulatedFleet, **overrides: object) -> RouterServer:
    return await routers(*((f"r{i}", url) for i, url in enumerate(fleet.urls)), **overrides)


def chat(fleet: EmulatedFleet, question: str, **extra: object) -> dict[str, object]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return {"model": fleet.model, "messages": messages, "max_tokens": 4, **extra}


async def test_shared_prefix_hits_the_replica_cache(
    emulated: EmulatedFleet, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    router = await start(routers, emulated)
    assert {m for s in router.fleet.replicas.values() for m in s.models} == {emulated.model}  # discovered
    chosen = set()
    for i in range(5):
        extra = {"stream": True, "stream_options": {"include_usage": True}} if i % 2 else {}
        status, headers, _ = await post(
            http, router.url + "/v1/chat/completions", chat(emulated, f"Q{i}?", **extra)
        )
        assert status == 200
        chosen.add(headers[REPLICA_HEADER])
    assert len(chosen) == 1
    text = await scrape(http, router.url)
    physical = metric(text, "router_physical_cached_tokens_total")
    # Four of the five requests reuse the system prompt, which the replica really holds.
    assert physical > 0.5 * metric(text, "router_usage_prompt_tokens_total")
    assert metric(text, "router_logical_cached_tokens_total") > 0
    await router.state.upstream.scrape_round()  # type: ignore[union-attr]
    state = router.fleet.replicas[chosen.pop()]
    assert state.kv_capacity_tokens == 256 * 16 and state.scraped_at is not None


async def test_a_crashed_replica_is_routed_around_and_comes_back(
    emulated: EmulatedFleet, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    router = await start(routers, emulated, policy="round_robin", breaker_cooldown_s=0.2)
    await emulated.replicas[0].set_faults(Faults(crash=True))  # /health 503, generations 500
    for i in range(6):
        status, headers, _ = await post(
            http, router.url + "/v1/chat/completions", chat(emulated, f"crash {i}")
        )
        assert status == 200 and headers[REPLICA_HEADER] != "r0"
    await eventually(lambda: not router.fleet.replicas["r0"].healthy)
    await emulated.replicas[0].set_faults(Faults())
    await eventually(lambda: router.fleet.replicas["r0"].healthy)


async def test_refused_connections_are_retried_and_a_hang_times_out(
    emulated: EmulatedFleet, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    router = await start(
        routers, emulated, policy="round_robin", breaker_failures=1000, upstream_timeout_s=0.3
    )
    # New connections to r1 are refused; the router's pooled keep-alive ones may still be served
    # (as with a real server that stops listening), and a refused one is retried elsewhere.
    await emulated.replicas[1].set_faults(Faults(refuse=True))
    for i in range(3):
        status, _, _ = await post(http, router.url + "/v1/chat/completions", chat(emulated, f"refuse {i}"))
        assert status == 200
    for replica in emulated.replicas:
        await replica.set_faults(Faults(hang=True))
    status, _, _ = await asyncio.wait_for(
        post(http, router.url + "/v1/chat/completions", chat(emulated, "hang")), timeout=5
    )
    assert status == 504
    for replica in emulated.replicas:
        await replica.set_faults(Faults())


async def test_lone_surrogates_in_a_prompt_are_text_not_a_server_error() -> None:
    """JSON may escape a lone surrogate ("\\ud800"); it must hash, route and tokenize like any text."""
    import json

    import aiohttp

    from router.config import BackendConfig, RouterConfig
    from router.server import RouterServer
    from workers.emulator.fleet import EmulatedFleet

    async with EmulatedFleet(2, "tiny") as fleet:
        backends = tuple(BackendConfig(f"r{i}", url) for i, url in enumerate(fleet.urls))
        async with RouterServer(RouterConfig(backends=backends, port=0)) as router:
            # json.dumps writes lone surrogates as \\uXXXX escapes, as a client's JSON encoder would.
            completion = {"model": fleet.model, "prompt": "\ud800 " + "x" * 200 + " \udfff", "max_tokens": 2}
            chat = {"model": fleet.model, "messages": [{"role": "user", "content": "\udc80 hi"}]}
            headers = {"Content-Type": "application/json"}
            async with aiohttp.ClientSession() as session:
                for path, body in (("/v1/completions", completion), ("/v1/chat/completions", chat)):
                    raw = json.dumps(body)
                    assert "\\ud" in raw or "\\udc80" in raw
                    async with session.post(router.url + path, data=raw, headers=headers) as resp:
                        assert resp.status == 200, await resp.text()
                        assert (await resp.json())["usage"]["completion_tokens"] >= 1
