"""Drive a workload through a live OpenAI-compatible endpoint and record what each request saw.

Rules:
- Open loop: each request is sent at its `arrival_s` (scaled by `time_scale`) whatever happened to the
  earlier ones, with at most `concurrency` in flight (a bound, so a saturated server cannot make the
  client grow without limit); a request that waits for a slot is late, and its TTFT counts from its
  scheduled arrival, as a user's would.
- Every request streams with `stream_options.include_usage`, so TTFT is the first content chunk and
  `usage.prompt_tokens_details.cached_tokens` (the physical hit) comes in the last chunk.
- The replica is read from the router's `x-kvrouter-replica` header ("direct" when absent).
- Failures (status >= 400, broken streams, timeouts) are records with `error` set, never exceptions.
- Bounded in time: `deadline_s` after the first arrival every request still in flight is cancelled.
- `run_policy` is one policy's live run for `kvrouter demo` (a FRESH in-process emulated fleet, so
  caches start cold, and a router in the same process); `kvrouter bench live` runs each router as a
  process of its own instead (load/bench_live.py). `to_records` turns results into the records of
  load/report.py; `progress_line` draws a run's progress bar.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from load.report import RequestRecord, draw_progress
from load.workloads import WorkloadRequest

if TYPE_CHECKING:
    from workers.engine import Preset


@dataclass(frozen=True, slots=True)
class LiveResult:
    request_id: str
    replica: str
    scheduled_s: float  # arrival on the run's clock
    first_token_s: float | None
    done_s: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    inter_token_s: float | None  # mean gap between content chunks after the first
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One request as sent: its id, its path, its JSON body (without the stream flags) and its arrival."""

    request_id: str
    path: str
    body: Mapping[str, object]
    arrival_s: float

    @classmethod
    def of(cls, req: WorkloadRequest) -> Outgoing:
        path = "/v1/chat/completions" if req.messages is not None else "/v1/completions"
        return cls(req.request_id, path, req.openai_body(), req.arrival_s)


async def _one(
    session: aiohttp.ClientSession, base_url: str, req: Outgoing, scheduled: float, t0: float
) -> LiveResult:
    body = {**req.body, "stream": True, "stream_options": {"include_usage": True}}
    path = req.path
    first: float | None = None
    last: float | None = None
    gaps = 0.0
    chunks = 0
    usage: dict[str, object] = {}
    replica = "direct"
    try:
        async with session.post(base_url + path, json=body) as resp:
            replica = resp.headers.get("x-kvrouter-replica", "direct")
            if resp.status >= 400:
                text = (await resp.text())[:200]
                return LiveResult(
                    req.request_id,
                    replica,
                    scheduled,
                    None,
                    time.perf_counter() - t0,
                    0,
                    0,
                    0,
                    None,
                    f"HTTP {resp.status}: {text}",
                )
            buffer = b""
            async for data in resp.content.iter_any():
                buffer += data
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    line = event.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        continue
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        raise RuntimeError(str(chunk["error"])[:200])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    if chunk.get("choices"):
                        now = time.perf_counter() - t0
                        if first is None:
                            first = now
                        elif last is not None:
                            gaps += now - last
                            chunks += 1
                        last = now
    except (TimeoutError, aiohttp.ClientError, RuntimeError, ValueError) as exc:
        return LiveResult(
            req.request_id,
            replica,
            scheduled,
            first,
            time.perf_counter() - t0,
            0,
            0,
            0,
            None,
            f"{type(exc).__name__}: {exc}"[:200],
        )
    done = time.perf_counter() - t0
    details = usage.get("prompt_tokens_details") or {}
    cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    prompt = int(usage.get("prompt_tokens") or 0)  # type: ignore[call-overload]
    output = int(usage.get("completion_tokens") or 0)  # type: ignore[call-overload]
    error = None if first is not None and usage else "stream ended without a token or usage"
    return LiveResult(
        req.request_id,
        replica,
        scheduled,
        first,
        done,
        prompt,
        cached,
        output,
        gaps / chunks if chunks else None,
        error,
    )


