"""The proxy's driver of the hot-prefix controller (router/hot_prefix.py): ticks, executes, reports.

Rules:
- It exists only when the policy is kvaware with `migration` true (`kvaware:migration=false` turns it
  off); `make_runner` returns None otherwise, and then /admin/hot and /admin/migrations answer 404.
- The controller's parameters are the config's `hot_prefix:` mapping over `HotPrefixParams`' defaults,
  with the policy's own `group_chunks` and step model (`hot_prefix_params`). A reload that changes only
  `hot_prefix` retunes the running controller (`retune`): groups, rates, added holders and migrations in
  flight are kept, the new values rule from the next tick, and a migration already running keeps the
  timeout it started with. A reload that changes the policy builds a new runner.
- Every routed request is counted (`observe`, called by router/forward.py after each routing decision).
- `tick` (every `migration_interval_s`, from the app's cleanup_ctx loop) asks the controller for plans
  and starts each as a task. The controller bounds what is in flight (`max_concurrent`), so no extra
  semaphore is needed; a plan also times out after the controller's `migration_timeout_s`.
- A copy runs with the executor of its TARGET backend's `kv_transfer` (router/executors.py) when its
  source backend has the same `kv_transfer`: "p2p" (the emulator's export/import), "lmcache" (the
  LMCache controller's /move, at the config's `lmcache_controller_url`; a prefix of at least one LMCache
  chunk) or "nixl" (the target pulls from the source's OffloadingConnector P2P tier): `copy_kind`.
  The controller is told exactly this (`can_copy`) and plans a copy only for such a pair, a warm-up
  prefill (any vLLM) otherwise; so a plan's `mechanism` (in /admin/hot and the POST /admin/migrations
  answer) is the one that runs, and a warm-up's bytes are 0. The executor is chosen in `launch`, in the
  same synchronous step as the planning, so the backends cannot change in between. The controller
  indexes the target only on `completed`.
- Whatever an executor does (an error answer, malformed JSON, a hang), the outcome is `failed`: its
  run is bounded by `migration_timeout_s` and no exception leaves the task, so the tick loop goes on
  and the group waits out the controller's `cooldown_s` before its next plan.
- Metrics: `router_migrations_total{outcome}` (started, completed, failed), `router_migration_bytes_total`,
  `router_migration_duration_seconds`, `router_hot_groups` and `router_hot_groups_waiting{reason}` (set
  at every tick).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import aiohttp

from router.executors import (
    LMCACHE_CHUNK_TOKENS,
    LMCacheExecutor,
    MigrationFailed,
    NixlExecutor,
    P2PExecutor,
    WarmupExecutor,
)
from router.hot_prefix import (
    TUNABLE_PARAMS,
    HotPrefixController,
    HotPrefixParams,
    MigrationPlan,
    idle_step_s,
)
from router.metrics import TOP_GROUPS
from router.policies.kvaware import KvAwareParams

if TYPE_CHECKING:
    from router.config import BackendConfig
    from router.fleet import Fleet
    from router.metrics import RouterMetrics
    from router.policies.base import Decision, RequestView
    from router.upstream import ReplicaSet

log = logging.getLogger("kvrouter.migration")
Executor = P2PExecutor | WarmupExecutor | LMCacheExecutor | NixlExecutor
COPY_KINDS = ("p2p", "lmcache", "nixl")  # the `kv_transfer`s that copy KV; "warmup" and None recompute


def copy_kind(source: BackendConfig | None, target: BackendConfig | None, tokens: int) -> str | None:
    """The `kv_transfer` that can copy `tokens` of prefix from `source` to `target`, or None (a warm-up)."""
    if source is None or target is None:
        return None
    kind = target.kv_transfer
    if kind not in COPY_KINDS or source.kv_transfer != kind:
        return None
    # LMCache moves whole 256-token chunks only: a shorter prefix is recomputed instead.
    if kind == "lmcache" and tokens < LMCACHE_CHUNK_TOKENS:
        return None
    return kind


def hot_prefix_params(policy: KvAwareParams, overrides: Mapping[str, object]) -> HotPrefixParams:
    """The controller's parameters: `overrides` (the config's `hot_prefix`, validated there) over the
    defaults, with the policy's group size and step model."""
    return HotPrefixParams(**overrides, group_chunks=policy.group_chunks, step=policy)  # type: ignore[arg-type]


