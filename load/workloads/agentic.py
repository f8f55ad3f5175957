"""Agentic tool use: shared tool definitions, per-task histories that grow, bursts of sub-agents.

Rules:
- Every request is a chat. The system message = a global instruction + one toolset's definitions
  (the prefix group, "g7"), built once per toolset and shared as the same dict by all its tasks.
- A task is a user message, then steps. A plain step sends the task's messages; its (synthetic) tool
  call and the tool's result are appended for the next step. A burst step (never the first) fans out
  to `fanout` parallel sub-agents arriving within `burst_spread_s`, each sending the parent's context +
  the fan-out call + its own sub-task; the parent then continues with all their results appended.
  So every request of a task extends the task's history, and sub-agents share the parent's context.
- Roles alternate system, user, assistant, user, ...: tool calls are assistant text and tool results
  user text, so no chat template needs tool-call support.
- Open loop: `agents` concurrent task slots; a task's steps are one exponential gap (mean
  `step_gap_s`) apart, and a slot starts its next task one gap after its last step. By default
  `agents` is chosen so that the aggregate request rate is `rate`.

Calibration target (anchors.md, Preble's ToolBench preset): prompts of 1835 ± 742 tokens, of which
0.85 ± 0.13 is shared with earlier requests. The defaults below give 1,780-1,930 ± 650-810 tokens
over seeds 0-4 and a shared fraction of 0.87 ± 0.13 (tests/unit/test_workloads.py checks both).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count

from load.workloads.base import ChatMessage, Workload, WorkloadRequest, merge_by_arrival, stream_rng
from load.workloads.text import TextSource, tokens_to_chars

_Range = tuple[int, int]


@dataclass(frozen=True)
class Agentic(Workload):
    """Lengths are calibrated to the ToolBench preset above; the structure values are assumptions."""

    name = "agentic"
    kind = "chat"

    system_tokens: int = 256  # global agent instruction shared by every task
    toolsets: int = 64  # prefix groups; 64 keeps the seed-to-seed spread of the mean prompt ~±5%
    toolset_mean_tokens: int = 900  # tool definitions per toolset ~ Normal(900, 700), clipped
    toolset_sd_tokens: int = 700
    toolset_clip_tokens: _Range = (128, 4096)
    task_tokens: _Range = (64, 192)  # the user's task statement
    call_tokens: _Range = (32, 64)  # an assistant tool call
    result_tokens: _Range = (64, 320)  # a tool's result
    steps: _Range = (1, 6)  # main-agent steps per task
    burst_probability: float = 0.25  # chance that a step after the first fans out
    fanout: _Range = (2, 4)  # sub-agents per burst
    subtask_tokens: _Range = (32, 96)  # a sub-agent's instruction
    subresult_tokens: _Range = (32, 128)  # what each sub-agent contributes to the parent
    burst_spread_s: float = 0.05  # sub-agents of one burst arrive within 50 ms
    step_gap_s: float = 3.0  # tool latency + the previous call's generation
    output_tokens: int = 128  # tool calls are short
    agents: int | None = None  # concurrent tasks; None: chosen so that the rate is `rate`

    def __post_init__(self) -> None:
        for field_name in ("toolset_clip_tokens", "task_tokens", "call_tokens", "result_tokens", "steps",
                           "fanout", "subtask_tokens", "subresult_tokens"):  # fmt: skip
            lo, hi = getattr(self, field_name)
            if not 1 <= lo <= hi:
                raise ValueError(f"agentic: {field_name} must be a range 1 <= lo <= hi, got {(lo, hi)}")
        if not 0 <= self.burst_probability <= 1 or self.toolsets < 1 or not self.step_gap_s > 0:
            raise ValueError("agentic: need 0 <= burst_probability <= 1, toolsets >= 1, step_gap_s > 0")

    def requests_per_task(self) -> float:
        """Expected requests per task: one for the first step, then per step 1 or a burst."""
        mean_steps = sum(self.steps) / 2
        per_later_step = 1 - self.burst_probability + self.burst_probability * sum(self.fanout) / 2
        return 1 + (mean_steps - 1) * per_later_step

    def concurrent_agents(self, rate: float) -> int:
        """A slot sends requests_per_task requests per (mean_steps x step_gap_s) seconds."""
        if self.agents is not None:
            return self.agents
        per_slot = self.requests_per_task() / (sum(self.steps) / 2 * self.step_gap_s)
        return max(1, math.ceil(rate / per_slot))

    def stream(self, seed: int, rate: float, horizon_s: float, model: str) -> Iterator[WorkloadRequest]:
        rng = stream_rng(seed, self.name, "toolsets")
        text = TextSource(rng)
        instruction = text.text(tokens_to_chars(self.system_tokens))
        lo, hi = self.toolset_clip_tokens
        systems: list[ChatMessage] = []
        for g in range(self.toolsets):
            tokens = min(hi, max(lo, round(rng.gauss(self.toolset_mean_tokens, self.toolset_sd_tokens))))
            header = f"Tools of set {g}:\n"
            body = text.text(tokens_to_chars(tokens) - len(header))
            systems.append({"role": "system", "content": instruction + header + body})
        agents = self.concurrent_agents(rate)
        # Slot gap chosen so that agents x (requests per task / task length) == rate.
        mean_gap = agents * self.requests_per_task() / (sum(self.steps) / 2) / rate
        return merge_by_arrival(self._slot(seed, j, systems, mean_gap, model) for j in range(agents))

    def _slot(
        self, seed: int, slot: int, systems: list[ChatMessage], mean_gap: float, model: str
    ) -> Iterator[WorkloadRequest]:
        rng = stream_rng(seed, self.name, f"slot{slot}")  # per slot: independent of the merge order
        text = TextSource(rng)

        def message(role: str, tokens: _Range) -> ChatMessage:
            return {"role": role, "content": text.text(tokens_to_chars(rng.randint(*tokens)))}

        t = rng.expovariate(1.0 / mean_gap)  # exponential from 0: a Poisson slot from the start
        for k in count():
            task = f"t{slot}.{k}"
            g = rng.randrange(self.toolsets)
            messages: tuple[ChatMessage, ...] = (systems[g], message("user", self.task_tokens))

            for step in range(rng.randint(*self.steps)):
                if step > 0 and rng.random() < self.burst_probability:
                    fan_out = (*messages, message("assistant", self.call_tokens))
                    n = rng.randint(*self.fanout)
                    offsets = sorted(rng.uniform(0.0, self.burst_spread_s) for _ in range(n))
                    for i, offset in enumerate(offsets):
                        sub = (*fan_out, message("user", self.subtask_tokens))
                        yield self._request(model, f"{task}-s{step}-a{i}", t + offset, sub, g, task, step)
                    results = sum(rng.randint(*self.subresult_tokens) for _ in range(n))
                    messages = (*fan_out, message("user", (results, results)))
                    t += offsets[-1]  # the parent resumes after its last sub-agent started
                else:
                    yield self._request(model, f"{task}-s{step}", t, messages, g, task, step)
                    messages = (*messages, message("assistant", self.call_tokens))
                    messages = (*messages, message("user", self.result_tokens))
                t += rng.expovariate(1.0 / mean_gap)

    def _request(
        self, model: str, rid: str, arrival: float, messages: tuple[ChatMessage, ...], group: int, task: str,
        step: int,
    ) -> WorkloadRequest:  # fmt: skip
        return WorkloadRequest(
            request_id=f"{self.name}-{rid}",
            arrival_s=arrival,
            model=model,
            kind="chat",
            prompt_parts=None,
            messages=messages,
            max_tokens=self.output_tokens,
            group=f"g{group}",
            session=task,  # sub-agents belong to their parent's task: they share its context
            turn=step,
        )
