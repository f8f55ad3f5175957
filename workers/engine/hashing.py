"""Chained hashes of full KV blocks of token ids, as vLLM's prefix cache computes them.

Rules:
- Only FULL blocks of `block_size` tokens are hashed: vLLM caches nothing smaller
  (vllm/v1/core/kv_cache_utils.py: "We only hash full blocks").
- Block i's hash covers block i *and every block before it*: `h[i] = H(h[i-1] or ROOT, tokens of i)`,
  so equal hashes mean equal prefixes and a lookup is a walk from block 0.
- The published value (the cache key, and what KV events carry) is a 64-bit unsigned int. The chain
  state carried from block to block may be wider (sha256 carries the 32-byte digest), so a request keeps
  its last `ChainState` to hash the blocks its output tokens complete.

Two schemes:
- "mmh3" (default, fast): `mmh3_x64_128(pack('<Q', parent) + tokens as little-endian uint32)[0]` with
  seed 0, the root being the same hash of b"vllm-none-hash". About 1 µs a block here.
- "sha256": vLLM's default `--prefix-caching-hash-algo sha256`, reproduced exactly:
  `sha256(pickle.dumps((parent_digest, tuple(tokens), None), protocol=HIGHEST))`, with
  NONE_HASH = `sha256(pickle.dumps(seed, protocol=HIGHEST))` where seed is PYTHONHASHSEED when set on the
  replica, else "vllm-none-hash" (vLLM >= ~0.30; older releases used os.urandom unless PYTHONHASHSEED was
  set). The published int is `int.from_bytes(digest, "big") & (2**64 - 1)`, i.e. the low 64 bits, as
  with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1 (vllm/v1/core/kv_cache_utils.py, maybe_convert_block_hash).
  Extra keys (LoRA, multimodal, cache_salt) are not modelled: they are `None` here, as for plain text.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from array import array
from collections.abc import Sequence
from typing import Literal

import mmh3

HashAlgo = Literal["mmh3", "sha256"]
ChainState = int | bytes
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
MASK64 = (1 << 64) - 1

_hash128 = mmh3.mmh3_x64_128_utupledigest
_PARENT = struct.Struct("<Q")
if array("I").itemsize != 4:  # pragma: no cover - every platform CPython supports has 4-byte unsigned int
    raise ImportError("array('I') must hold 32-bit token ids")


def sha256_pickle(obj: object) -> bytes:
    """vLLM's `sha256` hash function (vllm/utils/hashing.py): sha256 of the highest-protocol pickle."""
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def low64(digest: bytes) -> int:
    """The int vLLM publishes for a block hash: the digest read big-endian, masked to 64 bits."""
    return int.from_bytes(digest, "big") & MASK64


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    try:
        return array("I", token_ids).tobytes()
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"token ids must be integers in [0, 2**32): {exc}") from None


class BlockHasher:
    """Hashes full blocks of token ids into a chain; one per engine (its block size and scheme)."""

    __slots__ = ("algo", "block_size", "root")

    def __init__(
        self, block_size: int, algo: HashAlgo = "mmh3", *, none_hash_seed: str = DEFAULT_NONE_HASH_SEED
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if algo not in ("mmh3", "sha256"):
            raise ValueError(f"unknown hash algo {algo!r}; known: mmh3, sha256")
        self.block_size = block_size
        self.algo: HashAlgo = algo
        # The parent state of block 0 (vLLM's NONE_HASH). Never published: block 0's event parent is None.
        self.root: ChainState = (
            sha256_pickle(none_hash_seed)
            if algo == "sha256"
            else _hash128(none_hash_seed.encode("utf-8"), 0)[0]
        )

    def extend(
        self, parent: ChainState, token_ids: Sequence[int], start_block: int, end_block: int
    ) -> tuple[list[int], ChainState]:
        """Hashes of blocks [start_block, end_block) of `token_ids`, chained on `parent`.

        `parent` is the chain state after block start_block - 1 (or `root`). Returns the published
        64-bit hashes and the chain state after the last block. The caller guarantees the blocks are full.
        """
        bs = self.block_size
        if end_block <= start_block:
            return [], parent
        out: list[int] = []
        if self.algo == "sha256":
            digest = parent
            for b in range(start_block, end_block):
                digest = sha256_pickle((digest, tuple(token_ids[b * bs : (b + 1) * bs]), None))
                out.append(low64(digest))
            return out, digest
        if not isinstance(parent, int):
            raise TypeError("an mmh3 chain state is an int")
        data = _token_bytes(token_ids[start_block * bs : end_block * bs])
        step = bs * 4
        h = parent
        pack = _PARENT.pack
        for off in range(0, len(data), step):
            h = _hash128(pack(h) + data[off : off + step], 0)[0]
            out.append(h)
        return out, h

    def hash_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Published hashes of every full block of `token_ids`, from the root."""
        hashes, _ = self.extend(self.root, token_ids, 0, len(token_ids) // self.block_size)
        return hashes

    def hash_block(self, parent: int | None, block_token_ids: Sequence[int]) -> int:
        """One mmh3 block hash from its published parent (None for the first block) and its tokens.

        This is what an index rebuilt from BlockStored events can recompute. Not possible for sha256,
        whose chain carries the full digest while events carry only 64 bits of it.
        """
        if self.algo != "mmh3":
            raise ValueError("only the mmh3 chain can be recomputed from published 64-bit parents")
        state = self.root if parent is None else parent
        assert isinstance(state, int)
        return _hash128(_PARENT.pack(state) + _token_bytes(block_token_ids), 0)[0]
