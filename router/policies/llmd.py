"""`llmd`: the llm-d inference scheduler's default profile — weighted scorers, then a max-score picker.

Algorithm (anchors.md, "llm-d inference scheduler"): every candidate gets
    score = prefix_weight * prefix + queue_weight * queue + kv_weight * kv_util (+ load_weight * load)
with each scorer in [0, 1]:
- prefix (approximate prefix-cache scorer): matched blocks / total blocks, where blocks are the
  request's chained chunk hashes (64 characters = 16 tokens x 4, chained and seeded by model, exactly
  llm-d's block) capped at `max_prefix_blocks`, and matches come from the Fleet's PrefixIndex, which
  the Fleet writes at routing time as llm-d's approximate index is.
- queue: (maxQ - q) / (maxQ - minQ) over the scraped `vllm:num_requests_waiting`; 1.0 when all equal.
- kv_util: 1 - scraped `vllm:kv_cache_usage_perc`.
- load (load-aware scorer, off in the default profile): 0.5 if nothing waits, else
  0.5 * (1 - waiting / load_queue_threshold), floored at 0.
The max-score picker takes the highest score; ties go to a seeded random choice.
The scraped signals are a scrape interval old, so a burst between scrapes sees equal queues: that
staleness is part of the baseline being measured.

Parameters and defaults (llm-d's default profile): `prefix_weight` 3, `queue_weight` 2, `kv_weight` 2,
`load_weight` 0, `load_queue_threshold` 128, `max_prefix_blocks` 256, `seed` 0. llm-d's per-pod LRU
of 31,250 blocks is the Fleet's index capacity here (FleetConfig / vllm:cache_config_info).

Config example: `--policy llmd:prefix_weight=3,queue_weight=2,kv_weight=2`
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from router.policies.base import Decision, PolicyBase, RequestView, candidates_or_raise

if TYPE_CHECKING:
    from router.fleet import Fleet, ReplicaState

_TIE = 1e-9


@dataclass(frozen=True, slots=True)
class LlmdParams:
    prefix_weight: float = 3.0
    queue_weight: float = 2.0
    kv_weight: float = 2.0
    load_weight: float = 0.0
    load_queue_threshold: int = 128
    max_prefix_blocks: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.prefix_weight, self.queue_weight, self.kv_weight, self.load_weight) < 0:
            raise ValueError("scorer weights must be non-negative")
        if self.max_prefix_blocks <= 0 or self.load_queue_threshold <= 0:
            raise ValueError("max_prefix_blocks and load_queue_threshold must be positive")


def queue_scores(candidates: list[ReplicaState]) -> dict[str, float]:
    """llm-d's queue scorer: (maxQ - q) / (maxQ - minQ) over waiting requests; 1.0 when all equal."""
    waiting = {s.name: s.num_requests_waiting for s in candidates}
    hi, lo = max(waiting.values()), min(waiting.values())
    if hi == lo:
        return dict.fromkeys(waiting, 1.0)
    return {name: (hi - q) / (hi - lo) for name, q in waiting.items()}


class Llmd(PolicyBase):
    name = "llmd"

    def __init__(self, params: LlmdParams | None = None) -> None:
        self.params = params or LlmdParams()
        self._rng = random.Random(self.params.seed)

    def scores(self, request: RequestView, candidates: list[ReplicaState], fleet: Fleet) -> dict[str, float]:
        """Each candidate's weighted score (exposed for tests and for explaining a decision)."""
        p = self.params
        blocks = request.hashes.chained[: p.max_prefix_blocks]
        matches = fleet.index.longest_match(blocks)
        queue = queue_scores(candidates)
        out: dict[str, float] = {}
        for s in candidates:
            prefix = matches.get(s.name, 0) / len(blocks) if blocks else 0.0
            kv_util = 1.0 - min(max(s.kv_cache_usage_perc, 0.0), 1.0)
            w = s.num_requests_waiting
            load = 0.5 if w == 0 else max(0.0, 0.5 * (1 - w / p.load_queue_threshold))
            out[s.name] = (
                p.prefix_weight * prefix
                + p.queue_weight * queue[s.name]
                + p.kv_weight * kv_util
                + p.load_weight * load
            )
        return out

    def choose(self, request: RequestView, fleet: Fleet, now: float) -> Decision:
        candidates = candidates_or_raise(fleet, request)
        scores = self.scores(request, candidates, fleet)
        best = max(scores.values())
        tied = [name for name, score in scores.items() if score >= best - _TIE]
        chosen = tied[0] if len(tied) == 1 else self._rng.choice(tied)
        matched = fleet.index.longest_match(request.hashes.chained).get(chosen, 0)
        return Decision(chosen, request.cached_tokens(matched), "prefix-hit" if matched else "scored")
