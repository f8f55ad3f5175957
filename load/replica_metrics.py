"""What a benchmark reads from the replicas' own /metrics, whatever router stands in front of them.

A peer router exposes nothing kvrouter's report could use, and the client sees only what the router
relays, so every figure that must not depend on the router is read on the replica side, for every
row alike (vLLM V1's names, as the emulator exports them; workers/emulator/metrics.py):
- hit rate: `vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`, the increase over the
  run. vLLM counts these in tokens, once per lookup: a queue head that does not fit in free KV is
  looked up (and counted) again on the next step, so under KV pressure this reads lower than the
  per-request `cached_tokens` the answers carry.
- requests per replica: the increase of `vllm:request_success_total` (all finish reasons);
- busy time per replica: the increase of `vllm:e2e_request_latency_seconds_sum` (request-seconds);
- TTFT as the replica saw it (from the request's arrival in the engine to its first token): the
  increase of `vllm:time_to_first_token_seconds` sum over count. The client's TTFT minus this one is
  what the path adds: HTTP, the router, the client's own scheduling;
- in flight: `vllm:num_requests_running + vllm:num_requests_waiting`, a gauge, sampled.

One figure is read from the router instead, for kvrouter's rows only (a peer has no counterpart):
the hot-prefix migrations it ran (`router_migrations_total` by outcome, `parse_router_migrations`),
since a warm-up prefill is a request the replicas count like any other.

`parse_replica_metrics` and `parse_router_migrations` are pure; `scrape` is the one I/O call. With
several engines in one replica (data-parallel ranks) everything is summed.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import MIGRATION_OUTCOMES

_SAMPLES = {
    "vllm:prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:request_success_total": "requests_finished",
    "vllm:e2e_request_latency_seconds_sum": "e2e_seconds",
    "vllm:time_to_first_token_seconds_sum": "ttft_seconds",
    "vllm:time_to_first_token_seconds_count": "first_tokens",
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
}
_GAUGES = ("running", "waiting")
# The families of the samples above: only their lines are parsed, buckets left out (most of a page).
_WANTED = tuple({re.sub(r"_(total|sum|count)$", "", name) for name in _SAMPLES})


@dataclass(frozen=True, slots=True)
class ReplicaCounters:
    """One scrape of one replica: counters (cumulative) and gauges (now)."""

    prefix_cache_queries: float = 0.0
    prefix_cache_hits: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    requests_finished: float = 0.0
    e2e_seconds: float = 0.0
    ttft_seconds: float = 0.0
    first_tokens: float = 0.0
    running: float = 0.0
    waiting: float = 0.0

    def since(self, before: ReplicaCounters) -> ReplicaCounters:
        """The counters' increase since `before`; the gauges as they are now."""
        return ReplicaCounters(
            **{
                f.name: getattr(self, f.name) - (0.0 if f.name in _GAUGES else getattr(before, f.name))
                for f in fields(self)
            }
        )

    @property
    def in_flight(self) -> int:
        return round(self.running + self.waiting)


def parse_replica_metrics(text: str) -> ReplicaCounters:
    """A replica's /metrics page → its counters (ValueError if the lines we need do not parse)."""
    lines = [line for line in text.splitlines() if "_bucket{" not in line and any(w in line for w in _WANTED)]
    totals = dict.fromkeys(_SAMPLES.values(), 0.0)
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            key = _SAMPLES.get(sample.name)
            if key is not None:
                totals[key] += sample.value
    return ReplicaCounters(**totals)


def parse_router_migrations(text: str) -> dict[str, int]:
    """kvrouter's /metrics page → its hot-prefix migrations by outcome (ValueError if it does not parse)."""
    lines = [line for line in text.splitlines() if "router_migrations_total" in line]
    counts = dict.fromkeys(MIGRATION_OUTCOMES, 0)
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            outcome = sample.labels.get("outcome", "")
            if sample.name == "router_migrations_total" and outcome in counts:
                counts[outcome] += round(sample.value)
    return counts


async def scrape(session: aiohttp.ClientSession, urls: Sequence[str]) -> list[ReplicaCounters]:
    """Every replica's counters, scraped concurrently (raises on a replica that does not answer)."""

    async def one(url: str) -> ReplicaCounters:
        async with session.get(url + "/metrics") as resp:
            resp.raise_for_status()
            return parse_replica_metrics(await resp.text())

    return list(await asyncio.gather(*(one(url) for url in urls)))


def hit_rate(deltas: Sequence[ReplicaCounters]) -> float:
    queries = sum(d.prefix_cache_queries for d in deltas)
    return sum(d.prefix_cache_hits for d in deltas) / queries if queries else 0.0


def replica_ttft_mean(deltas: Sequence[ReplicaCounters]) -> float:
    """Mean TTFT as the replicas measured it over the run (NaN when no first token came)."""
    count = sum(d.first_tokens for d in deltas)
    return sum(d.ttft_seconds for d in deltas) / count if count else math.nan
