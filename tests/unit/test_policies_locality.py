"""Known failure (c): under high load SGLang's imbalance branch discards locality; kvaware keeps it.

A tiny deterministic discrete-event run (no event loop, virtual time): Poisson arrivals from G prefix
groups with Zipf popularity; each replica prefills first-come first-served at a fixed rate and decodes
for a fixed time; its cache is the Fleet's PrefixIndex with a small LRU capacity (so a group spread
over every replica evicts the others'). Locality = the fraction of requests sent to a replica that
held the whole group prefix at routing time. At 50 requests/s with 8 s decodes about 400 requests
are in flight, and the hot group's holder runs more than 32 requests ahead of the others: SGLang's
imbalance threshold. Seen on seeds 1-4: locality kvaware 0.99 (0.97-0.98 with recompute_weight=0),
sglang 0.83-0.92, least_load 0.63-0.67; mean TTFT kvaware 16-18 ms, sglang 35-56, least_load 90-117.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from router.fleet import Fleet, FleetConfig
from router.policies.base import make_request
from router.policies.registry import parse_policy_spec

PREFILL_RATE = 5000.0  # tokens/s per replica
PREFIX_CHARS = 2048  # 32 chunks, 512 tokens
QUESTION_CHARS = 256


@dataclass(frozen=True)
class Outcome:
    locality: float
    mean_ttft_s: float
    reasons: Counter[str]


def run(
    spec: str,
    *,
    seed: int,
    requests: int = 800,
    replicas: int = 4,
    groups: int = 8,
    arrival_rate: float = 50.0,
    decode_s: float = 8.0,
    kv_capacity_tokens: int = 2600,
) -> Outcome:
    fleet = Fleet(parse_policy_spec(spec), FleetConfig(prefill_tokens_per_s=PREFILL_RATE))
    names = [f"r{i}" for i in range(replicas)]
    for name in names:
        fleet.add_replica(name, kv_capacity_tokens=kv_capacity_tokens)
    rng = random.Random(seed)
    prefixes = ["".join(rng.choice("abcdefghij ") for _ in range(PREFIX_CHARS)) for _ in range(groups)]
    popularity = [1 / (g + 1) for g in range(groups)]
    prefix_chunks = PREFIX_CHARS // 64
    busy_until = dict.fromkeys(names, 0.0)
    events: list[tuple[float, int, int]] = []  # (time, kind 0 arrive / 1 first token / 2 done, request)
    now = 0.0
    for k in range(requests):
        now += rng.expovariate(arrival_rate)
        events.append((now, 0, k))
    heapq.heapify(events)
    local, ttft_total, reasons = 0, 0.0, Counter[str]()
    while events:
        now, kind, k = heapq.heappop(events)
        rid = f"q{k}"
        if kind == 1:
            fleet.first_token(rid, now)
            heapq.heappush(events, (now + decode_s, 2, k))
            continue
        if kind == 2:
            fleet.done(rid, now)
            continue
        group = rng.choices(range(groups), popularity)[0]
        question = "".join(rng.choice("klmnopqrst ") for _ in range(QUESTION_CHARS))
        request = make_request(rid, "m", prompt=prefixes[group] + question)
        decision = fleet.policy.choose(request, fleet, now)
        held = fleet.index.longest_match(request.hashes.chained).get(decision.replica, 0)
        local += held >= prefix_chunks
        reasons[decision.reason] += 1
        fleet.routed(request, decision, now)
        start = max(now, busy_until[decision.replica])
        busy_until[decision.replica] = first = start + request.uncached_tokens(held) / PREFILL_RATE
        ttft_total += first - now
        heapq.heappush(events, (first, 1, k))
    return Outcome(local / requests, ttft_total / requests, reasons)


@pytest.mark.parametrize("seed", [1, 2])
def test_kvaware_keeps_locality_where_sglang_imbalance_loses_it(seed: int) -> None:
    kvaware = run("kvaware", seed=seed)
    sglang = run("sglang", seed=seed)
    least_load = run("least_load", seed=seed)
    # About 400 requests in flight: SGLang's imbalance branch really fires (70-140 times a run).
    assert sglang.reasons["imbalance"] >= 50
    assert kvaware.locality >= 0.97
    assert sglang.locality <= kvaware.locality - 0.05  # seen: 0.07 to 0.16 over seeds 1-4
    assert least_load.locality <= kvaware.locality - 0.25
    # Locality is not bought with latency: kvaware's mean TTFT is the lowest of the three.
    assert kvaware.mean_ttft_s < sglang.mean_ttft_s < least_load.mean_ttft_s


def test_at_low_load_everyone_cache_aware_is_local() -> None:
    """Control: with few requests in flight the imbalance branch never fires and SGLang is local too,
    so the gap above comes from load, not from a difference in matching."""
    sglang = run("sglang", seed=1, arrival_rate=4.0, decode_s=2.0, requests=200, kv_capacity_tokens=8000)
    kvaware = run("kvaware", seed=1, arrival_rate=4.0, decode_s=2.0, requests=200, kv_capacity_tokens=8000)
    assert sglang.reasons["imbalance"] == 0
    assert sglang.locality >= 0.9 and kvaware.locality >= 0.9
