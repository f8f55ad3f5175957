"""Routing through the live proxy: prefix affinity, multi-model fleets, sessions, and the core's lifecycle."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from fake_upstream import FakeFactory, RouterFactory, chat, completion, post

from router.forward import REPLICA_HEADER

SHARED = "You are a helpful assistant for a shipping company. " * 30  # ~1.5K characters, ~24 chunks


@pytest.mark.parametrize("policy", ["kvaware", "dynamo", "sglang"])
async def test_a_repeated_prefix_goes_to_the_replica_that_got_it_first(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession, policy: str
) -> None:
    replicas = [await fakes(name) for name in ("a", "b", "c")]
    router = await routers(*replicas, policy=policy)
    chosen = []
    for i in range(6):
        status, headers, _ = await post(
            http, router.url + "/v1/completions", completion(SHARED + f"question {i}?")
        )
        assert status == 200
        chosen.append(headers[REPLICA_HEADER])
    assert len(set(chosen)) == 1, chosen
    holder = chosen[0]
    assert router.fleet.index.stats().per_replica[holder] > 0


@pytest.mark.parametrize(("stall_wait", "moves"), [(True, True), (False, False)])
async def test_a_holder_that_stops_answering_stops_drawing_its_group(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession, stall_wait: bool, moves: bool
) -> None:
    """The holder of a prefix stops producing first tokens (as a replica with a full KV cache does):
    once the wait is past what its queue should take by more than recomputing the prefix costs, the
    group goes to the other replica — long before the health probes (every 2 s) or the request's
    timeout could notice. Without the overdue time (stall_wait=false) the holder's queue is credited
    as done by the clock and it keeps drawing the group."""
    a, b = await fakes("a"), await fakes("b")
    router = await routers(
        a,
        b,
        policy=f"kvaware:stall_wait={str(stall_wait).lower()}",
        breaker_failures=100,
        upstream_timeout_s=1.0,
    )
    status, headers, _ = await post(http, router.url + "/v1/completions", completion(SHARED + "first?"))
    assert status == 200
    holder = headers[REPLICA_HEADER]
    stuck = {"a": a, "b": b}[holder]
    stuck.hang = True
    loop = asyncio.get_running_loop()

    async def send(question: str) -> asyncio.Future[tuple[int, dict[str, str], bytes]]:
        """Send in the background; return once the router has routed it."""
        before = router.fleet.inflight_count()
        body = completion(SHARED + question)
        sent = asyncio.ensure_future(post(http, router.url + "/v1/completions", body))
        deadline = loop.time() + 5
        while router.fleet.inflight_count() == before and not sent.done():
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        return sent

    second = await send("second?")
    assert router.fleet.replicas[holder].prefill_requests == 1  # the holder took it, and sends nothing
    await asyncio.sleep(0.3)  # past due by far more than the prefix's prefill time (~15 ms)
    third = await send("third?")
    went_to_holder = router.fleet.replicas[holder].prefill_requests == 2
    assert went_to_holder != moves
    # The stuck replica never answers: what it took ends at the router's first-byte timeout.
    (status2, _, _), (status3, headers3, _) = await asyncio.gather(second, third)
    assert status2 == 504
    if not went_to_holder:
        assert status3 == 200 and headers3[REPLICA_HEADER] == ({"a", "b"} - {holder}).pop()


async def test_chat_conversations_stick_to_their_replica(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    replicas = [await fakes(name) for name in ("a", "b", "c")]
    router = await routers(*replicas)
    history = [{"role": "system", "content": SHARED}]
    chosen = set()
    for turn in range(4):
        history.append({"role": "user", "content": f"turn {turn}"})
        body = {"model": "fake-model", "messages": history, "max_tokens": 4}
        status, headers, _ = await post(http, router.url + "/v1/chat/completions", body)
        assert status == 200
        chosen.add(headers[REPLICA_HEADER])
        history.append({"role": "assistant", "content": "tok tok tok tok"})
    assert len(chosen) == 1


async def test_only_replicas_serving_the_model_are_candidates(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    # No models in the configuration: the router learns them from each replica's /v1/models.
    a = await fakes("a", models=("llama",))
    b = await fakes("b", models=("qwen",))
    router = await routers(a, b, policy="round_robin")
    assert router.fleet.replicas["a"].models == frozenset({"llama"})
    for i in range(4):
        for model, replica in (("llama", "a"), ("qwen", "b")):
            status, headers, _ = await post(
                http, router.url + "/v1/completions", completion(f"{i}", model=model)
            )
            assert status == 200 and headers[REPLICA_HEADER] == replica
    async with http.get(router.url + "/v1/models") as resp:
        assert [m["id"] for m in (await resp.json())["data"]] == ["llama", "qwen"]


async def test_lifecycle_reaches_the_fleet_and_load_is_scraped(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    fake = await fakes("a", waiting=3)
    router = await routers(fake)
    for body in (completion("one"), chat("two", stream=True), completion([1, 2, 3] * 20)):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        status, _, _ = await post(http, router.url + path, body)
        assert status == 200
    assert router.fleet.inflight_count() == 0
    state = router.fleet.replicas["a"]
    assert state.inflight_requests == 0 and state.inflight_prefill_tokens == 0
    await router.state.upstream.scrape_round()  # type: ignore[union-attr]
    assert state.num_requests_waiting == 3 and state.kv_cache_usage_perc == 0.25
    assert state.kv_capacity_tokens == 4096 * 16 and state.block_size == 16
