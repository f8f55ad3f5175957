"""What the engine hands its drivers: per-step results and a metrics snapshot. Frozen, plain data.

Rules: every output of a step is visible at the step's END (`StepResult.end`); times are the driver's
clock in seconds (virtual in the simulator, real in the emulator); token counts are in tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FirstToken:
    """A request produced its first token (its prefill completed) in this step."""

    request_id: str
    prompt_tokens: int
    cached_tokens: int  # prefix-cache hit at first admission (usage.prompt_tokens_details.cached_tokens)
    arrival_time: float
    first_scheduled_time: float
    time: float  # end of the step: when the token is visible


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """A request generated its max_tokens in this step; its blocks are freed."""

    request_id: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    num_preemptions: int
    arrival_time: float
    first_token_time: float
    finish_time: float
    finish_reason: str = "length"


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one step did. All outputs are visible at `end`."""

    start: float
    duration: float
    num_prefill_tokens: int
    num_decode_seqs: int
    num_context_tokens: int
    num_new_tokens: int  # tokens sampled in this step (one per request that reached its length)
    new_tokens: tuple[tuple[str, int], ...]  # (request_id, token_id), incl. first tokens; () if not emitted
    first_tokens: tuple[FirstToken, ...]
    finished: tuple[FinishedRequest, ...]
    preempted: tuple[str, ...]

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """The vLLM /metrics values a router reads (gauges now; counters since start, in tokens)."""

    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage_perc: float  # 0..1
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens: int
    generation_tokens: int
    num_preemptions: int
    request_success: int
    block_size: int
    num_gpu_blocks: int
