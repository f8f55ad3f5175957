"""Request handling of an emulated replica: prompt forms, vLLM-like 400s, bounded bodies, no 500s."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.emulator import EmulatedFleet
from workers.engine import tokenizer


@pytest.fixture
async def fleet() -> AsyncIterator[EmulatedFleet]:
    async with EmulatedFleet(1, "tiny") as f:
        yield f


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


async def post(session: aiohttp.ClientSession, url: str, body: Any, *, raw: bool = False) -> tuple[int, Any]:
    data = body if raw else json.dumps(body)
    async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        text = await r.text()
        return r.status, json.loads(text) if r.content_type == "application/json" else text


@pytest.mark.parametrize(
    "prompt",
    [
        "four tokens of text here.",
        [[1000, 1001, 1002, 1003, 1004, 1005, 1006]],
        ["four tokens of text here."],
    ],
    ids=["text", "list-of-one-id-list", "list-of-one-string"],
)
async def test_prompt_forms(fleet: EmulatedFleet, session: aiohttp.ClientSession, prompt: Any) -> None:
    status, body = await post(session, f"{fleet.urls[0]}/v1/completions", {"prompt": prompt, "max_tokens": 3})
    assert status == 200
    assert body["usage"]["prompt_tokens"] == 7
    assert body["usage"]["completion_tokens"] == 3 and len(body["choices"][0]["text"]) == 12


async def test_output_text_comes_from_the_generated_token_ids(
    fleet: EmulatedFleet, session: aiohttp.ClientSession
) -> None:
    url = f"{fleet.urls[0]}/v1/completions"
    _, body = await post(session, url, {"prompt": "deterministic", "max_tokens": 8})
    text = body["choices"][0]["text"]
    assert tokenizer.encode(text) == [tokenizer.encode(text[i : i + 4])[0] for i in range(0, len(text), 4)]
    assert (await post(session, url, {"prompt": "deterministic", "max_tokens": 8}))[1]["choices"][0][
        "text"
    ] == text


BAD_COMPLETIONS: list[tuple[Any, int, str]] = [
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": []}, 400, "empty"),
    ({"prompt": ["a", "b"]}, 400, "one prompt"),
    ({"prompt": [1, "a"]}, 400, "integers"),
    ({"prompt": [1, -1]}, 400, "vocabulary"),
    ({"prompt": [40000]}, 400, "vocabulary"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "at least 1"),
    ({"prompt": "hi", "max_tokens": "5"}, 400, "integer"),
    ({"prompt": "hi", "max_tokens": True}, 400, "integer"),
    ({"prompt": [1000] * 2049, "max_tokens": 1}, 400, "maximum context length"),
    ({"prompt": [1000] * 2048, "max_tokens": 1}, 400, "at least 1"),
    ({"prompt": "hi", "model": "other"}, 404, "does not exist"),
    ({"prompt": "hi", "model": 3}, 400, "model"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream=True"),
    ({"prompt": "hi", "n": 2}, 400, "n=1"),
    ([1, 2], 400, "JSON object"),
]


@pytest.mark.parametrize(("body", "status", "needle"), BAD_COMPLETIONS)
async def test_bad_completions_get_vllm_like_errors(
    fleet: EmulatedFleet, session: aiohttp.ClientSession, body: Any, status: int, needle: str
) -> None:
    got, error = await post(session, f"{fleet.urls[0]}/v1/completions", body)
    assert got == status
    assert error["object"] == "error" and error["code"] == status and error["param"] is None
    assert error["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
    assert needle in error["message"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"content": "no role"}]}, "role"),
        ({"messages": [{"role": "user", "content": 5}]}, "content"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "at least 1"),
    ],
)
async def test_bad_chat_requests_get_400(
    fleet: EmulatedFleet, session: aiohttp.ClientSession, body: Any, needle: str
) -> None:
    status, error = await post(session, f"{fleet.urls[0]}/v1/chat/completions", body)
    assert status == 400 and needle in error["message"]


async def test_malformed_json_and_oversized_bodies(
    fleet: EmulatedFleet, session: aiohttp.ClientSession
) -> None:
    url = f"{fleet.urls[0]}/v1/completions"
    for raw in (b"{", b"", b"\xff\xfe", b'{"prompt": "hi",}'):
        status, error = await post(session, url, raw, raw=True)
        assert status == 400 and error["type"] == "BadRequestError" and "JSON" in error["message"]
    huge = b'{"prompt": "' + b"a" * (17 * 1024 * 1024) + b'"}'
    status, error = await post(session, url, io.BytesIO(huge), raw=True)
    assert status == 413 and error["object"] == "error"


async def test_unknown_routes_and_methods_answer_json_errors(
    fleet: EmulatedFleet, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{fleet.urls[0]}/v1/nothing") as r:
        assert r.status == 404 and (await r.json())["object"] == "error"
    async with session.get(f"{fleet.urls[0]}/v1/completions") as r:
        assert r.status == 405 and (await r.json())["object"] == "error"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
fields = st.sampled_from(
    ["prompt", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options", "model", "n"]
)
_VALID: dict[str, Any] = {"prompt": "hello", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
# A valid body with one field replaced reaches every type check; random objects reach the rest.
mutated = st.builds(lambda key, value: {**_VALID, key: value}, fields, json_values)
bodies = st.one_of(json_values, st.dictionaries(fields, json_values, max_size=5), mutated)
paths = st.sampled_from(
    ["/v1/completions", "/v1/chat/completions", "/tokenize", "/kvrouter/kv/export", "/kvrouter/faults"]
)


@pytest.fixture
async def instant() -> AsyncIterator[EmulatedFleet]:
    # Zero-time steps and a short context: a generated body that happens to be valid finishes at once.
    async with EmulatedFleet(1, "instant", max_model_len=2048) as f:
        yield f


@pytest.mark.parametrize("kind", ["completions", "chat/completions"])
async def test_streams_from_an_instant_engine_are_complete(
    instant: EmulatedFleet, session: aiohttp.ClientSession, kind: str
) -> None:
    """Zero-time steps may finish a request before its handler first looks: the stream is still whole."""
    body = {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
    for _ in range(5):
        status, text = await post(session, f"{instant.urls[0]}/v1/{kind}", body)
        assert status == 200 and text.endswith("data: [DONE]\n\n")
        chunks = [json.loads(e[6:]) for e in text.split("\n\n")[:-2]]
        assert (
            len([c for c in chunks if c["choices"] and c["choices"][0].get("delta", {}).get("role") is None])
            == 6
        )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=paths, body=bodies)
async def test_malformed_bodies_never_get_a_500(
    instant: EmulatedFleet, session: aiohttp.ClientSession, path: str, body: Any
) -> None:
    if path == "/kvrouter/faults" and isinstance(body, dict):  # never inject a real fault here
        body = {
            k: v for k, v in body.items() if k not in ("latency_s", "error_rate", "hang", "refuse", "crash")
        }
    status, answer = await post(session, f"{instant.urls[0]}{path}", body)
    assert status < 500, answer
    if status >= 400:
        assert answer["object"] == "error" and answer["code"] == status
