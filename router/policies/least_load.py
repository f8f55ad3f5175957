"""`least_load`: each request to the candidate with the fewest router-side in-flight requests.

Algorithm: minimise `(in-flight requests, in-flight tokens, name)` over the candidates, where
in-flight means routed by this router and not yet done (the Fleet's lifecycle load, fresh at every
routing, so a burst spreads even while scraped metrics are stale). Ties by tokens (prefill still to do
plus prompts held while decoding), then by name so the choice is deterministic.

Parameters: none. The load-only rule SGLang's cache_aware falls back to when imbalanced and, in its
newer versions, uses on a cache miss (anchors.md); it keeps no locality at all.

Config example: `--policy least_load`
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from router.policies.base import Decision, PolicyBase, RequestView, candidates_or_raise, index_cached_tokens

if TYPE_CHECKING:
    from router.fleet import Fleet, ReplicaState


@dataclass(frozen=True, slots=True)
class LeastLoadParams:
    """No parameters."""


def least_loaded(candidates: list[ReplicaState]) -> ReplicaState:
    """The candidate with the fewest in-flight requests, then tokens, then the smallest name."""
    return min(candidates, key=lambda s: (s.inflight_requests, s.inflight_tokens, s.name))


class LeastLoad(PolicyBase):
    name = "least_load"

    def __init__(self, params: LeastLoadParams | None = None) -> None:
        self.params = params or LeastLoadParams()

    def choose(self, request: RequestView, fleet: Fleet, now: float) -> Decision:
        replica = least_loaded(candidates_or_raise(fleet, request)).name
        return Decision(replica, index_cached_tokens(fleet, request, replica), "least-load")
