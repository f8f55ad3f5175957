"""`sglang`: SGLang router's `cache_aware` policy — its own character radix tree, a load-imbalance escape.

Algorithm (anchors.md, "SGLang router, cache_aware"; as the sgl-router / smg header comment states it):
1. Load = the router's own in-flight request count per replica (routed, not done).
2. Over the candidates, the fleet is *imbalanced* when
       max_load - min_load > balance_abs_threshold  and  max_load > balance_rel_threshold * min_load;
   then the least-loaded candidate takes the request (reason "imbalance"), whatever it holds.
3. Otherwise match the prompt text in this model's radix tree (router/policies/char_tree.py):
   match_rate = matched characters / prompt characters. If match_rate > cache_threshold, the first
   holder of the deepest matched node takes it ("prefix-hit"; load does not break ties). Else the
   candidate with the smallest tree ("smallest-tree"), or with `miss=least_load` the least-loaded
   one ("least-load"), as newer versions do.
4. The prompt (never the output) is inserted under the chosen replica when the request is routed.
   Every `eviction_interval_s` the tree is trimmed: per replica, least recently used leaves go until
   it holds at most `max_tree_size` characters. Between runs it grows without bound, as SGLang's does.

The tree is the policy's own, not the Fleet's PrefixIndex: SGLang sees only what it routed, by
characters, without a tokenizer, and that is the behaviour being measured.

Parameters and defaults: `cache_threshold` 0.5, `balance_abs_threshold` 32, `balance_rel_threshold` 1.1,
`eviction_interval_s` 30 (the docs' example, anchors.md); `max_tree_size` 67,108,864 characters (smg's
`--max-tree-size` default); `miss` "smallest_tree" (or "least_load").
Known failures it reproduces (anchors.md): on a miss the smallest tree ignores load and piles onto a
busy replica; under high load the imbalance branch discards locality; a request count cannot see
long-context KV saturation.

Config example: `--policy sglang:cache_threshold=0.5,balance_abs_threshold=32,miss=least_load`
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from router.policies.base import Decision, PolicyBase, RequestView, candidates_or_raise
from router.policies.char_tree import CharTree

if TYPE_CHECKING:
    from router.fleet import Fleet, ReplicaState

MISS_RULES = ("smallest_tree", "least_load")


@dataclass(frozen=True, slots=True)
class SglangParams:
    cache_threshold: float = 0.5
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.1
    eviction_interval_s: float = 30.0
    max_tree_size: int = 1 << 26
    miss: str = "smallest_tree"

    def __post_init__(self) -> None:
        if self.miss not in MISS_RULES:
            raise ValueError(f"miss must be one of {', '.join(MISS_RULES)}; got {self.miss!r}")
        if self.max_tree_size <= 0 or self.eviction_interval_s < 0:
            raise ValueError("max_tree_size must be positive and eviction_interval_s non-negative")


def _least_loaded(candidates: list[ReplicaState]) -> ReplicaState:
    return min(candidates, key=lambda s: (s.inflight_requests, s.name))


class Sglang(PolicyBase):
    name = "sglang"

    def __init__(self, params: SglangParams | None = None) -> None:
        self.params = params or SglangParams()
        self._trees: dict[str, CharTree] = {}
        self._last_eviction: float | None = None

    def tree(self, model: str) -> CharTree:
        tree = self._trees.get(model)
        if tree is None:
            tree = self._trees[model] = CharTree()
        return tree

    def is_imbalanced(self, candidates: list[ReplicaState]) -> bool:
        loads = [s.inflight_requests for s in candidates]
        hi, lo = max(loads), min(loads)
        p = self.params
        return hi - lo > p.balance_abs_threshold and hi > p.balance_rel_threshold * lo

    def choose(self, request: RequestView, fleet: Fleet, now: float) -> Decision:
        candidates = candidates_or_raise(fleet, request)
        tree = self._trees.get(request.model) or CharTree()
        if self.is_imbalanced(candidates):
            chosen, reason = _least_loaded(candidates).name, "imbalance"
        else:
            names = {s.name for s in candidates}
            matched, holder = tree.match(request.text, names)
            rate = matched / len(request.text) if request.text else 0.0
            if holder is not None and rate > self.params.cache_threshold:
                chosen, reason = holder, "prefix-hit"
            elif self.params.miss == "least_load":
                chosen, reason = _least_loaded(candidates).name, "least-load"
            else:
                chosen, reason = tree.smallest_tenant(sorted(names)), "smallest-tree"
        return Decision(chosen, self._cached_tokens(tree, request, chosen), reason)

    @staticmethod
    def _cached_tokens(tree: CharTree, request: RequestView, replica: str) -> int:
        # The tree counts characters; prorate to tokens (what SGLang would expect the replica to hold).
        if not request.text:
            return 0
        return request.prompt_tokens * tree.matched_chars(request.text, replica) // len(request.text)

    def on_routed(self, request: RequestView, decision: Decision, fleet: Fleet, now: float) -> None:
        self.tree(request.model).insert(request.text, decision.replica, now)
        if self._last_eviction is None:
            self._last_eviction = now
        if now - self._last_eviction >= self.params.eviction_interval_s:  # 0: after every insert
            self._last_eviction = now
            for tree in self._trees.values():
                tree.evict(self.params.max_tree_size)

    def on_replica_removed(self, replica: str) -> None:
        for tree in self._trees.values():
            tree.remove_tenant(replica)
