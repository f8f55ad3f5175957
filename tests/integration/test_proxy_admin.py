"""The admin API: absent without a token, 401 with a wrong one, and changing the fleet with the right one."""

from __future__ import annotations

import json

import aiohttp
from fake_upstream import FakeFactory, RouterFactory, completion, post

from router.forward import REPLICA_HEADER

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_without_a_token_the_admin_api_does_not_exist(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    router = await routers(await fakes("a"))
    for method, path in (
        ("GET", "/admin/replicas"),
        ("GET", "/admin/index"),
        ("DELETE", "/admin/replicas/a"),
    ):
        async with http.request(method, router.url + path, headers=AUTH) as resp:
            assert resp.status == 404, path
            assert "error" in await resp.json()
    assert "a" in router.fleet.replicas


async def test_a_wrong_or_missing_token_is_401(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    router = await routers(await fakes("a"), admin_token=TOKEN)
    for headers in (
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer é"},
    ):
        async with http.get(router.url + "/admin/replicas", headers=headers) as resp:
            assert resp.status == 401, headers
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await resp.json())["error"]["type"] == "authentication_error"
    async with http.delete(router.url + "/admin/replicas/a", headers={"Authorization": "Bearer x"}) as resp:
        assert resp.status == 401
    assert "a" in router.fleet.replicas


async def test_admin_lists_adds_drains_and_deletes_replicas(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    a = await fakes("a")
    router = await routers(a, admin_token=TOKEN, policy="round_robin")
    base = router.url + "/admin/replicas"
    async with http.get(base, headers=AUTH) as resp:
        listed = (await resp.json())["replicas"]
    assert resp.status == 200 and [r["name"] for r in listed] == ["a"]
    assert listed[0]["healthy"] and listed[0]["breaker"]["state"] == "closed"
    assert listed[0]["load"]["inflight_requests"] == 0 and listed[0]["models"] == ["fake-model"]

    b = await fakes("b")
    async with http.post(base, json={"name": "b", "url": b.url}, headers=AUTH) as resp:
        assert resp.status == 201 and (await resp.json())["name"] == "b"
    async with http.post(base, json={"name": "b", "url": b.url}, headers=AUTH) as resp:
        assert resp.status == 409
    for bad in ({"name": "c"}, {"name": "c", "url": "ftp://x"}, {"name": "c", "url": b.url, "extra": 1}, [1]):
        async with http.post(base, json=bad, headers=AUTH) as resp:
            assert resp.status == 400, bad
    async with http.post(base, data=b"{nope", headers={**AUTH, "Content-Type": "application/json"}) as resp:
        assert resp.status == 400
    seen = set()
    for i in range(4):
        _, headers, _ = await post(http, router.url + "/v1/completions", completion(f"r{i}"))
        seen.add(headers[REPLICA_HEADER])
    assert seen == {"a", "b"}

    async with http.post(f"{base}/a/drain", headers=AUTH) as resp:
        assert resp.status == 200 and (await resp.json())["draining"] is True
    for i in range(3):
        _, headers, _ = await post(http, router.url + "/v1/completions", completion(f"d{i}"))
        assert headers[REPLICA_HEADER] == "b"
    async with http.post(f"{base}/a/drain", json={"draining": False}, headers=AUTH) as resp:
        assert resp.status == 200 and (await resp.json())["draining"] is False
    async with http.post(f"{base}/a/drain", json={"draining": "no"}, headers=AUTH) as resp:
        assert resp.status == 400

    async with http.get(router.url + "/admin/index", headers=AUTH) as resp:
        stats = await resp.json()
    assert resp.status == 200 and stats["entries"] >= 0 and set(stats["per_replica"]) == {"a", "b"}

    async with http.delete(f"{base}/b", headers=AUTH) as resp:
        assert resp.status == 200 and json.loads(await resp.read()) == {"deleted": "b"}
    async with http.delete(f"{base}/b", headers=AUTH) as resp:
        assert resp.status == 404
    assert set(router.fleet.replicas) == {"a"} and "b" not in router.fleet.index.stats().per_replica


async def test_admin_requests_are_counted_by_route_pattern(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    router = await routers(await fakes("a"), admin_token=TOKEN)
    async with http.delete(router.url + "/admin/replicas/zz", headers=AUTH) as resp:
        assert resp.status == 404
    async with http.get(router.url + "/admin/replicas", headers={"Authorization": "Bearer no"}) as resp:
        assert resp.status == 401
    text = router.metrics.render().decode()
    assert 'router_requests_total{code="404",route="/admin/replicas/{name}"} 1.0' in text
    assert 'router_requests_total{code="401",route="/admin/replicas"} 1.0' in text
