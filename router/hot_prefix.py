"""The hot-prefix controller: detect prefix groups whose holders are overloaded and plan replicas.

Sans-I/O (no asyncio, no clock: `now` is an argument). Drivers: the simulator (load/sim.py) and
the proxy's background task. The driver calls `observe_routed` for every routed request, `tick` every
`tick_s` or so, executes the returned `MigrationPlan`s by the backend's mechanism, and reports back
with `completed` (the index learns the new holder only then, not when the copy starts) or `failed`.

Rules:
- A prefix group is kvaware's group (`router.policies.kvaware.group_key`: the chained hash of the first
  `group_chunks` chunks). Per group: exponentially decayed request and prompt-token rates (half-life
  `half_life_s`, in events a second), and the group's prefix: the longest common prefix of the chained
  hashes of the requests seen in it (a binary search, since equal chained hashes imply equal prefixes),
  with the first request's text or token ids to materialise it (`MigrationPlan.prefix_text` /
  `prefix_token_ids`).
- Holders of a group: the replicas the Fleet's PrefixIndex lists for the group-key chunk.
- Overload signal per replica (`replica_wait_s`): the TTFT a request with nothing to prefill would see
  there: (queued prefill tokens + others' waiting requests x typical tokens + steps x step work) /
  prefill rate, with kvaware's step model (router/policies/kvaware.py `step_tokens`), so a growing decode
  batch counts as well as a prefill queue. (Measured on hot-prefix: the hot group's holder has a tiny
  prefill queue, 128-token questions, but a decode batch of hundreds of 4K-token contexts; a prefill-only
  signal never fires there.)
- The thresholds are in idle engine steps of each replica, not seconds: each replica's wait is divided by
  its own idle step (`idle_step_s`: kvaware's fixed cost of a step, `step_base_tokens` prefill-token
  equivalents, at the router's belief of the replica's prefill rate; 150 / 25,000 tokens/s = 6 ms), so
  one setting fits every engine speed and a fleet of mixed engines. An idle replica waits one step (the
  request's own). The rate cancels out: a wait in steps is (queue + steps x step work) /
  `step_base_tokens`, the pending work in units of a step's fixed cost. (Measured: with thresholds in
  seconds tuned on llama-8b-h100, 30 and 15 ms, the 4x slower `demo` engines never looked idle enough
  to take a copy and migration never fired; docs/BENCHMARKS.md, issue #8.) With the step model off
  (`step_base_tokens` 0, the prefill-only estimate) the unit is the default step's 150 tokens.
- HOT (on) when the group's minimum holder wait is >= `hot_wait_steps`, its request rate >=
  `min_rate_rps`, and some non-holder has wait <= `headroom_wait_steps`; it turns off (hysteresis) only
  when the minimum holder wait falls below `cool_wait_steps` < `hot_wait_steps` (each holder's wait in
  its own steps).
- While hot: at most one migration in flight per group, `cooldown_s` between two plans of a group, and
  at most `max_concurrent` in flight fleet-wide; a group may be forbidden (`forbid`).
- Target: a non-holder serving the model, available, with wait <= `headroom_wait_steps` and free KV
  (`kv_capacity_tokens - committed_kv_tokens`, when known) for the prefix; lowest wait in seconds (the
  routing's unit: where the group's next request would start soonest), then most free KV, then name.
  Source (for a copy): the holder with the lowest wait in seconds among those the target can copy from.
- Copy or recompute: copying `t` tokens costs `copy_overhead_s + t * kv_bytes_per_token / copy_bytes_per_s`;
  recomputing them on the target costs `t / prefill_rate(target)`. A copy is planned only when it is
  cheaper, i.e. when `t` exceeds `copy_overhead_s / (1/rate - kv_bytes_per_token/bandwidth)` (infinite
  when the link is slower per token than the target's prefill): `copy_min_tokens`, and when some holder
  can copy to the target at all: the driver says which pairs can (`can_copy(source, target, tokens)`; the
  proxy answers from the backends' `kv_transfer`, router/migration.py; by default every pair can, the
  simulator's single link). So a plan's `mechanism` is the one that runs. Otherwise a WARM-UP prefill is
  planned (if `warmup` is allowed): it recomputes the prefix once on the target, off the critical path of
  any user request, and the target has headroom by construction.
  (llm-d's draft pulls only above a cached-token lead of 2K-12K tokens; here the threshold follows from
  the link and the target instead of being a constant.)
- A warm-up the controller plans itself (not one an operator triggers) must pay for its own prefill
  (`warmup_pays`): only when the best holder's wait in seconds is at least the target's wait plus half
  the warm-up's prefill (prefix tokens / the target's prefill rate), the wait a request arriving at the
  target at a uniform time during the warm-up would see. The warm-up is a step as long as a cold
  prefill that the target's own requests queue behind; relieving a holder whose backlog is shorter
  costs more than it saves. (Measured on hot-prefix, 4 x `demo`, seeds 0-2, p99 TTFT after 5 s: without
  the rule warm-ups were worse than no migration at 40 req/s, 0.478 s against 0.275 s on seed 0; with
  it no point measured is worse than no migration on mean or p99, and a whole warm-up's prefill
  instead of half blocks the warm-ups that help at 40 req/s, 0.275 s against 0.141 s; docs/BENCHMARKS.md,
  issue #8.) A copy costs the target no compute and has no such condition.
- Shrink: holders the controller added are forgotten again (`PrefixIndex.remove` of the prefix), most
  recent first, one per `shrink_after_s`, while the group has been cool that long and it keeps more
  holders than its demand needs: ceil(its share of the fleet's request rate x available replicas x
  `shrink_margin`). Routing then stops spreading onto them; the replica's own LRU forgets the blocks.
- Bounded memory: at most `max_groups` groups (the coldest are dropped), a group whose decayed rate
  falls below `forget_rps` and has nothing in flight or added is dropped; in-flight plans older than
  `migration_timeout_s` count as failed.
- Parameters (`HotPrefixParams`) are validated on construction (ValueError naming the field). All but
  `group_chunks` and `step`, which are the kvaware policy's own, are operator settings
  (`TUNABLE_PARAMS`: kvrouter serve's `hot_prefix:` keys, router/config.py; the thresholds' former
  names in seconds, `hot_wait_s` and the like, are refused naming the new key, `RENAMED_PARAMS`). The
  driver may replace `params` between calls (a reload): every rule reads them afresh, and the groups'
  state is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Literal, get_args

from router.policies.kvaware import KvAwareParams, group_key, step_tokens

if TYPE_CHECKING:
    from router.fleet import Fleet, ReplicaState
    from router.policies.base import Decision, RequestView

Mechanism = Literal["copy", "warmup"]
# Why a hot group gets no new migration at a tick (`GroupView.waiting_for`, /admin/hot): forbidden by an
# operator, one of its own in flight, the fleet-wide budget spent, within its cooldown, at `max_holders`,
# no replica with headroom and free KV, no copy possible with warm-ups off, or a warm-up that would not
# pay for its prefill.
WaitingFor = Literal[
    "forbidden", "in_flight", "max_concurrent", "cooldown", "max_holders", "no_target", "no_mechanism",
    "warmup_would_not_pay",
]  # fmt: skip
WAITING_REASONS: tuple[WaitingFor, ...] = get_args(WaitingFor)
# Whether the backends can copy `tokens` of prefix KV from `source` to `target` (the driver's knowledge).
CanCopy = Callable[[str, str, int], bool]
_LN2 = math.log(2.0)
# The fields the kvaware policy owns: `group_chunks` must equal its own and `step` is its step model.
POLICY_OWNED = ("group_chunks", "step")


@dataclass(frozen=True, slots=True)
class HotPrefixParams:
    """Controller parameters; see the module docstring for each rule."""

    group_chunks: int = 4  # must equal kvaware's
    half_life_s: float = 5.0
    # The thresholds, in idle engine steps of each replica (`idle_step_s`; module docstring). 5 and 2.5
    # are the 30 and 15 ms that issue #8's simulator results were tuned with on llama-8b-h100 (its step
    # is 6.2 ms, workers/engine/presets.py; kvaware's step model says 150 tokens / 24.6K tokens/s = 6.1
    # ms there, so the simulator's thresholds moved to 30.4 and 15.2 ms, one copy fewer on hot-prefix,
    # docs/BENCHMARKS.md; at the router's default 25K tokens/s a step is 6.0 ms: exactly 30 and 15 ms).
    # An idle replica waits 1 step, so a hot holder makes a request wait about 4 idle steps' worth of
    # extra work (queued prefill, or a decode batch that lengthens each step), and a target at most 1.5.
    hot_wait_steps: float = 5.0
    cool_wait_steps: float = 2.5
    headroom_wait_steps: float = 2.5
    min_rate_rps: float = 1.0
    cooldown_s: float = 2.0
    max_concurrent: int = 2
    max_holders: int = 8
    shrink_after_s: float = 10.0
    shrink_margin: float = 1.5
    # Transfer model of the backend. Defaults: Llama-3.1-8B's 128 KiB a token, a 25 GB/s RDMA/NIXL link.
    kv_bytes_per_token: int = 131_072
    copy_bytes_per_s: float | None = 25e9  # None: the backend cannot copy KV (warm-up only)
    copy_overhead_s: float = 0.005
    warmup: bool = True
    migration_timeout_s: float = 30.0
    max_groups: int = 1024
    forget_rps: float = 0.01
    typical_tokens: float = 512.0  # price of one engine-waiting request that is not ours
    step: KvAwareParams = field(default_factory=KvAwareParams)

    def __post_init__(self) -> None:
        if not isinstance(self.group_chunks, int) or self.group_chunks <= 0:
            raise ValueError(f"group_chunks must be a positive integer, got {self.group_chunks!r}")
        for name in TUNABLE_PARAMS:
            _check_param(name, getattr(self, name), *_LIMITS[name])
        if not self.cool_wait_steps < self.hot_wait_steps:
            raise ValueError(
                f"cool_wait_steps ({self.cool_wait_steps}) must be below hot_wait_steps "
                f"({self.hot_wait_steps}): a hot group turns cool only below cool_wait_steps (hysteresis)"
            )


# What an operator may set: every field but the policy's (kvrouter serve's `hot_prefix:` keys).
TUNABLE_PARAMS = tuple(f.name for f in fields(HotPrefixParams) if f.name not in POLICY_OWNED)
# Operator keys that were renamed, old -> new (router/config.py names the new key in its error): the
# thresholds were seconds until they became idle engine steps of each replica.
RENAMED_PARAMS = {
    "hot_wait_s": "hot_wait_steps",
    "cool_wait_s": "cool_wait_steps",
    "headroom_wait_s": "headroom_wait_steps",
}
# The step unit when the policy's step model is off (`step_base_tokens` 0): its default fixed cost (150
# prefill-token equivalents, derived in router/policies/kvaware.py's module docstring).
DEFAULT_STEP_BASE_TOKENS = KvAwareParams().step_base_tokens
# A request arriving at a uniform time during a warm-up waits half of it on average (`warmup_pays`).
WARMUP_WAIT_FRACTION = 0.5

_Kind = Literal["number", "number or None", "integer", "bool"]
# Each tunable field: its kind, its lower bound, and whether the bound itself is allowed. Zero is allowed
# only where it means something; every other number must be positive.
_LIMITS: dict[str, tuple[_Kind, float, bool]] = {
    "half_life_s": ("number", 0, False),
    "hot_wait_steps": ("number", 0, False),
    "cool_wait_steps": ("number", 0, True),  # 0: a hot group never cools again (nor shrinks)
    "headroom_wait_steps": ("number", 0, False),  # below 1 none qualifies: an idle replica waits 1 step
    "min_rate_rps": ("number", 0, False),
    "cooldown_s": ("number", 0, True),  # 0: plan again at the first tick after the last plan ended
    "max_concurrent": ("integer", 0, True),  # 0: no migrations at all, manual ones included
    "max_holders": ("integer", 1, True),
    "shrink_after_s": ("number", 0, False),
    "shrink_margin": ("number", 0, False),
    "kv_bytes_per_token": ("integer", 0, True),  # 0: a model without KV (the emulator's `instant` preset)
    "copy_bytes_per_s": ("number or None", 0, False),  # None: the backends cannot copy KV
    "copy_overhead_s": ("number", 0, True),
    "warmup": ("bool", 0, True),
    "migration_timeout_s": ("number", 0, False),
    "max_groups": ("integer", 1, True),
    "forget_rps": ("number", 0, False),
    "typical_tokens": ("number", 0, False),
}


def _check_param(name: str, value: object, kind: _Kind, low: float, inclusive: bool) -> None:
    """ValueError unless `value` is of `kind` and above `low` (or at it, if `inclusive`)."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return
    if kind == "number or None" and value is None:
        return
    # bool is an int to Python: `cooldown_s: yes` in YAML must not mean 1 s.
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        assert isinstance(value, int | float)
        ok = value >= low if inclusive else value > low
    if not ok:
        what = "an integer" if kind == "integer" else "a finite number"
        bound = f">= {low:g}" if inclusive else f"> {low:g}"
        none = " (or None: the backends cannot copy KV, warm-ups only)" if kind == "number or None" else ""
        raise ValueError(f"{name} must be {what} {bound}{none}, got {value!r}")


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    """Replicate one group's prefix onto `target` (by `mechanism`, from `source` for a copy)."""

    plan_id: int
    group: int
    model: str
    target: str
    source: str | None
    mechanism: Mechanism
    prefix_hashes: tuple[int, ...]
    prefix_tokens: int
    prefix_text: str | None  # the prefix as text (character chunks), or None
    prefix_token_ids: tuple[int, ...] | None  # the prefix as token ids (token chunks), or None
    estimated_s: float  # copy time, or recompute time for a warm-up
    bytes: int  # KV bytes a copy moves (0 for a warm-up)
    created_at: float
    reason: str  # "hot" or "manual"