async def drive(
    base_url: str,
    requests: Sequence[WorkloadRequest | Outgoing],
    *,
    concurrency: int = 64,
    time_scale: float = 1.0,
    deadline_s: float = 600.0,
    request_timeout_s: float = 120.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[LiveResult]:
    """Send `requests` to `base_url` open-loop; one LiveResult per request, in completion order.

    A workload's requests, or bodies given as they are (`Outgoing`: token-id prompts, say)."""
    if concurrency < 1 or time_scale <= 0:
        raise ValueError("concurrency and time_scale must be positive")
    slots = asyncio.Semaphore(concurrency)
    results: list[LiveResult] = []
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency)
    outgoing = [r if isinstance(r, Outgoing) else Outgoing.of(r) for r in requests]
    start = outgoing[0].arrival_s if outgoing else 0.0
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()

        async def send_one(req: Outgoing) -> None:
            scheduled = (req.arrival_s - start) * time_scale
            delay = scheduled - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            async with slots:
                result = await _one(session, base_url, req, scheduled, t0)
            results.append(result)
            if progress is not None:
                progress(len(results), len(outgoing))

        tasks = [asyncio.ensure_future(send_one(r)) for r in outgoing]
        try:
            _done, pending = await asyncio.wait(tasks, timeout=deadline_s) if tasks else (set(), set())
        except BaseException:
            # Cancelled (Ctrl-C, SIGTERM): the requests not yet sent must not go on being sent, one at
            # each arrival time, after the caller has moved on to stopping the router and the fleet.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    finished = {r.request_id for r in results}
    for req in outgoing:
        if req.request_id not in finished:
            scheduled = (req.arrival_s - start) * time_scale
            results.append(
                LiveResult(
                    req.request_id,
                    "none",
                    scheduled,
                    None,
                    deadline_s,
                    0,
                    0,
                    0,
                    None,
                    "cancelled at the deadline",
                )
            )
    return results


def to_records(results: Sequence[LiveResult], logical: Mapping[str, int]) -> list[RequestRecord]:
    """Records of the requests that completed (a first token and no error); `logical` maps request id
    to its infinite-cache hit (load/sim.py `prepare`)."""
    return [
        RequestRecord(
            request_id=r.request_id,
            replica=r.replica,
            arrival_s=r.scheduled_s,
            first_token_s=r.first_token_s if r.first_token_s is not None else r.done_s,
            done_s=r.done_s,
            prompt_tokens=r.prompt_tokens,
            cached_tokens=r.cached_tokens,
            logical_cached_tokens=min(logical.get(r.request_id, 0), r.prompt_tokens),
            expected_cached_tokens=0,
            output_tokens=r.output_tokens,
        )
        for r in results
        if r.error is None and r.first_token_s is not None
    ]


def progress_line(label: str, started: float) -> Callable[[int, int], None]:
    """A `drive` progress callback that redraws one stderr line at most twice a second."""
    shown = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - shown[0] > 0.5 or done == total:
            first, shown[0] = shown[0] == 0.0, now
            width = 24
            filled = width * done // max(1, total)
            bar = "#" * filled + "." * (width - filled)
            elapsed = time.perf_counter() - started
            line = f"  {label:<24} [{bar}] {done:>5}/{total} requests {elapsed:5.1f} s"
            draw_progress(line, keep=first or done == total)

    return progress


async def run_policy(
    policy: str,
    requests: Sequence[WorkloadRequest],
    preset: Preset,
    replicas: int,
    *,
    model: str,
    concurrency: int = 512,
    deadline_s: float = 120.0,
) -> tuple[list[LiveResult], float]:
    """One policy's live run: a fresh emulated fleet and a router in this process, `requests` driven
    through the router; the results and the run's wall seconds. Draws a progress line on stderr."""
    from router.config import BackendConfig, RouterConfig
    from router.server import RouterServer
    from workers.emulator.fleet import EmulatedFleet

    async with EmulatedFleet(replicas=replicas, preset=preset, model=model) as fleet:
        backends = tuple(BackendConfig(f"replica-{i}", url) for i, url in enumerate(fleet.urls))
        # The router is told the replicas' prefill speed, as an operator would (`--prefill-rate`).
        config = RouterConfig(
            backends=backends,
            policy=policy,
            port=0,
            max_inflight=4096,
            prefill_tokens_per_s=fleet.preset.prefill_tokens_per_s,
        )
        async with RouterServer(config) as router:
            started = time.perf_counter()
            results = await drive(
                router.url,
                requests,
                concurrency=concurrency,
                deadline_s=deadline_s,
                progress=progress_line(policy, started),
            )
            elapsed = time.perf_counter() - started
            print(f"  ({elapsed:.0f} s)", file=sys.stderr)
    return results, elapsed
