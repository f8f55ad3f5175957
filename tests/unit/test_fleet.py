"""Fleet state: lifecycle load bookkeeping, candidates, membership, engine metrics (no event loop)."""

from __future__ import annotations

import pytest

from router.fleet import Fleet, FleetConfig, ReplicaState
from router.policies.base import Decision, PolicyBase, RequestView, make_request
from router.policies.kvaware import KvAware

SYSTEM = "You are a meticulous assistant. Answer briefly and cite the sources you used. " * 8


def req(rid: str, text: str = SYSTEM + "question", model: str = "m") -> RequestView:
    return make_request(rid, model, prompt=text)


class Recorder(PolicyBase):
    """A policy that records every hook call and routes to a fixed replica."""

    name = "recorder"

    def __init__(self, target: str = "a") -> None:
        self.target = target
        self.calls: list[tuple[str, str]] = []

    def choose(self, request: RequestView, fleet: Fleet, now: float) -> Decision:
        return Decision(self.target, 0, "fixed")

    def on_routed(self, request: RequestView, decision: Decision, fleet: Fleet, now: float) -> None:
        self.calls.append(("routed", request.request_id))

    def on_first_token(self, request_id: str, replica: str, now: float) -> None:
        self.calls.append(("first_token", request_id))

    def on_done(self, request_id: str, replica: str, now: float) -> None:
        self.calls.append(("done", request_id))

    def on_replica_added(self, replica: str) -> None:
        self.calls.append(("added", replica))

    def on_replica_removed(self, replica: str) -> None:
        self.calls.append(("removed", replica))


def fleet_of(*names: str, policy: PolicyBase | None = None, config: FleetConfig | None = None) -> Fleet:
    fleet = Fleet(policy or Recorder(names[0]), config)
    for name in names:
        fleet.add_replica(name)
    return fleet


def load(state: ReplicaState) -> tuple[int, int, int, int, int, float]:
    return (
        state.inflight_requests,
        state.prefill_requests,
        state.inflight_prefill_tokens,
        state.inflight_decode_tokens,
        state.decode_requests,
        state.active_kv_tokens,
    )


ZERO = (0, 0, 0, 0, 0, 0.0)


# -- lifecycle ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps",
    [
        ["first_token", "done"],
        ["done"],  # failed before its first token
        ["first_token", "first_token", "done", "done"],  # repeats are ignored
        ["done", "first_token", "done"],  # late events after done are ignored
    ],
)
def test_lifecycle_returns_load_to_zero(steps: list[str]) -> None:
    fleet = fleet_of("a", "b")
    r = req("r1")
    fleet.routed(r, Decision("a", 100, "fixed"), now=0.0)
    state = fleet.replicas["a"]
    assert load(state)[:4] == (1, 1, r.prompt_tokens - 100, 0)
    for step in steps:
        getattr(fleet, step)("r1", 1.0)
    assert load(state) == ZERO
    assert fleet.inflight_count() == 0


def test_first_token_moves_prefill_to_decode() -> None:
    fleet = fleet_of("a")
    r = req("r1")
    fleet.routed(r, Decision("a", 40, "fixed"), now=0.0)
    assert fleet.first_token("r1", 0.5) is True
    state = fleet.replicas["a"]
    assert (state.prefill_requests, state.inflight_prefill_tokens) == (0, 0)
    assert (state.decode_requests, state.inflight_decode_tokens) == (1, r.prompt_tokens)
    assert state.inflight_tokens == r.prompt_tokens


@pytest.mark.parametrize("finish_before_first_token", [False, True])
def test_output_tokens_and_prefill_since_follow_the_lifecycle(finish_before_first_token: bool) -> None:
    fleet = fleet_of("a")
    state = fleet.replicas["a"]
    r1 = make_request("r1", "m", prompt=SYSTEM + "one", max_tokens=100)
    r2 = make_request("r2", "m", prompt=SYSTEM + "two", max_tokens=50)
    fleet.routed(r1, Decision("a", 0, "fixed"), now=1.0)
    fleet.routed(r2, Decision("a", 0, "fixed"), now=2.0)
    assert (state.inflight_output_tokens, state.decode_output_tokens) == (150, 0)
    assert state.prefill_since == 1.0  # the oldest prefilling request's routing
    assert state.committed_kv_tokens == pytest.approx(state.active_kv_tokens + 150)
    if finish_before_first_token:
        fleet.done("r1", 3.0)
        assert state.prefill_since == 1.0  # a failure says nothing about the engine's progress
    else:
        fleet.first_token("r1", 3.0)
        assert state.prefill_since == 3.0  # the engine moved on to r2
        assert state.decode_output_tokens == 100
    fleet.first_token("r2", 4.0)
    assert state.prefill_since is None
    assert state.decode_output_tokens == (50 if finish_before_first_token else 150)
    for rid in ("r1", "r2"):
        fleet.done(rid, 5.0)
    assert (state.inflight_output_tokens, state.decode_output_tokens) == (0, 0)
    assert state.committed_kv_tokens == 0


