"""MinHash similarity: order-free content overlap, estimated Jaccard, bounded memory."""

from __future__ import annotations

import random

from router.index.chunking import hash_text
from router.index.similarity import SimilarityIndex


def doc(seed: int, chars: int = 1024) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghij ") for _ in range(chars))


def content(text: str) -> tuple[int, ...]:
    return hash_text(text, "m").content


def test_finds_the_replica_holding_the_same_documents_in_another_order() -> None:
    index = SimilarityIndex()
    docs = [doc(i) for i in range(12)]
    for r in range(4):
        sig = index.signature(content("".join(docs[3 * r : 3 * r + 3])))
        assert sig is not None
        index.add(f"r{r}", sig)
    query = index.signature(content(docs[5] + docs[3] + docs[4]))
    assert query is not None
    result = index.query(query)
    assert max(result, key=lambda r: result[r]) == "r1"
    assert result["r1"] > 0.9


def test_estimated_jaccard_tracks_the_true_overlap() -> None:
    index = SimilarityIndex(num_perm=128, threshold=0.1)
    docs = [doc(100 + i) for i in range(10)]
    a = index.signature(content("".join(docs[:6])))
    b = index.signature(content("".join(docs[3:9])))
    assert a is not None and b is not None
    # 3 shared documents of 6 each: Jaccard 3/9 over chunk sets.
    estimate = float(a.minhash.jaccard(b.minhash))
    assert abs(estimate - 1 / 3) < 0.15


def test_large_prompts_are_sampled_consistently() -> None:
    index = SimilarityIndex(max_items=64)
    big = "".join(doc(200 + i) for i in range(40))  # 640 chunks, sampled down to 64
    a, b = index.signature(content(big)), index.signature(content(big[::-1][::-1]))
    assert a is not None and b is not None and a.items == 640
    assert float(a.minhash.jaccard(b.minhash)) == 1.0


def test_memory_is_bounded_per_replica_and_dropping_forgets() -> None:
    index = SimilarityIndex(per_replica=5)
    for i in range(50):
        sig = index.signature(content(doc(i)))
        assert sig is not None
        index.add("r0", sig)
    assert index.size() == 5
    old = index.signature(content(doc(0)))
    recent = index.signature(content(doc(49)))
    assert old is not None and recent is not None
    assert "r0" not in index.query(old)
    assert "r0" in index.query(recent)
    index.drop_replica("r0")
    assert index.size() == 0 and index.query(recent) == {}


def test_no_full_chunk_means_no_signature() -> None:
    assert SimilarityIndex().signature(content("short")) is None
