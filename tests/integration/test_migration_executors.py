"""Hot-prefix executors against the emulator: a planned migration makes the target's next request hit,
and the index lists the target only once the executor has confirmed it."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from router.executors import MigrationFailed, P2PExecutor, WarmupExecutor
from router.fleet import Fleet
from router.hot_prefix import HotPrefixController
from router.policies.base import Decision, make_request
from router.policies.kvaware import KvAware
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
