"""Fleet state: the replicas, the router-side load of each, the shared index, ring and similarity.

Rules:
- Two kinds of load, kept apart because they differ in freshness:
  * router-side lifecycle load, exact and fresh for the requests *this* router sent. Per request:
    `routed` adds 1 request, its uncached prompt tokens to `inflight_prefill_tokens`, its prompt's KV
    to `active_kv_tokens` and its `max_tokens` to `inflight_output_tokens`; `first_token` (prefill
    done) moves it from prefill to decode (its prompt tokens into `inflight_decode_tokens`, its
    `max_tokens` into `decode_output_tokens`); `done` removes it. This is Dynamo's predicted load (docs
    anchors.md: updated at route, at first token and at finish).
  * engine-scraped signals (`num_requests_waiting`, `kv_cache_usage_perc`, ... from /metrics), which
    see every client but are a scrape interval old. `update_engine_metrics` also snapshots how many of
    our own requests were still prefilling at that moment (`prefill_requests_at_scrape`), so a policy
    can tell the engine's waiting requests that are not ours from ours (`ReplicaState.waiting_not_ours`)
    without counting ours twice.
- `active_kv_tokens` counts a chunk shared by several in-flight requests once (a refcount per chained
  hash), as vLLM shares those blocks and Dynamo counts unique active blocks. Only prompt tokens count:
  the router does not see output tokens until the end. What outputs can add is bounded apart, by the
  requests' `max_tokens` (`inflight_output_tokens`; `committed_kv_tokens` is the sum of the two).
- Per-request bookkeeping lives only while a request is in flight. `expire(now)` reaps requests
  older than `inflight_timeout_s` (a driver that lost a `done`), so memory stays bounded by the requests
  really in flight. Unknown or repeated ids in `first_token` / `done` are ignored and return False.
- `routed` writes the request's chained hashes into the PrefixIndex for the chosen replica at once
  (speculative insert, as llm-d's approximate scorer and Dynamo's approximate mode do), unless that
  replica's index is event-fed, in which case only its KV events write it.
- Pending prefixes of event-fed replicas: between a request's routing and the BlockStored events of its
  prefill (its queueing and prefill time, seconds on a busy or slow engine) its replica holds nothing
  yet by the index, so a second request of the same new prefix would look like a new group and could
  be placed elsewhere, computing the prefix twice. `longest_match` therefore also counts, for an
  event-fed replica, the chunks its in-flight requests are computing (their refcounts below): pending
  entries, confirmed by the events that follow or gone with the request. After a request ends its
  blocks have been announced (vLLM publishes BlockStored at the step that fills them, before the
  answer's last token), so only an event's network delay is uncovered.
- The Fleet knows no particular policy: it calls the `Policy` hooks and nothing else. No clock: `now`
  is an argument everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from router.index.prefix_index import PrefixIndex
from router.index.ring import BoundedLoadRing
from router.index.similarity import SimilarityIndex
from router.policies.base import Decision, Policy, RequestView

ANY_MODEL = "*"


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """Fleet-wide defaults; each can be overridden per replica where that makes sense."""

    # Recompute speed on an H200 from anchors.md (2K tokens in 78 ms, 16K in 510 ms: 26-31K tokens/s),
    # rounded down. Replace per replica with the engine preset's or a measured rate.
    prefill_tokens_per_s: float = 25_000.0
    block_size: int = 16  # vLLM's GPU default, until vllm:cache_config_info says otherwise
    # Tokens per index chunk, to turn a replica's KV capacity into an index capacity in chunks:
    # 64 characters / 4 (the default text chunk), or the block size when chunking token ids.
    index_chunk_tokens: float = 16.0
    index_capacity_chunks: int = 1 << 20  # Dynamo prunes its approximate tree at 2**20 blocks
    index_ttl_s: float | None = None  # Dynamo's approximate mode: 120 s; None = capacity only
    ring_vnodes: int = 256  # KubeAI's replication default
    ring_load_factor: float = 1.25  # KubeAI's meanLoadFactor 125%
    inflight_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s <= 0 or self.block_size <= 0 or self.index_chunk_tokens <= 0:
            raise ValueError("prefill_tokens_per_s, block_size and index_chunk_tokens must be positive")
        if self.inflight_timeout_s <= 0:
            raise ValueError("inflight_timeout_s must be positive")


@dataclass(slots=True)
class ReplicaState:
    """One replica as the router knows it. Mutated only by the Fleet; read by policies."""

    name: str
    models: frozenset[str]  # empty or containing "*": serves any model
    prefill_tokens_per_s: float
    block_size: int
    healthy: bool = True
    draining: bool = False
    event_fed: bool = False  # its PrefixIndex entries come from KV events, not from routing
    # Requests of ours that ended here after their first token with at least one full chunk, ever: each
    # made the replica hold KV blocks, so its KV events should follow (router/kv_subscriber.py's
    # silence rule reads it).
    served_requests: int = 0
    # Router-side lifecycle load (fresh; only this router's requests).
    inflight_requests: int = 0
    prefill_requests: int = 0  # routed, first token not seen yet
    inflight_prefill_tokens: int = 0  # their uncached prompt tokens
    inflight_decode_tokens: int = 0  # prompt tokens of requests past their first token
    active_kv_tokens: float = 0.0  # unique prompt KV of all in-flight requests
    inflight_output_tokens: int = 0  # max_tokens of all in-flight requests (KV outputs may grow into)
    decode_output_tokens: int = 0  # max_tokens of the requests past their first token
    # Since when the engine has been working on the oldest of our prefilling requests (FCFS): when it
    # was routed to an idle prefill queue, or the last first token of a request before it. None when
    # none of ours is prefilling.
    prefill_since: float | None = None
    # Engine-scraped signals (stale by up to a scrape interval; every client's requests).
    num_requests_waiting: int = 0
    num_requests_running: int = 0
    kv_cache_usage_perc: float = 0.0
    kv_capacity_tokens: int | None = None
    scraped_at: float | None = None
    prefill_requests_at_scrape: int = 0

    def serves(self, model: str) -> bool:
        return not self.models or ANY_MODEL in self.models or model in self.models

    @property
    def available(self) -> bool:
        return self.healthy and not self.draining

    @property
    def inflight_tokens(self) -> int:
        """Router-side load in tokens: prefill still to do plus prompts held by decoding requests."""
        return self.inflight_prefill_tokens + self.inflight_decode_tokens

    @property
    def decode_requests(self) -> int:
        return self.inflight_requests - self.prefill_requests

    @property
    def committed_kv_tokens(self) -> float:
        """KV the in-flight requests hold or may still grow into: unique prompt KV + their max_tokens.

        An upper bound (a request may stop before max_tokens), the KV a replica needs to finish its
        in-flight requests without preempting any; compare with `kv_capacity_tokens`.
        """
        return self.active_kv_tokens + self.inflight_output_tokens

    @property
    def active_blocks(self) -> int:
        return math.ceil(self.active_kv_tokens / self.block_size)

    def waiting_not_ours(self, now: float, max_age_s: float) -> int:
        """Engine-waiting requests that this router's fresh load does not already count.

        At scrape time the engine's waiting queue held at most `prefill_requests_at_scrape` of ours
        (ours still prefilling; some of those were running, so this under-counts others' rather than
        double counting ours). A scrape older than `max_age_s` says nothing and counts as zero.
        """
        if self.scraped_at is None or now - self.scraped_at > max_age_s:
            return 0
        return max(0, self.num_requests_waiting - self.prefill_requests_at_scrape)


@dataclass(slots=True)
class _InFlight:
    replica: str
    routed_at: float
    prompt_tokens: int
    prefill_tokens: int
    output_tokens: int  # the request's max_tokens
    chained: tuple[int, ...]
    chunk_tokens: float
    tail_tokens: float
    prefilling: bool = True
    background: bool = False  # the router's own work (a warm-up), not a client's request


class Fleet:
    """The replicas, their load, and the shared PrefixIndex / SimilarityIndex / BoundedLoadRing."""

    def __init__(self, policy: Policy | None = None, config: FleetConfig | None = None) -> None:
        self.config = config or FleetConfig()
        cfg = self.config
        self.index = PrefixIndex(cfg.index_capacity_chunks, ttl_s=cfg.index_ttl_s)
        self.similarity = SimilarityIndex()
        self.ring = BoundedLoadRing(cfg.ring_vnodes, cfg.ring_load_factor)
        self._replicas: dict[str, ReplicaState] = {}
        self._refs: dict[str, dict[int, int]] = {}  # replica -> chained hash -> in-flight users
        self._inflight: dict[str, _InFlight] = {}  # insertion order = routing order (for expire)
        self._policy: Policy | None = None
        if policy is not None:
            self.attach(policy)

    # -- membership ---------------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        if self._policy is None:
            raise RuntimeError("no policy attached to this fleet")
        return self._policy

    def attach(self, policy: Policy) -> None:
        """Use `policy`, telling it about the replicas already here."""
        self._policy = policy
        for name in self._replicas:
            policy.on_replica_added(name)

    @property
    def replicas(self) -> Mapping[str, ReplicaState]:
        return self._replicas

    def add_replica(
        self,
        name: str,
        models: Iterable[str] = (),
        *,
        prefill_tokens_per_s: float | None = None,
        block_size: int | None = None,
        kv_capacity_tokens: int | None = None,
        event_fed: bool = False,
    ) -> ReplicaState:
        """Register a replica (ValueError if the name is taken); it joins the index and the ring."""
        if name in self._replicas:
            raise ValueError(f"replica {name!r} is already in the fleet")
        cfg = self.config
        rate = cfg.prefill_tokens_per_s if prefill_tokens_per_s is None else prefill_tokens_per_s
        block = cfg.block_size if block_size is None else block_size
        if rate <= 0 or block <= 0:
            raise ValueError("prefill_tokens_per_s and block_size must be positive")
        state = ReplicaState(name, frozenset(models), rate, block, event_fed=event_fed)
        # Kept sorted by name so candidates() is deterministic without sorting per request.
        self._replicas = dict(sorted({**self._replicas, name: state}.items()))
        self._refs[name] = {}
        self.index.add_replica(name)
        self.ring.add(name)
        if kv_capacity_tokens is not None:
            self._set_kv_capacity(state, kv_capacity_tokens)
        if self._policy is not None:
            self._policy.on_replica_added(name)
        return state

    def remove_replica(self, name: str) -> bool:
        """Forget a replica: its in-flight records, index entries, signatures and ring points."""
        if self._replicas.pop(name, None) is None:
            return False
        self._refs.pop(name, None)
        for rid in [rid for rid, rec in self._inflight.items() if rec.replica == name]:
            del self._inflight[rid]
        self.index.drop_replica(name)
        self.similarity.drop_replica(name)
        self.ring.remove(name)
        if self._policy is not None:
            self._policy.on_replica_removed(name)
        return True

    def set_healthy(self, name: str, healthy: bool) -> None:
        self._replicas[name].healthy = healthy

    def set_draining(self, name: str, draining: bool) -> None:
        self._replicas[name].draining = draining

    def set_models(self, name: str, models: Iterable[str]) -> None:
        """Change what a replica serves (e.g. once its /v1/models is known); its index entries stay."""
        self._replicas[name].models = frozenset(models)

    def set_event_fed(self, name: str, event_fed: bool) -> None:
        self._replicas[name].event_fed = event_fed

    def set_prefill_rate(self, name: str, tokens_per_s: float) -> None:
        if tokens_per_s <= 0:
            raise ValueError("tokens_per_s must be positive")
        self._replicas[name].prefill_tokens_per_s = tokens_per_s

    def candidates(self, model: str) -> list[ReplicaState]:
        """Healthy, non-draining replicas serving `model`, in name order."""
        return [s for s in self._replicas.values() if s.available and s.serves(model)]

    # -- engine signals -----------------------------------------------------------------------

    def update_engine_metrics(
        self,
        name: str,
        *,
        now: float,
        num_requests_waiting: int | None = None,
        num_requests_running: int | None = None,
        kv_cache_usage_perc: float | None = None,
        num_gpu_blocks: int | None = None,
        block_size: int | None = None,
    ) -> bool:
        """Record a scrape of the replica's /metrics; False (ignored) for an unknown replica.

        `num_gpu_blocks` and `block_size` come from vllm:cache_config_info and also resize the
        replica's PrefixIndex capacity, so the index forgets roughly when the replica does.
        """
        state = self._replicas.get(name)
        if state is None:
            return False  # a late scrape of a replica that just left
        if num_requests_waiting is not None:
            state.num_requests_waiting = num_requests_waiting
        if num_requests_running is not None:
            state.num_requests_running = num_requests_running
        if kv_cache_usage_perc is not None:
            state.kv_cache_usage_perc = kv_cache_usage_perc
        if block_size is not None and block_size > 0:
            state.block_size = block_size
        if num_gpu_blocks is not None and num_gpu_blocks > 0:
            self._set_kv_capacity(state, num_gpu_blocks * state.block_size)
        state.scraped_at = now
        state.prefill_requests_at_scrape = state.prefill_requests
        return True

    def _set_kv_capacity(self, state: ReplicaState, tokens: int) -> None:
        state.kv_capacity_tokens = tokens
        self.index.set_capacity(state.name, max(1, int(tokens // self.config.index_chunk_tokens)))

    # -- request lifecycle --------------------------------------------------------------------

    def route(self, request: RequestView, now: float) -> Decision:
        """Ask the policy, then record the routing: what a driver does for each request."""
        decision = self.policy.choose(request, self, now)
        self.routed(request, decision, now)
        return decision

    def routed(self, request: RequestView, decision: Decision, now: float) -> None:
        """The request was sent to `decision.replica`: add its load, index its prefix, tell the policy.

        An id already in flight is released first (a retry elsewhere). KeyError for an unknown replica.
        """
        state = self._replica_or_raise(decision.replica)
        cached = min(max(decision.expected_cached_tokens, 0), request.prompt_tokens)
        chained = request.hashes.chained
        chunk_tokens = request.tokens_per_chunk
        rec = _InFlight(
            replica=state.name,
            routed_at=now,
            prompt_tokens=request.prompt_tokens,
            prefill_tokens=request.prompt_tokens - cached,
            output_tokens=max(0, request.max_tokens),
            chained=chained,
            chunk_tokens=chunk_tokens,
            tail_tokens=max(0.0, request.prompt_tokens - len(chained) * chunk_tokens),
        )
        self._admit(request.request_id, rec, state, now)
        if not state.event_fed:
            self.index.insert(state.name, chained, now)
        if self._policy is not None:
            self._policy.on_routed(request, decision, self, now)

    def background_prefill(self, work_id: str, replica: str, tokens: int, now: float) -> None:
        """Prefill the router itself started on `replica` (a hot-prefix warm-up): `tokens` join its queue
        like a routed request's uncached prompt, so routing does not take the replica for idle while it
        computes them (without it kvaware sent cold prefills to a warm-up's target, queued behind the
        warm-up). Not indexed (the index learns a migration's prefix when it completes) and not told to
        the policy. Ends with `done(work_id)`. KeyError for an unknown replica."""
        state = self._replica_or_raise(replica)
        tokens = max(0, tokens)
        rec = _InFlight(replica, now, tokens, tokens, 1, (), 0.0, float(tokens), background=True)
        self._admit(work_id, rec, state, now)

    def _replica_or_raise(self, name: str) -> ReplicaState:
        state = self._replicas.get(name)
        if state is None:
            raise KeyError(f"unknown replica {name!r}")
        return state

    def _admit(self, request_id: str, rec: _InFlight, state: ReplicaState, now: float) -> None:
        """Add `rec`'s load to `state` (what `_release` takes away); an id already in flight is released
        first (a retry elsewhere)."""
        old = self._inflight.pop(request_id, None)
        if old is not None:
            self._release(old)
        self._inflight[request_id] = rec
        state.inflight_requests += 1
        if state.prefill_requests == 0:
            state.prefill_since = now
        state.prefill_requests += 1
        state.inflight_prefill_tokens += rec.prefill_tokens
        state.inflight_output_tokens += rec.output_tokens
        counts = self._refs[state.name]
        added = rec.tail_tokens
        for h in rec.chained:
            n = counts.get(h, 0)
            if n == 0:
                added += rec.chunk_tokens
            counts[h] = n + 1
        state.active_kv_tokens += added

    def first_token(self, request_id: str, now: float) -> bool:
        """The request's first token arrived: its prefill is done. False if unknown or repeated."""
        rec = self._inflight.get(request_id)
        if rec is None or not rec.prefilling:
            return False
        rec.prefilling = False
        state = self._replicas[rec.replica]
        state.prefill_requests -= 1
        state.prefill_since = now if state.prefill_requests else None
        state.inflight_prefill_tokens -= rec.prefill_tokens
        state.inflight_decode_tokens += rec.prompt_tokens
        state.decode_output_tokens += rec.output_tokens
        if self._policy is not None and not rec.background:
            self._policy.on_first_token(request_id, rec.replica, now)
        return True

    def done(self, request_id: str, now: float) -> bool:
        """The request finished (or failed, or was aborted): remove its load. False if unknown."""
        rec = self._inflight.pop(request_id, None)
        if rec is None:
            return False
        self._release(rec)
        if not rec.prefilling and rec.chained:
            self._replicas[rec.replica].served_requests += 1
        if self._policy is not None and not rec.background:
            self._policy.on_done(request_id, rec.replica, now)
        return True

    def _release(self, rec: _InFlight) -> None:
        state = self._replicas[rec.replica]
        state.inflight_requests -= 1
        state.inflight_output_tokens -= rec.output_tokens
        if rec.prefilling:
            state.prefill_requests -= 1
            if not state.prefill_requests:
                state.prefill_since = None
            state.inflight_prefill_tokens -= rec.prefill_tokens
        else:
            state.inflight_decode_tokens -= rec.prompt_tokens
            state.decode_output_tokens -= rec.output_tokens
        counts = self._refs[rec.replica]
        removed = rec.tail_tokens
        for h in rec.chained:
            n = counts.get(h, 0)
            if n <= 1:
                counts.pop(h, None)
                removed += rec.chunk_tokens
            else:
                counts[h] = n - 1
        # Requests sharing a chunk may have prorated it to slightly different token counts; reset
        # exactly when nothing is in flight so float drift cannot accumulate.
        state.active_kv_tokens = (
            max(0.0, state.active_kv_tokens - removed) if state.inflight_requests else 0.0
        )

    def expire(self, now: float) -> int:
        """Reap in-flight records older than `inflight_timeout_s` and expire index TTLs; returns reaped."""
        cutoff = now - self.config.inflight_timeout_s
        stale: list[str] = []
        for rid, rec in self._inflight.items():
            if rec.routed_at >= cutoff:
                break  # insertion order is routing order
            stale.append(rid)
        for rid in stale:
            self.done(rid, now)
        self.index.expire(now)
        return len(stale)

    # -- reads for policies -------------------------------------------------------------------

    def longest_match(self, chained: Sequence[int]) -> dict[str, int]:
        """{replica: consecutive chunks of `chained` it holds or is computing}, for replicas with any.

        The PrefixIndex's match, extended for event-fed replicas by the chunks their in-flight requests
        use (pending entries, see the module rules): the chain continues while each next chunk is in
        the index or in flight there. Costs nothing more when no event-fed replica has requests in
        flight; otherwise O(k) more lookups for each such replica.
        """
        matches = self.index.longest_match(chained)
        n = len(chained)
        for name, state in self._replicas.items():
            refs = self._refs[name]
            if not state.event_fed or not refs:
                continue
            depth = matches.get(name, 0)
            while depth < n and (chained[depth] in refs or self.index.holds(name, chained[depth])):
                depth += 1
            if depth:
                matches[name] = depth
        return matches

    def inflight_count(self) -> int:
        return len(self._inflight)

    def replica_of(self, request_id: str) -> str | None:
        rec = self._inflight.get(request_id)
        return None if rec is None else rec.replica

    def active_chunks(self, replica: str, chained: Iterable[int]) -> int:
        """How many of these chained hashes in-flight requests on `replica` already use."""
        refs = self._refs.get(replica)
        if refs is None:
            return 0
        return sum(1 for h in chained if h in refs)
