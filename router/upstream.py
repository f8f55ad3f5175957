"""The replicas behind the router: membership, health (circuit breakers, /health probes), load scrapes.

Rules:
- `ReplicaSet` is the one place that adds, removes and updates replicas, and it keeps the Fleet in
  step: a replica joins the Fleet when added, leaves it (and the prefix index) when removed, and its
  Fleet `healthy` flag always equals its breaker's `available`.
- A replica's models are its configured `models`, else what its `/v1/models` answered, else "any"
  (until discovery succeeds the replica itself says whether it serves a model).
- `UpstreamClient` does the I/O on the router's one pooled `ClientSession`: active /health probes
  (and model discovery) every `health_interval_s`, /metrics scrapes every `scrape_interval_s`, each
  round bounded by a timeout no longer than its interval, so a hung replica cannot stall the loop.
- A failed scrape is counted (`router_scrape_errors_total`) but is not a health failure: load signals
  are optional (a replica without /metrics is routed on the router's own load alone).
- Every await is followed by a check that the replica is still the same object in the set, since a
  reload or an admin call may have removed or replaced it meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from router.breaker import Breaker
from router.config import BackendConfig, RouterConfig
from router.fleet import Fleet
from router.metrics import RouterMetrics

log = logging.getLogger("kvrouter.upstream")

_WANTED = (
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:cache_config_info",
)


@dataclass(slots=True)
class Replica:
    config: BackendConfig
    breaker: Breaker
    discovered: tuple[Mapping[str, object], ...] | None = None  # model objects from /v1/models

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def url(self) -> str:
        return self.config.url


@dataclass(frozen=True, slots=True)
class ReloadDiff:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EngineSample:
    """The load signals of one /metrics scrape (None: the replica does not export that one)."""

    num_requests_waiting: int | None = None
    num_requests_running: int | None = None
    kv_cache_usage_perc: float | None = None
    num_gpu_blocks: int | None = None
    block_size: int | None = None


def parse_engine_metrics(text: str) -> EngineSample:
    """vLLM's /metrics text → load signals (ValueError if the lines we need do not parse).

    Only the lines naming the four metrics are parsed (a vLLM page is mostly histograms). With several
    engines (data-parallel ranks) in one replica, counts and KV blocks are summed, usage is the max.
    """
    lines = [line for line in text.splitlines() if any(w in line for w in _WANTED)]
    totals: dict[str, float] = {}
    usage: float | None = None
    blocks: int | None = None
    block_size: int | None = None
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            if sample.name in ("vllm:num_requests_waiting", "vllm:num_requests_running"):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
            elif sample.name == "vllm:kv_cache_usage_perc":
                usage = sample.value if usage is None else max(usage, sample.value)
            elif sample.name == "vllm:cache_config_info":
                try:
                    blocks = (blocks or 0) + int(sample.labels.get("num_gpu_blocks", ""))
                    block_size = int(sample.labels.get("block_size", ""))
                except ValueError:
                    continue  # "None" before the engine has profiled its memory
    waiting = totals.get("vllm:num_requests_waiting")
    running = totals.get("vllm:num_requests_running")
    return EngineSample(
        num_requests_waiting=None if waiting is None else round(waiting),
        num_requests_running=None if running is None else round(running),
        kv_cache_usage_perc=usage,
        num_gpu_blocks=blocks,
        block_size=block_size,
    )


@dataclass(slots=True)
class ReplicaSet:
    """name → Replica, in step with the Fleet."""

    fleet: Fleet
    config: RouterConfig
    metrics: RouterMetrics
    _replicas: dict[str, Replica] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self._replicas

    def __len__(self) -> int:
        return len(self._replicas)

    def get(self, name: str) -> Replica | None:
        return self._replicas.get(name)

    def all(self) -> list[Replica]:
        return list(self._replicas.values())

    def add(self, backend: BackendConfig) -> Replica:
        """Add a replica (ValueError if the name is taken). It starts healthy until a probe says not."""
        if backend.name in self._replicas:
            raise ValueError(f"replica {backend.name!r} already exists")
        cfg = self.config
        replica = Replica(
            backend, Breaker(cfg.breaker_failures, cfg.breaker_cooldown_s, cfg.breaker_max_cooldown_s)
        )
        self.fleet.add_replica(
            backend.name,
            backend.models,
            kv_capacity_tokens=backend.kv_capacity_tokens,
            prefill_tokens_per_s=backend.prefill_tokens_per_s or cfg.prefill_tokens_per_s,
        )
        self._replicas[backend.name] = replica
        return replica

    def remove(self, name: str) -> bool:
        """Remove a replica: from the Fleet and its prefix index, and its labelled metric series."""
        if self._replicas.pop(name, None) is None:
            return False
        self.fleet.remove_replica(name)
        self.metrics.forget_replica(name)
        return True

    def apply(self, new: Sequence[BackendConfig], old: Sequence[BackendConfig]) -> ReloadDiff:
        """Move from the `old` configured backends to `new` (a reload). Replicas added by the admin
        API and absent from both lists are left alone. A backend whose url or capacity changed is
        replaced (its cache is another one now); one whose models alone changed keeps its index."""
        new_by_name = {b.name: b for b in new}
        removed = [b.name for b in old if b.name not in new_by_name and self.remove(b.name)]
        added: list[str] = []
        updated: list[str] = []
        for backend in new:
            current = self._replicas.get(backend.name)
            if current is None:
                self.add(backend)
                added.append(backend.name)
            elif current.config != backend:
                if (current.url, current.config.kv_capacity_tokens) == (
                    backend.url,
                    backend.kv_capacity_tokens,
                ):
                    current.config = backend
                    self._sync_models(current)
                    self.fleet.set_prefill_rate(
                        backend.name, backend.prefill_tokens_per_s or self.config.prefill_tokens_per_s
                    )
                else:
                    self.remove(backend.name)
                    self.add(backend)
                updated.append(backend.name)
        return ReloadDiff(tuple(added), tuple(removed), tuple(updated))

    def set_discovered(self, replica: Replica, models: Sequence[Mapping[str, object]]) -> None:
        replica.discovered = tuple(models)
        self._sync_models(replica)

    def _sync_models(self, replica: Replica) -> None:
        if replica.config.models:
            models: Sequence[str] = replica.config.models
        elif replica.discovered:
            models = [str(m["id"]) for m in replica.discovered]
        else:
            models = ()
        self.fleet.set_models(replica.name, models)

    def record_success(self, replica: Replica, now: float) -> None:
        if replica.breaker.record_success(now):
            log.info("replica %s is back (probe succeeded)", replica.name)
        self._sync_health(replica)

    def record_failure(self, replica: Replica, now: float, *, trip: bool = False) -> None:
        breaker = replica.breaker
        if breaker.trip(now) if trip else breaker.record_failure(now):
            self.metrics.ejections.labels(replica.name).inc()
            log.warning("replica %s ejected for %.1fs", replica.name, breaker.cooldown_s)
        self._sync_health(replica)

    def _sync_health(self, replica: Replica) -> None:
        if self._replicas.get(replica.name) is replica:
            self.fleet.set_healthy(replica.name, replica.breaker.available)

    def knows_model(self, model: str) -> bool:
        """Whether any replica (healthy or not) serves `model`: if none does, the model is unknown."""
        return any(state.serves(model) for state in self.fleet.replicas.values())

    def model_objects(self) -> list[Mapping[str, object]]:
        """The union of the replicas' models as OpenAI model objects: a replica's own object when it
        answered /v1/models, else a minimal one for a model named only in the configuration."""
        found: dict[str, Mapping[str, object]] = {}
        configured: dict[str, Mapping[str, object]] = {}
        for replica in self._replicas.values():
            names = replica.config.models
            for obj in replica.discovered or ():
                if not names or obj["id"] in names:
                    found.setdefault(str(obj["id"]), obj)
            for model in names:
                configured.setdefault(
                    model, {"id": model, "object": "model", "created": 0, "owned_by": "kvrouter"}
                )
        for model, obj in configured.items():
            found.setdefault(model, obj)
        return [found[k] for k in sorted(found)]


class UpstreamClient:
    """Probes and scrapes the replicas on the router's pooled session."""

    def __init__(
        self, session: aiohttp.ClientSession, replicas: ReplicaSet, clock: Callable[[], float]
    ) -> None:
        self.session = session
        self.replicas = replicas
        self.clock = clock

    def _timeout(self, interval: float) -> aiohttp.ClientTimeout:
        cfg = self.replicas.config
        return aiohttp.ClientTimeout(total=max(0.5, min(interval, 5.0)), sock_connect=cfg.connect_timeout_s)

    async def _get(self, replica: Replica, path: str, interval: float) -> tuple[int, bytes]:
        async with self.session.get(replica.url + path, timeout=self._timeout(interval)) as resp:
            return resp.status, await resp.read()

    async def probe(self, replica: Replica, *, initial: bool = False) -> None:
        """One /health probe (and model discovery when needed); updates the breaker."""
        breaker = replica.breaker
        if not breaker.available and not breaker.probe_due(self.clock()):
            return
        was_down = not breaker.available
        try:
            status, _ = await self._get(replica, "/health", self.replicas.config.health_interval_s)
            ok = status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            ok = False
        if self.replicas.get(replica.name) is not replica:
            return
        if not ok:
            self.replicas.record_failure(replica, self.clock(), trip=initial)
            return
        if not replica.config.models and (replica.discovered is None or was_down):
            await self.discover_models(replica)
        self.replicas.record_success(replica, self.clock())

    async def discover_models(self, replica: Replica) -> None:
        try:
            status, body = await self._get(replica, "/v1/models", self.replicas.config.health_interval_s)
            data = json.loads(body) if status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            return
        objects = [m for m in models if isinstance(m, dict) and isinstance(m.get("id"), str)]
        if objects and self.replicas.get(replica.name) is replica:
            self.replicas.set_discovered(replica, objects)

    async def scrape(self, replica: Replica) -> None:
        """One /metrics scrape into `Fleet.update_engine_metrics` (errors only counted)."""
        try:
            status, body = await self._get(replica, "/metrics", self.replicas.config.scrape_interval_s)
            if status != 200:
                raise ValueError(f"/metrics answered {status}")
            sample = parse_engine_metrics(body.decode("utf-8", errors="replace"))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            if self.replicas.get(replica.name) is replica:
                self.replicas.metrics.scrape_errors.labels(replica.name).inc()
            return
        self.replicas.fleet.update_engine_metrics(
            replica.name,
            now=self.clock(),
            num_requests_waiting=sample.num_requests_waiting,
            num_requests_running=sample.num_requests_running,
            kv_cache_usage_perc=sample.kv_cache_usage_perc,
            num_gpu_blocks=sample.num_gpu_blocks,
            block_size=sample.block_size,
        )

    async def health_round(self, *, initial: bool = False) -> None:
        await asyncio.gather(*(self.probe(r, initial=initial) for r in self.replicas.all()))

    async def scrape_round(self) -> None:
        await asyncio.gather(*(self.scrape(r) for r in self.replicas.all()))
        self.replicas.fleet.expire(self.clock())

    async def run_every(self, interval: Callable[[], float], round_fn: Callable[[], Awaitable[None]]) -> None:
        """Run `round_fn` every `interval()` seconds until cancelled (a failing round is logged).
        The interval is read each round, so a reload changes it."""
        while True:
            started = self.clock()
            try:
                await round_fn()
            except Exception:  # a bug in one round must not stop health checking for good
                log.exception("background round failed")
            await asyncio.sleep(max(0.0, interval() - (self.clock() - started)))
