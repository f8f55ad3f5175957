"""The proxy drives the hot-prefix controller (router/migration.py): a migration started through
/admin/migrations copies the prefix to the target replica of a real emulator, and is counted; the
detector fires on its own under load and warms a peer (with failures and timeouts counted, bounded and
survived); LMCache backends copy through the controller (a FAKE, fake_lmcache.py: it needs GPUs)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from fake_lmcache import CPU, FakeLMCacheController
from fake_upstream import TEST_DEFAULTS, FakeFactory, RouterFactory, eventually, metric, scrape

from router.config import BackendConfig, RouterConfig
from router.server import RouterServer
from workers.emulator import EmulatedFleet
from workers.emulator.replica import DEFAULT_MODEL

TOKEN = "secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PREFIX = list(range(5000, 5000 + 20 * 16))  # 20 blocks of the tiny preset


async def start(emu: EmulatedFleet, policy: str) -> RouterServer:
    backends = tuple(
        BackendConfig(name=f"r{i}", url=url, kv_transfer="p2p") for i, url in enumerate(emu.urls)
    )
    config = RouterConfig(backends=backends, policy=policy, admin_token=TOKEN, **TEST_DEFAULTS)
    return await RouterServer(config).start()


async def complete(http: aiohttp.ClientSession, url: str, prompt: Any) -> dict[str, Any]:
    body = {"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": 1}
    async with http.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        data: dict[str, Any] = await r.json()
        return data


async def test_admin_migration_copies_the_prefix(http: aiohttp.ClientSession) -> None:
    async with EmulatedFleet(2, "tiny") as emu:
        router = await start(emu, "kvaware")
        try:
            for tail in ([1, 2, 3], [4, 5, 6]):
                await complete(http, router.url, [*PREFIX, *tail])
            async with http.get(router.url + "/admin/hot", headers=AUTH) as r:
                assert r.status == 200
                (group,) = (await r.json())["groups"]
            (holder,) = group["holders"]
            target = "r1" if holder == "r0" else "r0"
            body = {"group": group["group"], "target": target}
            async with http.post(router.url + "/admin/migrations", json=body, headers=AUTH) as r:
                assert r.status == 202, await r.text()
                plan = await r.json()
            assert plan["mechanism"] == "copy" and plan["source"] == holder

            for _ in range(250):
                text = await scrape(http, router.url)
                if metric(text, "router_migrations_total", outcome="completed") == 1:
                    break
                await asyncio.sleep(0.02)
            assert metric(text, "router_migrations_total", outcome="completed") == 1
            assert metric(text, "router_migrations_total", outcome="started") == 1
            assert metric(text, "router_migrations_total", outcome="failed") == 0
            assert metric(text, "router_migration_bytes_total") > 0
            async with http.get(router.url + "/admin/hot", headers=AUTH) as r:
                hot = await r.json()
            (g,) = hot["groups"]
            assert sorted(g["holders"]) == ["r0", "r1"] and g["added_holders"] == [target]
            assert hot["completed"] == 1 and hot["in_flight"] == []
            # The target's engine really holds the prefix now.
            idx = int(target[1:])
            reply = await complete(http, emu.urls[idx], [*PREFIX, 9, 9])
            assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == len(PREFIX)
            # Bad requests.
            for bad, status in (
                ({"group": group["group"], "target": "nope"}, 404),
                ({"group": "12345", "target": target}, 404),
                ({"group": group["group"], "target": target}, 400),  # already a holder
                ({"group": 7, "target": target}, 400),
            ):
                async with http.post(router.url + "/admin/migrations", json=bad, headers=AUTH) as r:
                    assert r.status == status, (bad, await r.text())
            forbid = f"{router.url}/admin/hot/{group['group']}/forbid"
            async with http.post(forbid, headers=AUTH) as r:
                assert r.status == 200 and (await r.json())["forbidden"] is True
        finally:
            await router.stop()


async def test_admin_hot_is_404_without_migration(http: aiohttp.ClientSession) -> None:
    async with EmulatedFleet(1, "tiny") as emu:
        router = await start(emu, "kvaware:migration=false")
        try:
            async with http.get(router.url + "/admin/hot", headers=AUTH) as r:
                assert r.status == 404
            body = {"group": "1", "target": "r0"}
            async with http.post(router.url + "/admin/migrations", json=body, headers=AUTH) as r:
                assert r.status == 404
            async with http.post(router.url + "/admin/hot/1/forbid", headers=AUTH) as r:
                assert r.status == 404
            assert router.state.migration is None
        finally:
            await router.stop()


# -- the detector through the proxy, with the warm-up executor end to end ------------------------------

HOT_PREFIX = list(range(10_000, 10_000 + 64 * 16))  # 1,024 tokens: 64 blocks of the tiny preset
WORKERS = 8
_request_ids = itertools.count()


@dataclass
class Served:
    started: float
    replica: str
    cached_tokens: int


async def hot_load(http: aiohttp.ClientSession, url: str, stop: asyncio.Event, out: list[Served]) -> None:
    """WORKERS clients sending the hot group back to back: the prefix + 200 tokens of their own, 100 out.

    Non-streaming, so the router counts each request's uncached prompt tokens as queued prefill until it
    ends: 8 x 200 = 1,600 tokens on the holder, a wait of (1,600 + 150 step tokens) / 25K tokens/s =
    70 ms (router/hot_prefix.py replica_wait_s) >= hot_wait_s 30 ms, while the other replica's is 6 ms
    <= headroom_wait_s 15 ms. kvaware keeps the group on the holder meanwhile: 70 ms + 4 x 200 / 25K =
    0.10 s there against 6 ms + 4 x 1,224 / 25K = 0.2 s to recompute the whole prompt elsewhere."""
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        while not stop.is_set():
            k = next(_request_ids)
            prompt = [*HOT_PREFIX, 20_000 + k, *range(21_000, 21_199)]
            body = {"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": 100}
            started = loop.time()
            async with http.post(f"{url}/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                data = await r.json()
                replica = r.headers["x-kvrouter-replica"]
            out.append(Served(started, replica, data["usage"]["prompt_tokens_details"]["cached_tokens"]))

    await asyncio.gather(*(worker() for _ in range(WORKERS)))


async def start_hot(emu: EmulatedFleet, **params: float) -> RouterServer:
    """A kvaware router over `emu` (warm-up backends) ticking every 50 ms, with controller `params`."""
    backends = tuple(BackendConfig(name=f"r{i}", url=url) for i, url in enumerate(emu.urls))
    config = RouterConfig(
        backends=backends, policy="kvaware", admin_token=TOKEN, migration_interval_s=0.05, **TEST_DEFAULTS
    )
    router = await RouterServer(config).start()
    runner = router.state.migration
    assert runner is not None
    # No config key sets the controller's timings (their defaults suit production: 2 s cooldown, 30 s
    # timeout); a test shortens them on the controller itself.
    runner.controller.params = replace(runner.controller.params, **params)
    return router


async def first_holder(http: aiohttp.ClientSession, router: RouterServer) -> str:
    body = {"model": DEFAULT_MODEL, "prompt": [*HOT_PREFIX, 1, 2, 3], "max_tokens": 1}
    async with http.post(f"{router.url}/v1/completions", json=body) as r:
        assert r.status == 200
        return r.headers["x-kvrouter-replica"]


async def outcome(http: aiohttp.ClientSession, router: RouterServer, name: str, at_least: int = 1) -> str:
    """The /metrics text once `router_migrations_total{outcome=name}` reaches `at_least` (5 s at most)."""
    for _ in range(250):
        text = await scrape(http, router.url)
        if metric(text, "router_migrations_total", outcome=name) >= at_least:
            return text
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {name} migration within 5 s:\n{text}")


async def hot_view(http: aiohttp.ClientSession, router: RouterServer) -> dict[str, Any]:
    async with http.get(router.url + "/admin/hot", headers=AUTH) as r:
        assert r.status == 200
        data: dict[str, Any] = await r.json()
        return data


async def test_detector_warms_a_peer_and_the_group_spreads(http: aiohttp.ClientSession) -> None:
    async with EmulatedFleet(2, "tiny", num_gpu_blocks=1024) as emu:
        router = await start_hot(emu)
        try:
            holder = await first_holder(http, router)
            peer = "r1" if holder == "r0" else "r0"
            stop, served = asyncio.Event(), []
            load = asyncio.create_task(hot_load(http, router.url, stop, served))
            text = await outcome(http, router, "completed")
            done_at = asyncio.get_running_loop().time()
            assert metric(text, "router_migrations_total", outcome="failed") == 0
            hot = await hot_view(http, router)
            group = next(g for g in hot["groups"] if g["prefix_tokens"] == len(HOT_PREFIX))
            assert sorted(group["holders"]) == ["r0", "r1"] and group["added_holders"] == [peer]
            await asyncio.sleep(0.6)  # the group's requests after the warm-up
            stop.set()
            await asyncio.wait_for(load, 10)
        finally:
            await router.stop()
        before = [s for s in served if s.started < done_at]
        after = [s for s in served if s.started > done_at]
        assert before and {s.replica for s in before} == {holder}  # the detector fired, not kvaware's spill
        assert {s.replica for s in after} == {"r0", "r1"}
        # Served by the warmed peer, the prefix is a physical cache hit there.
        assert all(s.cached_tokens >= len(HOT_PREFIX) for s in after if s.replica == peer)
        reply = await complete(http, emu.urls[int(peer[1:])], [*HOT_PREFIX, 9, 9])
        assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == len(HOT_PREFIX)


async def test_failed_warmups_wait_out_the_cooldown_and_the_loop_goes_on(http: aiohttp.ClientSession) -> None:
    async with EmulatedFleet(2, "tiny", num_gpu_blocks=1024) as emu:
        router = await start_hot(emu, cooldown_s=0.4)
        try:
            holder = await first_holder(http, router)
            peer = "r1" if holder == "r0" else "r0"
            faults = f"{emu.urls[int(peer[1:])]}/kvrouter/faults"
            async with http.post(faults, json={"error_rate": 1.0}) as r:  # every completion there: HTTP 500
                assert r.status == 200
            stop, served = asyncio.Event(), []
            load = asyncio.create_task(hot_load(http, router.url, stop, served))
            await outcome(http, router, "failed", at_least=2)
            async with http.post(faults, json={}) as r:  # repaired: the next plan succeeds
                assert r.status == 200
            text = await outcome(http, router, "completed")
            stop.set()
            await asyncio.wait_for(load, 10)
            runner = router.state.migration
            assert runner is not None
            starts = [plan.created_at for plan, _, _ in runner.controller.history]
            outcomes = [result for _, result, _ in runner.controller.history]
            hot = await hot_view(http, router)
        finally:
            await router.stop()
        assert outcomes[:2] == ["failed", "failed"] and outcomes[-1] == "completed"
        assert all(b - a >= 0.4 for a, b in itertools.pairwise(starts))  # one plan per cooldown_s
        started = metric(text, "router_migrations_total", outcome="started")
        failed = metric(text, "router_migrations_total", outcome="failed")
        assert started == failed + 1 and failed >= 2
        group = next(g for g in hot["groups"] if g["prefix_tokens"] == len(HOT_PREFIX))
        assert sorted(group["holders"]) == ["r0", "r1"]


async def test_a_hung_warmup_times_out(http: aiohttp.ClientSession) -> None:
    async with EmulatedFleet(2, "tiny", num_gpu_blocks=1024) as emu:
        router = await start_hot(emu, migration_timeout_s=0.1)
        try:
            holder = await first_holder(http, router)
            peer = "r1" if holder == "r0" else "r0"
            # 0.3 s before every answer from the peer: longer than the migration timeout (0.1 s), shorter
            # than the router's health probe timeout (0.5 s), so the peer stays healthy and targetable.
            async with http.post(f"{emu.urls[int(peer[1:])]}/kvrouter/faults", json={"latency_s": 0.3}) as r:
                assert r.status == 200
            stop, served = asyncio.Event(), []
            load = asyncio.create_task(hot_load(http, router.url, stop, served))
            text = await outcome(http, router, "failed")
            hot = await hot_view(http, router)
            stop.set()
            await asyncio.wait_for(load, 10)
        finally:
            await router.stop()
        assert metric(text, "router_migrations_total", outcome="completed") == 0
        count = metric(text, "router_migration_duration_seconds_count")
        assert count >= 1
        assert metric(text, "router_migration_duration_seconds_sum") / count < 0.3  # cut at 0.1 s
        group = next(g for g in hot["groups"] if g["prefix_tokens"] == len(HOT_PREFIX))
        assert group["holders"] == [holder] and group["added_holders"] == []


# -- LMCache through the proxy (the controller is FAKE_LMCACHE: it needs GPUs) ----------------------------

LM_PREFIX = list(range(12_000, 12_000 + 40 * 16))  # 640 tokens: two whole LMCache chunks (512) and a rest


async def test_lmcache_backends_copy_through_the_controller(http: aiohttp.ClientSession) -> None:
    controller = await FakeLMCacheController(check_finish="polling", pending_polls=4).start()
    try:
        async with EmulatedFleet(2, "tiny") as emu:
            backends = tuple(
                BackendConfig(f"r{i}", url, kv_transfer="lmcache", lmcache_instance_id=f"inst-{i}")
                for i, url in enumerate(emu.urls)
            )
            config = RouterConfig(
                backends=backends,
                policy="kvaware",
                admin_token=TOKEN,
                lmcache_controller_url=controller.url,
                **TEST_DEFAULTS,
            )
            router = await RouterServer(config).start()
            try:
                for tail in ([1, 2, 3], [4, 5, 6]):
                    await complete(http, router.url, [*LM_PREFIX, *tail])
                (group,) = (await hot_view(http, router))["groups"]
                (holder,) = group["holders"]
                target = "r1" if holder == "r0" else "r0"
                # What the holder's LMCache worker would have stored after its prefills.
                controller.held[f"inst-{holder[1:]}"] = (CPU, LM_PREFIX)
                body = {"group": group["group"], "target": target}
                async with http.post(router.url + "/admin/migrations", json=body, headers=AUTH) as r:
                    assert r.status == 202, await r.text()
                    assert (await r.json())["mechanism"] == "copy"
                await eventually(lambda: controller.polls >= 2)
                (pending,) = (await hot_view(http, router))["groups"]
                assert pending["holders"] == [holder] and len(pending["in_flight"]) == 1  # not yet
                await outcome(http, router, "completed")
                (done,) = (await hot_view(http, router))["groups"]
                assert sorted(done["holders"]) == ["r0", "r1"] and done["in_flight"] == []
                # An LMCache replica added at run time must not reuse an instance id.
                dup = {
                    "name": "r9",
                    "url": emu.urls[0],
                    "kv_transfer": "lmcache",
                    "lmcache_instance_id": "inst-0",
                }
                async with http.post(router.url + "/admin/replicas", json=dup, headers=AUTH) as r:
                    assert r.status == 400 and "lmcache_instance_id" in await r.text()
            finally:
                await router.stop()
    finally:
        await controller.stop()
    assert controller.errors == []
    move = next(b for p, b in controller.requests if p == "/move")
    assert move["old_position"] == [f"inst-{holder[1:]}", CPU]
    assert move["new_position"] == [f"inst-{target[1:]}", CPU] and move["tokens"] == LM_PREFIX[:512]
    assert controller.held[f"inst-{target[1:]}"] == (CPU, LM_PREFIX[:512])


async def test_admin_refuses_a_replica_its_transfer_cannot_reach(
    http: aiohttp.ClientSession, fakes: FakeFactory, routers: RouterFactory
) -> None:
    a = await fakes("a")
    router = await routers(a, admin_token=TOKEN)  # no lmcache_controller_url
    for extra, message in (
        ({"kv_transfer": "lmcache", "lmcache_instance_id": "x"}, "set lmcache_controller_url"),
        ({"kv_transfer": "lmcache"}, "needs lmcache_instance_id"),
        ({"kv_transfer": "nixl", "nixl_host": "10.0.0.2"}, "needs nixl_port"),
    ):
        body = {"name": "n", "url": a.url, **extra}
        async with http.post(router.url + "/admin/replicas", json=body, headers=AUTH) as r:
            assert r.status == 400 and message in (await r.json())["error"]["message"], extra
    assert set(router.fleet.replicas) == {"a"}
