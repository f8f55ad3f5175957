"""`kvaware` (the default): the replica with the smallest estimated time to first token, with a
cache miss charged for the delay its extra prefill imposes on the requests queued behind it.

Algorithm. For each candidate replica r (healthy, not draining, serving the model), in prefill
tokens and prefill-token equivalents (one = 1 / prefill_rate(r) seconds of engine time):

    queue(r)    = in-flight prefill tokens(r)                              router-side, fresh
                  - progress(r)                                            floored at 0
                  + waiting_not_ours(r) * typical uncached tokens          scraped, stale
    uncached(r) = prompt tokens - cached(r)
    step(r)     = step_base_tokens + decode_seq_tokens * decoding(r)
                  + context_token_cost * (decoding prompts(r) + max_tokens of decoding(r) / 2)
    steps(r)    = max(1, ceil((queue(r) + uncached(r)) / (step_token_budget - decoding(r))))
    TTFT(r)     = (queue(r) + uncached(r) + steps(r) * step(r)) / prefill_rate(r) + stall(r)
                  [+ kv_wait(r)]
    score(r)    = TTFT(r) + recompute_weight * uncached(r) / prefill_rate(r)

- cached(r) = the request's consecutive chunks the Fleet's PrefixIndex says r holds, in tokens.
- in-flight prefill tokens: the uncached prompt tokens of the requests this router sent to r whose first
  token has not come back (Fleet lifecycle: routed -> first token). It changes at every routing, so a
  burst spreads even while every scraped metric is still zero.
- progress(r): vLLM prefills first come, first served, so since `ReplicaState.prefill_since` (the
  routing of the oldest of our prefilling requests, or the last first token before it) the engine has
  been working through that queue: (now - prefill_since) * prefill_rate * c / (c + step(r)), with
  c = min(in-flight prefill tokens, step_token_budget) the prefill a step carries, is done and no longer
  ahead of the request. Without it a replica whose only prefill is about to finish looked a whole
  prefill busier than an idle one, and the fleet herded onto replicas with an empty queue: in the
  simulator (8 x llama-8b-h100, 1,500 requests, default rate, seed 0) no-sharing's mean TTFT was 8%
  above least_load's (0.305 s against 0.282); with it, equal (0.282).
- stall(r) (`stall_wait`, on by default), for replicas holding part of the prompt: progress is credited
  by the clock, so a holder that has stopped producing first tokens (its KV full of running requests,
  preemption, a slower engine than its configured rate) would look idle once the credited progress
  covers its queue, and the recompute weight would keep its group on it. Once the time since
  `prefill_since` exceeds what the model gives our whole queue there plus one step (the one the engine
  may have been in when the head arrived), the overdue time is added to TTFT(r): the stuck holder's
  score grows with the stall and its group spills once the stall outweighs recomputing the prefix —
  within a fraction of a second, where health probes take seconds (tests/integration/
  test_proxy_routing.py: a holder that stops answering). Holders only: on a fleet saturated to its KV
  every replica is past due at times, and charging non-holders turned the choice of a new prompt's
  replica into whichever last sent a first token (simulator, no-sharing, 8 x llama-8b-h100, 2,000
  requests, seed 0: p99 TTFT 6.72 s against 5.85 s; holders only: 5.85 s). Charging every replica
  changed nothing else on the seven workloads (4 x, 600 requests, and 8 x, 2,000, seed 0) but llmd-prefix
  at 8 x, whose fleet runs out of KV during the ramp; holders only, re-run there: mean TTFT 0.202 ->
  0.195 s.
- step(r): every engine step that carries a prefill chunk also carries the fixed cost of a step and one
  token of every decoding sequence, each attending to its context (vLLM's continuous batching; the
  engine model's step time, workers/engine/presets.py, is linear in the same three inputs). decoding(r)
  and their prompts are the router's own lifecycle counts (first token seen, not done); the outputs
  they have generated are unseen, so half their max_tokens stands for them. vLLM gives each decoding
  sequence one token of the step's budget, so a prefill takes steps(r) steps. This is what makes
  decode load (batch size and context) part of the estimate: with the prefill-only estimate
  two replicas with equal prefill queues tied whatever their decode batches.
- The step coefficients are in prefill-token equivalents, so they scale with each replica's prefill
  rate, and follow from published hardware figures (H100 SXM: 989 dense BF16 TFLOPS, 3.35 TB/s):
  `step_base_tokens` 150: a step re-reads the weights (2 bytes a parameter, memory-bound, ~77% of
  bandwidth) while a prefill token costs 2 FLOPs a parameter (~40% of peak): 989e12 * 0.4 /
  (3.35e12 * 0.77) = 153 tokens whatever the model size (107 on an H200's 4.8 TB/s).
  `decode_seq_tokens` 0.8: a decoding sequence computes one token, 2 FLOPs a parameter like a prefill
  token, at a somewhat higher efficiency in a large batch (50% against 40%).
  `context_token_cost` 1/800: attending to one context token reads its KV (128 KiB a token for
  Llama-3.1-8B) at bandwidth, against 16 GFLOPs of compute for a prefill token: 131,072 / 16.06e9 * 153
  = 1/800 (Qwen3-32B on 2 GPUs: ~1/1,600). Model-specific: set it for the served model.
  `step_token_budget` 8192: vLLM's max_num_batched_tokens default on >= 70 GiB GPUs.
  (These are the figures the engine model's llama-8b-h100 preset is derived from, so in the simulator
  the model is right by construction for that preset; halving or doubling them is a fair robustness
  check.)
- Combining fresh and stale load without double counting: the engine's `num_requests_waiting` counts
  our queued requests too. The Fleet snapshots how many of ours were still prefilling when the metrics
  were scraped; only the excess (`ReplicaState.waiting_not_ours`: waiting - ours-at-scrape, floored at
  0, and 0 once the scrape is older than `scrape_max_age_s`) is added, priced at the typical uncached
  size of the requests we route (a moving average). With one router the excess is usually 0 and the
  fresh count rules; with several routers or direct clients it adds what only the engine can see. It
  errs low (some of ours were running, not waiting), never counting our load twice.
- Why the score and not TTFT alone: a miss's prefill is also paid by every request that later queues
  behind it on that replica, and on a saturated fleet the recomputed prefixes are the load. Pure
  TTFT-greedy routing spills whenever a holder's queue exceeds another's by the cached tokens, and each
  spill adds a full prefix of work: in the simulator (load/sim.py, 4 x llama-8b-h100, 600 requests
  of each of the seven built-in workloads at round robin's saturation rate, seed 0) that cascaded into
  4x SGLang's mean TTFT on shared-prefix. With `recompute_weight` 4 kvaware's mean TTFT was the best
  or within 1% of the best baseline's on all seven (1 and 2 still spill too often; 8 changed nothing
  on shared-prefix). Re-measured with the step model (8 x llama-8b-h100, seed 0): 2 lowers agentic's
  p99 (0.131 -> 0.093 s) but raises llmd-prefix's mean at 3,000 requests (3.19 -> 3.43 s), 8 the
  reverse (3.11 s); 4 stayed. Re-measured again (issue #7) at the live benchmark's operating point
  (4 x `demo`, 20 req/s, 16 output tokens, seeds 0-3) and at 4 and 8 x llama-8b-h100 (seed 0): 2
  lowers multi-turn's mean TTFT by 12-19% at the live point (0.396 -> 0.320 s at seed 0, where SGLang's
  rule gives 0.348 s; 3 gives 0.325 s there but trails SGLang at seeds 1 and 2) and agentic's p99
  everywhere, costs rag 2-3% at the live point and 13-19% on the H100 fleets (still 1.8x ahead of
  SGLang's there), and leaves shared-prefix, hot-prefix, llmd-prefix (2,000 and 3,000 requests) and
  no-sharing unchanged; 2 is the default. The results move by up to 20% between neighbouring weights
  (3.5 -> 4 at the live point), so read any single seed with care. A holder is left only when its
  TTFT exceeds another's by more than recompute_weight x the prefill time of the tokens it would
  spare; planned replication of a hot prefix is the hot-prefix controller's job, not the router's.
- kv_wait(r), opt-in (`kv_wait`, off by default): when the KV the in-flight requests have committed
  (`ReplicaState.committed_kv_tokens`: unique prompt KV + their max_tokens) plus this request's
  (prompt + max_tokens, less the chunks in-flight requests on r already use) exceeds
  `kv_capacity_tokens`, the request waits for that excess to be freed: about excess / committed of a
  request lifetime (mean max_tokens of the in-flight requests x step(r)), by Little's law. Off because
  in the simulator it made things worse: on llmd-prefix (3,000 requests, where the whole fleet runs
  out of KV during the ramp's peak) it moved requests off full holders onto other full replicas, each
  move recomputing and duplicating a 6,000-token prefix: mean TTFT 3.19 s without, 5.56 with (4.46
  counting only held KV, not max_tokens). Spilling does not create KV when every replica is short of
  it; what would is admission control, which a router without a queue of its own cannot do.
- Decision:
  * Some candidate holds part of the prefix: the smallest score wins ("prefix-hit", or "spill" when a
    replica without the prefix wins). Scores within `tie_epsilon_s` tie; ties go to the smallest
    in-flight token load, then ring order.
  * No candidate holds any of it (a new prefix group), with `group_balance` (the default): of the
    candidates whose TTFT is within one engine step of the best — (1 + ring_slack) x the best + the best
    replica's step(r) / prefill_rate(r) + `tie_epsilon_s` — and whose in-flight tokens plus the
    request's stay under the ring's load bound (below; all of the close ones when none does), the one
    holding the fewest groups per KV token (`kv_capacity_tokens`; plain counts unless every candidate's
    is known) takes it ("fewest-groups"); ties go to ring order from the group key (below), "ring" when
    every close candidate tied, "least-ttft" when no other was close. The groups a replica holds are the
    group keys routed to it that its index still holds (the key chunk; evicted ones are dropped in LRU
    order, amortised O(1)). Why: once placed, a group's later requests follow it (prefix hits), so the
    groups a replica holds predict the KV and work it will get, which no current load shows — a group
    whose first request has finished is invisible in in-flight load, and once every replica's index is
    at capacity the index size no longer tells replicas apart either. Why one step: a request lands at
    an unknown point of the step in progress, which the estimate does not model, so TTFTs closer than
    one step are not told apart; choosing among them by TTFT was arbitrary (llmd-prefix at 4 x
    llama-8b-h100, 600 requests: 65 of 150 new groups were placed "least-ttft", and whichever replica
    drew a few more groups filled its KV first). Measured (llmd-prefix, 4 x llama-8b-h100, 600 requests,
    seeds 0-3, against `group_balance=false`): TTFT mean 0.180 / 0.216 / 0.201 / 0.188 s against 0.653 /
    0.270 / 1.526 / 1.376, p99 0.38 / 0.48 / 0.41 / 0.42 s against 22.9 / 0.77 / 35.2 / 31.5 (SGLang,
    which evens groups by its smallest tree: p99 0.43 / 0.68 / 0.44 / 0.46); 8 x, 2,000 requests, seed
    0: mean 0.137 against 0.195 s (Dynamo 0.154). The load bound matters on hot-prefix (8 x, 2,000,
    migration off): without it, new groups went to the hot replica, which holds few groups (TTFT mean
    0.086 -> 0.110 s, p99 0.33 -> 0.43); with it, 0.086 / 0.33 as before. Ties within one step: TTFT
    ties alone (margin 0) failed at three of the four seeds; half and two steps did as well as one. The
    other six workloads (8 x, 2,000 requests and 4 x, 600, seed 0): no TTFT mean or p99 worse by more
    than 0.5%, hit rates equal (shared-prefix and hot-prefix a little better: their imbalance fell). Not
    a guarantee: the fleet ends that ramp 90-99% full, and at seed 6 (4 x) the last few requests still
    found their holder full (mean 0.225 against 0.187 s without, p99 0.44 against 0.38; before the load
    bound 0.30 / 0.46); what is left is the hit path's, below.
  * The same without `group_balance`: the bounded-load ring (router/index/ring.py,
    256 vnodes, load factor 1.25, loads = in-flight tokens + tokens the replica's index entries hold,
    unit cost) names an owner by the group key —
    the chained hash of the first `group_chunks` chunks, or of the whole prompt when shorter — so
    independent router instances agree where a group starts ("ring"). The owner is taken only if its
    TTFT is at most (1 + ring_slack) x the best (+ `tie_epsilon_s`); else the best ("least-ttft").
    With the default slack 0 the ring decides among equally good replicas and never costs latency:
    a new group's first prefill is the heaviest work there is, and in the simulator a slack of 0.1
    already put 6,000-token prefixes on busier owners (llmd-prefix TTFT p99 55 s against 1.0 s).
- Optional similarity fallback (`similarity_credit` > 0, for backends that reuse non-prefix KV such as
  LMCache CacheBlend): only when the best prefix match covers less than `similarity_below` of the
  prompt, a MinHash signature of the request's chunk contents is built and queried; a replica with
  estimated Jaccard j is credited `similarity_credit * j` of the tokens it does not hold by prefix
  ("similarity"). The signature is then added for the chosen replica, so the similarity index records
  where content first landed. Off by default: vLLM reuses prefixes only, and a cache hit then costs
  nothing here.
- `migration` is not used in routing: the hot-prefix controller (router/hot_prefix.py) runs only when
  it is true, and replicates a hot group's prefix to another replica; the index then lists that
  replica as a holder once the copy completes, and the estimate above spreads the group over its
  holders by itself (equal cached tokens, so the smaller TTFT wins: bounded by load, no extra rule).

Parameters and defaults: `recompute_weight` 2.0, `group_chunks` 4 (256 characters with 64-character
chunks: about a system prompt's opening), `ring_slack` 0.0, `tie_epsilon_s` 0.001 (25 tokens at the
default 25K tokens/s), `scrape_max_age_s` 10, `similarity_credit` 0.0, `similarity_below` 0.5,
`migration` true, `step_base_tokens` 150, `decode_seq_tokens` 0.8, `context_token_cost` 0.00125
(1/800), `step_token_budget` 8192 (all four derived above), `prefill_progress` true, `stall_wait` true
(needs `prefill_progress`), `kv_wait` false, `group_balance` true
(both measured above; setting the three step coefficients to 0 and `prefill_progress` to false gives
the earlier prefill-only estimate). The ring's 256 vnodes and 1.25 bound are KubeAI's defaults
(anchors.md); the prefill rate is the replica's (FleetConfig default 25K tokens/s, anchors.md's H200
recompute figures).
It avoids the anchors' known failures: a miss never goes to a busy replica just because its tree is
small (SGLang); a burst spreads before metrics move (llm-d's stale queue scorer); under high load it
keeps each group on its holder until the holder's queue outweighs recomputing the prefix, where
SGLang's imbalance branch discards locality on a request-count difference of 32.
Not modelled: the decode work a request adds to its replica's later steps (it lengthens the steps of
every request that arrives there during its lifetime; a hot prefix's holder therefore keeps its group
while its batch grows, see hot-prefix), and KV-capacity saturation unless `kv_wait` is on (a replica
whose KV is full queues new requests whatever its prefill queue says; the engine's waiting count
covers that once scraped).

Config example: `--policy kvaware:recompute_weight=2,group_chunks=4,migration=false`
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mmh3

from router.policies.base import Decision, PolicyBase, RequestView, candidates_or_raise

if TYPE_CHECKING:
    from router.fleet import Fleet, ReplicaState
    from router.index.similarity import Signature

# Weight of the newest sample in the typical-uncached moving average: about the last 10 requests, so
# it follows a workload shift within seconds at any useful request rate.
_EWMA_ALPHA = 0.1


@dataclass(frozen=True, slots=True)
class KvAwareParams:
    recompute_weight: float = 2.0
    group_chunks: int = 4
    ring_slack: float = 0.0
    tie_epsilon_s: float = 0.001
    scrape_max_age_s: float = 10.0
    similarity_credit: float = 0.0
    similarity_below: float = 0.5
    migration: bool = True  # read by the hot-prefix controller's drivers, not by routing
    # The step-time model, in prefill-token equivalents (see the module docstring for the derivation).
    step_base_tokens: float = 150.0
    decode_seq_tokens: float = 0.8
    context_token_cost: float = 1.0 / 800.0
    step_token_budget: int = 8192
    prefill_progress: bool = True
    stall_wait: bool = True
    kv_wait: bool = False
    group_balance: bool = True

    def __post_init__(self) -> None:
        if self.group_chunks <= 0:
            raise ValueError("group_chunks must be positive")
        if self.step_token_budget <= 0:
            raise ValueError("step_token_budget must be positive")
        if (
            min(
                self.recompute_weight,
                self.ring_slack,
                self.tie_epsilon_s,
                self.scrape_max_age_s,
                self.step_base_tokens,
                self.decode_seq_tokens,
                self.context_token_cost,
            )
            < 0
        ):
            raise ValueError(
                "recompute_weight, ring_slack, tie_epsilon_s, scrape_max_age_s and the step-time "
                "coefficients must be non-negative"
            )
        if not 0.0 <= self.similarity_credit <= 1.0 or not 0.0 <= self.similarity_below <= 1.0:
            raise ValueError("similarity_credit and similarity_below must be within [0, 1]")


def group_key(request: RequestView, group_chunks: int) -> int:
    """The prefix group: chained hash of the first `group_chunks` chunks (or all, if fewer)."""
    chained = request.hashes.chained
    if chained:
        return chained[min(group_chunks, len(chained)) - 1]
    # Shorter than one chunk: the whole prompt (seeded by model, like the chunk chains).
    return mmh3.mmh3_x64_128_utupledigest(
        f"{request.model}\x00{request.text}".encode("utf-8", "surrogatepass"), 0
    )[0]


def step_tokens(s: ReplicaState, p: KvAwareParams) -> float:
    """A step's work besides prefill on `s`, in prefill-token equivalents: the fixed cost plus
    each decoding sequence and the context it attends to (prompt + half its max_tokens, the mean
    output length generated so far). Shared with the hot-prefix controller's overload signal."""
    context = s.inflight_decode_tokens + 0.5 * s.decode_output_tokens
    return p.step_base_tokens + p.decode_seq_tokens * s.decode_requests + p.context_token_cost * context


