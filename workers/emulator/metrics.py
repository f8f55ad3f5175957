"""`/metrics` of one emulated replica: vLLM V1's Prometheus names, labels and types.

Rules:
- One `CollectorRegistry` per replica (several replicas share a process, and prometheus_client's
  default registry is process-global). A custom collector reads the engine's `EngineMetrics` snapshot
  at scrape time, so the engine stays the single source of truth and nothing is counted twice.
- Every series carries `model_name` and `engine` ("0": one engine core per replica), as vLLM's do.
  Counters are exposed with `_total`; `vllm:cache_config_info` is an info-style gauge with value 1 whose
  labels give the KV capacity (`block_size`, `num_gpu_blocks`), as vLLM exposes it.
- The two histograms (TTFT, end-to-end latency) use vLLM's bucket bounds (vllm/v1/metrics/loggers.py)
  and are fed by the driver from the engine's step outputs. `request_success_total{finished_reason}`
  counts finished requests only: an aborted request is not a success, as seen on live vLLM
  (vllm-interfaces.md), and its "abort" series stays 0.
- A restart (clearing a `crash` fault) starts from zero, as a restarted vLLM process does.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import CollectorRegistry

from workers.engine import EngineMetrics

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what vLLM's /metrics answers with
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort")


class Histogram:
    """Bucket counts and a sum: what one Prometheus histogram series needs, with no lock."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le is inclusive: bisect_left
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


class RequestStats:
    """Per-request observations that the engine's counters do not carry."""

    __slots__ = ("e2e", "finished_reasons", "ttft")

    def __init__(self) -> None:
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.finished_reasons: Counter[str] = Counter()


class ReplicaCollector:
    """Builds the vLLM metric families from a replica's current engine snapshot and stats."""

    def __init__(self, model_name: str, source: Callable[[], tuple[EngineMetrics, RequestStats]]) -> None:
        self._labels = ["model_name", "engine"]
        self._values = [model_name, "0"]
        self._source = source

    def collect(self) -> Iterator[Metric]:
        m, stats = self._source()
        labels, values = self._labels, self._values

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        yield gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            m.num_requests_running,
        )
        yield gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", m.num_requests_waiting
        )
        yield gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", m.kv_cache_usage_perc
        )
        yield counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
            m.prefix_cache_queries,
        )  # fmt: skip
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            m.prefix_cache_hits,
        )
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", m.prompt_tokens)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", m.generation_tokens)
        yield counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.", m.num_preemptions
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*labels, "finished_reason"],
        )
        for reason in FINISH_REASONS:
            success.add_metric([*values, reason], stats.finished_reasons[reason])
        yield success
        for name, doc, hist in (
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", stats.ttft),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", stats.e2e),
        ):
            family = HistogramMetricFamily(name, doc, labels=labels)
            family.add_metric(values, hist.cumulative(), hist.sum)
            yield family
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
            labels=["block_size", "num_gpu_blocks", "enable_prefix_caching", "cache_dtype", "engine"],
        )  # fmt: skip
        info.add_metric([str(m.block_size), str(m.num_gpu_blocks), "True", "auto", "0"], 1.0)
        yield info


def make_registry(collector: ReplicaCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
