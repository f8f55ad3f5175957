"""Content similarity: which replicas recently received most of this request's content, in any order.

MinHash (datasketch) over a request's *unchained* chunk hashes, with an LSH index of the signatures
each replica recently received. Prefix matching finds reuse vLLM can serve directly; similarity finds
requests that share documents in another order (RAG) or near-duplicate prefixes (to merge them into
one hot group), which prefix matching scores as zero.

Choices (measured here, docs/BENCHMARKS.md):
- 64 permutations: the standard error of a Jaccard estimate is about sqrt(J(1-J)/P), so 0.06 at
  J = 0.5 — enough to rank replicas — for half the cost of 128.
- A signature covers at most `max_items` (256) distinct chunk hashes, chosen as the smallest hash
  values (a bottom-k sample, consistent across requests, so two requests' samples of shared content
  coincide). Building one from 2,048 items costs about 2.8 ms here against 0.4 ms from 256, and the
  sample keeps the Jaccard estimate unbiased for sets that share most content.
- Permutations are drawn once per index and shared by every signature (datasketch otherwise draws
  them per MinHash, about 0.25 ms each).
- Callers decide how often to build signatures; the policies build one per request only when the
  prefix match is short, so a cache hit costs nothing here.
- Memory is bounded: at most `per_replica` signatures per replica (oldest dropped first), each
  P x 8 bytes plus LSH bucket entries.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from datasketch import MinHash

_U64 = 0xFFFFFFFFFFFFFFFF


def _identity(value: int) -> int:
    return value


@dataclass(frozen=True, slots=True)
class Signature:
    """A MinHash signature of one request's content, with the number of distinct items it covers."""

    minhash: MinHash
    items: int


class SimilarityIndex:
    """Per-replica recent content signatures, queried by estimated Jaccard similarity."""

    def __init__(
        self,
        num_perm: int = 64,
        threshold: float = 0.3,
        per_replica: int = 64,
        max_items: int = 256,
        seed: int = 1,
    ) -> None:
        if per_replica <= 0 or max_items <= 0 or num_perm <= 0:
            raise ValueError("num_perm, per_replica and max_items must be positive")
        self.num_perm = num_perm
        self.threshold = threshold
        self.per_replica = per_replica
        self.max_items = max_items
        self._seed = seed
        # datasketch is imported here, not at module level: it pulls in scipy (about 0.6 s here), which
        # everything importing router.index (the CLI's --help included) would otherwise pay.
        from datasketch import MinHash, MinHashLSH

        template = MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity, scheme="affine64")
        self._permutations = template.permutations
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._recent: dict[str, deque[str]] = {}  # replica -> its LSH keys, oldest first
        self._stored: dict[str, tuple[str, Signature]] = {}  # LSH key -> (replica, signature)
        self._serial = 0

    def signature(self, content_hashes: Sequence[int]) -> Signature | None:
        """The signature of a request's content; None when it has no full chunk."""
        distinct = set(content_hashes)
        if not distinct:
            return None
        if len(distinct) > self.max_items:
            sample: Sequence[int] = heapq.nsmallest(self.max_items, distinct)
        else:
            sample = list(distinct)
        from datasketch import MinHash  # already loaded by __init__: a dict lookup

        m = MinHash(
            num_perm=self.num_perm,
            seed=self._seed,
            hashfunc=_identity,
            scheme="affine64",
            permutations=self._permutations,
        )
        m.update_batch(np.fromiter((h & _U64 for h in sample), dtype=np.uint64, count=len(sample)))
        return Signature(m, len(distinct))

    def add(self, replica: str, signature: Signature) -> None:
        """Remember that `replica` received this content, forgetting its oldest beyond the bound."""
        recent = self._recent.setdefault(replica, deque())
        self._serial += 1
        key = f"{replica}\x00{self._serial}"
        self._lsh.insert(key, signature.minhash)
        self._stored[key] = (replica, signature)
        recent.append(key)
        while len(recent) > self.per_replica:
            self._forget(recent.popleft())

    def _forget(self, key: str) -> None:
        self._lsh.remove(key)
        del self._stored[key]

    def query(self, signature: Signature) -> dict[str, float]:
        """{replica: best estimated Jaccard} over replicas whose signatures pass the LSH threshold."""
        best: dict[str, float] = {}
        for key in self._lsh.query(signature.minhash):
            replica, stored = self._stored[key]
            j = float(signature.minhash.jaccard(stored.minhash))
            if j > best.get(replica, 0.0):
                best[replica] = j
        return best

    def drop_replica(self, replica: str) -> None:
        for key in self._recent.pop(replica, ()):
            self._forget(key)

    def size(self) -> int:
        return len(self._stored)
