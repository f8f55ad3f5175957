"""Workload generators: determinism, arrivals, the published shapes, the default rate."""

from __future__ import annotations

import itertools
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from load.workloads import (
    DEFAULT_OVERLOAD,
    WORKLOADS,
    Agentic,
    HotPrefix,
    LlmdPrefix,
    MultiTurn,
    Rag,
    SharedPrefix,
    WorkloadRequest,
    make_workload,
    workload_spec,
)
from load.workloads.text import TextSource
from router.index.chunking import ChunkHashes, hash_chat, hash_text

NAMES = sorted(WORKLOADS)


def chunks(r: WorkloadRequest) -> ChunkHashes:
    if r.messages is not None:
        return hash_chat(r.messages, r.model)
    assert r.prompt is not None
    return hash_text(r.prompt, r.model)


def prefix_reuse(reqs: Sequence[WorkloadRequest]) -> tuple[list[float], float]:
    """Per request, the fraction of its full chunks whose prefix an earlier request already sent
    (ideal prefix caching with unbounded memory); and the overall fraction of chunks that were new."""
    seen: set[int] = set()
    fractions, new, total = [], 0, 0
    for r in reqs:
        chained = chunks(r).chained
        hit = next((i for i, c in enumerate(chained) if c not in seen), len(chained))
        fractions.append(hit / max(1, len(chained)))
        new += len(chained) - hit
        total += len(chained)
        seen.update(chained)
    return fractions, new / total


# --- every workload -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_requests_and_other_seed_other_text(name: str) -> None:
    a = make_workload(name, seed=7, replicas=2, rate=5.0, requests=200)
    b = make_workload(name, seed=7, replicas=2, rate=5.0, requests=200)
    c = make_workload(name, seed=8, replicas=2, rate=5.0, requests=200)
    assert a == b and len(a) == 200
    assert [r.arrival_s for r in a] != [r.arrival_s for r in c]
    assert [chunks(r).chained for r in a[:20]] != [chunks(r).chained for r in c[:20]]


