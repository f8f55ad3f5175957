"""The proxy passes replicas' answers through unchanged: streams chunk by chunk, bodies byte for byte."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from fake_upstream import FakeFactory, RouterFactory, chat, completion, post

from router.forward import REPLICA_HEADER


async def test_non_streaming_body_is_passed_through_byte_for_byte(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    fake = await fakes("a")
    router = await routers(fake)
    for path, body in (
        ("/v1/completions", completion("the same prompt")),
        ("/v1/chat/completions", chat("hi")),
    ):
        direct_status, _, direct = await post(http, fake.url + path, body)
        status, headers, proxied = await post(http, router.url + path, body)
        assert (status, proxied) == (direct_status, direct) == (200, direct)
        assert headers[REPLICA_HEADER] == "a"
        assert headers["Content-Type"].startswith("application/json")
        assert headers["Content-Length"] == str(len(direct))


async def test_stream_is_passed_through_byte_for_byte(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    fake = await fakes("a", stream_tokens=6)
    router = await routers(fake)
    body = chat("stream me", stream=True, max_tokens=6, stream_options={"include_usage": True})
    _, _, direct = await post(http, fake.url + "/v1/chat/completions", body)
    status, headers, proxied = await post(http, router.url + "/v1/chat/completions", body)
    assert status == 200 and proxied == direct
    assert proxied.endswith(b"data: [DONE]\n\n") and proxied.count(b"data: ") == 8
    assert headers["Content-Type"] == "text/event-stream"
    assert headers[REPLICA_HEADER] == "a"


async def test_stream_chunks_reach_the_client_before_the_replica_finishes(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()
    fake = await fakes("a", gate=gate)  # sends its first chunk, then waits for the gate
    router = await routers(fake)
    body = completion("not buffered", stream=True)
    async with http.post(router.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=5)
        assert b'"tok0 "' in first and not gate.is_set() and fake.completed == 0
        gate.set()
        rest = await asyncio.wait_for(resp.content.read(), timeout=5)
    assert rest.endswith(b"data: [DONE]\n\n") and fake.completed == 1


async def test_headers_hop_by_hop_stripped_authorization_kept(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    fake = await fakes("a")
    router = await routers(fake)
    sent = {
        "Authorization": "Bearer client-key",
        "X-Custom": "kept",
        "Connection": "keep-alive, X-Per-Hop",
        "X-Per-Hop": "dropped because Connection names it",
        "Proxy-Authorization": "Basic secret",
        "TE": "trailers",
        "Keep-Alive": "timeout=5",
    }
    status, headers, _ = await post(http, router.url + "/v1/completions", completion(), sent)
    assert status == 200
    got = fake.generation_requests[-1].headers
    assert got["Authorization"] == "Bearer client-key" and got["X-Custom"] == "kept"
    for name in ("X-Per-Hop", "Proxy-Authorization", "TE", "Keep-Alive"):
        assert name not in got, name
    assert got["Host"] == f"127.0.0.1:{fake.port}"
    assert headers["X-Upstream-Extra"] == "1" and "Proxy-Authenticate" not in headers


async def test_replica_header_can_be_turned_off(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    fake = await fakes("a")
    router = await routers(fake, replica_header=False)
    status, headers, _ = await post(http, router.url + "/v1/completions", completion())
    assert status == 200 and REPLICA_HEADER not in headers


async def test_models_health_ready(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    a = await fakes("a", models=("m1",))
    b = await fakes("b", models=("m2", "m1"))
    router = await routers(a, b)
    async with http.get(router.url + "/v1/models") as resp:
        models = await resp.json()
    assert resp.status == 200 and models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["m1", "m2"]
    assert models["data"][0]["owned_by"] == "fake"  # the replica's own object, passed on
    for path in ("/health", "/ready"):
        async with http.get(router.url + path) as resp:
            assert resp.status == 200, path
            assert json.loads(await resp.read())["status"] in ("ok", "ready")
