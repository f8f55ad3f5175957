"""Chunk hashing: prefix identity, full chunks only, model/salt separation, text vs tokens."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.index.chunking import hash_chat, hash_text, hash_tokens, model_seed, render_chat


def test_only_full_chunks_are_hashed() -> None:
    assert len(hash_text("a" * 63, "m")) == 0
    assert len(hash_text("a" * 64, "m")) == 1
    h = hash_text("a" * 200, "m", chunk_chars=64)
    assert len(h) == 3
    assert h.indexed_units == 192
    assert h.total_units == 200


@given(st.text(min_size=0, max_size=400), st.text(min_size=0, max_size=400))
def test_shared_prefix_shares_exactly_its_full_chunks(prefix: str, suffix: str) -> None:
    a = hash_text(prefix + suffix, "m", chunk_chars=16)
    b = hash_text(prefix, "m", chunk_chars=16)
    assert a.chained[: len(b)] == b.chained


@given(st.text(min_size=32, max_size=200), st.characters(), st.integers(min_value=0, max_value=31))
def test_a_change_in_a_chunk_changes_it_and_every_later_chained_hash(text: str, ch: str, pos: int) -> None:
    if text[pos] == ch:
        return
    changed = text[:pos] + ch + text[pos + 1 :]
    a, b = hash_text(text, "m", chunk_chars=8), hash_text(changed, "m", chunk_chars=8)
    first = pos // 8
    assert a.chained[:first] == b.chained[:first]
    assert all(x != y for x, y in zip(a.chained[first:], b.chained[first:], strict=True))
    # Content hashes are position-free: only the changed chunk's own hash differs.
    assert [i for i, (x, y) in enumerate(zip(a.content, b.content, strict=True)) if x != y] == [first]


def test_models_and_salts_never_share_entries() -> None:
    text = "x" * 256
    base = hash_text(text, "llama")
    assert not set(base.chained) & set(hash_text(text, "qwen").chained)
    assert not set(base.chained) & set(hash_text(text, "llama", cache_salt="tenant-a").chained)
    assert (
        hash_text(text, "llama", cache_salt="t").chained == hash_text(text, "llama", cache_salt="t").chained
    )
    assert model_seed("llama") != model_seed("llama", "")


def test_content_hashes_are_position_free() -> None:
    a, b = "A" * 64, "B" * 64
    h1 = hash_text(a + b, "m")
    h2 = hash_text(b + a, "m")
    assert set(h1.content) == set(h2.content)
    assert h1.chained != h2.chained


@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_token_blocks(block_size: int) -> None:
    ids = list(range(1000, 1000 + 4 * block_size - 1))  # 3 full blocks and a partial one
    h = hash_tokens(ids, "m", block_size=block_size)
    assert len(h) == 3
    assert h.unit == "token" and h.chunk_units == block_size
    assert hash_tokens(ids[: 2 * block_size], "m", block_size=block_size).chained == h.chained[:2]


@pytest.mark.parametrize("bad", [[-1], [2**32], ["7"], [1.5]])
def test_invalid_token_ids_are_a_value_error(bad: list[object]) -> None:
    with pytest.raises(ValueError):
        hash_tokens(bad, "m", block_size=16)  # type: ignore[arg-type]


def test_chat_rendering_is_deterministic_and_prefix_preserving() -> None:
    history = [{"role": "system", "content": "be brief " * 20}, {"role": "user", "content": "hi " * 30}]
    longer = [*history, {"role": "assistant", "content": "hello " * 30}, {"role": "user", "content": "more"}]
    assert render_chat(longer).startswith(render_chat(history))
    assert render_chat(history) == render_chat([dict(m) for m in history])
    assert "<|system|>" in render_chat(history)
    a, b = hash_chat(history, "m"), hash_chat(longer, "m")
    assert b.chained[: len(a)] == a.chained
    # The role is part of the content: the same words from another role are another prefix.
    swapped = [{"role": "user", "content": history[0]["content"]}, history[1]]
    assert hash_chat(swapped, "m").chained[0] != a.chained[0]


def test_chat_with_non_string_content_renders_canonically() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"b": 1, "a": 2}]}]
    reordered = [{"role": "user", "content": [{"text": "hi", "type": "text"}, {"a": 2, "b": 1}]}]
    assert render_chat(parts) == render_chat(reordered)
