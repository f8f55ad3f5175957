"""The proxy drives the hot-prefix controller (router/migration.py): a migration started through
/admin/migrations copies the prefix to the target replica of a real emulator, and is counted; between
backends that cannot copy it is a warm-up, and says so; the detector fires on its own under load and
warms a peer (with failures and timeouts counted, bounded and survived, after the config file's
`hot_prefix` cooldown_s and migration_timeout_s); a reload retunes the running controller; LMCache
backends copy through the controller (a FAKE, fake_lmcache.py: it needs GPUs)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from fake_lmcache import CPU, FakeLMCacheController
from fake_upstream import TEST_DEFAULTS, FakeFactory, RouterFactory, eventually, metric, scrape

from router.config import BackendConfig, ConfigError, RouterConfig, build_config
from router.hot_prefix import WAITING_REASONS, HotPrefixParams
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
            # One series per reason a hot group can wait, none hot here (two requests are no hot group).
            for reason in WAITING_REASONS:
                assert f'router_hot_groups_waiting{{reason="{reason}"}} 0.0' in text
            async with http.get(router.url + "/admin/hot", headers=AUTH) as r:
                hot = await r.json()
            (g,) = hot["groups"]
            assert sorted(g["holders"]) == ["r0", "r1"] and g["added_holders"] == [target]
            assert (g["hot"], g["waiting_for"]) == (False, None)  # an operator's copy of a cool group
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
    70 ms (router/hot_prefix.py replica_wait_s), 11.7 idle steps of 6 ms (150 / 25K) >= hot_wait_steps
    5, while the other replica's is 6 ms, 1 step <= headroom_wait_steps 2.5. kvaware keeps the group on
    the holder meanwhile: 70 ms + 4 x 200 / 25K = 0.10 s there against 6 ms + 4 x 1,224 / 25K = 0.2 s to
    recompute the whole prompt elsewhere."""
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


