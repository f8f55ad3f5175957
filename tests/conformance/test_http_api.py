"""The OpenAI-compatible HTTP surface, checked with the real `openai` client where it fits."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import openai
import pytest

if TYPE_CHECKING:
    from conftest import Target


@pytest.fixture
async def client(target: Target) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=f"{target.url}/v1", api_key="EMPTY", max_retries=0, timeout=30)
    yield c
    await c.close()


async def test_health_models_and_version(target: Target, client: openai.AsyncOpenAI) -> None:
    async with target.session.get(f"{target.url}/health") as r:
        assert r.status == 200
    models = [m async for m in client.models.list()]
    assert target.model in [m.id for m in models]
    assert target.max_model_len > 0
    async with target.session.get(f"{target.url}/version") as r:
        assert r.status == 200
        assert isinstance((await r.json())["version"], str)


async def test_tokenize_prompt_and_messages(target: Target) -> None:
    async with target.session.post(f"{target.url}/tokenize", json={"prompt": "Hello there, world"}) as r:
        body = await r.json()
    assert body["count"] == len(body["tokens"]) > 0
    assert body["max_model_len"] == target.max_model_len
    messages = [{"role": "user", "content": "Hello there, world"}]
    counts = []
    for add in (False, True):
        payload = {"messages": messages, "add_generation_prompt": add}
        async with target.session.post(f"{target.url}/tokenize", json=payload) as r:
            assert r.status == 200
            counts.append((await r.json())["count"])
    assert counts[1] > counts[0] > body["count"]  # the template adds markers, and the reply's opener


async def test_completion_usage_and_shape(target: Target, client: openai.AsyncOpenAI) -> None:
    prompt = await target.unique_prompt(3 * target.block_size + 5)
    result = await client.completions.create(
        model=target.model, prompt=prompt, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    assert result.id.startswith("cmpl-")
    assert result.object == "text_completion" and result.model == target.model
    assert isinstance(result.created, int) and result.created > 0
    assert len(result.choices) == 1 and result.choices[0].finish_reason == "length"
    assert isinstance(result.choices[0].text, str) and result.choices[0].text
    usage = result.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), 4)
    assert usage.total_tokens == len(prompt) + 4
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 0


async def test_text_prompt_counts_as_tokenize_does(target: Target, client: openai.AsyncOpenAI) -> None:
    text = "A text prompt of a few words, counted by the server's own tokenizer."
    expected = len(await target.tokenize(text))
    result = await client.completions.create(model=target.model, prompt=text, max_tokens=2)
    assert result.usage is not None and result.usage.prompt_tokens == expected


async def test_chat_completion(target: Target, client: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    result = await client.chat.completions.create(
        model=target.model, messages=messages, max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion"
    choice = result.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 3


async def test_streaming_framing(target: Target) -> None:
    """Raw SSE: `data: {json}` events, one usage chunk with no choices, then `data: [DONE]`."""
    prompt = await target.unique_prompt(2 * target.block_size)
    body = {
        "model": target.model,
        "prompt": prompt,
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with target.session.post(f"{target.url}/v1/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = (await r.read()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")
    assert events[-1] == ""
    events = events[:-1]
    assert all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "text_completion" and c["model"] == target.model for c in chunks)
    *choice_chunks, usage_chunk = chunks
    assert all(len(c["choices"]) == 1 for c in choice_chunks)
    assert [c["choices"][0]["finish_reason"] for c in choice_chunks][-1] == "length"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5
    assert usage_chunk["usage"]["prompt_tokens"] == len(prompt)
    streamed = "".join(c["choices"][0]["text"] for c in choice_chunks)
    plain = await target.complete(prompt, 5, temperature=0)
    assert streamed == plain["choices"][0]["text"]


async def test_chat_streaming_with_the_openai_client(target: Target, client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=target.model,
        messages=[{"role": "user", "content": "Count to three."}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    choice_chunks = [c for c in chunks if c.choices]
    assert choice_chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in choice_chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


async def test_non_streaming_usage_reports_cached_tokens(target: Target, client: openai.AsyncOpenAI) -> None:
    prompt = await target.unique_prompt(2 * target.block_size + 1)
    results = [
        await client.completions.create(model=target.model, prompt=prompt, max_tokens=1) for _ in range(2)
    ]
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in results]  # type: ignore[union-attr]
    assert cached == [0, 2 * target.block_size]


async def test_max_tokens_past_the_context_is_clamped(target: Target, client: openai.AsyncOpenAI) -> None:
    """vLLM 0.32 answers a max_tokens that reaches past the context with what is left, not a 400."""
    prompt = [20] * (target.max_model_len - 3)
    result = await client.completions.create(
        model=target.model, prompt=prompt, max_tokens=target.max_model_len, extra_body={"ignore_eos": True}
    )
    assert result.usage is not None and result.usage.completion_tokens == 3
    assert result.choices[0].finish_reason == "length"


async def test_errors(target: Target, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError):  # longer than the context
        await client.completions.create(
            model=target.model, prompt=[20] * (target.max_model_len + 1), max_tokens=1
        )
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model=target.model, prompt="hi", max_tokens=0)
