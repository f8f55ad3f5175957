"""Injected faults of an emulated replica: latency, errors, hangs, refused connections, crashes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import zmq
import zmq.asyncio

from router.index.kv_events import decode_seq, encode_seq
from workers.emulator import EmulatedFleet, Faults
from workers.emulator.faults import parse_fault_spec

PROMPT = {"prompt": "fault injection " * 8, "max_tokens": 2}


@pytest.fixture
async def fleet() -> AsyncIterator[EmulatedFleet]:
    async with EmulatedFleet(1, "tiny", kv_events=True) as f:
        yield f


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


async def set_faults(session: aiohttp.ClientSession, url: str, **faults: object) -> dict[str, object]:
    async with session.post(f"{url}/kvrouter/faults", json=faults) as r:
        assert r.status == 200, await r.text()
        body: dict[str, object] = await r.json()
    async with session.get(f"{url}/kvrouter/faults") as r:
        assert await r.json() == body
    return body


async def test_faults_endpoint_replaces_the_set_and_rejects_bad_values(
    fleet: EmulatedFleet, session: aiohttp.ClientSession
) -> None:
    url = fleet.urls[0]
    assert await set_faults(session, url, latency_s=0.01, error_rate=0.5) == {
        "latency_s": 0.01,
        "error_rate": 0.5,
        "hang": False,
        "refuse": False,
        "crash": False,
        "drop_events": 0,
    }
    assert (await set_faults(session, url))["error_rate"] == 0.0  # POST {} clears
    bads = ({"error_rate": 2}, {"latency_s": -1}, {"hang": "yes"}, {"nope": 1}, [1], {"drop_events": -1})
    for bad in (*bads, {"drop_events": 1.5}, {"drop_events": True}):
        async with session.post(f"{url}/kvrouter/faults", json=bad) as r:
            assert r.status == 400
            assert (await r.json())["type"] == "BadRequestError"


async def test_latency_delays_the_first_byte(fleet: EmulatedFleet, session: aiohttp.ClientSession) -> None:
    url = fleet.urls[0]
    await set_faults(session, url, latency_s=0.3)
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with session.post(f"{url}/v1/completions", json=PROMPT) as r:
        assert r.status == 200
    assert loop.time() - start >= 0.3
    await set_faults(session, url)
    start = loop.time()
    async with session.post(f"{url}/v1/completions", json=PROMPT) as r:
        assert r.status == 200
    assert loop.time() - start < 0.3


async def test_error_rate_answers_vllm_like_500s_from_a_seeded_rng(session: aiohttp.ClientSession) -> None:
    outcomes = []
    for _ in range(2):  # the same seed gives the same sequence of failures
        async with EmulatedFleet(1, "tiny", faults=Faults(error_rate=0.5), seed=7) as fleet:
            statuses = []
            for _ in range(20):
                async with session.post(f"{fleet.urls[0]}/v1/completions", json=PROMPT) as r:
                    statuses.append(r.status)
                    if r.status == 500:
                        body = await r.json()
                        assert body["object"] == "error" and body["type"] == "InternalServerError"
                        assert body["code"] == 500 and body["param"] is None
            async with session.get(f"{fleet.urls[0]}/health") as r:
                assert r.status == 200  # only generation requests fail
            outcomes.append(statuses)
    assert outcomes[0] == outcomes[1]
    assert 0 < outcomes[0].count(500) < 20


async def test_hang_holds_requests_until_cleared(
    fleet: EmulatedFleet, session: aiohttp.ClientSession
) -> None:
    url = fleet.urls[0]
    await set_faults(session, url, hang=True)
    with pytest.raises(asyncio.TimeoutError):
        async with session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=0.3)):
            pass
    pending = asyncio.create_task(session.post(f"{url}/v1/completions", json=PROMPT))
    await asyncio.sleep(0.2)
    assert not pending.done()
    await set_faults(session, url)  # the control endpoint is never faulted
    async with await asyncio.wait_for(pending, 10) as r:
        assert r.status == 200
        assert (await r.json())["usage"]["completion_tokens"] == 2
    assert fleet.replicas[0].driver.num_streams == 0


async def test_refuse_closes_the_listener_and_reopens_it(fleet: EmulatedFleet) -> None:
    url = fleet.urls[0]
    await fleet.replicas[0].set_faults(Faults(refuse=True))
    async with aiohttp.ClientSession() as fresh:
        with pytest.raises(aiohttp.ClientConnectorError):
            await fresh.get(f"{url}/health")
    await fleet.replicas[0].set_faults(Faults())
    assert fleet.urls[0] == url  # the same port again
    async with aiohttp.ClientSession() as fresh, fresh.get(f"{url}/health") as r:
        assert r.status == 200


async def test_crash_drops_streams_then_restarts_fresh(
    fleet: EmulatedFleet, session: aiohttp.ClientSession
) -> None:
    url = fleet.urls[0]
    replica = fleet.replicas[0]
    async with session.post(f"{url}/v1/completions", json=PROMPT) as r:
        assert r.status == 200
    publisher = replica.publisher
    assert publisher is not None and publisher.next_seq > 0
    body = {"prompt": "a long answer " * 10, "max_tokens": 1500, "stream": True}
    resp = await session.post(f"{url}/v1/completions", json=body)
    assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")
    await set_faults(session, url, crash=True)
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.content.read()  # dropped mid-way: no [DONE], no proper end
    resp.close()
    async with session.get(f"{url}/health") as r:
        assert r.status == 503
    async with session.post(f"{url}/v1/completions", json=PROMPT) as r:
        assert r.status == 500 and (await r.json())["type"] == "EngineDeadError"
    assert replica.engine.metrics().num_requests_running == 0
    await set_faults(session, url)
    async with session.get(f"{url}/health") as r:
        assert r.status == 200
    assert publisher.next_seq == 0  # a restarted publisher counts from 0 again
    async with session.post(f"{url}/v1/completions", json=PROMPT) as r:
        assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # the cache is gone


async def test_faults_from_the_constructor_apply_per_replica(session: aiohttp.ClientSession) -> None:
    async with EmulatedFleet(2, "tiny", faults={1: Faults(crash=True)}) as fleet:
        statuses = []
        for url in fleet.urls:
            async with session.get(f"{url}/health") as r:
                statuses.append(r.status)
        assert statuses == [200, 503]


@pytest.mark.parametrize(
    ("spec", "index", "faults"),
    [
        ("latency_s=0.2", None, Faults(latency_s=0.2)),
        ("1:error_rate=0.1,hang=1", 1, Faults(error_rate=0.1, hang=True)),
        ("refuse=true, crash=0", None, Faults(refuse=True)),
        ("0:drop_events=3", 0, Faults(drop_events=3)),
    ],
)
def test_fault_specs_parse(spec: str, index: int | None, faults: Faults) -> None:
    assert parse_fault_spec(spec) == (index, faults)


@pytest.mark.parametrize(
    "spec", ["latency_s", "latency_s=abc", "bogus=1", "error_rate=3", "drop_events=1.5", "drop_events=-1"]
)
def test_bad_fault_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_fault_spec(spec)


async def test_drop_events_withholds_batches_from_the_pub_socket_but_keeps_them_for_replay(
    fleet: EmulatedFleet, session: aiohttp.ClientSession
) -> None:
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    dealer = ctx.socket(zmq.DEALER)
    url = fleet.urls[0]

    async def complete(i: int) -> None:
        async with session.post(f"{url}/v1/completions", json={"prompt": f"{i} " * 40, "max_tokens": 1}) as r:
            assert r.status == 200

    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(fleet.event_endpoints[0])
        seen = -1
        for i in range(50):  # ZMQ's slow joiner: a SUB sees only what is sent once it has joined
            await complete(i)
            if await sub.poll(timeout=100):
                seen = decode_seq((await sub.recv_multipart())[1])
                break
        assert seen >= 0
        await set_faults(session, url, drop_events=1)
        await complete(100)  # batch seen + 1: withheld
        await complete(101)
        frames = await asyncio.wait_for(sub.recv_multipart(), 5)
        assert decode_seq(frames[1]) == seen + 2
        dealer.connect(fleet.replay_endpoints[0])
        await dealer.send_multipart((b"", encode_seq(seen + 1)))
        replayed = [decode_seq((await asyncio.wait_for(dealer.recv_multipart(), 5))[2]) for _ in range(3)]
        assert replayed == [seen + 1, seen + 2, -1]  # both batches, then the end marker
    finally:
        sub.close(linger=0)
        dealer.close(linger=0)
        ctx.destroy(linger=0)


async def test_a_failing_engine_step_marks_the_replica_dead_until_restarted(
    fleet: EmulatedFleet, session: aiohttp.ClientSession
) -> None:
    url = fleet.urls[0]
    replica = fleet.replicas[0]

    def broken_step(now: float) -> None:
        raise RuntimeError("a bug in the engine model")

    replica.engine.step = broken_step  # type: ignore[method-assign,assignment]
    with pytest.raises(aiohttp.ServerDisconnectedError):  # the in-flight request is dropped
        await session.post(f"{url}/v1/completions", json=PROMPT)
    async with session.get(f"{url}/health") as r:
        assert r.status == 503
    await set_faults(session, url, crash=True)
    await set_faults(session, url)  # a restart brings a fresh engine and a running driver
    async with session.post(f"{url}/v1/completions", json=PROMPT) as r:
        assert r.status == 200
