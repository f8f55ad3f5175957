"""Which chained chunk hashes have been seen before, anywhere: the logical (infinite-cache) hit.

Pure, like the rest of router/index. The router's amnesia-tax meter (router/metrics.py) keeps a
bounded one; the simulator, the workloads' default-rate probe and the benchmarks keep unbounded ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


class SeenChunks:
    """A memory of chained chunk hashes, approximately LRU, for the logical hit count.

    Two generations of sets: new hashes (and hashes seen again) go into `young`; when it holds
    `capacity / 2`, it becomes `old` and the previous old is dropped. So it always remembers at least
    the last capacity/2 distinct chunks used and never more than `capacity`, at O(1) per chunk and
    about a set slot plus a shared int per entry (the ints are the same objects the index holds).
    `capacity=None` never forgets: the exact infinite cache that benchmarks measure the logical
    limit with (their workloads are bounded, so their memory is too); a live router must bound it.
    """

    __slots__ = ("_half", "_old", "_young")

    _half: float

    def __init__(self, capacity: int | None = 1 << 20) -> None:
        if capacity is not None and capacity < 2:
            raise ValueError("capacity must be at least 2")
        self._half = math.inf if capacity is None else capacity // 2
        self._young: set[int] = set()
        self._old: set[int] = set()

    def __len__(self) -> int:
        young = self._young
        return len(young) + sum(1 for h in self._old if h not in young)

    def match_and_add(self, chained: Sequence[int]) -> int:
        """How many leading chunks of `chained` were seen before; then remember them all."""
        young, old = self._young, self._old
        if young.issuperset(chained):  # all seen lately (a repeated prefix): one C call, nothing to add
            return len(chained)
        matched, counting = 0, True
        for h in chained:
            if counting and (h in young or h in old):
                matched += 1
            else:
                counting = False
            if h not in young:
                young.add(h)
                if len(young) >= self._half:
                    self._old, self._young = young, set()
                    young, old = self._young, self._old
        return matched