@pytest.mark.parametrize("method", ["first_token", "done"])
def test_unknown_ids_are_ignored(method: str) -> None:
    fleet = fleet_of("a")
    fleet.routed(req("r1"), Decision("a", 0, "fixed"), now=0.0)
    before = load(fleet.replicas["a"])
    assert getattr(fleet, method)("nope", 1.0) is False
    assert load(fleet.replicas["a"]) == before


def test_hooks_are_called_in_lifecycle_order() -> None:
    policy = Recorder("a")
    fleet = fleet_of("a", policy=policy)
    fleet.route(req("r1"), now=0.0)
    fleet.first_token("r1", 1.0)
    fleet.done("r1", 2.0)
    fleet.done("r1", 3.0)  # unknown now: no hook
    assert policy.calls == [("added", "a"), ("routed", "r1"), ("first_token", "r1"), ("done", "r1")]


@pytest.mark.parametrize("steps", [["done"], ["first_token", "done"]])
def test_background_prefill_is_queued_load_only(steps: list[str]) -> None:
    """A warm-up the router runs itself: in the target's prefill queue (and KV) until done, but not
    indexed, not a served request and never shown to the policy."""
    policy = Recorder("a")
    fleet = fleet_of("a", "b", policy=policy)
    fleet.background_prefill("warmup-1", "b", 4096, now=2.0)
    b = fleet.replicas["b"]
    assert load(b) == (1, 1, 4096, 0, 0, 4096.0)
    assert b.prefill_since == 2.0
    assert fleet.index.size("b") == 0
    for i, step in enumerate(steps):
        getattr(fleet, step)("warmup-1", 3.0 + i)
    assert load(b) == ZERO and b.prefill_since is None and b.inflight_output_tokens == 0
    assert b.served_requests == 0 and fleet.inflight_count() == 0
    assert policy.calls == [("added", "a"), ("added", "b")]
    with pytest.raises(KeyError):
        fleet.background_prefill("warmup-2", "nowhere", 1, now=0.0)


def test_kvaware_counts_a_warm_up_in_its_targets_queue() -> None:
    fleet = Fleet(KvAware(), FleetConfig(prefill_tokens_per_s=1000.0))
    for name in ("a", "b"):
        fleet.add_replica(name)
    fleet.background_prefill("warmup-1", "a", 3000, now=0.0)
    policy = fleet.policy
    assert isinstance(policy, KvAware)
    queue = {e.replica: e.queue_tokens for e in policy.estimates(req("q"), fleet, 0.0)}
    assert queue == {"a": 3000, "b": 0}
    assert fleet.route(req("q"), 0.0).replica == "b"


def test_attach_announces_existing_replicas() -> None:
    fleet = Fleet()
    fleet.add_replica("a")
    fleet.add_replica("b")
    policy = Recorder("a")
    fleet.attach(policy)
    assert policy.calls == [("added", "a"), ("added", "b")]


def test_route_without_policy_fails_clearly() -> None:
    fleet = Fleet()
    fleet.add_replica("a")
    with pytest.raises(RuntimeError, match="no policy"):
        fleet.route(req("r1"), now=0.0)


def test_retry_of_an_id_releases_the_first_routing() -> None:
    fleet = fleet_of("a", "b")
    r = req("r1")
    fleet.routed(r, Decision("a", 0, "fixed"), now=0.0)
    fleet.routed(r, Decision("b", 0, "fixed"), now=1.0)
    assert load(fleet.replicas["a"]) == ZERO
    assert fleet.replicas["b"].inflight_requests == 1
    assert fleet.replica_of("r1") == "b"


def test_routed_to_unknown_replica_raises() -> None:
    fleet = fleet_of("a")
    with pytest.raises(KeyError):
        fleet.routed(req("r1"), Decision("zz", 0, "fixed"), now=0.0)