@pytest.mark.parametrize("name", NAMES)
def test_arrivals_ordered_and_empirical_rate_near_requested(name: str) -> None:
    reqs = make_workload(name, seed=3, replicas=1, rate=40.0, requests=4000)
    arrivals = [r.arrival_s for r in reqs]
    assert arrivals == sorted(arrivals) and arrivals[0] >= 0
    assert len({r.request_id for r in reqs}) == len(reqs)
    assert len(reqs) / arrivals[-1] == pytest.approx(40.0, rel=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_duration_bound_keeps_only_earlier_arrivals(name: str) -> None:
    reqs = make_workload(name, seed=1, replicas=1, rate=50.0, duration_s=40.0)
    assert reqs and max(r.arrival_s for r in reqs) < 40.0
    assert len(reqs) == pytest.approx(50.0 * 40.0, rel=0.12)
    both = make_workload(name, seed=1, replicas=1, rate=50.0, duration_s=40.0, requests=100)
    assert both == reqs[:100]


@pytest.mark.parametrize("name", NAMES)
def test_requests_are_well_formed(name: str) -> None:
    spec = WORKLOADS[name]()
    for r in spec.generate(seed=2, rate=10.0, requests=300, model="m1"):
        assert r.model == "m1" and r.kind == spec.kind and r.max_tokens >= 1 and r.group
        body = r.openai_body()
        if r.kind == "chat":
            assert r.messages is not None and r.prompt is None
            roles = [m["role"] for m in r.messages]
            # strict chat templates need: one system message, then user/assistant alternating, user last
            assert roles[0] == "system" and roles[-1] == "user"
            assert all(roles[i] == ("user" if i % 2 else "assistant") for i in range(1, len(roles)))
            assert body["messages"] == [dict(m) for m in r.messages]
            assert r.prompt_chars == sum(len(m["content"]) for m in r.messages)
        else:
            assert r.prompt is not None and r.messages is None and body["prompt"] == r.prompt
            assert r.prompt_chars == len(r.prompt)
        assert r.prompt_tokens == -(-r.prompt_chars // 4)


@pytest.mark.parametrize("name", NAMES)
def test_default_rate_is_overload_times_capacity_over_round_robin_prefill(name: str) -> None:
    spec = WORKLOADS[name]()
    rate = spec.default_rate(3, 10_000.0)
    rr_tokens = spec.round_robin_prefill_tokens(3)
    assert rate * rr_tokens == pytest.approx(DEFAULT_OVERLOAD * 3 * 10_000.0)
    # Round robin never prefills more than the whole prompt, and spreading a workload over more
    # replicas only makes it recompute more.
    assert rr_tokens <= spec.mean_prompt_tokens() * 1.01
    assert spec.round_robin_prefill_tokens(6) >= rr_tokens * 0.99
    if name == "no-sharing":
        assert rr_tokens == pytest.approx(spec.mean_prompt_tokens(), rel=0.02)
    else:
        assert rr_tokens < spec.mean_prompt_tokens()
    sample = spec.generate(seed=11, rate=rate, requests=3000)
    measured = statistics.mean(r.prompt_chars for r in sample) / 4
    assert spec.mean_prompt_tokens() == pytest.approx(measured, rel=0.1)


# No reuse: demand is 1.2x capacity; ideal prefix reuse: at most this share of capacity. rag only
# saves its system prompt and first document by prefix (documented in load/workloads/rag.py).
IDEAL_DEMAND_BOUND = {"no-sharing": 1.21, "rag": 0.95}


@pytest.mark.parametrize("name", NAMES)
def test_default_rate_saturates_without_reuse_but_not_with_ideal_reuse(name: str) -> None:
    spec = WORKLOADS[name]()
    reqs = spec.generate(seed=5, rate=spec.default_rate(1, 8_000.0), requests=2000)
    _, new_fraction = prefix_reuse(reqs)
    assert DEFAULT_OVERLOAD * new_fraction <= IDEAL_DEMAND_BOUND.get(name, 0.45)


def test_make_workload_without_rate_uses_the_default_rate() -> None:
    reqs = make_workload("shared-prefix", seed=1, replicas=4, requests=3000, prefill_tokens_per_s=5_000.0)
    rr_tokens = SharedPrefix().round_robin_prefill_tokens(4)
    assert 128 < rr_tokens < 2176  # round robin reuses some prefixes, and always prefills the question
    expected = 1.2 * 4 * 5_000.0 / rr_tokens
    assert len(reqs) / reqs[-1].arrival_s == pytest.approx(expected, rel=0.1)


def test_registry_rejects_unknown_names_params_and_unbounded_runs() -> None:
    with pytest.raises(ValueError, match="known: agentic, hot-prefix, llmd-prefix, multi-turn"):
        make_workload("nope", seed=0, replicas=1, requests=1)
    with pytest.raises(ValueError, match=r"no parameter colour; known: .*groups"):
        workload_spec("shared-prefix", {"colour": 1})
    with pytest.raises(ValueError, match="bounded"):
        make_workload("rag", seed=0, replicas=1)
    with pytest.raises(ValueError, match="rate"):
        make_workload("rag", seed=0, replicas=1, rate=0.0, requests=1)
    assert workload_spec("shared-prefix", {"groups": 3}) == SharedPrefix(groups=3)


def test_request_kind_must_match_its_content() -> None:
    with pytest.raises(ValueError, match="completion has prompt_parts"):
        WorkloadRequest("x", 0.0, "m", "completion", None, ({"role": "user", "content": "hi"},), 1, "g0")
    with pytest.raises(ValueError, match="max_tokens"):
        WorkloadRequest("x", 0.0, "m", "completion", ("hi",), None, 0, "g0")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), rate=st.floats(0.1, 500.0), requests=st.integers(0, 60))
def test_any_seed_and_rate_give_bounded_ordered_requests(seed: int, rate: float, requests: int) -> None:
    spec = SharedPrefix(groups=4, prompts_per_group=3, prefix_tokens=32, question_tokens=8)
    reqs = spec.generate(seed=seed, rate=rate, requests=requests)
    assert len(reqs) == requests
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(reqs))
    assert reqs == spec.generate(seed=seed, rate=rate, requests=requests)


