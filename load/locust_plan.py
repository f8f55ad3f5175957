"""What load/locustfile.py needs that is not Locust: prompt pools, the SSE meter, load shapes.

Rules:
- No Locust, gevent or socket here, and no clock: times are arguments. So mypy --strict and plain unit
  tests cover the logic, and the locustfile stays a thin driver (as load/live.py is for asyncio).
- Prompts come from the seeded generators of load/workloads, never written by hand. Independent
  workloads (shared prefix, RAG, hot prefix) are a `RequestPool` that users draw from in turn;
  session workloads (multi-turn, agentic) are a `SessionPool` whose sessions a user claims one at a
  time and walks in order, one `steps` entry per round (an agentic burst is one step of several
  requests, sent in parallel by the user).
- Distributed runs (`--master`/`--worker`): every process builds the same pools from the same seed;
  each starts at its own offset (`offset`, from the worker index) so workers do not send identical
  streams in lockstep.
- Configuration is by environment variables (Locust's own flags stay unchanged):
    KVROUTER_LOCUST_SEED        workload seed (default 0)
    KVROUTER_LOCUST_MODEL       served model name (default kvrouter-emulated, the emulator's)
    KVROUTER_LOCUST_MAX_TOKENS  output tokens per request (default 16: short answers, prefill matters)
    KVROUTER_LOCUST_POOL        requests generated per workload (default 2000)
    KVROUTER_LOCUST_SHAPE       "step" or "ramp" selects a LoadTestShape; unset: -u/-r/-t as given
    KVROUTER_LOCUST_USERS       the shape's peak users (default 20)
    KVROUTER_LOCUST_STEP_USERS  users added per step (default 5); KVROUTER_LOCUST_STEP_S: seconds
                                per step (default 10)
    KVROUTER_LOCUST_DURATION_S  the shape's total seconds (default 60); a ramp climbs for the first
                                half and holds for the rest
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from load.workloads import WorkloadRequest, make_workload

ShapeKind = Literal["step", "ramp"]
DEFAULT_MODEL = "kvrouter-emulated"  # workers/emulator/replica.py DEFAULT_MODEL
# Stride between workers' starting points in a pool: a prime, so offsets rarely coincide mod the size.
_WORKER_STRIDE = 7919


@dataclass(frozen=True, slots=True)
class LocustSettings:
    seed: int = 0
    model: str = DEFAULT_MODEL
    max_tokens: int = 16
    pool_requests: int = 2000
    shape: ShapeKind | None = None
    users: int = 20
    step_users: int = 5
    step_s: float = 10.0
    duration_s: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LocustSettings:
        env = os.environ if env is None else env
        shape = env.get("KVROUTER_LOCUST_SHAPE", "").strip().lower() or None
        if shape not in (None, "step", "ramp"):
            raise ValueError(f"KVROUTER_LOCUST_SHAPE must be step or ramp, got {shape!r}")
        settings = cls(
            seed=int(env.get("KVROUTER_LOCUST_SEED", "0")),
            model=env.get("KVROUTER_LOCUST_MODEL", DEFAULT_MODEL),
            max_tokens=int(env.get("KVROUTER_LOCUST_MAX_TOKENS", "16")),
            pool_requests=int(env.get("KVROUTER_LOCUST_POOL", "2000")),
            shape=shape,  # type: ignore[arg-type]  # checked above
            users=int(env.get("KVROUTER_LOCUST_USERS", "20")),
            step_users=int(env.get("KVROUTER_LOCUST_STEP_USERS", "5")),
            step_s=float(env.get("KVROUTER_LOCUST_STEP_S", "10")),
            duration_s=float(env.get("KVROUTER_LOCUST_DURATION_S", "60")),
        )
        if min(settings.max_tokens, settings.pool_requests, settings.users, settings.step_users) < 1:
            raise ValueError("KVROUTER_LOCUST_MAX_TOKENS, _POOL, _USERS and _STEP_USERS must be >= 1")
        if not (settings.step_s > 0 and settings.duration_s > 0):
            raise ValueError("KVROUTER_LOCUST_STEP_S and _DURATION_S must be positive")
        return settings


# The output-length parameter of each workload the locustfile drives (multi-turn calls it answer_tokens).
_OUTPUT_PARAM = {
    "shared-prefix": "output_tokens",
    "multi-turn": "answer_tokens",
    "agentic": "output_tokens",
    "rag": "output_tokens",
    "hot-prefix": "output_tokens",
}


def generate(workload: str, settings: LocustSettings) -> list[WorkloadRequest]:
    """`settings.pool_requests` requests of `workload` with short outputs. The rate only sets how many
    sessions run side by side in the generator (Locust users pace themselves); 10/s gives tens."""
    params: dict[str, Any] = {_OUTPUT_PARAM[workload]: settings.max_tokens}
    return make_workload(
        workload,
        seed=settings.seed,
        replicas=1,
        rate=10.0,
        requests=settings.pool_requests,
        model=settings.model,
        params=params,
    )


@dataclass
class RequestPool:
    """Independent requests, handed out in turn from `offset` (wrapping around)."""

    requests: Sequence[WorkloadRequest]
    offset: int = 0
    _next: itertools.count[int] = field(default_factory=itertools.count, repr=False)

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError("an empty request pool")

    def draw(self) -> WorkloadRequest:
        return self.requests[(self.offset + next(self._next)) % len(self.requests)]


@dataclass
class SessionPool:
    """Sessions (a user's chat, an agent's task) as steps in order; each step holds the requests of
    one round (several for an agentic burst of sub-agents). Claimed in turn from `offset`."""

    sessions: Sequence[Sequence[Sequence[WorkloadRequest]]]
    offset: int = 0
    _next: itertools.count[int] = field(default_factory=itertools.count, repr=False)

    def __post_init__(self) -> None:
        if not self.sessions:
            raise ValueError("an empty session pool")

    @classmethod
    def from_requests(cls, requests: Sequence[WorkloadRequest], offset: int = 0) -> SessionPool:
        steps: dict[str, dict[int, list[WorkloadRequest]]] = defaultdict(lambda: defaultdict(list))
        for req in requests:  # arrival order, so requests within a step keep their order too
            steps[req.session or req.request_id][req.turn].append(req)
        sessions = [[by_turn[t] for t in sorted(by_turn)] for by_turn in steps.values()]
        return cls(sessions, offset)

    def claim(self) -> Sequence[Sequence[WorkloadRequest]]:
        return self.sessions[(self.offset + next(self._next)) % len(self.sessions)]


def worker_offset(worker_index: int) -> int:
    return worker_index * _WORKER_STRIDE


def request_body(req: WorkloadRequest, max_tokens: int) -> tuple[str, dict[str, object]]:
    """The path and streaming body of `req`, asking for usage in the last chunk."""
    body = req.openai_body()
    body["max_tokens"] = min(req.max_tokens, max_tokens)
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    path = "/v1/chat/completions" if req.messages is not None else "/v1/completions"
    return path, body


@dataclass
class StreamMeter:
    """Reads one SSE response line by line (`feed(line, now)`), timing tokens from `started`."""

    started: float
    first_token_s: float | None = None
    last_token_s: float | None = None
    gaps_s: float = 0.0
    gaps: int = 0
    usage: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def feed(self, line: bytes, now: float) -> None:
        line = line.strip()
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            self.error = f"bad SSE chunk: {payload[:80]!r}"
            return
        if not isinstance(chunk, dict):
            self.error = f"bad SSE chunk: {payload[:80]!r}"
            return
        if "error" in chunk:
            self.error = str(chunk["error"])[:200]
            return
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if chunk.get("choices"):
            if self.first_token_s is None:
                self.first_token_s = now
            elif self.last_token_s is not None:
                self.gaps_s += now - self.last_token_s
                self.gaps += 1
            self.last_token_s = now

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.started

    @property
    def inter_token_s(self) -> float | None:
        return self.gaps_s / self.gaps if self.gaps else None

    @property
    def prompt_tokens(self) -> int:
        return int(self.usage.get("prompt_tokens") or 0)

    @property
    def cached_tokens(self) -> int:
        details = self.usage.get("prompt_tokens_details") or {}
        return int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0

    def failure(self) -> str | None:
        """Why the stream counts as failed, or None."""
        if self.error is not None:
            return self.error
        if self.first_token_s is None:
            return "stream ended without a token"
        if not self.usage:
            return "stream ended without usage (stream_options.include_usage ignored?)"
        return None


def shape_tick(settings: LocustSettings, run_time_s: float) -> tuple[int, float] | None:
    """(users, spawn rate) at `run_time_s` of a step or ramp load; None once the shape is over.

    step: `step_users` more every `step_s` seconds up to `users`; ramp: linear from 1 to `users` over
    the first half of `duration_s`, then held. Spawn rates let each change land within a second."""
    if settings.shape is None or run_time_s >= settings.duration_s:
        return None
    if settings.shape == "step":
        users = min(settings.users, settings.step_users * (1 + int(run_time_s // settings.step_s)))
        return users, float(settings.step_users)
    climb = settings.duration_s / 2
    users = max(1, min(settings.users, math.ceil(settings.users * run_time_s / climb)))
    return users, max(1.0, settings.users / climb)
