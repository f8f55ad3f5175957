"""The emulator's pure wire layer: request parsing into engine inputs, response shapes, histograms."""

from __future__ import annotations

from typing import Any

import pytest

from workers.emulator.metrics import TTFT_BUCKETS, Histogram
from workers.emulator.protocol import (
    DEFAULT_MAX_TOKENS,
    ApiError,
    chunk_body,
    parse_chat,
    parse_completion,
    parse_tokenize,
    response_body,
    usage,
)
from workers.engine import tokenizer

MODEL = "m"
X = tokenizer.encode("x")


@pytest.mark.parametrize(
    ("body", "ids", "max_tokens", "stream", "include_usage"),
    [
        ({"prompt": "abcdefgh"}, tokenizer.encode("abcdefgh"), DEFAULT_MAX_TOKENS, False, False),
        ({"prompt": [5, 6, 7], "max_tokens": 3, "model": MODEL}, [5, 6, 7], 3, False, False),
        ({"prompt": [[5, 6]], "max_tokens": None}, [5, 6], DEFAULT_MAX_TOKENS, False, False),
        ({"prompt": ["abcd"], "stream": True}, tokenizer.encode("abcd"), DEFAULT_MAX_TOKENS, True, False),
        ({"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}, X, 16, True, True),
        ({"prompt": "x", "temperature": 0.7, "stop": ".", "ignore_eos": True, "n": 1}, X, 16, False, False),
    ],
)  # fmt: skip
def test_completion_requests_parse(
    body: dict[str, Any], ids: list[int], max_tokens: int, stream: bool, include_usage: bool
) -> None:
    req = parse_completion(body, MODEL, 100)
    assert (req.prompt_token_ids, req.max_tokens, req.stream, req.include_usage) == (
        ids,
        max_tokens,
        stream,
        include_usage,
    )
    assert req.kind == "completion" and req.model == MODEL


def test_chat_renders_with_the_engine_template_and_prefers_max_completion_tokens() -> None:
    messages = [{"role": "user", "content": "hi"}]
    req = parse_chat({"messages": messages, "max_tokens": 9, "max_completion_tokens": 4}, MODEL, 100)
    assert req.prompt_token_ids == tokenizer.encode(tokenizer.render_chat(messages))
    assert req.max_tokens == 4
    assert parse_tokenize({"messages": messages}, MODEL) == req.prompt_token_ids
    shorter = parse_tokenize({"messages": messages, "add_generation_prompt": False}, MODEL)
    assert len(shorter) < len(req.prompt_token_ids)


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "effective"),
    [
        (90, 10, 10),
        (90, 11, 10),
        (99, 1, 1),
        (50, 500, 50),
        (100, 1, "at least 1, got 0"),
        (101, 1, "exceeds"),
    ],
)
def test_length_limits_are_vllms(prompt_len: int, max_tokens: int, effective: int | str) -> None:
    """vLLM 0.32 clamps max_tokens to the context left and refuses only prompts that fill it."""
    body = {"prompt": [20] * prompt_len, "max_tokens": max_tokens}
    if isinstance(effective, int):
        assert parse_completion(body, MODEL, 100).max_tokens == effective
    else:
        with pytest.raises(ApiError, match=effective):
            parse_completion(body, MODEL, 100)


def test_unknown_model_is_a_404() -> None:
    with pytest.raises(ApiError) as info:
        parse_completion({"prompt": "x", "model": "other"}, MODEL, 100)
    assert (info.value.status, info.value.err_type) == (404, "NotFoundError")
    assert info.value.message == "The model `other` does not exist."


def test_response_shapes() -> None:
    req = parse_completion({"prompt": "x"}, MODEL, 100)
    body = response_body(req, "cmpl-1", 7, "the ", usage(3, 1, 0))
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "the "
    assert body["usage"] == {
        "prompt_tokens": 3,
        "total_tokens": 4,
        "completion_tokens": 1,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    chat = parse_chat({"messages": [{"role": "user", "content": "x"}], "stream": True}, MODEL, 100)
    chunk = chunk_body(chat, "chatcmpl-1", 7, "the ", None)
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["delta"] == {"content": "the "}


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    hist = Histogram(TTFT_BUCKETS)
    for value in (0.001, 0.003, 5000.0):
        hist.observe(value)
    buckets = dict(hist.cumulative())
    assert buckets["0.001"] == 1 and buckets["0.005"] == 2 and buckets["2560.0"] == 2 and buckets["+Inf"] == 3
    assert hist.sum == pytest.approx(5000.004)
