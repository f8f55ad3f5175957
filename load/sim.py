"""The virtual-clock simulator: the real policies and the real engine model, on discrete events.

Rules:
- The policies are the production objects (`router.policies`), driven through the same `Fleet`
  lifecycle as the proxy (`route` -> `first_token` -> `done`); the replicas are the same pure
  `workers.engine.Engine` the live emulator runs. Nothing is re-modelled here: this module only
  moves time forward.
- What the router knows is what the proxy would know, when it would know it: its own lifecycle
  load at once (it sees every request it sends and every first token and completion it relays),
  and the engines' gauges (`num_requests_waiting`, `num_requests_running`, `kv_cache_usage_perc`)
  only at scrapes, every `scrape_interval_s` per replica with a random phase, so they are stale in
  between exactly as scraped Prometheus gauges are.
- The index is written at routing time (approximate mode, what the proxy does without KV events),
  sized from each replica's KV capacity as read from `vllm:cache_config_info`.
- Network time is zero: TTFT is queueing plus prefill, the part routing can change.
- Events at the same instant run step-ends first, then arrivals, then scrapes, then hot-prefix ticks
  and migration completions, in creation order: a finished request frees its replica before a new one
  is routed, as in a real event loop.
- Hot-prefix migration (router/hot_prefix.py) runs for a kvaware spec with `migration` true: the
  controller sees every routed request and ticks every `hot_tick_s`; each plan is a KV copy (the
  emulator's P2P export/import) that completes after prefix tokens x kv_bytes_per_token / bandwidth
  (+ overhead) of virtual time, when the target engine imports the blocks the source still holds
  (`Engine.import_prefix`) and the index learns the new holder. A plan the controller makes a warm-up
  (copy slower than recompute) is submitted to the target engine as a 1-token request and completes at
  its first token. The transfer does not slow either engine (a NIC, not the GPU, moves it).

Cost: O(steps x batch) engine work plus O(requests x prompt chunks) hashing. Steps grow with output
tokens per replica (one decode step emits one token per running request), so the cost grows
linearly with requests and output length and is nearly flat in the number of replicas for a fixed
request count (more replicas mean more, smaller batches). docs/BENCHMARKS.md has timings.
"""

from __future__ import annotations

import heapq
import random
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from load.report import RequestRecord
from load.workloads import WorkloadRequest
from router.fleet import Fleet, FleetConfig
from router.hot_prefix import HotPrefixController, HotPrefixParams, MigrationPlan
from router.index.chunking import DEFAULT_CHUNK_CHARS, hash_tokens
from router.index.seen import SeenChunks
from router.policies.base import NoReplicaAvailable, make_request
from router.policies.kvaware import KvAwareParams
from router.policies.registry import parse_policy_spec
from workers.engine import Engine, Preset, StepResult
from workers.engine import tokenizer as engine_tokenizer

# How stale scraped gauges are: kvrouter's scraper polls each replica's /metrics at this interval
# (the proxy's default), and Prometheus' own default scrape_interval is 15 s; llm-d's endpoint
# picker refreshes every 50 ms. 1 s sits between and is what the proxy ships with.
DEFAULT_SCRAPE_INTERVAL_S = 1.0
# A hot-prefix copy's link: a 25 GB/s RDMA/NIXL link, as router/hot_prefix.py assumes by default.
DEFAULT_COPY_BYTES_PER_S = 25e9

_STEP_END, _ARRIVAL, _SCRAPE, _HOT_TICK, _MIGRATED = 0, 1, 2, 3, 4


@dataclass(frozen=True, slots=True)
class SimConfig:
    replicas: int
    preset: Preset
    scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S
    chunk_chars: int = DEFAULT_CHUNK_CHARS
    seed: int = 0
    hot_tick_s: float = 0.5
    copy_bytes_per_s: float | None = DEFAULT_COPY_BYTES_PER_S  # None: warm-up prefills only
    # What the router believes a replica prefills per second. None: the preset's own rate, as if the
    # router had been told (bench live tells its kvrouter serve with --prefill-rate); a router that
    # was not told assumes FleetConfig's default (an H200's).
    router_prefill_tokens_per_s: float | None = None