@dataclass(frozen=True, slots=True)
class GroupView:
    """One group as /admin/hot shows it."""

    group: int
    model: str
    request_rate: float
    token_rate: float
    prefix_tokens: int
    holders: tuple[str, ...]
    added_holders: tuple[str, ...]
    hot: bool
    forbidden: bool
    in_flight: tuple[int, ...]
    waiting_for: WaitingFor | None  # a hot group's reason for no new migration at the last tick


def warmup_pays(holder_wait_s: float, target_wait_s: float, plan: MigrationPlan) -> bool:
    """Whether a warm-up is worth its prefill on the target (module docstring): the group's best holder
    waits at least as long as a request arriving at the target during the warm-up would, on average."""
    return holder_wait_s >= target_wait_s + WARMUP_WAIT_FRACTION * plan.estimated_s


def copy_min_tokens(params: HotPrefixParams, target_prefill_tokens_per_s: float) -> float:
    """Smallest prefix (tokens) for which copying beats recomputing on the target; inf if never."""
    if params.copy_bytes_per_s is None:
        return math.inf
    gain = 1.0 / target_prefill_tokens_per_s - params.kv_bytes_per_token / params.copy_bytes_per_s
    if gain <= 0:
        return math.inf
    return params.copy_overhead_s / gain


def copy_s(params: HotPrefixParams, tokens: int) -> float:
    if params.copy_bytes_per_s is None:
        return math.inf
    return params.copy_overhead_s + tokens * params.kv_bytes_per_token / params.copy_bytes_per_s


