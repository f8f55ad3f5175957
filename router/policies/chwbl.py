"""`chwbl`: KubeAI's PrefixHash — consistent hashing with bounded loads over a prompt-prefix key.

Algorithm (anchors.md, "KubeAI PrefixHash (CHWBL)"):
1. key = the first `prefix_char_length` (100) characters of the first user message; for a completions
   prompt (no messages) the first 100 characters of the prompt text.
2. Every replica has `replication` (256) points on a 64-bit hash ring. Walk clockwise from hash(key)
   to the first candidate whose router-side in-flight request count satisfies
       in_flight <= (total_in_flight + 1) / n * mean_load_factor / 100
   with total and n over the candidates (healthy, serving the model). The least-loaded candidate
   always satisfies it (its load is at most the mean), so the walk ends within one lap.
3. Load is the router's in-flight request count (routed, not done), as KubeAI counts its own.

This is KubeAI's bound as anchors.md states it (the current load against a float threshold), not the
ceil'ed `load + cost` bound of router/index/ring.py that kvaware uses, hence its own small ring here.
Points and the key are hashed with MurmurHash3 where KubeAI uses xxhash: the placement differs, its
statistics do not.

Parameters and defaults (KubeAI's): `prefix_char_length` 100, `replication` 256, `mean_load_factor`
125 (percent). Known failure (anchors.md): with a small replication factor, 80 vs 1-10 requests a pod.

Config example: `--policy chwbl:replication=256,mean_load_factor=125`
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mmh3

from router.policies.base import Decision, PolicyBase, RequestView, candidates_or_raise, index_cached_tokens

if TYPE_CHECKING:
    from router.fleet import Fleet

_hash128 = mmh3.mmh3_x64_128_utupledigest


@dataclass(frozen=True, slots=True)
class ChwblParams:
    prefix_char_length: int = 100
    replication: int = 256
    mean_load_factor: int = 125  # percent

    def __post_init__(self) -> None:
        if self.prefix_char_length <= 0 or self.replication <= 0:
            raise ValueError("prefix_char_length and replication must be positive")
        if self.mean_load_factor < 100:
            raise ValueError("mean_load_factor is a percentage and must be >= 100")


def chwbl_key(request: RequestView, prefix_char_length: int) -> str:
    """KubeAI's key: the start of the first user message, else of the prompt text."""
    source = request.first_user_text if request.first_user_text is not None else request.text
    return source[:prefix_char_length]


class Chwbl(PolicyBase):
    name = "chwbl"

    def __init__(self, params: ChwblParams | None = None) -> None:
        self.params = params or ChwblParams()
        self._members: set[str] = set()
        self._points: list[int] = []
        self._owners: list[str] = []

    def on_replica_added(self, replica: str) -> None:
        if replica not in self._members:
            self._members.add(replica)
            self._rebuild()

    def on_replica_removed(self, replica: str) -> None:
        if replica in self._members:
            self._members.discard(replica)
            self._rebuild()

    def _rebuild(self) -> None:
        ring = sorted(
            (_hash128(f"{r}#{v}".encode(), 0)[0], r)
            for r in self._members
            for v in range(self.params.replication)
        )
        self._points = [p for p, _ in ring]
        self._owners = [r for _, r in ring]

    def choose(self, request: RequestView, fleet: Fleet, now: float) -> Decision:
        candidates = candidates_or_raise(fleet, request)
        loads = {s.name: s.inflight_requests for s in candidates}
        missing = loads.keys() - self._members
        if missing:  # used with a fleet it was not attached to: learn its replicas
            self._members |= missing
            self._rebuild()
        threshold = (sum(loads.values()) + 1) / len(loads) * self.params.mean_load_factor / 100
        key = _hash128(
            chwbl_key(request, self.params.prefix_char_length).encode("utf-8", "surrogatepass"), 0
        )[0]
        n = len(self._points)
        start = bisect_left(self._points, key)
        chosen = None
        for step in range(n):
            owner = self._owners[(start + step) % n]
            load = loads.get(owner)
            if load is not None and load <= threshold:
                chosen = owner
                break
        if chosen is None:  # unreachable with non-negative loads; never fail a request over it
            chosen = min(loads, key=lambda r: (loads[r], r))
        return Decision(chosen, index_cached_tokens(fleet, request, chosen), "ring")
