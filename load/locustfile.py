"""Locust users for kvrouter (or any OpenAI-compatible endpoint): one user class per workload.

    locust -f load/locustfile.py --headless --csv reports/loadtest/run -u 10 -r 5 -t 20s \
        --host http://127.0.0.1:8080
    locust -f load/locustfile.py --host URL MultiTurnUser AgenticUser     # only these classes
    locust -f load/locustfile.py --master ... / --worker --master-host H   # distributed, unchanged
    KVROUTER_LOCUST_SHAPE=step|ramp locust -f load/locustfile.py ...       # a LoadTestShape

Users (prompts from the seeded generators of load/workloads, via load/locust_plan.py, which also
documents the KVROUTER_LOCUST_* settings):
    SharedPrefixUser  SGLang generated-shared-prefix: group system prompts + questions
    MultiTurnUser     each user walks its own chat session's rounds in order, the history growing
    AgenticUser       each user walks an agent task's steps; a burst's sub-agents go in parallel
    RagUser           shared documents, a few per request in varying order
    HotPrefixUser     Zipf-popular long prefixes (one group takes >= 30%)

Every request streams with `stream_options.include_usage`. Besides Locust's own row per POST (its
time is time to response headers), each successful request fires custom request events, so they are
in Locust's stats, CSV and HTML, one row per (type, workload):
    TTFT           time to the first content chunk, ms
    ITL            mean gap between content chunks after the first, ms
    E2E            until the end of the stream, ms
    PROMPT_TOKENS  prompt tokens; the "response time" column holds the COUNT, not ms
    CACHED_TOKENS  prompt tokens served from the prefix cache (usage.prompt_tokens_details), likewise
so the hit rate is CACHED_TOKENS' average / PROMPT_TOKENS' average (load/check_locust.py prints it).
A failed request (HTTP >= 400, an error chunk, no token, no usage, a broken stream) is a failure of
its POST row (`response.failure`) and fires no custom event.

Locust runs as its own process (gevent); it is never imported by the router. mypy does not check
this file (Locust's gevent-based types fight --strict); its logic is in load/locust_plan.py.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import requests
from gevent.pool import Group
from locust import HttpUser, LoadTestShape, between, task

from load.locust_plan import (
    LocustSettings,
    RequestPool,
    SessionPool,
    StreamMeter,
    generate,
    request_body,
    shape_tick,
    worker_offset,
)
from load.workloads import WorkloadRequest

SETTINGS = LocustSettings.from_env()
_POOLS: dict[str, Any] = {}  # workload -> RequestPool | SessionPool, built once per process


def _pool(workload: str, worker_index: int, sessions: bool) -> Any:
    if workload not in _POOLS:
        requests_ = generate(workload, SETTINGS)
        offset = worker_offset(worker_index)
        _POOLS[workload] = (
            SessionPool.from_requests(requests_, offset) if sessions else RequestPool(requests_, offset)
        )
    return _POOLS[workload]


class _WorkloadUser(HttpUser):
    abstract = True
    workload: ClassVar[str]
    sessions: ClassVar[bool] = False
    wait_time = between(0.2, 1.0)  # closed loop: a user's think time between requests (or rounds)

    def pool(self) -> Any:
        return _pool(self.workload, getattr(self.environment.runner, "worker_index", 0), self.sessions)

    def _event(self, request_type: str, value: float, length: int = 0) -> None:
        self.environment.events.request.fire(
            request_type=request_type,
            name=self.workload,
            response_time=value,
            response_length=length,
            exception=None,
            context={},
        )

    def send(self, req: WorkloadRequest) -> None:
        path, body = request_body(req, SETTINGS.max_tokens)
        started = time.perf_counter()
        with self.client.post(
            path, json=body, stream=True, catch_response=True, name=f"{path} [{self.workload}]"
        ) as resp:
            if resp.status_code >= 400:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            meter = StreamMeter(started)
            try:
                # chunk_size=None: each chunk as it arrives (a fixed size would wait to fill it).
                for line in resp.iter_lines(chunk_size=None):
                    meter.feed(line, time.perf_counter())
            except (requests.RequestException, OSError) as exc:
                meter.error = f"{type(exc).__name__}: {exc}"[:200]
            reason = meter.failure()
            if reason is not None:
                resp.failure(reason)
                return
            resp.success()
        done = time.perf_counter()
        ttft = meter.ttft_s
        assert ttft is not None  # failure() is None only after a first token
        self._event("TTFT", ttft * 1000.0)
        if meter.inter_token_s is not None:
            self._event("ITL", meter.inter_token_s * 1000.0)
        self._event("E2E", (done - started) * 1000.0)
        self._event("PROMPT_TOKENS", meter.prompt_tokens, meter.prompt_tokens)
        self._event("CACHED_TOKENS", meter.cached_tokens, meter.cached_tokens)


class _PoolUser(_WorkloadUser):
    """Independent requests: each task draws the pool's next one."""

    abstract = True

    @task
    def request(self) -> None:
        self.send(self.pool().draw())


class _SessionUser(_WorkloadUser):
    """A user owns one session at a time and sends its steps in order; a step of several requests
    (sub-agents) goes out in parallel and the next step waits for all of them."""

    abstract = True
    sessions = True

    def on_start(self) -> None:
        self._steps = self.pool().claim()
        self._step = 0

    @task
    def step(self) -> None:
        batch = self._steps[self._step]
        if len(batch) == 1:
            self.send(batch[0])
        else:
            group = Group()
            for req in batch:
                group.spawn(self.send, req)
            group.join()
        self._step += 1
        if self._step == len(self._steps):
            self.on_start()


class SharedPrefixUser(_PoolUser):
    workload = "shared-prefix"


class MultiTurnUser(_SessionUser):
    workload = "multi-turn"


class AgenticUser(_SessionUser):
    workload = "agentic"


class RagUser(_PoolUser):
    workload = "rag"


class HotPrefixUser(_PoolUser):
    workload = "hot-prefix"


class WorkloadShape(LoadTestShape):
    """Step or ramp load (KVROUTER_LOCUST_SHAPE); abstract, so unused, when the variable is unset."""

    abstract = SETTINGS.shape is None

    def tick(self) -> tuple[int, float] | None:
        return shape_tick(SETTINGS, self.get_run_time())
