"""`dynamo`: NVIDIA Dynamo's KV router — lowest predicted cost of prefill plus decode, in blocks.

Algorithm (anchors.md, "NVIDIA Dynamo KV router"), per candidate with block size `bs`:
    prefill_blocks = (in-flight prefill tokens + prompt tokens - overlap_blocks * bs) / bs
    decode_blocks  = active blocks + this request's new blocks
    cost           = overlap_weight * prefill_blocks + decode_blocks
- overlap: the request's prefix held by the replica, from the Fleet's PrefixIndex (Dynamo's
  approximate mode without events counts routed blocks as stored; the Fleet inserts at routing time).
- in-flight prefill tokens and active blocks are the router's own prediction, updated at route, at
  first token (prefill done) and at finish: the Fleet's lifecycle load. Active blocks count a block
  shared by several in-flight requests once, as Dynamo's active-sequence tracker does; new blocks are
  the request's blocks that no in-flight request on that replica already uses.
- temperature 0: lowest cost wins; ties go to the replica with the fewest indexed blocks (the smallest
  tree), then to a seeded random choice. temperature T > 0: costs are normalised to [0, 1] and a
  replica is sampled with probability proportional to exp(-normalised / T).

Parameters and defaults (Dynamo's): `overlap_weight` 1.0, `temperature` 0.0, `seed` 0.
Output tokens are not predicted (the router learns them only at the end), so decode blocks cover
prompts only.

Config example: `--policy dynamo:overlap_weight=1.0,temperature=0`
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from router.policies.base import Decision, PolicyBase, RequestView, candidates_or_raise

if TYPE_CHECKING:
    from router.fleet import Fleet

_TIE = 1e-9


@dataclass(frozen=True, slots=True)
class DynamoParams:
    overlap_weight: float = 1.0
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.overlap_weight < 0 or self.temperature < 0:
            raise ValueError("overlap_weight and temperature must be non-negative")


class Dynamo(PolicyBase):
    name = "dynamo"

    def __init__(self, params: DynamoParams | None = None) -> None:
        self.params = params or DynamoParams()
        self._rng = random.Random(self.params.seed)

    def costs(self, request: RequestView, fleet: Fleet) -> dict[str, float]:
        """Each candidate's cost in blocks (exposed for tests and for explaining a decision)."""
        chained = request.hashes.chained
        matches = fleet.index.longest_match(chained)
        out: dict[str, float] = {}
        for s in candidates_or_raise(fleet, request):
            bs = s.block_size
            cached = request.cached_tokens(matches.get(s.name, 0))
            prefill_blocks = (s.inflight_prefill_tokens + request.prompt_tokens - cached) / bs
            already_active = request.cached_tokens(fleet.active_chunks(s.name, chained))
            new_blocks = math.ceil((request.prompt_tokens - already_active) / bs)
            out[s.name] = self.params.overlap_weight * prefill_blocks + s.active_blocks + new_blocks
        return out

    def choose(self, request: RequestView, fleet: Fleet, now: float) -> Decision:
        costs = self.costs(request, fleet)
        if self.params.temperature > 0:
            chosen = self._sample(costs)
        else:
            low = min(costs.values())
            tied = [name for name, cost in costs.items() if cost <= low + _TIE]
            fewest = min(fleet.index.size(name) for name in tied)
            tied = [name for name in tied if fleet.index.size(name) == fewest]
            chosen = tied[0] if len(tied) == 1 else self._rng.choice(tied)
        matched = fleet.index.longest_match(request.hashes.chained).get(chosen, 0)
        return Decision(chosen, request.cached_tokens(matched), "prefix-hit" if matched else "least-cost")

    def _sample(self, costs: dict[str, float]) -> str:
        names = list(costs)
        lo, hi = min(costs.values()), max(costs.values())
        if hi - lo <= _TIE:
            return self._rng.choice(names)
        weights = [math.exp(-((costs[n] - lo) / (hi - lo)) / self.params.temperature) for n in names]
        return self._rng.choices(names, weights=weights)[0]
