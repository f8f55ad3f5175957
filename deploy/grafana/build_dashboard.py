"""Build kvrouter's Grafana dashboard, deploy/grafana/kvrouter.json, from one table of panels.

    python deploy/grafana/build_dashboard.py > deploy/grafana/kvrouter.json

Edit the panels here, not the JSON: tests/integration/test_deploy_prometheus.py checks that the JSON is
what this script builds, and runs every query in it against a real Prometheus scraping a live router and
emulated vLLM replicas. Import the JSON into Grafana (Dashboards > Import), or provision it with
deploy/grafana/provisioning/. It needs a Prometheus data source that scrapes the routers (job `kvrouter`
by default, the `job` variable) and, for the last row, the vLLM replicas (the `engine_job` variable).

Rates use Grafana's `$__rate_interval`, so the panels work without the recording rules of
deploy/prometheus/kvrouter-rules.yml (the alerts use those).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

UID = "kvrouter-overview"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ROUTERS = 'job=~"$job", instance=~"$instance"'
ENGINES = 'job=~"$engine_job"'
GENERATION = ROUTERS + ', route=~"/v1/.*"'  # the proxied routes, not /metrics or /admin
WIDTH = 24  # Grafana's grid is 24 columns wide


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""
    width: int = 12
    height: int = 8
    max_value: float | None = None
    stacked: bool = False


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def rate(metric: str, selector: str = ROUTERS) -> str:
    return f"rate({metric}{{{selector}}}[$__rate_interval])"


def ratio(numerator: str, denominator: str) -> str:
    return f"sum({rate(numerator)}) / sum({rate(denominator)})"


def quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, sum by (le) ({rate(histogram + '_bucket')}))"


LOGICAL = ratio("router_logical_cached_tokens_total", "router_prompt_tokens_total")
PHYSICAL = ratio("router_physical_cached_tokens_total", "router_usage_prompt_tokens_total")

ROWS = (
    Row(
        "The amnesia tax: what the fleet reuses, against what it could",
        (
            Panel(
                "Prompt-token hit ratio",
                (
                    Query(
                        ratio("router_logical_cached_tokens_total", "router_prompt_tokens_total"), "logical"
                    ),
                    Query(
                        ratio("router_expected_cached_tokens_total", "router_prompt_tokens_total"), "expected"
                    ),
                    Query(
                        ratio("router_physical_cached_tokens_total", "router_usage_prompt_tokens_total"),
                        "physical",
                    ),
                ),
                unit="percentunit",
                max_value=1.0,
                description=(
                    "logical: prompt tokens whose chunks the router had seen before on any replica (a "
                    "perfect fleet-wide cache). expected: what the routing decisions expected the chosen "
                    "replica to hold. physical: what the replicas reported as cache hits (vLLM's "
                    "--enable-prompt-tokens-details)."
                ),
            ),
            Panel(
                "Amnesia tax: seen before, computed again",
                (
                    Query(
                        f"clamp_min({LOGICAL} - {PHYSICAL}, 0)",
                        "logical - physical",
                    ),
                ),
                unit="percentunit",
                max_value=1.0,
                description="The share of prompt tokens the fleet prefilled again although it had "
                "computed them before.",
            ),
            Panel(
                "Prompt tokens per second",
                (
                    Query(f"sum({rate('router_prompt_tokens_total')})", "routed"),
                    Query(f"sum({rate('router_logical_cached_tokens_total')})", "seen before"),
                    Query(f"sum({rate('router_physical_cached_tokens_total')})", "served from cache"),
                ),
                width=24,
            ),
        ),
    ),
    Row(
        "Traffic and latency",
        (
            Panel(
                "Requests per second, by status",
                (Query(f"sum by (code) ({rate('router_requests_total', GENERATION)})", "{{code}}"),),
                unit="reqps",
                stacked=True,
            ),
            Panel(
                "Time to first token",
                (
                    Query(quantile(0.5, "router_time_to_first_token_seconds"), "p50"),
                    Query(quantile(0.99, "router_time_to_first_token_seconds"), "p99"),
                ),
                unit="s",
                description="From the request's arrival to the replica's first body byte (streams) or whole "
                "body.",
            ),
            Panel(
                "Request duration",
                (
                    Query(quantile(0.5, "router_request_duration_seconds"), "p50"),
                    Query(quantile(0.99, "router_request_duration_seconds"), "p99"),
                ),
                unit="s",
            ),
            Panel(
                "In flight, by replica",
                (
                    Query(f"sum by (replica) (router_replica_inflight_requests{{{ROUTERS}}})", "{{replica}}"),
                    Query(f"sum(router_inflight_requests{{{ROUTERS}}})", "router total"),
                ),
            ),
            Panel(
                "Routing decisions, by policy and reason",
                (
                    Query(
                        f"sum by (policy, reason) ({rate('router_routing_decisions_total')})",
                        "{{policy}} {{reason}}",
                    ),
                ),
                unit="reqps",
                stacked=True,
            ),
            Panel(
                "Replica failures",
                (
                    Query(f"sum by (kind) ({rate('router_upstream_errors_total')})", "error: {{kind}}"),
                    Query(f"sum by (reason) ({rate('router_upstream_retries_total')})", "retry: {{reason}}"),
                    Query(
                        f"sum by (replica) ({rate('router_replica_ejections_total')})", "ejected: {{replica}}"
                    ),
                    Query(f"sum({rate('router_stream_interruptions_total')})", "streams cut"),
                ),
                unit="ops",
            ),
        ),
    ),
    Row(
        "Replicas and the prefix index",
        (
            Panel(
                "Healthy replicas",
                (
                    Query(f"sum(router_replica_healthy{{{ROUTERS}}})", "healthy"),
                    Query(f"max(router_replicas{{{ROUTERS}}})", "configured"),
                ),
                description="Healthy and not draining, out of the replicas configured.",
            ),
            Panel(
                "Prefix-index entries",
                (Query(f"sum by (instance) (router_index_entries{{{ROUTERS}}})", "{{instance}}"),),
            ),
            Panel(
                "KV events applied per second, by type",
                (Query(f"sum by (type) ({rate('router_kv_events_total')})", "{{type}}"),),
                unit="ops",
            ),
            Panel(
                "KV-event streams in trouble",
                (
                    Query(
                        f"sum(router_kv_events_approximate{{{ROUTERS}}})", "replicas routed without events"
                    ),
                    Query(f"sum({rate('router_kv_event_gaps_total')})", "gaps/s"),
                    Query(
                        f"sum by (reason) ({rate('router_kv_event_resyncs_total')})", "resyncs/s: {{reason}}"
                    ),
                ),
            ),
        ),
    ),
    Row(
        "Hot prefixes",
        (
            Panel(
                "Hot groups, and why they wait",
                (
                    Query(f"sum(router_hot_groups{{{ROUTERS}}})", "hot"),
                    Query(f"sum by (reason) (router_hot_groups_waiting{{{ROUTERS}}})", "waiting: {{reason}}"),
                ),
            ),
            Panel(
                "Busiest prefix groups: requests per second",
                (Query(f"max by (group) (router_top_group_requests_per_second{{{ROUTERS}}})", "{{group}}"),),
                unit="reqps",
                description="The five busiest prefix groups, by their keys as GET /admin/hot names them.",
            ),
            Panel(
                "Busiest prefix groups: holders",
                (
                    Query(f"max by (group) (router_top_group_holders{{{ROUTERS}}})", "{{group}}"),
                    Query(f"sum(router_top_group_hot{{{ROUTERS}}})", "hot among them"),
                ),
                description="Replicas holding each busy group; migrations add holders to hot groups.",
            ),
            Panel(
                "Migrations",
                (
                    Query(
                        "sum by (outcome) "
                        f"(increase(router_migrations_total{{{ROUTERS}}}[$__rate_interval]))",
                        "{{outcome}}",
                    ),
                    Query(quantile(0.99, "router_migration_duration_seconds"), "p99 duration (s)"),
                ),
            ),
        ),
    ),
    Row(
        "Engines (vLLM's own metrics)",
        (
            Panel(
                "Requests waiting and running, by replica",
                (
                    Query(
                        f"sum by (instance) (vllm:num_requests_waiting{{{ENGINES}}})", "waiting {{instance}}"
                    ),
                    Query(
                        f"sum by (instance) (vllm:num_requests_running{{{ENGINES}}})", "running {{instance}}"
                    ),
                ),
            ),
            Panel(
                "KV-cache usage, by replica",
                (Query(f"max by (instance) (vllm:kv_cache_usage_perc{{{ENGINES}}})", "{{instance}}"),),
                unit="percentunit",
                max_value=1.0,
            ),
            Panel(
                "Engine prefix-cache hit ratio, by replica",
                (
                    Query(
                        f"sum by (instance) ({rate('vllm:prefix_cache_hits_total', ENGINES)})"
                        f" / sum by (instance) ({rate('vllm:prefix_cache_queries_total', ENGINES)})",
                        "{{instance}}",
                    ),
                ),
                unit="percentunit",
                max_value=1.0,
                width=24,
            ),
        ),
    ),
)


def _variable(name: str, label: str, query: str, default: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"text": default, "value": default},
        "sort": 1,
    }


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "custom": {"stacking": {"mode": "normal" if panel.stacked else "none"}, "fillOpacity": 10},
    }
    if panel.max_value is not None:
        defaults["min"], defaults["max"] = 0, panel.max_value
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend, "refId": chr(ord("A") + i)}
            for i, q in enumerate(panel.queries)
        ],
    }


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    panels: list[dict[str, Any]] = []
    y = 0
    for row in ROWS:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y},
            }
        )
        y += 1
        x, line_height = 0, 0
        for panel in row.panels:
            if x + panel.width > WIDTH:
                x, y, line_height = 0, y + line_height, 0
            panels.append(_panel(panel, len(panels) + 1, x, y))
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return {
        "uid": UID,
        "title": "kvrouter",
        "description": "Cache-aware routing in front of vLLM: the amnesia tax, latency, replicas, KV events, "
        "hot prefixes.",
        "tags": ["kvrouter", "vllm"],
        "timezone": "",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                },
                _variable("job", "Router job", "label_values(router_requests_total, job)", "kvrouter"),
                _variable(
                    "instance", "Router", 'label_values(router_requests_total{job=~"$job"}, instance)', "All"
                ),
                _variable("engine_job", "vLLM job", "label_values(vllm:num_requests_running, job)", "vllm"),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