class MigrationRunner:
    """One controller, its executors, and the migrations running now."""

    def __init__(
        self,
        params: HotPrefixParams,
        fleet: Fleet,
        replicas: ReplicaSet,
        metrics: RouterMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # The runner builds its controller so that the planner always knows which pairs can copy.
        self.controller = HotPrefixController(params, can_copy=self.can_copy)
        self.fleet = fleet
        self.replicas = replicas
        self.metrics = metrics
        self.clock = clock
        self.session: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def observe(self, request: RequestView, decision: Decision) -> None:
        self.controller.observe_routed(request, decision, self.clock())

    def tick(self) -> None:
        for plan in self.controller.tick(self.clock(), self.fleet):
            self.launch(plan)
        self.metrics.hot_groups.set(self.controller.hot_count())
        for reason, count in self.controller.waiting_counts().items():
            self.metrics.hot_groups_waiting.labels(reason).set(count)
        self.metrics.observe_top_groups(self.controller.groups(self.fleet, self.clock(), top=TOP_GROUPS))

    def retune(self, overrides: Mapping[str, object]) -> None:
        """New `hot_prefix` values for the running controller (a reload; module docstring)."""
        self.controller.params = hot_prefix_params(self.controller.params.step, overrides)

    def can_copy(self, source: str, target: str, tokens: int) -> bool:
        """The controller's `can_copy`: whether the backends' `kv_transfer` can copy this prefix."""
        return self._copy_kind(source, target, tokens) is not None

    def _copy_kind(self, source: str | None, target: str, tokens: int) -> str | None:
        src = self.replicas.get(source) if source is not None else None
        dst = self.replicas.get(target)
        return copy_kind(src.config if src else None, dst.config if dst else None, tokens)

    def launch(self, plan: MigrationPlan) -> None:
        """Run a plan the controller has started (from `tick` or `plan_manual`) in the background."""
        executor = self.executor(plan)  # now, while the backends are those the plan was made for
        self.metrics.migrations.labels("started").inc()
        task = asyncio.create_task(self._run(plan, executor))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def executor(self, plan: MigrationPlan) -> Executor:
        """The executor for `plan` (module docstring): its backends' copy mechanism, else a warm-up."""
        assert self.session is not None, "the cleanup context opens the session before any tick"
        config = self.replicas.config
        kind = None
        if plan.mechanism == "copy":
            kind = self._copy_kind(plan.source, plan.target, plan.prefix_tokens)
        backends = [r.config for r in self.replicas.all()]
        if kind == "p2p":
            return P2PExecutor(self.session)
        if kind == "lmcache":
            ids = {b.name: b.lmcache_instance_id for b in backends if b.lmcache_instance_id}
            return LMCacheExecutor(self.session, config.lmcache_controller_url, ids)
        if kind == "nixl":
            peers = {b.name: (b.nixl_host, b.nixl_port) for b in backends if b.nixl_host and b.nixl_port}
            return NixlExecutor(self.session, peers, config.block_size)
        return WarmupExecutor(self.session, config.block_size)

    async def _run(self, plan: MigrationPlan, executor: Executor) -> None:
        started = self.clock()
        urls = {r.name: r.url for r in self.replicas.all()}
        held: int | None = None
        # A warm-up computes the prefix on the target: its queue holds that work until the answer, so
        # routing does not send cold prefills there as if it were idle (Fleet.background_prefill).
        work_id = f"kvrouter-warmup-{plan.plan_id}"
        if executor.mechanism == "warmup" and plan.target in self.fleet.replicas:
            self.fleet.background_prefill(work_id, plan.target, plan.prefix_tokens, started)
        try:
            async with asyncio.timeout(self.controller.params.migration_timeout_s):
                held = await executor.execute(plan, urls)
        except (MigrationFailed, TimeoutError) as exc:
            log.warning(
                "migration %d of group %d to %s failed: %s", plan.plan_id, plan.group, plan.target, exc
            )
        except Exception:
            log.exception("migration %d failed unexpectedly", plan.plan_id)
        finally:
            self.fleet.done(work_id, self.clock())
        now = self.clock()
        self.metrics.migration_duration.observe(now - started)
        moved = self.controller.bytes_moved
        if held is not None and self.controller.completed(plan.plan_id, self.fleet, now, held):
            self.metrics.migrations.labels("completed").inc()
            self.metrics.migration_bytes.inc(self.controller.bytes_moved - moved)
        else:
            self.controller.failed(plan.plan_id, now)
            self.metrics.migrations.labels("failed").inc()

    async def stop(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def view(self) -> dict[str, Any]:
        """/admin/hot: the hottest groups, the migrations in flight (group keys as strings), the
        controller's parameters in force (the `hot_prefix` keys), and each replica's idle engine step in
        seconds, the unit of the `*_wait_steps` thresholds."""
        c = self.controller
        groups = []
        for g in c.groups(self.fleet, self.clock()):
            d = asdict(g)
            d["group"] = str(g.group)
            groups.append(d)
        return {
            "groups": groups,
            "in_flight": [plan_json(p) for p in c.in_flight],
            "started": c.started,
            "completed": c.completed_count,
            "failed": c.failed_count,
            "bytes_moved": c.bytes_moved,
            "params": {name: getattr(c.params, name) for name in TUNABLE_PARAMS},
            "idle_step_s": {name: idle_step_s(s, c.params) for name, s in self.fleet.replicas.items()},
        }


def plan_json(plan: MigrationPlan) -> dict[str, Any]:
    return {
        "plan_id": plan.plan_id,
        "group": str(plan.group),
        "model": plan.model,
        "target": plan.target,
        "source": plan.source,
        "mechanism": plan.mechanism,
        "prefix_tokens": plan.prefix_tokens,
        "estimated_s": plan.estimated_s,
        "bytes": plan.bytes,
        "reason": plan.reason,
    }


def make_runner(
    fleet: Fleet,
    replicas: ReplicaSet,
    metrics: RouterMetrics,
    clock: Callable[[], float],
    overrides: Mapping[str, object] | None = None,
) -> MigrationRunner | None:
    """A runner for the fleet's current policy, or None unless it is kvaware with migration on;
    `overrides`: the config's `hot_prefix`."""
    policy = getattr(fleet.policy, "params", None)
    if not isinstance(policy, KvAwareParams) or not policy.migration:
        return None
    return MigrationRunner(hot_prefix_params(policy, overrides or {}), fleet, replicas, metrics, clock)