@given(seed=st.integers(), chars=st.integers(0, 5000))
def test_text_has_the_exact_length_and_depends_only_on_the_seed(seed: int, chars: int) -> None:
    text = TextSource(random.Random(seed)).text(chars)
    assert len(text) == chars and text == TextSource(random.Random(seed)).text(chars)
    assert chars == 0 or text.endswith("\n")


# --- published shapes -----------------------------------------------------------------------------


def test_shared_prefix_has_sglangs_shape() -> None:
    reqs = SharedPrefix().generate(seed=1, rate=10.0, requests=64 * 16)
    assert Counter(r.group for r in reqs) == {f"g{g}": 16 for g in range(64)}  # one full deck
    prefixes: dict[str, str] = {}
    for r in reqs:
        assert r.prompt_parts is not None and r.max_tokens == 256
        prefix, question = r.prompt_parts
        assert (len(prefix), len(question)) == (2048 * 4, 128 * 4)
        assert prefixes.setdefault(r.group, prefix) is prefix  # one shared object per group
    assert len({p[:64] for p in prefixes.values()}) == 64
    assert len({r.prompt_parts[1] for r in reqs if r.prompt_parts}) == len(reqs)  # fresh questions


def test_llmd_prefix_has_the_published_shape_and_a_rising_ramp() -> None:
    reqs = LlmdPrefix().generate(seed=1, rate=20.0, requests=150 * 5 * 8)
    deck = reqs[:750]
    assert Counter(r.session for r in deck) == {f"g{g}-u{u}": 1 for g in range(150) for u in range(5)}
    for r in reqs[:50]:
        assert r.prompt_parts is not None and r.max_tokens == 1000
        assert [len(p) for p in r.prompt_parts] == [6000 * 4, 1200 * 4]
    horizon = len(reqs) / 20.0
    first = sum(r.arrival_s < horizon / 10 for r in reqs)
    last = sum(0.9 * horizon <= r.arrival_s < horizon for r in reqs)
    # lambda rises 3 -> 60: about 5.85 vs 57.15 (x 20/31.5) in the first and last tenths
    assert last / first == pytest.approx(57.15 / 5.85, rel=0.3)


def test_multi_turn_rounds_extend_the_previous_round_by_appending() -> None:
    reqs = MultiTurn().generate(seed=4, rate=5.0, requests=3000)
    by_user: dict[str, list[WorkloadRequest]] = defaultdict(list)
    for r in reqs:
        assert r.session is not None and r.max_tokens == 100
        by_user[r.session].append(r)
    system = reqs[0].messages[0] if reqs[0].messages else None
    assert system is not None and len(system["content"]) == 1000 * 4
    grew = 0
    for rounds in by_user.values():
        assert [r.turn for r in rounds] == list(range(rounds[0].turn, rounds[0].turn + len(rounds)))
        for prev, cur in itertools.pairwise(rounds):
            assert prev.messages is not None and cur.messages is not None
            assert cur.messages[: len(prev.messages)] == prev.messages
            assert len(cur.messages) == len(prev.messages) + 2
            answer, question = cur.messages[-2:]
            assert answer["role"] == "assistant" and len(answer["content"]) == 100 * 4
            assert 100 * 4 <= len(question["content"]) <= 300 * 4
            grew += 1
        assert all(r.messages is not None and r.messages[0] is system for r in rounds)
    assert grew > 2000 and max(r.turn for r in reqs) == 9


def test_multi_turn_sessions_end_at_the_history_cap() -> None:
    spec = MultiTurn(history_cap_tokens=1200, rounds=50, user_context_tokens=300)
    reqs = spec.generate(seed=1, rate=5.0, requests=2000)
    history = [r.prompt_chars - 1000 * 4 for r in reqs]
    assert max(history) <= 1200 * 4 and max(r.turn for r in reqs) < 10


