"""A deterministic, download-free, fast tokenizer for the emulator and the simulator.

Rules:
- One token per 4 characters (Unicode code points), the last group padded: OpenAI's rule of thumb,
  "one token generally corresponds to ~4 characters of text for common English text"
  (OpenAI help center, "What are tokens and how to count them?"). `len(encode(t)) == ceil(len(t) / 4)`.
- A token id is an arithmetic mix of its 4 code points into [N_SPECIAL, VOCAB_SIZE): equal groups give
  equal ids, so equal text prefixes give equal token prefixes, and texts whose lengths are multiples of 4
  concatenate: `encode(a + b) == encode(a) + encode(b)`. Distinct groups may collide (32000 ids), which
  only makes two different texts share a token, as real tokenizers' merges do.
- Vectorised with numpy (a UTF-32 byte view, a few passes of uint64 arithmetic): the simulator tokenizes ~100k
  prompts of up to ~30K characters.
- Output text is cheap and not invertible in general: each generated id is one of WORD_TOKEN_IDS, the
  ids of 4-character words, so generated text re-tokenizes to the same ids when it starts 4-aligned
  (a multi-turn conversation then shares its previous answer's blocks, as with a real tokenizer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

VOCAB_SIZE = 32000
N_SPECIAL = 16  # ids below are reserved (pad, bos, eos, chat markers...) and never produced by encode()
CHARS_PER_TOKEN = 4
_SPAN = np.uint64(VOCAB_SIZE - N_SPECIAL)
# Odd 64-bit multipliers (golden-ratio and splitmix64 constants) and the murmur3 finalizer's.
_MUL0 = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_FINAL = np.uint64(0xFF51AFD7ED558CCD)
_S29, _S32, _S33 = np.uint64(29), np.uint64(32), np.uint64(33)
_GROUP_BYTES = 4 * CHARS_PER_TOKEN  # UTF-32: 4 bytes a code point


def encode(text: str) -> list[int]:
    """Token ids of `text`: one per 4 code points (the last group zero-padded)."""
    if not text:
        return []
    data = text.encode("utf-32-le", "surrogatepass")  # JSON may carry lone surrogates: still text
    pad = -len(data) % _GROUP_BYTES
    if pad:
        data += bytes(pad)
    # A group of 4 code points is 16 bytes: two little-endian uint64 words, mixed with wrapping
    # uint64 arithmetic (what a hash wants), then reduced to the id range by the multiply-shift method
    # on the well-mixed high 32 bits (cheaper than a uint64 modulo).
    words = np.frombuffer(data, dtype=np.uint64)
    h = words[0::2] * _MUL0 + words[1::2] * _MUL1
    h ^= h >> _S33
    h *= _FINAL
    h ^= h >> _S29
    ids = ((h >> _S32) * _SPAN >> _S32) + np.uint64(N_SPECIAL)
    out: list[int] = ids.astype(np.int64).tolist()  # int64 converts to Python ints faster than uint64
    return out


def count_tokens(text: str) -> int:
    """`len(encode(text))` without encoding."""
    return -(-len(text) // CHARS_PER_TOKEN)


# 64 words of exactly 4 characters (3 letters and a space), so generated text is 4 characters a token.
WORDS: tuple[str, ...] = tuple(
    f"{w} "
    for w in (
        "the and for are but not you all any can had her was one our out day get has him his how man new "
        "now old see two way who boy did its let put say she too use act add age ago air arm art ask bad "
        "bed big box car cut dog ear eat end eye far few fit fly fun got gun hot job key law lay"
    ).split()[:64]
)
WORD_TOKEN_IDS: tuple[int, ...] = tuple(encode(w)[0] for w in WORDS)
_WORD_OF_ID = dict(zip(WORD_TOKEN_IDS, WORDS, strict=True))
_MASK64 = (1 << 64) - 1
SEED_MUL = 0x9E3779B97F4A7C15
MIX_MUL = 0xBF58476D1CE4E5B9


def output_token_id(seed: int, index: int) -> int:
    """The `index`-th generated token of a request whose prompt gives `seed` (deterministic, like greedy).

    The engine inlines this formula in its per-token loop; a test keeps the two equal."""
    x = ((seed ^ (index * SEED_MUL)) * MIX_MUL) & _MASK64
    return WORD_TOKEN_IDS[x >> 58]  # top 6 bits: one of 64 words


def token_text(token_id: int) -> str:
    """Text of one token for streaming: its word if generated here, else a stand-in word."""
    return _WORD_OF_ID.get(token_id) or WORDS[token_id % len(WORDS)]


def detokenize(token_ids: Iterable[int]) -> str:
    """Text of generated tokens (not an inverse of `encode` for arbitrary ids)."""
    return "".join(token_text(t) for t in token_ids)


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text parts, in order
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content):
            return "".join(str(t) for t in texts)
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def render_chat(messages: Sequence[Mapping[str, object]], *, add_generation_prompt: bool = True) -> str:
    """The emulator's chat template: ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n` per message),
    then `<|im_start|>assistant\\n` when a reply is to be generated. Appending messages extends the text,
    so multi-turn prompts share their history's prefix."""
    parts = [
        f"<|im_start|>{m.get('role', 'user')}\n{_content_text(m.get('content', ''))}<|im_end|>\n"
        for m in messages
    ]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)
