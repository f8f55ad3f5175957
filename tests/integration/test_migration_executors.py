"""Hot-prefix executors: a planned migration makes the target hold the prefix, and the index lists the
target only once the executor has confirmed it.

P2P and warm-up run against the emulator. LMCache's controller and vLLM's NIXL pull need GPUs, so they
run against FAKEs that check the exact requests (fake_lmcache.py, fake_nixl.py).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from fake_lmcache import CPU, FakeLMCacheController
from fake_nixl import FakeNixlTarget
from fake_upstream import eventually, metric

from router.config import BackendConfig, RouterConfig
from router.executors import LMCacheExecutor, MigrationFailed, NixlExecutor, P2PExecutor, WarmupExecutor
from router.fleet import Fleet
from router.hot_prefix import HotPrefixController, HotPrefixParams, MigrationPlan
from router.migration import MigrationRunner
from router.policies.base import Decision, make_request
from router.policies.kvaware import KvAware
from router.proxy import RouterState, build_state
from workers.emulator import EmulatedFleet
from workers.emulator.replica import DEFAULT_MODEL

BS = 16
_ids = itertools.count()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


async def complete(session: aiohttp.ClientSession, url: str, prompt: Any) -> int:
    async with session.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 1}) as r:
        assert r.status == 200, await r.text()
        return int((await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"])


def setup(prompt: Any) -> tuple[Fleet, HotPrefixController, int]:
    fleet = Fleet(KvAware())
    for name in ("a", "b"):
        fleet.add_replica(name)
    c = HotPrefixController()
    for tail in ([1, 2, 3], [4, 5, 6]):
        p = prompt + tail if isinstance(prompt, list) else prompt + f" question {tail[0]}"
        r = make_request(f"r-{next(_ids)}", DEFAULT_MODEL, prompt=p)
        d = Decision("a", 0, "ring")
        fleet.routed(r, d, 0.0)
        c.observe_routed(r, d, 0.0)
    (g,) = c.groups(fleet, 0.0)
    return fleet, c, g.group


async def test_p2p_copy_makes_target_hit(session: aiohttp.ClientSession) -> None:
    prefix = list(range(3000, 3000 + 20 * BS))
    async with EmulatedFleet(2, "tiny") as emu:
        urls = dict(zip(("a", "b"), emu.urls, strict=True))
        await complete(session, urls["a"], [*prefix, 7])
        fleet, c, group = setup(prefix)
        plan = c.plan_manual(group, "b", fleet, 0.0)
        assert plan.mechanism == "copy" and plan.prefix_token_ids == tuple(prefix)
        assert fleet.index.holders(group) == ["a"]
        held = await P2PExecutor(session).execute(plan, urls)
        assert held == 20 * BS
        assert c.completed(plan.plan_id, fleet, 1.0, held)
        assert sorted(fleet.index.holders(group)) == ["a", "b"]
        assert await complete(session, urls["b"], [*prefix, 9, 9]) == 20 * BS


async def test_warmup_by_text_makes_target_hit(session: aiohttp.ClientSession) -> None:
    text = "a long shared system prompt. " * 12  # 348 characters: 5 full 64-character chunks
    async with EmulatedFleet(2, "tiny") as emu:
        urls = dict(zip(("a", "b"), emu.urls, strict=True))
        fleet, c, group = setup(text)
        plan = c.plan_manual(group, "b", fleet, 0.0)
        assert plan.prefix_text == text[:320]
        held = await WarmupExecutor(session, BS).execute(plan, urls)
        assert held == 80  # 320 characters = 80 tokens = 5 blocks
        assert c.completed(plan.plan_id, fleet, 1.0, held)
        assert await complete(session, urls["b"], text + "what now?") == 80
        with pytest.raises(MigrationFailed):
            await WarmupExecutor(session).execute(plan, {"b": "http://127.0.0.1:9"})


# -- LMCache controller /lookup, /move, /check_finish (against FAKE_LMCACHE: it needs GPUs) ------------


INSTANCES = {"a": "inst-a", "b": "inst-b"}
NO_URLS = {"a": "http://127.0.0.1:9", "b": "http://127.0.0.1:9"}  # token-id plans never contact replicas


@pytest.fixture
async def lmcache() -> AsyncIterator[FakeLMCacheController]:
    fake = await FakeLMCacheController().start()
    yield fake
    await fake.stop()


def copy_plan(prefix: list[int]) -> tuple[Fleet, HotPrefixController, MigrationPlan]:
    fleet, c, group = setup(prefix)
    plan = c.plan_manual(group, "b", fleet, 0.0)
    assert plan.mechanism == "copy" and plan.source == "a"
    return fleet, c, plan


async def test_lmcache_copies_whole_chunks_into_the_target_cpu_backend(
    session: aiohttp.ClientSession, lmcache: FakeLMCacheController
) -> None:
    prefix = list(range(7000, 7600))  # the group's prefix: 37 full blocks = 592 tokens
    lmcache.held["inst-a"] = (CPU, prefix)
    fleet, c, plan = copy_plan(prefix)
    assert plan.prefix_token_ids == tuple(prefix[:592])
    held = await LMCacheExecutor(session, lmcache.url, INSTANCES).execute(plan, NO_URLS)
    assert held == 512  # two whole 256-token chunks; the last 80 tokens cannot move
    assert lmcache.errors == []
    assert lmcache.requests == [
        ("/lookup", {"tokens": prefix[:512]}),
        (
            "/move",
            {
                "old_position": ["inst-a", CPU],
                "new_position": ["inst-b", CPU],
                "tokens": prefix[:512],
                "should_copy": True,
            },
        ),
        ("/check_finish", {"event_id": "Move1"}),  # LMCache 0.5.6: 500 {"detail": ""}, /move was synchronous
    ]
    assert lmcache.held["inst-b"] == (CPU, prefix[:512]) and lmcache.held["inst-a"] == (CPU, prefix)
    assert fleet.index.holders(plan.group) == ["a"]
    assert c.completed(plan.plan_id, fleet, 1.0, held)
    assert sorted(fleet.index.holders(plan.group)) == ["a", "b"]


async def test_lmcache_text_prefix_is_tokenized_by_the_target(
    session: aiohttp.ClientSession, lmcache: FakeLMCacheController
) -> None:
    text = "a long shared system prompt. " * 48  # 1,392 characters: 21 chunks of 64 = 1,344
    async with EmulatedFleet(1, "tiny") as emu:
        async with session.post(f"{emu.urls[0]}/tokenize", json={"prompt": text[:1344]}) as r:
            ids = (await r.json())["tokens"]
        assert len(ids) == 336
        lmcache.held["inst-a"] = ("LocalDiskBackend", ids)
        fleet, c, group = setup(text)
        plan = c.plan_manual(group, "b", fleet, 0.0)
        assert plan.prefix_text == text[:1344] and plan.prefix_token_ids is None
        held = await LMCacheExecutor(session, lmcache.url, INSTANCES).execute(plan, {"b": emu.urls[0]})
    assert held == 256 and lmcache.errors == []
    assert lmcache.requests[1][1]["old_position"] == ["inst-a", "LocalDiskBackend"]
    assert lmcache.held["inst-b"] == (CPU, ids[:256])


async def test_lmcache_polls_check_finish_until_completed(
    session: aiohttp.ClientSession, lmcache: FakeLMCacheController
) -> None:
    prefix = list(range(7000, 7600))
    lmcache.held["inst-a"] = (CPU, prefix)
    lmcache.check_finish, lmcache.pending_polls = "polling", 3
    _, _, plan = copy_plan(prefix)
    task = asyncio.create_task(
        LMCacheExecutor(session, lmcache.url, INSTANCES, poll_s=0.01).execute(plan, NO_URLS)
    )
    await eventually(lambda: lmcache.polls >= 1)
    assert not task.done() and "inst-b" not in lmcache.held  # pending: not done, nothing to index yet
    assert await asyncio.wait_for(task, 5) == 512
    assert lmcache.polls == 4 and lmcache.paths().count("/check_finish") == 4
    assert lmcache.held["inst-b"] == (CPU, prefix[:512]) and lmcache.errors == []


def _status(fake: FakeLMCacheController, path: str, status: int, body: object) -> None:
    fake.fail[path] = (status, body)


LMCACHE_FAILURES: dict[str, tuple[Callable[[FakeLMCacheController], None], str]] = {
    "lookup error": (lambda f: _status(f, "/lookup", 500, {"detail": "boom"}), "HTTP 500"),
    "lookup malformed": (lambda f: f.malformed.add("/lookup"), "not JSON"),
    "move error": (
        lambda f: _status(f, "/move", 500, {"detail": "Src worker 0 not registered"}),
        "not registered",
    ),
    "move malformed": (lambda f: f.malformed.add("/move"), "not JSON"),
    "move answer not an object": (lambda f: _status(f, "/move", 200, [1, 2]), "not a JSON object"),
    "check_finish error": (lambda f: _status(f, "/check_finish", 500, {"detail": "lost"}), "HTTP 500"),
    "check_finish malformed": (lambda f: f.malformed.add("/check_finish"), "not JSON"),
    "check_finish failed": (lambda f: setattr(f, "final_status", "failed"), "status 'failed'"),
    "source holds nothing": (lambda f: f.held.pop("inst-a"), "holds none of the prefix on a"),
}


@pytest.mark.parametrize("case", sorted(LMCACHE_FAILURES))
async def test_lmcache_errors_fail_the_migration(
    session: aiohttp.ClientSession, lmcache: FakeLMCacheController, case: str
) -> None:
    prefix = list(range(7000, 7600))
    lmcache.held["inst-a"] = (CPU, prefix)
    lmcache.check_finish = "polling"
    breaks, message = LMCACHE_FAILURES[case]
    breaks(lmcache)
    _, _, plan = copy_plan(prefix)
    with pytest.raises(MigrationFailed, match=message):
        await LMCacheExecutor(session, lmcache.url, INSTANCES, poll_s=0.01).execute(plan, NO_URLS)
    assert lmcache.errors == []


async def test_lmcache_refuses_what_cannot_move(
    session: aiohttp.ClientSession, lmcache: FakeLMCacheController
) -> None:
    short = list(range(7000, 7200))  # 12 blocks = 192 tokens: less than one 256-token chunk
    _, _, plan = copy_plan(short)
    with pytest.raises(MigrationFailed, match="shorter than one LMCache chunk"):
        await LMCacheExecutor(session, lmcache.url, INSTANCES).execute(plan, NO_URLS)
    _, _, plan = copy_plan(list(range(7000, 7600)))
    with pytest.raises(MigrationFailed, match="lmcache_controller_url"):
        await LMCacheExecutor(session, None, INSTANCES).execute(plan, NO_URLS)
    with pytest.raises(MigrationFailed, match="lmcache_instance_id"):
        await LMCacheExecutor(session, lmcache.url, {"a": "inst-a"}).execute(plan, NO_URLS)
    assert lmcache.requests == []


# -- vLLM NIXL pull (remote_kv_source) (against FAKE_NIXL: it needs GPUs and NIXL) ----------------------


SOURCE = ("10.0.0.1", 5710)  # the P2P side channel's default port in vLLM (VLLM_P2P_SIDE_CHANNEL_PORT)


@pytest.fixture
async def nixl_target() -> AsyncIterator[FakeNixlTarget]:
    fake = await FakeNixlTarget(DEFAULT_MODEL).start()
    yield fake
    await fake.stop()


@pytest.mark.parametrize(("source_holds", "held"), [(600, 592), (300, 288)])
async def test_nixl_pull_is_confirmed_by_cached_tokens(
    session: aiohttp.ClientSession, nixl_target: FakeNixlTarget, source_holds: int, held: int
) -> None:
    prefix = list(range(7000, 7600))
    nixl_target.sources[SOURCE] = prefix[:source_holds]
    fleet, c, plan = copy_plan(prefix)
    executor = NixlExecutor(session, {"a": SOURCE}, BS)
    assert await executor.execute(plan, {"b": nixl_target.url}) == held
    assert nixl_target.errors == []
    (body,) = nixl_target.requests
    rid = body["kv_transfer_params"]["remote_kv_source"]["kv_request_id"]
    assert rid.startswith(f"kvrouter-migration-{plan.plan_id}-")
    assert body == {
        "model": DEFAULT_MODEL,
        "prompt": [*prefix[:592], prefix[0]],  # one more token: every full block of the prefix can hit
        "max_tokens": 1,
        "kv_transfer_params": {
            "remote_kv_source": {"kv_request_id": rid, "remote_host": "10.0.0.1", "remote_port": 5710}
        },
    }
    assert nixl_target.held == prefix[:held]
    assert c.completed(plan.plan_id, fleet, 1.0, held) and "b" in fleet.index.holders(plan.group)


NIXL_FAILURES: dict[str, tuple[Callable[[FakeNixlTarget], None], str]] = {
    "error": (lambda f: setattr(f, "fail_status", 500), "HTTP 500"),
    "malformed": (lambda f: setattr(f, "malformed", True), "not JSON"),
    "no prompt details": (lambda f: setattr(f, "details", False), "--enable-prompt-tokens-details"),
    "nothing pulled": (lambda f: f.sources.__setitem__(SOURCE, [1, 2, 3]), "pulled nothing"),
}


@pytest.mark.parametrize("case", sorted(NIXL_FAILURES))
async def test_nixl_errors_fail_the_migration(
    session: aiohttp.ClientSession, nixl_target: FakeNixlTarget, case: str
) -> None:
    prefix = list(range(7000, 7600))
    nixl_target.sources[SOURCE] = prefix
    breaks, message = NIXL_FAILURES[case]
    breaks(nixl_target)
    _, _, plan = copy_plan(prefix)
    with pytest.raises(MigrationFailed, match=message):
        await NixlExecutor(session, {"a": SOURCE}, BS).execute(plan, {"b": nixl_target.url})
    assert nixl_target.errors == []
    with pytest.raises(MigrationFailed, match="nixl_host and nixl_port"):
        await NixlExecutor(session, {}, BS).execute(plan, {"b": nixl_target.url})


# -- the runner (router/migration.py): executor choice, outcomes, timeout, cooldown ----------------------


def dead(port: int) -> str:
    return f"http://127.0.0.1:{port}"  # never contacted: token-id plans to LMCache need no replica


def make_runner(
    *backends: BackendConfig, now: list[float], params: HotPrefixParams | None = None, **config: Any
) -> tuple[MigrationRunner, RouterState]:
    state = build_state(RouterConfig(backends=backends, policy="kvaware", **config))
    params = params or HotPrefixParams(half_life_s=1.0, cooldown_s=1.0)
    runner = MigrationRunner(params, state.fleet, state.replicas, state.metrics, lambda: now[0])
    return runner, state


def make_hot(runner: MigrationRunner, prefix: list[int], now: float) -> int:
    """The group of `prefix` held by "a", which has 2,000 uncached prompt tokens to prefill: a wait of
    (2000 + 150 step tokens) / 25K tokens/s = 86 ms, 14.3 idle steps of 6 ms >= hot_wait_steps 5, while
    "b" is idle (6 ms, 1 step <= headroom_wait_steps 2.5)."""
    fleet = runner.fleet
    for tail in ([1, 2, 3], [4, 5, 6]):
        r = make_request(f"r-{next(_ids)}", DEFAULT_MODEL, prompt=[*prefix, *tail])
        d = Decision("a", r.prompt_tokens, "prefix-hit")
        fleet.routed(r, d, now)
        runner.observe(r, d)
    load = make_request(f"load-{next(_ids)}", DEFAULT_MODEL, prompt=list(range(50_000, 52_000)))
    fleet.routed(load, Decision("a", 0, "load"), now)
    return runner.controller.group_of(make_request("x", DEFAULT_MODEL, prompt=[*prefix, 9]))


async def settle(runner: MigrationRunner) -> None:
    """Wait for the migrations running now; any exception from one would fail here."""
    await asyncio.wait_for(asyncio.gather(*list(runner.tasks)), 5)


def counted(state: RouterState, outcome: str) -> float:
    return metric(state.metrics.render().decode(), "router_migrations_total", outcome=outcome)


LMCACHE_PAIR = (
    BackendConfig("a", dead(9), kv_transfer="lmcache", lmcache_instance_id="inst-a"),
    BackendConfig("b", dead(9), kv_transfer="lmcache", lmcache_instance_id="inst-b"),
)


async def test_runner_picks_the_executor_of_the_backends(session: aiohttp.ClientSession) -> None:
    backends = (
        BackendConfig("p1", dead(1), kv_transfer="p2p"),
        BackendConfig("p2", dead(2), kv_transfer="p2p"),
        BackendConfig("l1", dead(3), kv_transfer="lmcache", lmcache_instance_id="i1"),
        BackendConfig("l2", dead(4), kv_transfer="lmcache", lmcache_instance_id="i2"),
        BackendConfig("n1", dead(5), kv_transfer="nixl", nixl_host="h1", nixl_port=5710),
        BackendConfig("n2", dead(6), kv_transfer="nixl", nixl_host="h2", nixl_port=5710),
        BackendConfig("w", dead(7)),
    )
    runner, _ = make_runner(*backends, now=[0.0], lmcache_controller_url="http://127.0.0.1:9000")
    runner.session = session
    _, _, plan = copy_plan(list(range(7000, 7600)))
    full = plan.prefix_tokens  # 592 tokens: two whole LMCache chunks and a rest
    cases = [
        ("p1", "p2", "copy", full, P2PExecutor),
        ("l1", "l2", "copy", full, LMCacheExecutor),
        ("n1", "n2", "copy", full, NixlExecutor),
        ("n1", "l2", "copy", full, WarmupExecutor),  # different mechanisms cannot copy between them
        ("w", "n2", "copy", full, WarmupExecutor),
        ("l1", "l2", "warmup", full, WarmupExecutor),  # recomputing was planned as the cheaper way
        ("l1", "l2", "copy", 200, WarmupExecutor),  # under one LMCache chunk (256 tokens): nothing would move
        ("n1", "n2", "copy", 200, NixlExecutor),
        (None, "l2", "warmup", full, WarmupExecutor),
    ]
    for source, target, mechanism, tokens, kind in cases:
        changed = replace(plan, source=source, target=target, mechanism=mechanism, prefix_tokens=tokens)
        assert type(runner.executor(changed)) is kind, (source, target, mechanism, tokens)


async def test_runner_lmcache_indexes_the_target_only_after_check_finish(
    session: aiohttp.ClientSession, lmcache: FakeLMCacheController
) -> None:
    prefix = list(range(7000, 7600))
    lmcache.held["inst-a"] = (CPU, prefix)
    lmcache.check_finish, lmcache.pending_polls = "polling", 4
    now = [0.0]
    runner, state = make_runner(*LMCACHE_PAIR, now=now, lmcache_controller_url=lmcache.url)
    runner.session = session
    group = make_hot(runner, prefix, 0.0)
    runner.tick()  # the detector fires: a copy from a to b
    (plan,) = runner.controller.in_flight
    assert (plan.source, plan.target, plan.mechanism) == ("a", "b", "copy")
    await eventually(lambda: lmcache.polls >= 2)
    assert state.fleet.index.holders(group) == ["a"]  # the copy is not finished: b is not a holder yet
    assert (counted(state, "started"), counted(state, "completed")) == (1, 0)
    await settle(runner)
    assert sorted(state.fleet.index.holders(group)) == ["a", "b"]
    assert (counted(state, "completed"), counted(state, "failed")) == (1, 0)
    assert metric(state.metrics.render().decode(), "router_migration_bytes_total") > 0
    assert lmcache.errors == [] and lmcache.polls == 5


async def test_runner_nixl_pull_completes(
    session: aiohttp.ClientSession, nixl_target: FakeNixlTarget
) -> None:
    prefix = list(range(7000, 7600))
    nixl_target.sources[("10.0.0.1", 5710)] = prefix
    backends = (
        BackendConfig("a", dead(9), kv_transfer="nixl", nixl_host="10.0.0.1", nixl_port=5710),
        BackendConfig("b", nixl_target.url, kv_transfer="nixl", nixl_host="10.0.0.2", nixl_port=5710),
    )
    runner, state = make_runner(*backends, now=[0.0])
    runner.session = session
    group = make_hot(runner, prefix, 0.0)
    runner.tick()
    await settle(runner)
    assert nixl_target.errors == [] and len(nixl_target.requests) == 1
    assert sorted(state.fleet.index.holders(group)) == ["a", "b"]
    assert counted(state, "completed") == 1


async def test_runner_failure_is_counted_and_the_group_waits_out_its_cooldown(
    session: aiohttp.ClientSession, lmcache: FakeLMCacheController, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = list(range(7000, 7600))
    lmcache.held["inst-a"] = (CPU, prefix)
    lmcache.fail["/move"] = (500, {"detail": "Src worker 0 not registered for instance inst-a"})
    now = [0.0]
    runner, state = make_runner(*LMCACHE_PAIR, now=now, lmcache_controller_url=lmcache.url)
    runner.session = session
    group = make_hot(runner, prefix, 0.0)
    runner.tick()
    await settle(runner)  # no exception leaves the migration's task
    assert (counted(state, "started"), counted(state, "failed"), counted(state, "completed")) == (1, 1, 0)
    assert state.fleet.index.holders(group) == ["a"]
    assert "not registered" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # an expected failure, not a crash
    now[0] = 0.5
    runner.tick()  # still hot, but within cooldown_s (1 s) of the failed plan
    assert counted(state, "started") == 1 and runner.controller.in_flight == []
    now[0] = 1.1
    runner.tick()  # the tick loop goes on: after the cooldown the group is planned again
    assert counted(state, "started") == 2
    await settle(runner)
    assert counted(state, "failed") == 2


async def test_runner_timeout_is_a_bounded_failure(
    session: aiohttp.ClientSession, lmcache: FakeLMCacheController
) -> None:
    prefix = list(range(7000, 7600))
    lmcache.held["inst-a"] = (CPU, prefix)
    lmcache.hang.add("/move")  # the controller accepts the move and never answers
    params = HotPrefixParams(half_life_s=1.0, migration_timeout_s=0.3)
    runner, state = make_runner(*LMCACHE_PAIR, now=[0.0], params=params, lmcache_controller_url=lmcache.url)
    runner.session = session
    group = make_hot(runner, prefix, 0.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    runner.tick()
    await settle(runner)
    assert 0.3 <= loop.time() - started < 2.0
    assert lmcache.paths() == ["/lookup", "/move"]
    assert (counted(state, "failed"), counted(state, "completed")) == (1, 0)
    assert state.fleet.index.holders(group) == ["a"] and runner.controller.in_flight == []
