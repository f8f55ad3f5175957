"""Cut a prompt into fixed chunks and hash them into 64-bit chained chunk hashes.

Rules:
- A chunk is `chunk_chars` characters of text (default 64, about 16 tokens: llm-d's approximate
  prefix scorer uses 16 tokens x 4 characters) or `block_size` token ids when tokens are known.
- Only full chunks are hashed: vLLM caches only full blocks, so a trailing partial chunk can never
  be a cache hit and indexing it would only add noise.
- `chained[i]` identifies the whole prefix `chunks[0..i]`: equal chained hashes mean equal prefixes.
  It is seeded by the model name and an optional cache salt, so two models never share an entry.
- `content[i]` identifies chunk i alone (position-free, still seeded by model): the input to the
  MinHash similarity index, which looks for shared content regardless of order.

Both text and tokens go through the same byte path: text is encoded as UTF-32 (4 bytes a character,
so a chunk of N characters is exactly 4N bytes and slicing needs no per-chunk encode) and token ids
as unsigned 32-bit ints (4 bytes a token). The hash is MurmurHash3 x64-128 (mmh3), low 64 bits:
on this machine it chunk-hashes a 128 KB prompt in about 1 ms (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Mapping, Sequence

import mmh3

DEFAULT_CHUNK_CHARS = 64
_UNIT_BYTES = 4  # UTF-32 code unit, or one uint32 token id
# The low 64 bits of MurmurHash3 x64-128: the 128-bit digest as one int, masked. The same bits as
# `mmh3_x64_128_utupledigest(...)[0]`, a third faster and without a tuple per chunk (which also fed the
# garbage collector's young generation: 128 of them for every 8 KB prompt).
_hash128 = mmh3.mmh3_x64_128_uintdigest
_LOW64 = (1 << 64) - 1


class ChunkHashes:
    """The hashes of one prompt's full chunks, in order.

    `chained` is computed eagerly (every request needs it); `content` lazily, on first use, since
    only the similarity path reads it and most requests never take that path.
    """

    __slots__ = ("_content", "_seed", "_source", "chained", "chunk_units", "total_units", "unit")

    def __init__(
        self,
        chained: tuple[int, ...],
        source: str | Sequence[int],
        seed: int,
        chunk_units: int,
        total_units: int,
        unit: str,
    ):
        self.chained = chained
        self.chunk_units = chunk_units  # characters or tokens per chunk
        self.total_units = total_units  # characters or tokens in the whole prompt, partial chunk included
        self.unit = unit  # "char" or "token"
        # The prompt itself, not its encoding: the caller holds it anyway, while the 4-bytes-a-unit
        # encoding would cost 4x the prompt for as long as the request is in flight.
        self._source = source
        self._seed = seed
        self._content: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.chained)

    def __repr__(self) -> str:
        return f"ChunkHashes({len(self.chained)} chunks of {self.chunk_units} {self.unit}s)"

    @property
    def indexed_units(self) -> int:
        """Units covered by full chunks (the most any cache can hold of this prompt)."""
        return len(self.chained) * self.chunk_units

    @property
    def content(self) -> tuple[int, ...]:
        """Each full chunk's own hash, position-free (for similarity), seeded by model like `chained`."""
        if self._content is None:
            step = self.chunk_units * _UNIT_BYTES
            data, seed = _encode(self._source), self._seed & 0xFFFFFFFF
            self._content = tuple(
                _hash128(data[i : i + step], seed) & _LOW64 for i in range(0, len(self.chained) * step, step)
            )
        return self._content


def model_seed(model: str, cache_salt: str | None = None) -> int:
    """The 64-bit root of every chain for this model (and salt): parent of the first chunk."""
    key = model if cache_salt is None else f"{model}\x00salt\x00{cache_salt}"
    return _hash128(key.encode("utf-8", "surrogatepass"), 0) & _LOW64


