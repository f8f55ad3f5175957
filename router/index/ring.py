"""Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, SODA 2018).

Where does a prefix group go when no replica holds it yet? To the replica that owns its key on a hash
ring — so independent router instances agree without talking, and a replica joining or leaving moves
only about 1/N of the keys — unless that replica is over its bound, in which case the key walks on
clockwise to the first replica within it.

Rules:
- Every replica has `vnodes` points on a 64-bit ring (default 256: KubeAI's `replication` default;
  fewer points give visibly uneven shares, KubeAI's own reported failure).
- The bound: a replica may take a request of `cost` only if `load + cost <= ceil(c * (total + cost) / n)`,
  with `total` the candidates' summed load and `n` their number (c = `load_factor`, default 1.25:
  KubeAI's `meanLoadFactor` 125%). For unit costs the least-loaded candidate always satisfies it;
  for a larger cost (a request weighed in tokens) on a nearly idle fleet it may not, so the bound is
  raised to at least `min_load + cost`: the least-loaded candidate then always fits, and `pick` never
  returns a replica above the bound while one below exists.
- `pick` only considers `candidates` (healthy replicas serving the model) when given.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Collection, Mapping

import mmh3

_hash128 = mmh3.mmh3_x64_128_utupledigest


def _point(replica: str, vnode: int) -> int:
    return _hash128(f"{replica}#{vnode}".encode(), 0)[0]


class BoundedLoadRing:
    """A hash ring of replicas with a load bound applied when picking."""

    def __init__(self, vnodes: int = 256, load_factor: float = 1.25) -> None:
        if vnodes <= 0:
            raise ValueError(f"vnodes must be positive, got {vnodes}")
        if load_factor < 1.0:
            raise ValueError(f"load_factor must be >= 1.0, got {load_factor}")
        self.vnodes = vnodes
        self.load_factor = load_factor
        self._members: set[str] = set()
        self._points: list[int] = []
        self._owners: list[str] = []

    def __contains__(self, replica: object) -> bool:
        return replica in self._members

    def __len__(self) -> int:
        return len(self._members)

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._members)

    def add(self, replica: str) -> None:
        """Add a replica's points (idempotent). O(V log(NV)) for N replicas of V points."""
        if replica in self._members:
            return
        self._members.add(replica)
        self._rebuild()

    def remove(self, replica: str) -> None:
        """Remove a replica's points (idempotent)."""
        if replica not in self._members:
            return
        self._members.discard(replica)
        self._rebuild()

    def _rebuild(self) -> None:
        # Ties between points (astronomically rare with 64-bit hashes) break by name, so every
        # router instance builds the same ring.
        ring = sorted((_point(r, v), r) for r in self._members for v in range(self.vnodes))
        self._points = [p for p, _ in ring]
        self._owners = [r for _, r in ring]

    def owner(self, key: int) -> str:
        """The replica owning `key` with no load bound (the first point clockwise)."""
        if not self._points:
            raise LookupError("the ring is empty")
        i = bisect_left(self._points, key & 0xFFFFFFFFFFFFFFFF)
        return self._owners[i % len(self._owners)]

    def bound(self, loads: Mapping[str, float], candidates: Collection[str], cost: float = 1.0) -> float:
        """The most load a candidate may have after taking `cost`:
        max(ceil(c * (total + cost) / n), min_load + cost)."""
        values = [loads.get(r, 0.0) for r in candidates]
        return max(math.ceil(self.load_factor * (sum(values) + cost) / len(values)), min(values) + cost)

    def order(self, key: int, candidates: Collection[str] | None = None) -> list[str]:
        """Candidates in ring order clockwise from `key`: the preference list with no load bound."""
        eligible = self._members if candidates is None else set(candidates) & self._members
        points, owners = self._points, self._owners
        n = len(points)
        start = bisect_left(points, key & 0xFFFFFFFFFFFFFFFF) if n else 0
        out: list[str] = []
        seen: set[str] = set()
        for step in range(n):
            replica = owners[(start + step) % n]
            if replica in eligible and replica not in seen:
                seen.add(replica)
                out.append(replica)
                if len(out) == len(eligible):
                    break
        return out

    def pick(
        self,
        key: int,
        loads: Mapping[str, float],
        candidates: Collection[str] | None = None,
        cost: float = 1.0,
    ) -> str:
        """The first replica clockwise from `key` whose load stays within the bound after `cost`.

        O(log(NV)) to find the start, then a walk that is short unless most replicas are at the bound.
        Raises LookupError if no candidate is on the ring.
        """
        eligible: Collection[str] = (
            self._members if candidates is None else [r for r in candidates if r in self._members]
        )
        if not eligible:
            raise LookupError("no candidate replica is on the ring")
        eligible_set = eligible if isinstance(eligible, (set, frozenset)) else set(eligible)
        limit = self.bound(loads, eligible_set, cost)
        points, owners = self._points, self._owners
        n = len(points)
        start = bisect_left(points, key & 0xFFFFFFFFFFFFFFFF)
        seen: set[str] = set()
        for step in range(n):
            replica = owners[(start + step) % n]
            if replica in seen or replica not in eligible_set:
                continue
            if loads.get(replica, 0.0) + cost <= limit:
                return replica
            seen.add(replica)
            if len(seen) == len(eligible_set):
                break
        # Unreachable while loads are non-negative (the least-loaded candidate always fits); with
        # negative or NaN loads fall back to the least loaded rather than fail a request.
        return min(eligible_set, key=lambda r: (loads.get(r, 0.0), r))
