"""The router's Prometheus metrics, one registry per router, and the amnesia-tax meter.

Rules:
- One `CollectorRegistry` per `RouterMetrics` (never the global one), so several routers in one
  process (tests, benchmarks) keep separate counts.
- Label sets are bounded: `route` is the matched route's pattern (or "unmatched"), `code` the status,
  `policy`/`reason` come from the policy's small fixed set, `replica` from the fleet (series of a
  removed replica are deleted with it), `reason` of retries from `RETRY_REASONS`, `outcome` of
  migrations from `MIGRATION_OUTCOMES`, `reason` of tokenization failures from the tokenizer's
  `FAILURE_REASONS`, KV-event `type` from `EVENT_TYPES` and `reason` from `RESYNC_REASONS` /
  `SKIP_REASONS`, `reason` of hot groups waiting from `WAITING_REASONS`; `router_hot_groups` is a count,
  with no per-group label; `router_top_group_*{rank,group}` hold the `TOP_GROUPS` busiest groups only,
  their previous series removed at every controller tick.
- Names follow Prometheus' conventions (what `promtool check metrics` checks): `router_` prefix,
  counters end in `_total`, units in the name (`_seconds`, `_tokens`).
- Fleet-derived gauges (in-flight per replica, health, index entries) are set from the Fleet at
  scrape time (`observe_fleet`), not on every request.

The amnesia-tax meter, all in prompt tokens (a rate of each over `router_prompt_tokens_total`): exact
counts for token-id prompts and, in token-precise mode (`tokenizer` set), for every tokenized request;
characters / 4 estimates for text hashed as text.
- `router_logical_cached_tokens_total`: the part of each prompt whose chunks this router has seen
  before, on any replica: what a fleet with one shared, never-forgetting cache would hit.
- `router_expected_cached_tokens_total`: what the routing decision predicted the chosen replica holds.
- `router_physical_cached_tokens_total`: what the replica reports it actually reused
  (`usage.prompt_tokens_details.cached_tokens`), with `router_usage_prompt_tokens_total` the replica's
  own count of those requests' prompt tokens, the right denominator for the physical hit rate.
logical - physical is the tax: prefills the fleet recomputed although the prefix had been computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from router.fleet import Fleet
from router.hot_prefix import WAITING_REASONS, GroupView
from router.index.event_indexer import EVENT_TYPES, SKIP_REASONS
from router.index.seen import SeenChunks
from router.tokenize import FAILURE_REASONS as TOKENIZE_FAILURE_REASONS

RETRY_REASONS = ("connect_error", "upstream_5xx", "disconnected")
# Busiest prefix groups exposed per top-group gauge (router_top_group_*): the hot-prefix issue's "top hot
# groups, bounded cardinality"; the rest are in GET /admin/hot (20 of them).
TOP_GROUPS = 5
# TTFT through the router: from a few ms (cached, idle) to minutes (long prefills in a queue).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
MIGRATION_OUTCOMES = ("started", "completed", "failed")
MIGRATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Why a replica's event-derived index entries were dropped and rebuilt (router/kv_subscriber.py):
# the engine restarted (sequence reset), a gap with no replay endpoint, a replay that did not reach back
# far enough, or one that failed (timeout, error, malformed batch).
RESYNC_REASONS = ("restart", "no_replay", "replay_incomplete", "replay_failed")
# Tokenization before routing: tens of µs (a short prompt, locally) to the replica timeout (1 s).
TOKENIZE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


_Labelled = TypeVar("_Labelled", Counter, Gauge)


def with_series(metric: _Labelled, values: Iterable[str]) -> _Labelled:
    """`metric` (one label) with a series for each of its fixed label `values` from the start, so a
    dashboard sees zeros rather than no data before the first event of a kind."""
    for value in values:
        metric.labels(value)
    return metric


class RouterMetrics:
    """Every metric of one router, in its own registry; `render()` is the /metrics body."""

    def __init__(self, seen_chunks_capacity: int = 1 << 20) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.seen = SeenChunks(seen_chunks_capacity)
        self.requests = Counter(
            "router_requests_total",
            "HTTP requests answered, by route pattern and status code",
            ["route", "code"],
            registry=r,
        )
        self.decisions = Counter(
            "router_routing_decisions_total",
            "Routing decisions, by policy and the policy's reason",
            ["policy", "reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "router_time_to_first_token_seconds",
            "From request received to the replica's first body byte (streams) or whole body",
            ["route"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "router_request_duration_seconds",
            "Proxied requests, from received to last byte sent",
            ["route"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "router_upstream_retries_total",
            "Requests re-sent to another replica before any byte reached the client, by reason",
            ["reason"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "router_upstream_errors_total",
            "Failed exchanges with a replica, by kind",
            ["kind"],
            registry=r,
        )
        self.stream_interruptions = Counter(
            "router_stream_interruptions_total",
            "Streams cut by the replica after their first byte (ended with an SSE error event)",
            registry=r,
        )
        self.client_disconnects = Counter(
            "router_client_disconnects_total", "Proxied requests abandoned by the client", registry=r
        )
        self.ejections = Counter(
            "router_replica_ejections_total", "Circuit-breaker ejections, by replica", ["replica"], registry=r
        )
        self.scrape_errors = Counter(
            "router_scrape_errors_total", "Failed /metrics scrapes, by replica", ["replica"], registry=r
        )
        self.inflight = Gauge("router_inflight_requests", "Proxied requests in flight", registry=r)
        self.replica_inflight = Gauge(
            "router_replica_inflight_requests",
            "Requests this router has in flight on each replica",
            ["replica"],
            registry=r,
        )
        self.replica_healthy = Gauge(
            "router_replica_healthy",
            "1 if the replica takes traffic (healthy, not draining), else 0",
            ["replica"],
            registry=r,
        )
        self.replicas = Gauge("router_replicas", "Replicas in the fleet", registry=r)
        self.index_entries = Gauge("router_index_entries", "Prefix-index (hash, replica) entries", registry=r)
        self.prompt_tokens = Counter(
            "router_prompt_tokens_total",
            "Prompt tokens routed (exact for token ids and tokenized requests, else chars/4)",
            registry=r,
        )
        self.logical_cached = Counter(
            "router_logical_cached_tokens_total",
            "Prompt tokens whose chunks this router had seen before on any replica",
            registry=r,
        )
        self.expected_cached = Counter(
            "router_expected_cached_tokens_total",
            "Prompt tokens the routing decision expected the chosen replica to hold",
            registry=r,
        )
        self.physical_cached = Counter(
            "router_physical_cached_tokens_total",
            "Prompt tokens the replicas reported as cache hits (usage.prompt_tokens_details)",
            registry=r,
        )
        self.usage_prompt_tokens = Counter(
            "router_usage_prompt_tokens_total",
            "Prompt tokens the replicas reported, for responses that reported cached tokens",
            registry=r,
        )

        self.migrations = with_series(
            Counter(
                "router_migrations_total",
                "Hot-prefix migrations, by outcome (started, completed, failed)",
                ["outcome"],
                registry=r,
            ),
            MIGRATION_OUTCOMES,
        )
        self.migration_bytes = Counter(
            "router_migration_bytes_total", "KV bytes copied by completed hot-prefix migrations", registry=r
        )
        self.migration_duration = Histogram(
            "router_migration_duration_seconds",
            "Hot-prefix migrations, from start to the executor's answer (or failure)",
            buckets=MIGRATION_BUCKETS,
            registry=r,
        )
        self.hot_groups = Gauge(
            "router_hot_groups", "Prefix groups the hot-prefix controller marks hot", registry=r
        )
        self.hot_groups_waiting = with_series(
            Gauge(
                "router_hot_groups_waiting",
                "Hot prefix groups that got no new migration at the last tick, by why",
                ["reason"],
                registry=r,
            ),
            WAITING_REASONS,
        )
        # The busiest groups, hot or not, refreshed every controller tick: at most TOP_GROUPS series each.
        top = ["rank", "group"]
        self.top_group_rate = Gauge(
            "router_top_group_requests_per_second",
            "Decayed request rate of the busiest prefix groups, by rank (1 = busiest) and group key "
            "(as GET /admin/hot names it)",
            top,
            registry=r,
        )
        self.top_group_holders = Gauge(
            "router_top_group_holders",
            "Replicas the prefix index lists as holding each of the busiest groups",
            top,
            registry=r,
        )
        self.top_group_hot = Gauge(
            "router_top_group_hot",
            "1 if the hot-prefix controller marks the group hot, else 0",
            top,
            registry=r,
        )

        # KV events (router/kv_subscriber.py); `replica` from the fleet, `type`/`reason` fixed sets.
        self.kv_event_batches = Counter(
            "router_kv_event_batches_total", "KV-event batches applied, by replica", ["replica"], registry=r
        )
        self.kv_events = Counter(
            "router_kv_events_total",
            "KV events applied, by replica and type (BlockStored, BlockRemoved, AllBlocksCleared)",
            ["replica", "type"],
            registry=r,
        )
        self.kv_event_gaps = Counter(
            "router_kv_event_gaps_total",
            "Sequence gaps in a replica's KV-event stream (batches missed)",
            ["replica"],
            registry=r,
        )
        self.kv_event_replays = Counter(
            "router_kv_event_replays_total",
            "Replays asked of a replica's replay endpoint",
            ["replica"],
            registry=r,
        )
        self.kv_event_resyncs = Counter(
            "router_kv_event_resyncs_total",
            "Times a replica's event-derived index entries were dropped, by reason",
            ["replica", "reason"],
            registry=r,
        )
        self.kv_event_skipped_blocks = Counter(
            "router_kv_event_skipped_blocks_total",
            "Stored blocks not indexed, by reason (orphan: parent unknown; medium, group, block_size, "
            "malformed)",
            ["replica", "reason"],
            registry=r,
        )
        self.kv_events_approximate = Gauge(
            "router_kv_events_approximate",
            "1 if the replica's KV events are not flowing (absent, lost or silent) and its index entries "
            "come from routing, else 0",
            ["replica"],
            registry=r,
        )
        self.tokenize_seconds = Histogram(
            "router_tokenize_seconds",
            "Token-precise mode: time to tokenize a request before routing it (failures included)",
            buckets=TOKENIZE_BUCKETS,
            registry=r,
        )
        self.tokenize_failures = with_series(
            Counter(
                "router_tokenize_failures_total",
                "Token-precise mode: requests that could not be tokenized and were hashed as text, by reason",
                ["reason"],
                registry=r,
            ),
            TOKENIZE_FAILURE_REASONS,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_fleet(self, fleet: Fleet, inflight: int) -> None:
        """Refresh the gauges derived from the Fleet (called when /metrics is scraped)."""
        self.inflight.set(inflight)
        self.replicas.set(len(fleet.replicas))
        self.index_entries.set(fleet.index.size())
        self.replica_inflight.clear()
        self.replica_healthy.clear()
        for name, state in fleet.replicas.items():
            self.replica_inflight.labels(name).set(state.inflight_requests)
            self.replica_healthy.labels(name).set(1 if state.available else 0)

    def observe_top_groups(self, groups: Sequence[GroupView]) -> None:
        """The top-group gauges for `groups`, busiest first (the controller's `groups(top=TOP_GROUPS)`);
        the series of groups no longer among them go, so the exposition holds at most TOP_GROUPS each."""
        gauges = (self.top_group_rate, self.top_group_holders, self.top_group_hot)
        for gauge in gauges:
            gauge.clear()
        for rank, g in enumerate(groups[:TOP_GROUPS], start=1):
            labels = (str(rank), str(g.group))
            self.top_group_rate.labels(*labels).set(g.request_rate)
            self.top_group_holders.labels(*labels).set(len(g.holders))
            self.top_group_hot.labels(*labels).set(1 if g.hot else 0)

    def forget_replica(self, name: str) -> None:
        """Drop a removed replica's labelled series, so churn cannot grow the exposition."""
        for metric in (
            self.ejections,
            self.scrape_errors,
            self.kv_event_batches,
            self.kv_event_gaps,
            self.kv_event_replays,
            self.kv_events_approximate,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(name)
        for labelled, values in (
            (self.kv_events, EVENT_TYPES),
            (self.kv_event_resyncs, RESYNC_REASONS),
            (self.kv_event_skipped_blocks, SKIP_REASONS),
        ):
            for value in values:
                with contextlib.suppress(KeyError):
                    labelled.remove(name, value)