@dataclass(frozen=True, slots=True)
class Estimate:
    """One candidate's TTFT estimate and its parts (exposed for tests and for explaining decisions)."""

    replica: str
    ttft_s: float
    score_s: float  # ttft_s + recompute_weight x the prefill time of the uncached tokens
    cached_tokens: int  # by prefix, what the Decision reports
    credited_tokens: int  # by similarity, on top of cached_tokens
    queue_tokens: float
    load_tokens: int
    step_tokens: float = 0.0  # a step's non-prefill work (base + decodes), prefill-token equivalents
    kv_wait_s: float = 0.0  # part of ttft_s: waiting for KV to free up (0 when the request fits)
    stall_s: float = 0.0  # part of ttft_s: how far the replica's first tokens are overdue


class KvAware(PolicyBase):
    name = "kvaware"

    def __init__(self, params: KvAwareParams | None = None) -> None:
        self.params = params or KvAwareParams()
        self._typical_uncached: float | None = None
        self._pending_signature: tuple[str, Signature] | None = None  # choose -> on_routed, one slot
        # Per replica, the group keys routed there, least recently routed first (`group_balance`).
        self._groups: dict[str, OrderedDict[int, None]] = {}

    @property
    def migration_enabled(self) -> bool:
        return self.params.migration

    @property
    def typical_uncached_tokens(self) -> float | None:
        return self._typical_uncached

    def estimates(self, request: RequestView, fleet: Fleet, now: float) -> list[Estimate]:
        """TTFT estimates for every candidate, in name order."""
        candidates = candidates_or_raise(fleet, request)
        matches = fleet.longest_match(request.hashes.chained)
        cached = {s.name: request.cached_tokens(matches.get(s.name, 0)) for s in candidates}
        credit = self._similarity_credit(request, fleet, max(cached.values()))
        # Before any routing, price others' waiting requests like this one (all of it uncached).
        typical = request.prompt_tokens if self._typical_uncached is None else self._typical_uncached
        p = self.params
        out = []
        for s in candidates:
            hit = cached[s.name]
            extra = int(credit.get(s.name, 0.0) * (request.prompt_tokens - hit))
            queue = s.inflight_prefill_tokens + s.waiting_not_ours(now, p.scrape_max_age_s) * typical
            uncached = request.prompt_tokens - hit - extra
            rate = s.prefill_tokens_per_s
            step = self.step_tokens(s)
            stall = 0.0
            if p.prefill_progress and s.prefill_since is not None and queue > 0:
                # The engine has been working through our queue since `prefill_since`, at the prefill
                # rate less each step's other work; what it has done is no longer ahead of us.
                chunk = min(float(s.inflight_prefill_tokens), p.step_token_budget)
                speed = rate * chunk / (chunk + step)
                elapsed = max(0.0, now - s.prefill_since)
                queue = max(0.0, queue - min(elapsed * speed, s.inflight_prefill_tokens))
                if p.stall_wait and hit and speed > 0:
                    # Past the time our whole queue should have taken, plus the step the engine may
                    # have been in when the head arrived, no first token has come back: the engine is
                    # held up by what the model does not see (KV full, preemption, a slower engine);
                    # the overdue time is charged, not a queue the model calls empty.
                    due = s.inflight_prefill_tokens / speed + (chunk + step) / rate
                    stall = max(0.0, elapsed - due)
            work = queue + uncached
            # vLLM gives each decoding sequence one token of the step's budget; prefill gets the rest.
            budget = max(1, p.step_token_budget - s.decode_requests)
            steps = max(1, math.ceil(work / budget))
            kv_wait = self._kv_wait_s(request, s, step, fleet) if p.kv_wait else 0.0
            ttft = (work + steps * step) / rate + kv_wait + stall
            score = ttft + p.recompute_weight * uncached / rate
            out.append(
                Estimate(s.name, ttft, score, hit, extra, queue, s.inflight_tokens, step, kv_wait, stall)
            )
        return out

    def step_tokens(self, s: ReplicaState) -> float:
        """A step's work besides prefill on `s` (see the module function `step_tokens`)."""
        return step_tokens(s, self.params)

    def _kv_wait_s(self, request: RequestView, s: ReplicaState, step: float, fleet: Fleet) -> float:
        """Seconds before `s` has KV for this request to run to the end, 0 when it already has."""
        capacity = s.kv_capacity_tokens
        committed = s.committed_kv_tokens
        if not capacity or committed <= 0 or not s.inflight_requests:
            return 0.0
        need = request.prompt_tokens + request.max_tokens
        if committed + need <= capacity:
            return 0.0  # fits even if it shares nothing
        # Only chunks that in-flight requests on `s` already use are shared for free; cached but idle
        # blocks are counted as free by the engine and become used again when this request takes them.
        shared = fleet.active_chunks(s.name, request.hashes.chained) * request.tokens_per_chunk
        over = committed + need - shared - capacity
        if over <= 0:
            return 0.0
        # KV frees as in-flight requests finish: about `committed` tokens per request lifetime of
        # (mean max_tokens) steps, so freeing `over` takes that share of a lifetime (Little's law).
        lifetime_s = s.inflight_output_tokens / s.inflight_requests * step / s.prefill_tokens_per_s
        return over / committed * lifetime_s

    def _similarity_credit(self, request: RequestView, fleet: Fleet, best_cached: int) -> dict[str, float]:
        self._pending_signature = None
        p = self.params
        if p.similarity_credit <= 0 or best_cached >= p.similarity_below * request.prompt_tokens:
            return {}
        signature = fleet.similarity.signature(request.hashes.content)
        if signature is None:
            return {}
        self._pending_signature = (request.request_id, signature)
        return {r: p.similarity_credit * j for r, j in fleet.similarity.query(signature).items()}

    def choose(self, request: RequestView, fleet: Fleet, now: float) -> Decision:
        estimates = self.estimates(request, fleet, now)
        by_name = {e.replica: e for e in estimates}
        key = group_key(request, self.params.group_chunks)
        best = self._best(estimates, key, fleet)
        if any(e.cached_tokens for e in estimates):
            chosen = best
            if chosen.cached_tokens:
                reason = "prefix-hit"
            else:
                reason = "similarity" if chosen.credited_tokens else "spill"
        elif self.params.group_balance:
            chosen, reason = self._place_group(estimates, best, key, fleet, request.prompt_tokens)
        else:
            # Unit cost over integer token loads: the regime in which the ring's bound is proven (the
            # least-loaded candidate always fits). With cost = the prompt's tokens an idle fleet fits
            # nobody (cost > ceil(1.25 * cost / n)) and every key would fall back to one replica.
            # The request's own size is weighed by the TTFT check below instead.
            # Load = in-flight tokens + the KV the replica already holds (index entries x tokens an
            # entry): a new group then goes where it evicts the least, and the ring's bound keeps any
            # replica from holding more than 1.25x the mean share of the fleet's cached prefixes. With
            # in-flight load alone, a run of new groups landing while one replica happened to be idle
            # all stacked there: on real vLLM with small caches (docs/BENCHMARKS.md, issue #6) a 6:2
            # group split over 2 replicas overflowed one cache while the other had room.
            chunk_tokens = fleet.config.index_chunk_tokens
            loads = {
                e.replica: float(e.load_tokens) + fleet.index.size(e.replica) * chunk_tokens
                for e in estimates
            }
            owner = by_name[fleet.ring.pick(key, loads, by_name.keys(), cost=1.0)]
            limit = (1.0 + self.params.ring_slack) * best.ttft_s + self.params.tie_epsilon_s
            if owner.ttft_s <= limit:
                chosen, reason = owner, "ring"
            else:
                chosen, reason = best, "similarity" if best.credited_tokens else "least-ttft"
        return Decision(chosen.replica, chosen.cached_tokens, reason)

    def _place_group(
        self, estimates: list[Estimate], best: Estimate, key: int, fleet: Fleet, request_tokens: int
    ) -> tuple[Estimate, str]:
        """A new group's replica (`group_balance`): of those whose TTFT is within one engine step of the
        best and whose in-flight load is under the ring's bound, the one holding the fewest groups per
        KV token; the ring breaks ties."""
        p = self.params
        rate = fleet.replicas[best.replica].prefill_tokens_per_s
        limit = (1.0 + p.ring_slack) * best.ttft_s + best.step_tokens / rate + p.tie_epsilon_s
        close = [e for e in estimates if e.ttft_s <= limit]
        # The ring's load bound over in-flight tokens (load factor 1.25, KubeAI's default): a replica
        # busy with a hot group holds few groups, yet its TTFT can look close for a while (its queue is
        # mostly cached tokens) — without the bound it drew new groups on top (hot-prefix, 8 x 2,000:
        # TTFT mean 0.086 -> 0.110 s with migration off). When none fits, the bound does not decide.
        loads = {e.replica: float(e.load_tokens) for e in estimates}
        bound = fleet.ring.bound(loads, loads.keys(), cost=float(request_tokens))
        close = [e for e in close if loads[e.replica] + request_tokens <= bound] or close
        capacity = [fleet.replicas[e.replica].kv_capacity_tokens for e in close]
        per_token = all(capacity)  # without every capacity, plain counts
        share = {
            e.replica: self.held_groups(e.replica, fleet) / (c if per_token and c else 1)
            for e, c in zip(close, capacity, strict=True)
        }
        low = min(share.values())
        fewest = [name for name, v in share.items() if v == low]
        name = fleet.ring.order(key, fewest)[0]
        chosen = next(e for e in close if e.replica == name)
        if chosen.credited_tokens:
            reason = "similarity"
        elif len(close) == 1:
            reason = "least-ttft"  # no other replica was close (or under the load bound)
        else:
            reason = "ring" if len(fewest) == len(close) else "fewest-groups"
        return chosen, reason

    def held_groups(self, replica: str, fleet: Fleet) -> int:
        """How many of the groups routed to `replica` its index still holds (their key chunk), or its
        in-flight requests are computing (an event-fed replica's index learns it from KV events only
        after the prefill): the groups whose next requests will go there. Amortised O(1): keys are
        kept in routing order, the index's own LRU order, so the evicted ones are at the front."""
        groups = self._groups.get(replica)
        if not groups:
            return 0
        holds = fleet.index.holds
        while groups:
            oldest = next(iter(groups))
            if holds(replica, oldest) or fleet.active_chunks(replica, (oldest,)):
                break
            groups.popitem(last=False)
        return len(groups)

    def _best(self, estimates: list[Estimate], key: int, fleet: Fleet) -> Estimate:
        low = min(e.score_s for e in estimates)
        tied = [e for e in estimates if e.score_s <= low + self.params.tie_epsilon_s]
        lightest = min(e.load_tokens for e in tied)
        tied = [e for e in tied if e.load_tokens == lightest]
        if len(tied) == 1:
            return tied[0]
        first = fleet.ring.order(key, [e.replica for e in tied])[0]
        return next(e for e in tied if e.replica == first)

    def on_routed(self, request: RequestView, decision: Decision, fleet: Fleet, now: float) -> None:
        uncached = request.prompt_tokens - decision.expected_cached_tokens
        if self._typical_uncached is None:
            self._typical_uncached = float(uncached)
        else:
            self._typical_uncached += _EWMA_ALPHA * (uncached - self._typical_uncached)
        pending, self._pending_signature = self._pending_signature, None
        if pending is not None and pending[0] == request.request_id:
            fleet.similarity.add(decision.replica, pending[1])
        if self.params.group_balance:
            groups = self._groups.setdefault(decision.replica, OrderedDict())
            key = group_key(request, self.params.group_chunks)
            groups[key] = None
            groups.move_to_end(key)
            # A replica's index holds at most its capacity in chunks, so no more groups than that can
            # be held: the hard bound on this memory, whatever order keys and evictions come in.
            while len(groups) > fleet.index.capacity(decision.replica):
                groups.popitem(last=False)
            self.held_groups(decision.replica, fleet)  # prune here too: bounded without new groups

    def on_replica_removed(self, replica: str) -> None:
        self._groups.pop(replica, None)