@dataclass(slots=True)
class SimResult:
    policy: str
    records: list[RequestRecord] = field(default_factory=list)
    busy_s: dict[str, float] = field(default_factory=dict)
    makespan_s: float = 0.0
    rejected: int = 0
    steps: int = 0
    migrations: list[tuple[float, MigrationPlan, str]] = field(default_factory=list)  # (at, plan, outcome)


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A workload request tokenized once for every policy's run, with its logical cache hit.

    Token ids are a packed `array('I')` (4 bytes a token): as a tuple of ints they cost 36 bytes a
    token, and 100,000 prompts of 2,000 tokens would hold 7 GB for the whole run.
    """

    source: WorkloadRequest
    token_ids: array[int]
    logical_cached_tokens: int


def prepare(requests: Sequence[WorkloadRequest], block_size: int) -> list[PreparedRequest]:
    """Tokenize each request as the engine would see it, and compute its logical cache hit.

    The logical hit is what one infinite cache shared by the whole fleet would reuse: the leading
    blocks of the request already seen in any earlier request, capped like vLLM's own (at least
    the last prompt token is always recomputed, so at most (n - 1) // block_size blocks).
    """
    seen = SeenChunks(capacity=None)
    out: list[PreparedRequest] = []
    for req in requests:
        text = engine_tokenizer.render_chat(req.messages) if req.messages is not None else req.prompt or ""
        ids = array("I", engine_tokenizer.encode(text))
        hit = seen.match_and_add(hash_tokens(ids, req.model, block_size=block_size).chained)
        hit = min(hit, (len(ids) - 1) // block_size) if ids else 0
        out.append(PreparedRequest(req, ids, hit * block_size))
    return out


class Simulation:
    """One policy over one fleet of engines, for one prepared workload."""

    def __init__(self, policy_spec: str, config: SimConfig) -> None:
        self.config = config
        self.policy_spec = policy_spec
        preset = config.preset
        self.fleet = Fleet(
            parse_policy_spec(policy_spec),
            FleetConfig(
                prefill_tokens_per_s=config.router_prefill_tokens_per_s or preset.prefill_tokens_per_s,
                block_size=preset.block_size,
            ),
        )
        self.engines: dict[str, Engine] = {}
        for i in range(config.replicas):
            name = f"replica-{i}"
            self.engines[name] = Engine(preset, emit_token_ids=False)  # the simulator never reads token ids
            self.fleet.add_replica(name, kv_capacity_tokens=preset.kv_capacity_tokens)
        self._events: list[tuple[float, int, int, object]] = []
        self._serial = 0
        self._busy: dict[str, bool] = dict.fromkeys(self.engines, False)
        self._pending: dict[str, tuple[PreparedRequest, str, int]] = {}  # id -> (req, replica, expected)
        self._first_token_at: dict[str, float] = {}
        # The step floor (load/report.py, `ttft_step_floor_mean_s`): when each replica's running step
        # ends, the requests that arrived during it (their floor so far: its rest), and their floors.
        self._step_end: dict[str, float] = dict.fromkeys(self.engines, 0.0)
        self._awaiting_step: dict[str, list[str]] = {name: [] for name in self.engines}
        self._step_floor: dict[str, float] = {}
        self.result = SimResult(policy_spec, busy_s=dict.fromkeys(self.engines, 0.0))
        # The controller runs only for kvaware with migration on (the switch its params carry); it is
        # read off the policy's params, the one place the spec's parameters live.
        self.controller: HotPrefixController | None = None
        kv_params = getattr(self.fleet.policy, "params", None)
        if isinstance(kv_params, KvAwareParams) and kv_params.migration:
            self.controller = HotPrefixController(
                HotPrefixParams(
                    group_chunks=kv_params.group_chunks,
                    kv_bytes_per_token=preset.kv_bytes_per_token,
                    copy_bytes_per_s=config.copy_bytes_per_s,
                    step=kv_params,
                )
            )
        self._warmups: dict[str, MigrationPlan] = {}  # warm-up request id -> plan

    def _push(self, time: float, kind: int, payload: object) -> None:
        self._serial += 1
        heapq.heappush(self._events, (time, kind, self._serial, payload))

    def run(
        self, requests: Sequence[PreparedRequest], progress: Callable[[int, int], None] | None = None
    ) -> SimResult:
        rng = random.Random(self.config.seed)
        for req in requests:
            self._push(req.source.arrival_s, _ARRIVAL, req)
        interval = self.config.scrape_interval_s
        if interval > 0 and requests:
            for name in self.engines:
                self._push(rng.uniform(0.0, interval), _SCRAPE, name)
        if self.controller is not None and requests:
            self._push(requests[0].source.arrival_s + self.config.hot_tick_s, _HOT_TICK, None)
        total = len(requests)
        done = 0
        last_time = requests[0].source.arrival_s if requests else 0.0
        first_time = last_time
        while self._events:
            time, kind, _, payload = heapq.heappop(self._events)
            if kind == _STEP_END:
                assert isinstance(payload, tuple)
                name, step = payload
                done += self._deliver(name, step)
                last_time = time
                if progress is not None:
                    progress(done, total)
            elif kind == _ARRIVAL:
                assert isinstance(payload, PreparedRequest)
                self._arrive(payload, time)
            elif kind == _HOT_TICK:
                self._hot_tick(time)
                if done + self.result.rejected < total:
                    self._push(time + self.config.hot_tick_s, _HOT_TICK, None)
            elif kind == _MIGRATED:
                assert isinstance(payload, MigrationPlan)
                self._copy_done(payload, time)
            else:
                assert isinstance(payload, str)
                self._scrape(payload, time)
                # Scraping stops once nothing is left to happen, so the loop ends.
                if done + self.result.rejected < total:
                    self._push(time + interval, _SCRAPE, payload)
        self.result.makespan_s = max(0.0, last_time - first_time)
        return self.result

    def _arrive(self, prepared: PreparedRequest, now: float) -> None:
        src = prepared.source
        view = make_request(
            src.request_id,
            src.model,
            prompt=src.prompt if src.messages is None else None,
            messages=src.messages,
            max_tokens=src.max_tokens,
            session_key=src.session,
            prompt_tokens=len(prepared.token_ids),
            chunk_chars=self.config.chunk_chars,
        )
        try:
            decision = self.fleet.route(view, now)
        except NoReplicaAvailable:
            self.result.rejected += 1
            return
        if self.controller is not None:
            self.controller.observe_routed(view, decision, now)
        engine = self.engines[decision.replica]
        try:
            engine.submit(src.request_id, prepared.token_ids, src.max_tokens, now)
        except ValueError:
            # Too long for the replica: vLLM answers 400 and the router passes it on.
            self.fleet.done(src.request_id, now)
            self.result.rejected += 1
            return
        self._pending[src.request_id] = (prepared, decision.replica, decision.expected_cached_tokens)
        # Its floor starts with the rest of the step running there (none on an idle engine); the next
        # step to start there adds its whole length (_start_step).
        busy = self._busy[decision.replica]
        self._step_floor[src.request_id] = self._step_end[decision.replica] - now if busy else 0.0
        self._awaiting_step[decision.replica].append(src.request_id)
        if not busy:
            self._start_step(decision.replica, now)

    def _start_step(self, name: str, now: float) -> None:
        engine = self.engines[name]
        if not engine.has_work():
            self._busy[name] = False
            return
        step = engine.step(now)
        self.result.steps += 1
        self.result.busy_s[name] += step.duration
        self._step_end[name] = step.end
        awaiting = self._awaiting_step[name]
        for request_id in awaiting:
            self._step_floor[request_id] += step.duration
        awaiting.clear()
        self._busy[name] = True
        self._push(step.end, _STEP_END, (name, step))

    def _deliver(self, name: str, step: StepResult) -> int:
        now = step.end
        for first in step.first_tokens:
            if first.request_id in self._warmups:
                self.fleet.done(first.request_id, now)  # a warm-up is done at its one token
                self._warmup_done(self._warmups.pop(first.request_id), name, now)
                continue
            self._first_token_at[first.request_id] = now
            self.fleet.first_token(first.request_id, now)
        finished = 0
        for fin in step.finished:
            if fin.request_id not in self._pending:
                continue  # a warm-up prefill's end
            prepared, replica, expected = self._pending.pop(fin.request_id)
            self.fleet.done(fin.request_id, now)
            self.result.records.append(
                RequestRecord(
                    request_id=fin.request_id,
                    replica=replica,
                    arrival_s=prepared.source.arrival_s,
                    first_token_s=self._first_token_at.pop(fin.request_id),
                    done_s=now,
                    prompt_tokens=fin.prompt_tokens,
                    cached_tokens=fin.cached_tokens,
                    logical_cached_tokens=prepared.logical_cached_tokens,
                    expected_cached_tokens=min(expected, fin.prompt_tokens),
                    output_tokens=fin.completion_tokens,
                    step_floor_s=self._step_floor.pop(fin.request_id),
                )
            )
            finished += 1
        self._start_step(name, now)
        return finished

    def _scrape(self, name: str, now: float) -> None:
        m = self.engines[name].metrics()
        self.fleet.update_engine_metrics(
            name,
            now=now,
            num_requests_waiting=m.num_requests_waiting,
            num_requests_running=m.num_requests_running,
            kv_cache_usage_perc=m.kv_cache_usage_perc,
            num_gpu_blocks=m.num_gpu_blocks,
            block_size=m.block_size,
        )

    # -- hot-prefix migration ------------------------------------------------------------------

    def _hot_tick(self, now: float) -> None:
        assert self.controller is not None
        for plan in self.controller.tick(now, self.fleet):
            self.result.migrations.append((now, plan, "started"))
            if plan.mechanism == "copy":
                self._push(now + plan.estimated_s, _MIGRATED, plan)
            else:
                rid = f"warmup-{plan.plan_id}"
                self._warmups[rid] = plan
                tokens = self._plan_tokens(plan)
                self.engines[plan.target].submit(rid, tokens, 1, now)
                # In the target's queue until its token, as the proxy's warm-up executor does.
                self.fleet.background_prefill(rid, plan.target, len(tokens), now)
                if not self._busy[plan.target]:
                    self._start_step(plan.target, now)

    def _plan_tokens(self, plan: MigrationPlan) -> tuple[int, ...]:
        if plan.prefix_token_ids is not None:
            return plan.prefix_token_ids
        return tuple(engine_tokenizer.encode(plan.prefix_text or ""))

    def _copy_done(self, plan: MigrationPlan, now: float) -> None:
        """The transfer finished: the target imports what the source still holds of the prefix."""
        assert self.controller is not None
        tokens = self._plan_tokens(plan)
        source = self.engines.get(plan.source or "")
        held = source.held_prefix_tokens(tokens) if source is not None else 0
        imported = self.engines[plan.target].import_prefix(tokens[:held], now) if held else 0
        if imported and self.controller.completed(plan.plan_id, self.fleet, now, imported):
            self.result.migrations.append((now, plan, "completed"))
        else:
            self.controller.failed(plan.plan_id, now)
            self.result.migrations.append((now, plan, "failed"))

    def _warmup_done(self, plan: MigrationPlan, name: str, now: float) -> None:
        assert self.controller is not None
        held = self.engines[name].held_prefix_tokens(self._plan_tokens(plan))
        ok = self.controller.completed(plan.plan_id, self.fleet, now, held)
        self.result.migrations.append((now, plan, "completed" if ok else "failed"))
