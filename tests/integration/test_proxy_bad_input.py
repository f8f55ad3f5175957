"""Bad input and overload: every refusal is an OpenAI-style JSON error with the right status, never a 500."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from fake_upstream import (
    TEST_DEFAULTS,
    FakeFactory,
    FakeReplica,
    RouterFactory,
    backend_of,
    completion,
    eventually,
    post,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.config import RouterConfig
from router.server import RouterServer


def assert_openai_error(status: int, body: bytes, expected_status: int, param: str | None = None) -> None:
    assert status == expected_status, body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", b"{not json", None),
        ("/v1/completions", b"\xff\xfe\x00garbage", None),
        ("/v1/completions", b"[1, 2]", None),
        ("/v1/completions", b"[" * 100_000, None),
        ("/v1/completions", {"prompt": "x"}, "model"),
        ("/v1/completions", {"model": 7, "prompt": "x"}, "model"),
        ("/v1/completions", {"model": "fake-model"}, "prompt"),
        ("/v1/completions", {"model": "fake-model", "prompt": {"a": 1}}, "prompt"),
        ("/v1/completions", {"model": "fake-model", "prompt": []}, "prompt"),
        ("/v1/completions", {"model": "fake-model", "prompt": [1, True]}, "prompt"),
        ("/v1/completions", {"model": "fake-model", "prompt": [1, "a"]}, "prompt"),
        ("/v1/completions", {"model": "fake-model", "prompt": [-1]}, "prompt"),
        ("/v1/completions", {"model": "fake-model", "prompt": [2**32]}, "prompt"),
        ("/v1/completions", {"model": "fake-model", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": "fake-model", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ("/v1/completions", {"model": "fake-model", "prompt": "x", "max_tokens": True}, "max_tokens"),
        ("/v1/completions", {"model": "fake-model", "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ("/v1/completions", {"model": "fake-model", "prompt": "x", "stream": "yes"}, "stream"),
        ("/v1/completions", {"model": "fake-model", "prompt": "x", "user": 3}, "user"),
        ("/v1/completions", {"model": "fake-model", "prompt": "x", "cache_salt": 3}, "cache_salt"),
        ("/v1/chat/completions", {"model": "fake-model", "messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"model": "fake-model", "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": "fake-model", "messages": ["hi"]}, "messages[0]"),
        ("/v1/chat/completions", {"model": "fake-model", "messages": [{"content": "x"}]}, "messages[0].role"),
        ("/v1/chat/completions", {"model": "fake-model", "messages": [{"role": "user", "content": 5}]}, None),
    ],
)
async def test_malformed_requests_are_400(
    fakes: FakeFactory,
    routers: RouterFactory,
    http: aiohttp.ClientSession,
    path: str,
    body: Any,
    param: str | None,
) -> None:
    fake = await fakes("a")
    router = await routers(fake)
    status, _, answer = await post(http, router.url + path, body)
    assert_openai_error(status, answer, 400, param)
    assert json.loads(answer)["error"]["type"] == "invalid_request_error"
    assert fake.generation_requests == []


async def test_unknown_model_is_404(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    router = await routers(await fakes("a", models=("m1",)))
    status, _, body = await post(http, router.url + "/v1/completions", completion(model="nope"))
    assert_openai_error(status, body, 404, "model")
    assert json.loads(body)["error"]["code"] == "model_not_found"


async def test_unknown_route_and_wrong_method_are_json(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    router = await routers(await fakes("a"))
    async with http.get(router.url + "/v1/nothing-here") as resp:
        assert_openai_error(resp.status, await resp.read(), 404)
    async with http.get(router.url + "/v1/completions") as resp:
        assert_openai_error(resp.status, await resp.read(), 405)
        assert "POST" in resp.headers["Allow"]


async def test_body_over_the_limit_is_413_with_or_without_content_length(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    router = await routers(await fakes("a"), max_body_bytes=1024)
    status, _, body = await post(http, router.url + "/v1/completions", completion("x" * 2000))
    assert_openai_error(status, body, 413)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b'{"model": "fake-model", "prompt": "'
        for _ in range(10):
            yield b"y" * 200
        yield b'"}'

    async with http.post(
        router.url + "/v1/completions", data=chunked(), headers={"Content-Type": "application/json"}
    ) as resp:
        assert_openai_error(resp.status, await resp.read(), 413)


async def test_non_json_content_type_is_415(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    router = await routers(await fakes("a"))
    data = json.dumps(completion()).encode()
    async with http.post(
        router.url + "/v1/completions", data=data, headers={"Content-Type": "text/plain"}
    ) as r:
        assert_openai_error(r.status, await r.read(), 415)
    async with http.post(router.url + "/v1/completions", data=data, skip_auto_headers=["Content-Type"]) as r:
        assert r.status == 200  # no Content-Type at all: taken as JSON, as vLLM does


async def test_above_max_inflight_is_429_with_retry_after(
    fakes: FakeFactory, routers: RouterFactory, http: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()
    fake = await fakes("a", gate=gate)
    router = await routers(fake, max_inflight=1)
    first = await http.post(router.url + "/v1/completions", json=completion(stream=True))
    await asyncio.wait_for(first.content.readuntil(b"\n\n"), timeout=5)  # in flight, held by the gate
    status, headers, body = await post(http, router.url + "/v1/completions", completion("second"))
    assert_openai_error(status, body, 429)
    assert int(headers["Retry-After"]) >= 1
    gate.set()
    await first.read()
    first.release()
    await eventually(lambda: router.state.inflight == 0)
    status, _, _ = await post(http, router.url + "/v1/completions", completion("third"))
    assert status == 200


# -- property test: arbitrary bodies and headers never make the router answer 500 ---------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_field_values = st.one_of(
    _json_values,
    st.sampled_from(["fake-model", "other-model", "", "x" * 300]),
    st.lists(st.integers(min_value=-5, max_value=2**33), max_size=40),
    st.lists(
        st.dictionaries(st.sampled_from(["role", "content", "name"]), _json_values, max_size=3), max_size=3
    ),
)
_bodies = st.one_of(
    st.binary(max_size=200),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(
        st.sampled_from(
            ["model", "prompt", "messages", "max_tokens", "stream", "user", "cache_salt", "stream_options"]
        ),
        _field_values,
        max_size=6,
    ).map(lambda d: json.dumps(d).encode()),
)
_header_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)
_headers = st.dictionaries(
    st.sampled_from(["Content-Type", "x-session-id", "Authorization", "X-Anything", "Accept", "Connection"]),
    _header_text | st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]),
    max_size=4,
)


@pytest.fixture
async def fuzz_router() -> AsyncIterator[tuple[FakeReplica, RouterServer]]:
    fake = await FakeReplica("a").start()
    config = RouterConfig(backends=(backend_of(fake),), **{**TEST_DEFAULTS, "max_body_bytes": 4096})
    async with RouterServer(config) as router:
        yield fake, router
    await fake.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=_bodies, headers=_headers)
async def test_arbitrary_bodies_and_headers_never_get_a_500(
    fuzz_router: tuple[FakeReplica, RouterServer],
    http: aiohttp.ClientSession,
    path: str,
    body: bytes,
    headers: dict[str, str],
) -> None:
    _, router = fuzz_router
    async with http.post(router.url + path, data=body, headers=headers) as resp:
        answer = await resp.read()
    if resp.status == 200:
        return  # a valid request: the fake answered it
    assert resp.status in (400, 404, 413, 415, 429), (resp.status, answer)
    error = json.loads(answer)["error"]
    assert error["type"] and error["message"]