def write_hot_config(path: Path, emu: EmulatedFleet, **hot_prefix: float) -> Path:
    """A config file for a kvaware router over `emu` (warm-up backends) ticking every 50 ms, with the
    controller parameters `hot_prefix` (its defaults suit production: 2 s cooldown, 30 s timeout)."""
    config = {
        "policy": "kvaware",
        "migration_interval_s": 0.05,
        "backends": [{"name": f"r{i}", "url": url} for i, url in enumerate(emu.urls)],
        "hot_prefix": hot_prefix,
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def start_hot(emu: EmulatedFleet, tmp_path: Path, **hot_prefix: float) -> RouterServer:
    """A router from `write_hot_config`'s file, built as `kvrouter serve --config` does (reloads re-read
    the file)."""
    path = write_hot_config(tmp_path / "router.yaml", emu, **hot_prefix)

    def source() -> RouterConfig:
        return build_config(config_path=path, overrides={**TEST_DEFAULTS, "admin_token": TOKEN})

    return await RouterServer(source(), config_source=source).start()


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


async def test_detector_warms_a_peer_and_the_group_spreads(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with EmulatedFleet(2, "tiny", num_gpu_blocks=1024) as emu:
        router = await start_hot(emu, tmp_path)
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
            # The busiest group leads the top-group gauges under the key /admin/hot gives it; they follow
            # the controller's ticks (every 50 ms here), so its second holder shows within a few.
            top = {"rank": "1", "group": group["group"]}
            for _ in range(100):
                top_text = await scrape(http, router.url)
                if metric(top_text, "router_top_group_holders", **top) == 2:
                    break
                await asyncio.sleep(0.02)
            assert metric(top_text, "router_top_group_holders", **top) == 2
            # The group's request rate as /admin/hot gives it a moment later (both decayed to their now).
            rate = metric(top_text, "router_top_group_requests_per_second", **top)
            later = next(g for g in (await hot_view(http, router))["groups"] if g["group"] == group["group"])
            assert 0.5 < rate / later["request_rate"] < 2.0, (rate, later["request_rate"])
            # Warm-up backends: the detector planned what ran, a warm-up, and no bytes were copied.
            runner = router.state.migration
            assert runner is not None
            assert [plan.mechanism for plan, _, _ in runner.controller.history] == ["warmup"]
            assert metric(text, "router_migration_bytes_total") == 0
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


async def test_failed_warmups_wait_out_the_configured_cooldown_and_the_loop_goes_on(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with EmulatedFleet(2, "tiny", num_gpu_blocks=1024) as emu:
        router = await start_hot(emu, tmp_path, cooldown_s=0.4)  # the file's hot_prefix: {cooldown_s: 0.4}
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
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert all(gap >= 0.4 for gap in gaps)  # one plan per cooldown_s
        # ... and that cooldown is the configured one: the default (2 s) would space the plans by 2 s.
        # The retry comes at the first 50 ms tick after 0.4 s; 1.5 s leaves room for a slow machine.
        assert gaps[0] < 1.5, gaps
        assert hot["params"]["cooldown_s"] == 0.4
        started = metric(text, "router_migrations_total", outcome="started")
        failed = metric(text, "router_migrations_total", outcome="failed")
        assert started == failed + 1 and failed >= 2
        group = next(g for g in hot["groups"] if g["prefix_tokens"] == len(HOT_PREFIX))
        assert sorted(group["holders"]) == ["r0", "r1"]


async def test_a_hung_warmup_times_out_after_the_configured_timeout(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with EmulatedFleet(2, "tiny", num_gpu_blocks=1024) as emu:
        # The file's hot_prefix: {migration_timeout_s: 0.1}; the default (30 s) would not fail it in 5 s.
        router = await start_hot(emu, tmp_path, migration_timeout_s=0.1)
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
            assert router.fleet.inflight_count() == 0  # the timed-out warm-up's queued work went with it
        finally:
            await router.stop()
        assert metric(text, "router_migrations_total", outcome="completed") == 0
        count = metric(text, "router_migration_duration_seconds_count")
        assert count >= 1
        assert metric(text, "router_migration_duration_seconds_sum") / count < 0.3  # cut at 0.1 s
        group = next(g for g in hot["groups"] if g["prefix_tokens"] == len(HOT_PREFIX))
        assert group["holders"] == [holder] and group["added_holders"] == []
        assert hot["params"]["migration_timeout_s"] == 0.1


async def test_admin_shows_a_warmup_as_warmup(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """Warm-up backends and a 1,024-token prefix, which the cost model alone would copy (over its
    144-token threshold): the plan says "warmup" in the 202 answer and in /admin/hot while it runs, and
    copies no bytes."""
    async with EmulatedFleet(2, "tiny", num_gpu_blocks=1024) as emu:
        router = await start_hot(emu, tmp_path)
        try:
            holder = await first_holder(http, router)
            peer = "r1" if holder == "r0" else "r0"
            # The warm-up takes 0.3 s there, long enough to see it in flight (the timeout is 30 s).
            async with http.post(f"{emu.urls[int(peer[1:])]}/kvrouter/faults", json={"latency_s": 0.3}) as r:
                assert r.status == 200
            (group,) = (await hot_view(http, router))["groups"]
            body = {"group": group["group"], "target": peer}
            async with http.post(router.url + "/admin/migrations", json=body, headers=AUTH) as r:
                assert r.status == 202, await r.text()
                plan = await r.json()
            assert (plan["mechanism"], plan["source"], plan["bytes"]) == ("warmup", None, 0)
            assert plan["prefix_tokens"] == len(HOT_PREFIX)
            (in_flight,) = (await hot_view(http, router))["in_flight"]
            assert in_flight == plan
            # The prefix it computes is in the peer's queue meanwhile: routing does not take it for idle.
            assert router.fleet.replicas[peer].inflight_prefill_tokens == len(HOT_PREFIX)
            text = await outcome(http, router, "completed")
            assert metric(text, "router_migration_bytes_total") == 0
            assert router.fleet.replicas[peer].inflight_prefill_tokens == 0
            (done,) = (await hot_view(http, router))["groups"]
            assert sorted(done["holders"]) == ["r0", "r1"]
        finally:
            await router.stop()


async def test_a_reload_retunes_the_running_controller(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    async with EmulatedFleet(2, "tiny") as emu:
        router = await start_hot(emu, tmp_path, cooldown_s=0.4)
        try:
            await first_holder(http, router)
            runner = router.state.migration
            assert runner is not None and runner.controller.params.cooldown_s == 0.4
            (before,) = (await hot_view(http, router))["groups"]
            write_hot_config(tmp_path / "router.yaml", emu, cooldown_s=3.0, migration_timeout_s=7.0)
            await router.reload()
            hot = await hot_view(http, router)
            assert router.state.migration is runner  # the same controller, retuned in place
            assert (hot["params"]["cooldown_s"], hot["params"]["migration_timeout_s"]) == (3.0, 7.0)
            assert hot["params"]["hot_wait_steps"] == HotPrefixParams().hot_wait_steps
            # Each replica's idle step, the thresholds' unit: 150 step tokens at the router's 25K tokens/s.
            assert hot["idle_step_s"] == {"r0": pytest.approx(0.006), "r1": pytest.approx(0.006)}
            (after,) = hot["groups"]
            assert (after["group"], after["holders"]) == (before["group"], before["holders"])  # kept
            # Keys dropped from the file go back to their defaults.
            write_hot_config(tmp_path / "router.yaml", emu)
            await router.reload()
            assert runner.controller.params.cooldown_s == HotPrefixParams().cooldown_s
            # A bad value refuses the reload and the running values stay.
            write_hot_config(tmp_path / "router.yaml", emu, cooldown_s=-1.0)
            with pytest.raises(ConfigError, match="hot_prefix: cooldown_s must be a finite number >= 0"):
                await router.reload()
            assert runner.controller.params.cooldown_s == HotPrefixParams().cooldown_s
        finally:
            await router.stop()


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
