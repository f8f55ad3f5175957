"""The real `openai` client through the router: completions and chat, streaming and not, and its errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
from fake_upstream import FakeFactory, RouterFactory
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam


@pytest.fixture
async def client(fakes: FakeFactory, routers: RouterFactory) -> AsyncIterator[AsyncOpenAI]:
    router = await routers(await fakes("a"), await fakes("b"))
    async with AsyncOpenAI(base_url=router.url + "/v1", api_key="client-key", max_retries=0, timeout=10) as c:
        yield c


async def test_completions_with_and_without_streaming(client: AsyncOpenAI) -> None:
    done = await client.completions.create(model="fake-model", prompt="Once upon a time", max_tokens=3)
    assert (
        done.choices[0].text == "tok tok tok "
        and done.usage is not None
        and done.usage.completion_tokens == 3
    )
    stream = await client.completions.create(
        model="fake-model", prompt="Once upon a time", max_tokens=3, stream=True
    )
    texts = [chunk.choices[0].text async for chunk in stream]
    assert texts == ["tok0 ", "tok1 ", "tok2 "]


async def test_chat_with_and_without_streaming(client: AsyncOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello!"},
    ]
    done = await client.chat.completions.create(model="fake-model", messages=messages, max_tokens=2)
    assert done.choices[0].message.content == "tok tok "
    stream = await client.chat.completions.create(
        model="fake-model",
        messages=messages,
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 "
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0


async def test_router_errors_are_openai_errors(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        await client.completions.create(model="fake-model", prompt="x", max_tokens=-1)
    assert bad.value.param == "max_tokens"
    models = await client.models.list()
    assert [m.id for m in models.data] == ["fake-model"]
