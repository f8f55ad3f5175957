"""`power_of_two`: two random candidates, the less loaded one wins.

Algorithm ("the power of two choices", Mitzenmacher): draw two distinct candidates with a private
`random.Random(seed)`; take the one with fewer router-side in-flight requests, then fewer in-flight
tokens; on a full tie the first drawn. One candidate: that one. The maximum load grows like
log log n instead of log n / log log n for a single random choice, at the cost of two load reads.

Parameters: `seed` (int, default 0). vllm-router ships it as `power_of_two` (anchors.md).

Config example: `--policy power_of_two:seed=3`
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from router.policies.base import Decision, PolicyBase, RequestView, candidates_or_raise, index_cached_tokens

if TYPE_CHECKING:
    from router.fleet import Fleet


@dataclass(frozen=True, slots=True)
class PowerOfTwoParams:
    seed: int = 0


class PowerOfTwo(PolicyBase):
    name = "power_of_two"

    def __init__(self, params: PowerOfTwoParams | None = None) -> None:
        self.params = params or PowerOfTwoParams()
        self._rng = random.Random(self.params.seed)

    def choose(self, request: RequestView, fleet: Fleet, now: float) -> Decision:
        candidates = candidates_or_raise(fleet, request)
        if len(candidates) == 1:
            chosen = candidates[0]
        else:
            a, b = self._rng.sample(candidates, 2)
            chosen = (
                b
                if (b.inflight_requests, b.inflight_tokens) < (a.inflight_requests, a.inflight_tokens)
                else a
            )
        return Decision(chosen.name, index_cached_tokens(fleet, request, chosen.name), "power-of-two")
