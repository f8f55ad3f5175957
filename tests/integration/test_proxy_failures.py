"""Failure handling: retries before the first byte, SSE errors after it, timeouts, breakers, aborts."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from fake_upstream import FakeFactory, RouterFactory, completion, dead_url, eventually, metric, post, scrape

from router.forward import REPLICA_HEADER


async def test_connection_refused_is_retried_on_another_replica(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    dead = await fakes("dead")
    good = await fakes("good")
    # round_robin alternates, so half the first attempts go to the dead replica; the breaker is set
    # high so it stays in rotation and every one of those must be retried.
    router = await routers(dead, good, policy="round_robin", breaker_failures=1000)
    await dead.stop()  # from now on its port refuses connections
    for i in range(4):
        status, headers, _ = await post(http, router.url + "/v1/completions", completion(f"p{i}"))
        assert status == 200 and headers[REPLICA_HEADER] == "good"
    text = await scrape(http, router.url)
    assert metric(text, "router_upstream_retries_total", reason="connect_error") >= 1


async def test_5xx_before_any_byte_is_retried_then_passed_through(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    bad = await fakes("bad", fail_status=500)
    good = await fakes("good")
    router = await routers(bad, good, policy="round_robin", breaker_failures=100)
    for i in range(4):
        status, headers, _ = await post(http, router.url + "/v1/completions", completion(f"q{i}"))
        assert status == 200 and headers[REPLICA_HEADER] == "good"
    assert len(bad.generation_requests) >= 1
    # When every replica fails, the last replica's own 5xx answer reaches the client unchanged.
    good.fail_status = 503
    status, headers, body = await post(http, router.url + "/v1/completions", completion("x"))
    assert status in (500, 503) and json.loads(body)["message"] == "fake failure"
    assert headers[REPLICA_HEADER] in ("bad", "good")
    text = await scrape(http, router.url)
    assert metric(text, "router_upstream_retries_total", reason="upstream_5xx") >= 2


async def test_retries_are_bounded(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    broken = [await fakes(f"b{i}", fail_status=502) for i in range(4)]
    router = await routers(*broken, max_retries=1, breaker_failures=100)
    status, _, _ = await post(http, router.url + "/v1/completions", completion())
    assert status == 502
    assert sum(len(f.generation_requests) for f in broken) == 2  # the first try and one retry


async def test_all_replicas_unreachable_is_a_502_json_error(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    d1, d2 = await fakes("d1"), await fakes("d2")
    router = await routers(d1, d2, breaker_failures=1000)
    await d1.stop()
    await d2.stop()
    status, _, body = await post(http, router.url + "/v1/completions", completion())
    assert status == 502
    assert json.loads(body)["error"]["code"] == "upstream_unavailable"


async def test_stream_cut_after_first_byte_ends_with_sse_error_not_a_hang(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    cut = await fakes("cut", cut_after=2, stream_tokens=6)
    other = await fakes("other")
    router = await routers(cut, other, policy="round_robin", breaker_failures=100)
    async with http.post(
        router.url + "/v1/completions", json=completion("cut me", stream=True, max_tokens=6)
    ) as r:
        assert r.status == 200 and r.headers[REPLICA_HEADER] == "cut"
        body = await asyncio.wait_for(r.read(), timeout=5)
    events = [e for e in body.split(b"\n\n") if e]
    assert events[0].startswith(b'data: {"id"') and b"tok1" in events[1]
    error = json.loads(events[-2].removeprefix(b"data: "))
    assert error["error"]["code"] == "upstream_stream_interrupted"
    assert events[-1] == b"data: [DONE]"
    assert other.generation_requests == []  # bytes were sent: never retried elsewhere
    text = await scrape(http, router.url)
    assert metric(text, "router_stream_interruptions_total") == 1


async def test_no_first_byte_within_the_timeout_is_a_504(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    fake = await fakes("slow", hang=True)
    router = await routers(fake, upstream_timeout_s=0.3, breaker_failures=100)
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, _, body = await post(http, router.url + "/v1/completions", completion())
    assert status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
    assert loop.time() - started < 3
    await eventually(lambda: fake.aborted == 1)  # the router closed the connection: the replica aborts


async def test_a_stream_that_stalls_ends_with_an_sse_timeout_error(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    fake = await fakes("stall", stall_after=1, stream_tokens=4)
    router = await routers(fake, upstream_timeout_s=0.3, breaker_failures=100)
    async with http.post(router.url + "/v1/completions", json=completion(stream=True)) as r:
        body = await asyncio.wait_for(r.read(), timeout=5)
    assert r.status == 200 and b"tok0" in body
    assert b'"code":"upstream_timeout"' in body and body.endswith(b"data: [DONE]\n\n")


async def test_client_disconnect_cancels_the_upstream_request(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()  # never set: the replica streams one chunk, then waits
    fake = await fakes("a", gate=gate)
    router = await routers(fake)
    resp = await http.post(router.url + "/v1/completions", json=completion(stream=True))
    assert resp.status == 200
    await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=5)
    resp.close()  # the client goes away mid-stream
    await eventually(lambda: fake.aborted == 1)
    await eventually(lambda: router.fleet.inflight_count() == 0)
    text = await scrape(http, router.url)
    assert metric(text, "router_client_disconnects_total") == 1
    assert metric(text, "router_requests_total", route="/v1/completions", code="499") == 1


async def test_breaker_ejects_after_consecutive_failures_and_probes_back(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    flaky = await fakes("flaky", fail_status=500)
    good = await fakes("good")
    router = await routers(flaky, good, policy="round_robin", breaker_failures=2, breaker_cooldown_s=0.3)
    for i in range(4):
        status, _, _ = await post(http, router.url + "/v1/completions", completion(f"e{i}"))
        assert status == 200
    assert not router.fleet.replicas["flaky"].healthy
    text = await scrape(http, router.url)
    assert metric(text, "router_replica_ejections_total", replica="flaky") == 1
    assert metric(text, "router_replica_healthy", replica="flaky") == 0
    sent = len(flaky.generation_requests)
    for i in range(2):  # while ejected, no request goes there
        await post(http, router.url + "/v1/completions", completion(f"f{i}"))
    assert len(flaky.generation_requests) == sent
    flaky.fail_status = None  # it heals; after the cool-down a /health probe brings it back
    await eventually(lambda: router.fleet.replicas["flaky"].healthy)


async def test_replica_down_at_startup_is_ejected_and_no_healthy_replica_is_503(
    routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    router = await routers(("down", dead_url()))
    assert not router.fleet.replicas["down"].healthy
    status, headers, body = await post(http, router.url + "/v1/completions", completion())
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert json.loads(body)["error"]["code"] == "no_healthy_replica"
    async with http.get(router.url + "/ready") as resp:
        assert resp.status == 503 and "Retry-After" in resp.headers
    async with http.get(router.url + "/health") as resp:
        assert resp.status == 200


async def test_stop_lets_a_stream_in_flight_finish(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()
    fake = await fakes("a", gate=gate)
    router = await routers(fake, shutdown_timeout_s=5.0)
    resp = await http.post(router.url + "/v1/completions", json=completion(stream=True))
    await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=5)
    stopping = asyncio.create_task(router.stop())  # graceful: stops listening, waits for the stream
    await asyncio.sleep(0.05)
    assert not stopping.done()
    gate.set()
    rest = await asyncio.wait_for(resp.content.read(), timeout=5)
    assert rest.endswith(b"data: [DONE]\n\n")
    await asyncio.wait_for(stopping, timeout=5)
    resp.release()
