"""The proxy drives the hot-prefix controller (router/migration.py): a migration started through
/admin/migrations copies the prefix to the target replica of a real emulator, and is counted."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from fake_upstream import TEST_DEFAULTS, metric, scrape

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
