"""The live driver of one engine model: an asyncio task stepping `workers.engine.Engine` in real time.

Rules (the engine's driving contract, workers/engine/model.py):
- One task per replica loops: `step = engine.step(now)`, sleep until `step.end` on the loop's clock,
  then deliver the step's outputs and publish the KV events drained after it — so every output becomes
  visible at the end of its step, as the contract asks. `now` never goes back before the previous
  step's end (uvloop's clock has millisecond granularity and may read a hair early).
- A zero-length step (the `instant` preset) still yields once (`sleep(0)`) so handlers run between
  steps; an idle engine does not spin: the task waits on an asyncio.Event that `submit()` and `wake()`
  set.
- Outputs go to one `RequestStream` per request (a minimal single-consumer queue): one `Delta` per step
  that sampled a token for it (the last carries the `FinishedRequest`), or `dead` when the engine died.
  A request leaves the driver when it finishes or is aborted; outputs of a step for a request aborted
  meanwhile are dropped.
- KV events are published as one batch per engine step that produced any, and one per batch of events
  produced outside a step (a P2P import): `wake()` makes an idle loop flush them.
- Everything engine-related lives in `workers.engine`; this module only moves its outputs to queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from workers.emulator.metrics import RequestStats
from workers.engine import Engine, FinishedRequest, KVEvent, StepResult

logger = logging.getLogger(__name__)

Publish = Callable[[list[KVEvent]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Delta:
    """What one engine step produced for one request."""

    token_id: int
    finished: FinishedRequest | None  # set on the last one: usage, cached tokens, finish reason


class RequestStream:
    """The outputs of one request, in step order, for the one handler that awaits them.

    A streaming handler is woken for every step's delta; a non-streaming one only once, when the request
    finished or the engine died (one wake-up per request instead of one per token: the benchmark's
    hot path). Cheaper than an asyncio.Queue, which wakes its getter for every item."""

    __slots__ = ("_waiter", "dead", "deltas", "finished", "wake_each")

    def __init__(self, wake_each: bool) -> None:
        self.wake_each = wake_each
        self.deltas: list[Delta] = []
        self.finished = False
        self.dead = False  # the engine died: the handler drops its connection
        self._waiter: asyncio.Future[None] | None = None

    def push(self, delta: Delta) -> None:
        self.deltas.append(delta)
        self.finished = delta.finished is not None
        if self.wake_each or self.finished:
            self._wake()

    def kill(self) -> None:
        self.dead = True
        self._wake()

    async def take(self) -> list[Delta]:
        """The deltas since the last call, once there are any (streaming) or once the request finished
        (non-streaming); [] after `kill`, with `dead` set."""
        while not self.dead and not (self.finished or (self.wake_each and self.deltas)):
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.dead:
            return []
        out, self.deltas = self.deltas, []
        return out

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class EngineDriver:
    """Steps one Engine in real time and routes its outputs to per-request queues."""

    def __init__(self, engine: Engine, stats: RequestStats, publish: Publish | None = None) -> None:
        self.engine = engine
        self.stats = stats
        self._publish = publish
        self._streams: dict[str, RequestStream] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dead = False  # the step loop failed: the replica reports itself unhealthy, like vLLM's

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine-driver")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.kill()

    def submit(
        self, request_id: str, prompt_token_ids: Sequence[int], max_tokens: int, *, stream: bool = True
    ) -> RequestStream:
        """Queue a request in the engine; its outputs arrive on the returned stream, woken per step
        (`stream=True`) or once at the end. ValueError (from the engine) when it cannot be served."""
        self.engine.submit(request_id, prompt_token_ids, max_tokens, asyncio.get_running_loop().time())
        out = RequestStream(wake_each=stream)
        self._streams[request_id] = out
        self._wake.set()
        return out

    def abort(self, request_id: str) -> None:
        """Abort a request still in flight (its blocks are released at once); a no-op once finished."""
        if self._streams.pop(request_id, None) is not None:
            self.engine.abort(request_id)

    def wake(self) -> None:
        """Make an idle loop look again (for events produced outside a step)."""
        self._wake.set()

    def kill(self) -> None:
        """The engine died: abort every request and tell its handler (`RequestStream.dead`)."""
        streams, self._streams = self._streams, {}
        for request_id, stream in streams.items():
            self.engine.abort(request_id)
            stream.kill()

    def replace_engine(self, engine: Engine) -> None:
        """Restart with a fresh engine (after `kill`); the loop picks it up at its next step."""
        self.kill()
        self.engine = engine
        self.dead = False
        if self._task is not None and self._task.done():  # the loop ended on a failed step
            self.start()
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_end = float("-inf")
        while True:
            engine = self.engine
            if not engine.has_work():
                # Clear before the flush awaits: a submit() during the flush must still wake the loop.
                self._wake.clear()
                await self._flush_events(engine)
                await self._wake.wait()
                continue
            try:
                step = engine.step(max(loop.time(), last_end))
            except Exception:  # a bug in the model must not leave requests waiting forever
                logger.exception("engine step failed; the replica is now dead")
                self.dead = True
                self.kill()
                return
            last_end = step.end
            await asyncio.sleep(max(0.0, step.end - loop.time()))
            if engine is self.engine:  # a restart meanwhile drops the old engine's outputs
                self._deliver(step)
                await self._flush_events(engine)

    def _deliver(self, step: StepResult) -> None:
        streams = self._streams
        for first in step.first_tokens:
            self.stats.ttft.observe(first.time - first.arrival_time)
        finished: dict[str, FinishedRequest] = {}
        for done in step.finished:
            finished[done.request_id] = done
            self.stats.e2e.observe(done.finish_time - done.arrival_time)
            self.stats.finished_reasons[done.finish_reason] += 1
        for request_id, token_id in step.new_tokens:
            done_request = finished.get(request_id)
            stream = streams.pop(request_id, None) if done_request else streams.get(request_id)
            if stream is not None:
                stream.push(Delta(token_id, done_request))

    async def _flush_events(self, engine: Engine) -> None:
        events = engine.drain_events()
        if events and self._publish is not None:
            try:
                await self._publish(events)
            except Exception:  # a publishing failure loses events (as ZMQ past hwm), never the engine
                logger.exception("publishing %d KV events failed", len(events))
