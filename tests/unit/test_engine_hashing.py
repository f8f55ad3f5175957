"""Block hashes: the fast mmh3 chain, and vLLM's sha256 scheme reproduced from its published formula."""

from __future__ import annotations

import hashlib
import pickle
import struct
from array import array

import mmh3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.engine import Engine, get_preset
from workers.engine.hashing import BlockHasher
from workers.engine.kv_cache import BlockStored

token_lists = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=80)


def vllm_sha256_chain(tokens: list[int], block_size: int, seed: str = "vllm-none-hash") -> list[int]:
    """Written from the formula in shared/design/vllm-interfaces.md, independently of the engine."""

    def h(obj: object) -> bytes:
        return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()

    parent = h(seed)
    out = []
    for i in range(len(tokens) // block_size):
        parent = h((parent, tuple(tokens[i * block_size : (i + 1) * block_size]), None))
        out.append(int.from_bytes(parent, byteorder="big") & ((1 << 64) - 1))
    return out


def mmh3_chain(tokens: list[int], block_size: int) -> list[int]:
    parent = mmh3.mmh3_x64_128_utupledigest(b"vllm-none-hash", 0)[0]
    out = []
    for i in range(len(tokens) // block_size):
        block = array("I", tokens[i * block_size : (i + 1) * block_size]).tobytes()
        parent = mmh3.mmh3_x64_128_utupledigest(struct.pack("<Q", parent) + block, 0)[0]
        out.append(parent)
    return out


@pytest.mark.parametrize("seed", ["vllm-none-hash", "0", "12345"])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_sha256_reproduces_vllms_formula(seed: str, block_size: int) -> None:
    tokens = [(i * 7919) % 32000 for i in range(100)]
    hasher = BlockHasher(block_size, "sha256", none_hash_seed=seed)
    assert hasher.hash_prefix(tokens) == vllm_sha256_chain(tokens, block_size, seed)


def test_sha256_seed_changes_every_hash() -> None:
    tokens = list(range(64))
    a = BlockHasher(16, "sha256").hash_prefix(tokens)
    b = BlockHasher(16, "sha256", none_hash_seed="0").hash_prefix(tokens)
    assert all(x != y for x, y in zip(a, b, strict=True))


@given(token_lists, st.sampled_from([1, 4, 16]))
def test_mmh3_chain_matches_its_documented_formula(tokens: list[int], block_size: int) -> None:
    assert BlockHasher(block_size).hash_prefix(tokens) == mmh3_chain(tokens, block_size)


@given(token_lists, token_lists)
def test_equal_prefixes_give_equal_hashes_and_only_full_blocks_are_hashed(a: list[int], b: list[int]) -> None:
    hasher = BlockHasher(4)
    ha, hab = hasher.hash_prefix(a), hasher.hash_prefix(a + b)
    assert len(ha) == len(a) // 4 and len(hab) == len(a + b) // 4
    full = len(a) // 4
    assert hab[:full] == ha


def test_a_changed_token_changes_its_block_and_every_later_one() -> None:
    hasher = BlockHasher(4)
    tokens = list(range(16))
    changed = tokens.copy()
    changed[5] = 999
    a, b = hasher.hash_prefix(tokens), hasher.hash_prefix(changed)
    assert a[0] == b[0]
    assert all(x != y for x, y in zip(a[1:], b[1:], strict=True))


def test_extend_continues_a_chain_block_by_block() -> None:
    hasher = BlockHasher(4, "sha256")
    tokens = list(range(20))
    first, state = hasher.extend(hasher.root, tokens, 0, 2)
    rest, _ = hasher.extend(state, tokens, 2, 5)
    assert first + rest == hasher.hash_prefix(tokens)


def test_hash_block_recomputes_mmh3_from_published_parents_only() -> None:
    hasher = BlockHasher(4)
    tokens = list(range(12))
    hashes = hasher.hash_prefix(tokens)
    assert hasher.hash_block(None, tokens[:4]) == hashes[0]
    assert hasher.hash_block(hashes[1], tokens[8:12]) == hashes[2]
    with pytest.raises(ValueError):
        BlockHasher(4, "sha256").hash_block(None, tokens[:4])


@pytest.mark.parametrize("bad", [[-1], [2**32], [1.5]])
def test_token_ids_outside_uint32_are_refused(bad: list[int]) -> None:
    with pytest.raises(ValueError):
        BlockHasher(1).hash_prefix(bad)


def test_unknown_algo_and_bad_block_size_are_refused() -> None:
    with pytest.raises(ValueError, match="mmh3, sha256"):
        BlockHasher(16, "xxhash")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BlockHasher(0)


def test_engine_in_sha256_mode_publishes_vllms_hashes_in_its_events() -> None:
    engine = Engine(get_preset("tiny"), hash_algo="sha256", enable_kv_cache_events=True)
    prompt = [(i * 31) % 32000 for i in range(70)]
    engine.submit("r", prompt, 3, 0.0)
    now = 0.0
    while engine.has_work():
        now = engine.step(now).end
    stored = [h for e in engine.drain_events() if isinstance(e, BlockStored) for h in e.block_hashes]
    assert stored[:4] == vllm_sha256_chain(prompt, 16)