def _encode(source: str | Sequence[int]) -> bytes:
    if isinstance(source, str):
        # surrogatepass: JSON can carry lone surrogates ("\ud800"); they are still text to hash.
        return source.encode("utf-32-le", "surrogatepass")
    try:
        return array("I", source).tobytes()
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"token ids must be integers in [0, 2**32): {exc}") from None


def _chain(data: bytes, chunk_bytes: int, root: int) -> tuple[int, ...]:
    """chained[i] = chained[i-1] XOR mmh3(chunk i, seed = low 32 bits of chained[i-1]).

    The parent enters twice — as the seed (mmh3 seeds are 32-bit) and, all 64 bits, through the
    XOR — so equal chained hashes need equal parents and equal chunks (up to 64-bit collisions).
    One hash call a chunk: hashing the parent and chunk together costs a concatenation and a
    second call, about twice the time (measured for 2,048 chunks: 0.86 ms against 1.7 ms).
    """
    out: list[int] = []
    append = out.append
    parent = root
    for i in range(0, len(data) - chunk_bytes + 1, chunk_bytes):
        parent ^= _hash128(data[i : i + chunk_bytes], parent & 0xFFFFFFFF) & _LOW64
        append(parent)
    return tuple(out)


def hash_text(
    text: str, model: str, *, cache_salt: str | None = None, chunk_chars: int = DEFAULT_CHUNK_CHARS
) -> ChunkHashes:
    """Chunk hashes of a completions prompt (or any rendered text)."""
    if chunk_chars <= 0:
        raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
    seed = model_seed(model, cache_salt)
    chained = _chain(_encode(text), chunk_chars * _UNIT_BYTES, seed)
    return ChunkHashes(chained, text, seed, chunk_chars, len(text), "char")


def chain_token_blocks(token_ids: Sequence[int], block_size: int, root: int) -> tuple[int, ...]:
    """Chained hashes of the full blocks of `token_ids`, the first block's parent being `root`.

    `root` is `model_seed(model, cache_salt)` for a prompt's first block, or the chained hash of the
    block before `token_ids[0]`: a chain hashed in pieces equals the chain hashed whole. This is the one
    piece of code behind both a request's hashes (`hash_tokens`) and the hashes the router computes from
    a replica's KV events (router/index/event_indexer.py), so the two always agree.
    ValueError for a non-positive block size or ids outside [0, 2**32).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return _chain(_encode(token_ids), block_size * _UNIT_BYTES, root)


def hash_tokens(
    token_ids: Sequence[int], model: str, *, block_size: int, cache_salt: str | None = None
) -> ChunkHashes:
    """Chunk hashes of a token-id prompt in blocks of `block_size` (the replica's KV block size).

    Raises ValueError for ids outside [0, 2**32): no tokenizer has such a vocabulary.
    """
    seed = model_seed(model, cache_salt)
    chained = chain_token_blocks(token_ids, block_size, seed)
    return ChunkHashes(chained, token_ids, seed, block_size, len(token_ids), "token")


def render_chat(messages: Sequence[Mapping[str, object]]) -> str:
    """Render chat messages deterministically, roles included, for chunking.

    The rendering only has to be stable and prefix-preserving: a conversation that grows by
    appending messages renders to a string that extends the previous one, so multi-turn chats
    share their history's chunks. Content that is not a string (content parts, tool calls) is
    rendered as canonical JSON.
    """
    parts: list[str] = []
    for message in messages:
        role = message.get("role", "")
        content = message.get("content", "")
        if not isinstance(content, str):
            content = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        parts.append(f"<|{role}|>\n{content}\n")
        for key in ("name", "tool_calls", "tool_call_id"):
            if key in message:
                extra = json.dumps(message[key], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                parts.append(f"<|{key}|>{extra}\n")
    return "".join(parts)


def hash_chat(
    messages: Sequence[Mapping[str, object]],
    model: str,
    *,
    cache_salt: str | None = None,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
) -> ChunkHashes:
    """Chunk hashes of chat messages, rendered by `render_chat`."""
    return hash_text(render_chat(messages), model, cache_salt=cache_salt, chunk_chars=chunk_chars)