def replica_wait_s(s: ReplicaState, now: float, params: HotPrefixParams) -> float:
    """The overload signal: TTFT of a request with nothing to prefill on `s` (module docstring)."""
    sp = params.step
    queue = s.inflight_prefill_tokens + s.waiting_not_ours(now, sp.scrape_max_age_s) * params.typical_tokens
    budget = max(1, sp.step_token_budget - s.decode_requests)
    steps = max(1, math.ceil(queue / budget))
    return (queue + steps * step_tokens(s, sp)) / s.prefill_tokens_per_s


def idle_step_s(s: ReplicaState, params: HotPrefixParams) -> float:
    """Seconds of one idle engine step of `s`, the thresholds' unit: the step model's fixed cost
    (`step_base_tokens`, or the default's when the model is off) at the router's belief of its rate."""
    tokens = params.step.step_base_tokens or DEFAULT_STEP_BASE_TOKENS
    return tokens / s.prefill_tokens_per_s


def replica_wait_steps(s: ReplicaState, now: float, params: HotPrefixParams) -> float:
    """`replica_wait_s` in idle engine steps of `s` (what the thresholds are compared with)."""
    return in_steps(replica_wait_s(s, now, params), s, params)


def in_steps(wait_s: float, s: ReplicaState, params: HotPrefixParams) -> float:
    """A wait on `s` in seconds, in idle engine steps of `s`."""
    return wait_s / idle_step_s(s, params)