def test_agentic_matches_prebles_toolbench_preset() -> None:
    reqs = Agentic().generate(seed=2, rate=30.0, requests=4000)
    tokens = [r.prompt_tokens for r in reqs]
    assert statistics.mean(tokens) == pytest.approx(1835, rel=0.12)  # anchors.md: 1835 ± 742
    assert statistics.pstdev(tokens) == pytest.approx(742, rel=0.3)
    shared, _ = prefix_reuse(reqs)
    assert statistics.mean(shared[500:]) == pytest.approx(0.85, abs=0.06)  # anchors.md: 0.85 ± 0.13


def test_agentic_tasks_grow_and_sub_agents_share_the_parents_context() -> None:
    reqs = Agentic().generate(seed=3, rate=30.0, requests=3000)
    by_task: dict[str, list[WorkloadRequest]] = defaultdict(list)
    for r in reqs:
        assert r.session is not None
        by_task[r.session].append(r)
    bursts = 0
    for task in by_task.values():
        for r in task:
            assert r.messages is not None
            context = r.messages[:-1]  # all but its own last message is in every later step's context
            later = [s.messages for s in task if s.turn > r.turn and s.messages is not None]
            assert all(m[: len(context)] == context for m in later)
        for burst in (b for b in Counter(r.turn for r in task).items() if b[1] > 1):
            siblings = [r for r in task if r.turn == burst[0]]
            assert max(r.arrival_s for r in siblings) - min(r.arrival_s for r in siblings) <= 0.05
            contexts = [r.messages[:-1] for r in siblings if r.messages is not None]
            assert all(c == contexts[0] for c in contexts) and len(contexts) == len(siblings)
            bursts += 1
    assert bursts > 50


def test_rag_documents_come_from_one_pool_in_varying_order() -> None:
    reqs = Rag().generate(seed=1, rate=10.0, requests=2000)
    doc_ids: dict[str, int] = {}
    orders: set[tuple[int, int]] = set()
    for r in reqs:
        assert r.prompt_parts is not None
        docs = r.prompt_parts[1:-1]
        assert 3 <= len(docs) <= 5 and len(r.prompt_parts[-1]) == 128 * 4
        ids = [doc_ids.setdefault(d, len(doc_ids)) for d in docs]
        assert len(set(ids)) == len(ids) and r.group == docs[0].split(":")[0].replace("Document ", "d")
        orders.update(itertools.pairwise(ids))
    assert len(doc_ids) == 200
    assert any((b, a) in orders for a, b in orders)  # some pair of documents appears in both orders
    assert statistics.mean(len(d) for d in doc_ids) / 4 == pytest.approx(1000, rel=0.05)


def test_hot_prefix_top_group_carries_at_least_30_percent() -> None:
    reqs = HotPrefix().generate(seed=1, rate=10.0, requests=5000)
    top, count = Counter(r.group for r in reqs).most_common(1)[0]
    assert top == "g0" and count / len(reqs) >= 0.30
    assert all(r.prompt_parts is not None and len(r.prompt_parts[0]) == 4096 * 4 for r in reqs[:50])
    with pytest.raises(ValueError, match="below 30%"):
        HotPrefix(groups=64)


def test_no_sharing_shares_no_chunk_between_requests() -> None:
    reqs = make_workload("no-sharing", seed=1, replicas=1, rate=10.0, requests=500)
    hashes = [chunks(r) for r in reqs]
    chained = [c for h in hashes for c in h.chained]
    content = [c for h in hashes for c in h.content]
    assert len(set(chained)) == len(chained) and len(set(content)) == len(content)
    assert all(r.prompt_tokens == 2176 for r in reqs)


def test_default_rate_prices_decode_when_given_a_service_time() -> None:
    spec = SharedPrefix()
    prefill_only = spec.default_rate(4, 10_000.0)
    # 1 ms per output token on top of the prefill: 256 output tokens cost 0.256 s a request.
    with_decode = spec.default_rate(4, 10_000.0, service_s=lambda u, p, o: u / 10_000.0 + o * 0.001)
    expected_s = spec.round_robin_prefill_tokens(4) / 10_000.0 + 256 * 0.001
    assert with_decode == pytest.approx(1.2 * 4 / expected_s)
    assert with_decode < prefill_only