def test_active_kv_counts_shared_chunks_once() -> None:
    fleet = fleet_of("a")
    r1, r2 = req("r1", SYSTEM + "first question"), req("r2", SYSTEM + "second, different question")
    fleet.routed(r1, Decision("a", 0, "fixed"), now=0.0)
    alone = fleet.replicas["a"].active_kv_tokens
    assert alone == pytest.approx(r1.prompt_tokens, abs=1.0)
    shared = min(len(r1.hashes), len(r2.hashes))
    assert r1.hashes.chained[:shared] == r2.hashes.chained[:shared]
    assert fleet.active_chunks("a", r2.hashes.chained) == shared  # what r1 already uses
    fleet.routed(r2, Decision("a", 0, "fixed"), now=0.0)
    # The second request adds only what it does not share with the first.
    added = fleet.replicas["a"].active_kv_tokens - alone
    assert added == pytest.approx(r2.prompt_tokens - shared * r2.tokens_per_chunk, abs=1.0)
    assert fleet.active_chunks("a", r2.hashes.chained) == len(r2.hashes)
    fleet.done("r1", 1.0)
    fleet.done("r2", 1.0)
    assert fleet.replicas["a"].active_kv_tokens == 0.0
    assert fleet.active_chunks("a", r2.hashes.chained) == 0


def test_expire_reaps_only_stale_inflight_requests() -> None:
    policy = Recorder("a")
    fleet = fleet_of("a", policy=policy, config=FleetConfig(inflight_timeout_s=10.0))
    fleet.route(req("old"), now=0.0)
    fleet.route(req("new"), now=8.0)
    assert fleet.expire(now=12.0) == 1
    assert fleet.replica_of("old") is None and fleet.replica_of("new") == "a"
    assert ("done", "old") in policy.calls
    assert fleet.replicas["a"].inflight_requests == 1


# -- index writes ------------------------------------------------------------------------------


@pytest.mark.parametrize(("event_fed", "indexed"), [(False, True), (True, False)])
def test_speculative_insert_unless_event_fed(event_fed: bool, indexed: bool) -> None:
    fleet = Fleet(Recorder("a"))
    fleet.add_replica("a", event_fed=event_fed)
    r = req("r1")
    fleet.route(r, now=0.0)
    matched = fleet.index.longest_match(r.hashes.chained).get("a", 0)
    assert matched == (len(r.hashes) if indexed else 0)


def test_event_fed_replica_matches_what_its_in_flight_requests_compute() -> None:
    """Pending entries: an event-fed replica's index says nothing until its BlockStored events, but a
    request routed there is computing its prefix, so `longest_match` counts it until the request ends."""
    fleet = Fleet(Recorder("a"))
    fleet.add_replica("a", event_fed=True)
    fleet.add_replica("b", event_fed=True)
    first, second = req("r1"), req("r2", SYSTEM + "another question")
    fleet.route(first, now=0.0)
    shared = sum(1 for x, y in zip(first.hashes.chained, second.hashes.chained, strict=False) if x == y)
    assert 0 < shared < len(second.hashes.chained)
    assert fleet.index.longest_match(second.hashes.chained) == {}
    assert fleet.longest_match(second.hashes.chained) == {"a": shared}
    fleet.done(first.request_id, now=1.0)  # ended with no event: nothing confirmed it
    assert fleet.longest_match(second.hashes.chained) == {}


def test_pending_entries_extend_what_events_confirmed() -> None:
    """A chain the events announced in part continues through chunks in flight, and only from the
    start: chunks in flight after a hole do not count."""
    fleet = Fleet(Recorder("a"))
    fleet.add_replica("a", event_fed=True)
    r = req("r1", SYSTEM * 3)
    chained = r.hashes.chained
    fleet.index.insert("a", chained[:4], now=0.0)  # what BlockStored events announced so far
    assert fleet.longest_match(chained) == {"a": 4}
    fleet.route(req("r0", SYSTEM * 2), now=0.0)  # in flight on a: the chain's first chunks
    in_flight = len(req("x", SYSTEM * 2).hashes.chained)
    assert fleet.longest_match(chained) == {"a": in_flight}
    fleet.index.remove("a", chained[:1])  # the first block evicted, the rest still in flight: no hole
    assert fleet.longest_match(chained) == {"a": in_flight}


def test_routing_time_index_needs_no_pending_entries() -> None:
    """Not event-fed: the routing-time insert already holds the chain; the match is the index's."""
    fleet = Fleet(Recorder("a"))
    fleet.add_replica("a")
    r = req("r1")
    fleet.route(r, now=0.0)
    assert fleet.longest_match(r.hashes.chained) == fleet.index.longest_match(r.hashes.chained)