@dataclass(slots=True)
class _Group:
    key: int
    model: str
    chain: tuple[int, ...]
    unit: str
    chunk_units: int
    tokens_per_chunk: float
    source: str | tuple[int, ...]  # the first request's text or token ids
    request_rate: float = 0.0
    token_rate: float = 0.0
    updated: float = 0.0
    hot: bool = False
    waiting_for: WaitingFor | None = None  # why a hot group has no new migration (GroupView)
    cool_since: float | None = None
    last_plan_at: float = -math.inf
    last_shrink_at: float = -math.inf
    added: list[str] = field(default_factory=list)  # controller-added holders, oldest first

    def decay(self, now: float, half_life_s: float) -> None:
        if now > self.updated:
            f = 0.5 ** ((now - self.updated) / half_life_s)
            self.request_rate *= f
            self.token_rate *= f
            self.updated = now

    @property
    def prefix_tokens(self) -> int:
        return int(len(self.chain) * self.tokens_per_chunk)


def _any_pair(source: str, target: str, tokens: int) -> bool:
    """The default `can_copy`: every pair shares one link (`copy_bytes_per_s`), as in the simulator."""
    del source, target, tokens
    return True


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two chained-hash sequences (binary search: chains agree up to
    some point and nowhere after it)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class HotPrefixController:
    """Detection and planning; see the module docstring. One per router, no locks (one event loop)."""

    def __init__(self, params: HotPrefixParams | None = None, can_copy: CanCopy | None = None) -> None:
        self.params = params or HotPrefixParams()
        self.can_copy: CanCopy = can_copy or _any_pair
        self._groups: dict[int, _Group] = {}
        self._forbidden: set[int] = set()
        self._in_flight: dict[int, MigrationPlan] = {}
        self._next_id = 1
        self.started = 0
        self.completed_count = 0
        self.failed_count = 0
        self.bytes_moved = 0
        self.history: list[tuple[MigrationPlan, str, float]] = []  # (plan, outcome, at), last 100

    # -- inputs ---------------------------------------------------------------------------------

    def group_of(self, request: RequestView) -> int:
        return group_key(request, self.params.group_chunks)

    def observe_routed(self, request: RequestView, decision: Decision, now: float) -> int:
        """Count a routed request in its group's rates; returns the group key."""
        del decision  # the holders come from the index at tick time
        p = self.params
        key = group_key(request, p.group_chunks)
        chained = request.hashes.chained
        g = self._groups.get(key)
        if g is None:
            while len(self._groups) >= p.max_groups:  # `while`: max_groups may have been lowered
                self._drop_coldest(now)
            source: str | tuple[int, ...] = request.text
            if request.hashes.unit == "token" and request.token_ids is not None:
                source = request.token_ids
            g = _Group(
                key,
                request.model,
                chained,
                request.hashes.unit,
                request.hashes.chunk_units,
                request.tokens_per_chunk,
                source,
                updated=now,
            )
            self._groups[key] = g
        else:
            g.decay(now, p.half_life_s)
            n = _common_prefix(g.chain, chained)
            if n < len(g.chain):
                g.chain = g.chain[:n]
        g.request_rate += _LN2 / p.half_life_s
        g.token_rate += request.prompt_tokens * _LN2 / p.half_life_s
        return key

    def forbid(self, group: int, forbidden: bool = True) -> None:
        (self._forbidden.add if forbidden else self._forbidden.discard)(group)

    # -- the tick -------------------------------------------------------------------------------

    def tick(self, now: float, fleet: Fleet) -> list[MigrationPlan]:
        """Update hot/cool states, shrink cooled groups, and return the migrations to start now."""
        p = self.params
        self._expire(now)
        # Waits in seconds rank targets and sources; in each replica's own steps they meet the thresholds.
        waits = {name: replica_wait_s(s, now, p) for name, s in fleet.replicas.items() if s.available}
        steps = {name: in_steps(w, fleet.replicas[name], p) for name, w in waits.items()}
        total_rate = 0.0
        for key in list(self._groups):
            g = self._groups[key]
            g.decay(now, p.half_life_s)
            busy = g.added or any(pl.group == key for pl in self._in_flight.values())
            if g.request_rate < p.forget_rps and not busy:
                del self._groups[key]
                continue
            total_rate += g.request_rate
        plans: list[MigrationPlan] = []
        for g in sorted(self._groups.values(), key=lambda g: -g.request_rate):
            g.waiting_for = None
            holders = [h for h in fleet.index.holders(g.key) if h in waits]
            if not holders or not g.chain:
                continue
            low = min(steps[h] for h in holders)
            headroom = any(
                w <= p.headroom_wait_steps and n not in holders and fleet.replicas[n].serves(g.model)
                for n, w in steps.items()
            )
            if not g.hot and low >= p.hot_wait_steps and g.request_rate >= p.min_rate_rps and headroom:
                g.hot, g.cool_since = True, None
            elif g.hot and low < p.cool_wait_steps:
                g.hot, g.cool_since = False, now
            if g.hot:
                plan = self._maybe_plan(g, holders, waits, steps, fleet, now)
                if plan is not None:
                    plans.append(plan)
            elif g.added and g.cool_since is not None:
                self._maybe_shrink(g, holders, len(waits), total_rate, fleet, now)
        return plans

    def _maybe_plan(
        self,
        g: _Group,
        holders: list[str],
        waits: dict[str, float],
        steps: dict[str, float],
        fleet: Fleet,
        now: float,
    ) -> MigrationPlan | None:
        g.waiting_for = self._held_back(g, holders, now)
        if g.waiting_for is not None:
            return None
        target = self._pick_target(g, holders, waits, steps, fleet)
        if target is None:
            g.waiting_for = "no_target"
            return None
        sources = sorted(holders, key=lambda h: (waits[h], h))
        plan = self._make_plan(g, target, sources, fleet, now, "hot")
        if plan is None:
            g.waiting_for = "no_mechanism"
            return None
        if plan.mechanism == "warmup" and not warmup_pays(waits[sources[0]], waits[target], plan):
            g.waiting_for = "warmup_would_not_pay"
            return None
        self._start(plan, g, now)
        return plan

    def _held_back(self, g: _Group, holders: list[str], now: float) -> WaitingFor | None:
        """The first rule, in the order below, that keeps a hot group from a new migration now."""
        p = self.params
        if g.key in self._forbidden:
            return "forbidden"
        if any(pl.group == g.key for pl in self._in_flight.values()):
            return "in_flight"
        if len(self._in_flight) >= p.max_concurrent:
            return "max_concurrent"
        if now - g.last_plan_at < p.cooldown_s:
            return "cooldown"
        if len(holders) >= p.max_holders:
            return "max_holders"
        return None

    def _pick_target(
        self, g: _Group, holders: list[str], waits: dict[str, float], steps: dict[str, float], fleet: Fleet
    ) -> str | None:
        p = self.params
        best: tuple[float, float, str] | None = None
        for name, w in waits.items():
            s = fleet.replicas[name]
            if name in holders or steps[name] > p.headroom_wait_steps or not s.serves(g.model):
                continue
            free = math.inf if s.kv_capacity_tokens is None else s.kv_capacity_tokens - s.committed_kv_tokens
            if free < g.prefix_tokens:
                continue
            key = (w, -free, name)
            if best is None or key < best:
                best = key
        return None if best is None else best[2]

    def _make_plan(
        self, g: _Group, target: str, sources: Sequence[str], fleet: Fleet, now: float, reason: str
    ) -> MigrationPlan | None:
        """A copy from the first of `sources` (holders, best first) that can copy to `target`, if copying
        is cheaper than recomputing; else a warm-up, if allowed; else None."""
        p = self.params
        tokens = g.prefix_tokens
        rate = fleet.replicas[target].prefill_tokens_per_s
        mechanism: Mechanism
        source = None
        if tokens >= copy_min_tokens(p, rate):
            source = next((s for s in sources if self.can_copy(s, target, tokens)), None)
        if source is not None:
            mechanism, est, nbytes = "copy", copy_s(p, tokens), tokens * p.kv_bytes_per_token
        elif p.warmup:
            mechanism, est, nbytes, source = "warmup", tokens / rate, 0, None
        else:
            return None
        units = len(g.chain) * g.chunk_units
        text = g.source[:units] if isinstance(g.source, str) else None
        ids = g.source[:units] if isinstance(g.source, tuple) else None
        # The id is taken only when the plan starts (`_start`): a plan held back leaves no gap in the ids.
        return MigrationPlan(
            self._next_id, g.key, g.model, target, source, mechanism, g.chain, tokens, text, ids,
            est, nbytes, now, reason,
        )  # fmt: skip

    def _start(self, plan: MigrationPlan, g: _Group, now: float) -> None:
        assert plan.plan_id == self._next_id, "a plan starts right after it is made"
        self._next_id += 1
        self._in_flight[plan.plan_id] = plan
        g.last_plan_at = now
        self.started += 1

    def _maybe_shrink(
        self, g: _Group, holders: list[str], available: int, total_rate: float, fleet: Fleet, now: float
    ) -> None:
        p = self.params
        assert g.cool_since is not None
        if now - g.cool_since < p.shrink_after_s or now - g.last_shrink_at < p.shrink_after_s:
            return
        share = g.request_rate / total_rate if total_rate > 0 else 0.0
        needed = max(1, math.ceil(share * available * p.shrink_margin))
        if len(holders) <= needed:
            return
        victim = g.added.pop()
        fleet.index.remove(victim, g.chain)
        g.last_shrink_at = now

    # -- driver reports -------------------------------------------------------------------------

    def completed(self, plan_id: int, fleet: Fleet, now: float, held_tokens: int | None = None) -> bool:
        """The executor confirmed the target holds the prefix (`held_tokens` of it, if known): index it.
        False for an unknown (expired, repeated) plan or a target that left."""
        plan = self._in_flight.pop(plan_id, None)
        if plan is None or plan.target not in fleet.replicas:
            return False
        chunks = len(plan.prefix_hashes)
        if held_tokens is not None and plan.prefix_tokens > 0:
            chunks = min(chunks, int(held_tokens * chunks / plan.prefix_tokens))
        if chunks <= 0:
            self._finish(plan, "failed", now)
            return False
        fleet.index.insert(plan.target, plan.prefix_hashes[:chunks], now)
        g = self._groups.get(plan.group)
        if g is not None and plan.target not in g.added:
            g.added.append(plan.target)
        self.bytes_moved += plan.bytes * chunks // max(1, len(plan.prefix_hashes))
        self._finish(plan, "completed", now)
        return True

    def failed(self, plan_id: int, now: float) -> bool:
        plan = self._in_flight.pop(plan_id, None)
        if plan is None:
            return False
        self._finish(plan, "failed", now)
        return True

    def _finish(self, plan: MigrationPlan, outcome: str, now: float) -> None:
        if outcome == "completed":
            self.completed_count += 1
        else:
            self.failed_count += 1
        self.history.append((plan, outcome, now))
        del self.history[:-100]

    def _expire(self, now: float) -> None:
        for pid in [
            i for i, pl in self._in_flight.items() if now - pl.created_at > self.params.migration_timeout_s
        ]:
            self.failed(pid, now)

    def _drop_coldest(self, now: float) -> None:
        for g in self._groups.values():
            g.decay(now, self.params.half_life_s)
        coldest = min(self._groups.values(), key=lambda g: g.request_rate)
        del self._groups[coldest.key]

    # -- manual control and views ---------------------------------------------------------------

    def plan_manual(self, group: int, target: str, fleet: Fleet, now: float) -> MigrationPlan:
        """Plan a migration of `group` onto `target` now, whatever its heat (admin); ValueError if the
        group is unknown or forbidden, the target unknown or already a holder, or the budget is spent."""
        g = self._groups.get(group)
        if g is None:
            raise ValueError(f"unknown group {group}")
        if group in self._forbidden:
            raise ValueError(f"group {group} is forbidden")
        if target not in fleet.replicas:
            raise ValueError(f"unknown replica {target!r}")
        holders = fleet.index.holders(g.key)
        if target in holders:
            raise ValueError(f"{target!r} already holds group {group}")
        if len(self._in_flight) >= self.params.max_concurrent:
            raise ValueError("the migration budget is spent")
        waits = {h: replica_wait_s(fleet.replicas[h], now, self.params) for h in holders}
        sources = sorted(waits, key=lambda h: (waits[h], h))
        plan = self._make_plan(g, target, sources, fleet, now, "manual")
        if plan is None:
            raise ValueError("no mechanism can move this prefix (no copy backend, warm-up disabled)")
        self._start(plan, g, now)
        return plan

    def hot_count(self) -> int:
        """Groups hot now (the router_hot_groups gauge)."""
        return sum(1 for g in self._groups.values() if g.hot)

    def waiting_counts(self) -> dict[WaitingFor, int]:
        """Hot groups by why they got no new migration at the last tick, every reason present (the
        router_hot_groups_waiting gauge)."""
        counts = dict.fromkeys(WAITING_REASONS, 0)
        for g in self._groups.values():
            if g.hot and g.waiting_for is not None:
                counts[g.waiting_for] += 1
        return counts

    @property
    def in_flight(self) -> list[MigrationPlan]:
        return list(self._in_flight.values())

    def groups(self, fleet: Fleet, now: float, top: int = 20) -> list[GroupView]:
        """The `top` groups by request rate, busiest first."""
        for g in self._groups.values():  # every rate decayed to `now` first, so the ranking compares like
            g.decay(now, self.params.half_life_s)
        out = []
        for g in sorted(self._groups.values(), key=lambda g: -g.request_rate)[:top]:
            out.append(
                GroupView(
                    g.key,
                    g.model,
                    g.request_rate,
                    g.token_rate,
                    g.prefix_tokens,
                    tuple(fleet.index.holders(g.key)),
                    tuple(g.added),
                    g.hot,
                    g.key in self._forbidden,
                    tuple(pl.plan_id for pl in self._in_flight.values() if pl.group == g.key),
                    g.waiting_for if g.hot else None,
                )
            )
        return out