# -- membership and candidates -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("llama", ["any", "llama-only", "star"]),
        ("qwen", ["any", "qwen-and-llama", "star"]),
        ("other", ["any", "star"]),
    ],
)
def test_candidates_filter_by_model_health_and_drain(model: str, expected: list[str]) -> None:
    fleet = Fleet()
    fleet.add_replica("star", ["*"])
    fleet.add_replica("any")
    fleet.add_replica("llama-only", ["llama"])
    fleet.add_replica("qwen-and-llama", ["qwen", "llama"])
    fleet.add_replica("sick", ["llama", "qwen"])
    fleet.add_replica("draining", ["*"])
    fleet.set_healthy("sick", False)
    fleet.set_draining("draining", True)
    if model == "llama":
        fleet.set_draining("qwen-and-llama", True)
    assert [s.name for s in fleet.candidates(model)] == expected


def test_set_models_changes_candidates() -> None:
    fleet = Fleet()
    fleet.add_replica("a", ["llama"])
    assert fleet.candidates("qwen") == []
    fleet.set_models("a", ["qwen"])
    assert [s.name for s in fleet.candidates("qwen")] == ["a"]
    fleet.set_models("a", [])
    assert [s.name for s in fleet.candidates("anything")] == ["a"]


def test_add_replica_twice_is_an_error() -> None:
    fleet = Fleet()
    fleet.add_replica("a")
    with pytest.raises(ValueError, match="already"):
        fleet.add_replica("a")


def test_remove_replica_drops_index_ring_similarity_and_inflight() -> None:
    policy = Recorder("a")
    fleet = fleet_of("a", "b", policy=policy)
    r = req("r1")
    fleet.route(r, now=0.0)
    signature = fleet.similarity.signature(r.hashes.content)
    assert signature is not None
    fleet.similarity.add("a", signature)
    assert fleet.index.size("a") > 0
    assert fleet.remove_replica("a") is True
    assert fleet.index.longest_match(r.hashes.chained) == {}
    assert "a" not in fleet.index and "a" not in fleet.ring
    assert fleet.similarity.query(signature) == {}
    assert fleet.inflight_count() == 0 and fleet.done("r1", 1.0) is False
    assert "a" not in fleet.replicas
    assert policy.calls[-1] == ("removed", "a")
    assert fleet.remove_replica("a") is False


# -- engine metrics ----------------------------------------------------------------------------


def test_engine_metrics_update_state_and_index_capacity() -> None:
    fleet = Fleet(config=FleetConfig(index_chunk_tokens=16))
    fleet.add_replica("a")
    assert fleet.update_engine_metrics(
        "a",
        now=5.0,
        num_requests_waiting=3,
        num_requests_running=7,
        kv_cache_usage_perc=0.25,
        num_gpu_blocks=1000,
        block_size=32,
    )
    s = fleet.replicas["a"]
    assert (s.num_requests_waiting, s.num_requests_running, s.kv_cache_usage_perc) == (3, 7, 0.25)
    assert (s.block_size, s.kv_capacity_tokens, s.scraped_at) == (32, 32_000, 5.0)
    assert fleet.index.capacity("a") == 2_000  # 32,000 tokens / 16 tokens a chunk
    assert fleet.update_engine_metrics("gone", now=5.0, num_requests_waiting=1) is False


@pytest.mark.parametrize(
    ("ours_prefilling", "waiting", "age", "expected"),
    [
        (0, 5, 0.0, 5),  # nothing of ours: all waiting requests are someone else's
        (3, 5, 0.0, 2),  # three of the five may be ours
        (6, 5, 0.0, 0),  # never negative
        (0, 5, 11.0, 0),  # too old to say anything
    ],
)
def test_waiting_not_ours(ours_prefilling: int, waiting: int, age: float, expected: int) -> None:
    fleet = fleet_of("a")
    for i in range(ours_prefilling):
        fleet.routed(req(f"r{i}"), Decision("a", 0, "fixed"), now=0.0)
    fleet.update_engine_metrics("a", now=1.0, num_requests_waiting=waiting)
    for i in range(ours_prefilling):  # our requests finish after the scrape: the snapshot stays
        fleet.done(f"r{i}", 1.5)
    assert fleet.replicas["a"].waiting_not_ours(now=1.0 + age, max_age_s=10.0) == expected


def test_per_replica_overrides() -> None:
    fleet = Fleet(config=FleetConfig(prefill_tokens_per_s=1000.0, block_size=16))
    s = fleet.add_replica("a", prefill_tokens_per_s=5000.0, block_size=128, kv_capacity_tokens=1600)
    assert (s.prefill_tokens_per_s, s.block_size, s.kv_capacity_tokens) == (5000.0, 128, 1600)
    assert fleet.index.capacity("a") == 100
    fleet.set_prefill_rate("a", 2000.0)
    assert fleet.replicas["a"].prefill_tokens_per_s == 2000.0
    with pytest.raises(ValueError):
        fleet.set_prefill_rate("a", 0.0)
