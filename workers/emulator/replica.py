"""One emulated vLLM replica: an engine model, its driver task, KV-event sockets and an HTTP listener.

Rules:
- A replica owns what it starts and stops it in reverse order: HTTP listener, then the driver (which
  aborts what is in flight), then the ZMQ sockets. Start is all-or-nothing: a failure part-way stops
  what had started.
- The engine is rebuilt only by a restart (clearing a `crash` fault); everything else holds on to the
  driver, and reads the current engine through it.
- Listeners bind `host:port` (port 0: ephemeral); the actual address is kept so a `refuse` fault can
  close the listener and re-open it on the same port.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import zmq.asyncio
from aiohttp import web

from router.index.kv_events import Encoding
from workers.emulator.driver import EngineDriver
from workers.emulator.faults import Faults
from workers.emulator.kv_publisher import DEFAULT_BUFFER_STEPS, KVEventPublisher
from workers.emulator.metrics import ReplicaCollector, RequestStats, make_registry
from workers.emulator.server import build_app
from workers.engine import Engine, EngineMetrics, HashAlgo, Preset

DEFAULT_MODEL = "kvrouter-emulated"  # load/workloads' DEFAULT_MODEL, so workloads need no flag
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024  # a 131,072-token prompt as JSON ids is ~1 MB; 16x headroom
_SHUTDOWN_S = 2.0  # what stop() waits for handlers still running (aiohttp's default is 60 s)


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    preset: Preset
    model: str = DEFAULT_MODEL
    hash_algo: HashAlgo = "mmh3"
    host: str = "127.0.0.1"
    port: int = 0  # 0: an ephemeral port
    kv_events: bool = False
    kv_events_encoding: Encoding = "map"
    kv_events_topic: str = ""
    events_port: int = 0  # 0: an ephemeral port (ZMQ's `*`)
    replay_port: int = 0
    buffer_steps: int = DEFAULT_BUFFER_STEPS
    kv_bandwidth: float | None = None  # bytes/s of a modeled P2P link; None: real bytes (p2p.py)
    faults: Faults = field(default_factory=Faults)
    seed: int = 0  # of the error-rate fault's RNG
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


class Replica:
    """A running replica. `start()` then `url`, `events_endpoint`, `replay_endpoint`; `stop()`."""

    def __init__(self, config: ReplicaConfig, zmq_ctx: zmq.asyncio.Context | None = None) -> None:
        if config.kv_events and zmq_ctx is None:
            raise ValueError("a replica with KV events needs a zmq.asyncio.Context")
        self.config = config
        self.model = config.model
        self.started = int(time.time())
        self.faults = config.faults
        self._rng = random.Random(config.seed)
        self._unhung = asyncio.Event()
        self._unhung.set()
        self.publisher: KVEventPublisher | None = None
        if config.kv_events:
            assert zmq_ctx is not None
            ep = f"tcp://{config.host}:{config.events_port or '*'}"
            replay = f"tcp://{config.host}:{config.replay_port or '*'}"
            self.publisher = KVEventPublisher(
                zmq_ctx,
                endpoint=ep,
                replay_endpoint=replay,
                topic=config.kv_events_topic,
                encoding=config.kv_events_encoding,
                buffer_steps=config.buffer_steps,
            )
        publish = self.publisher.publish if self.publisher is not None else None
        self.driver = EngineDriver(self._new_engine(), RequestStats(), publish)
        self.registry = make_registry(ReplicaCollector(config.model, self._metrics_source))
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = config.port

    # -- state read by the HTTP layer --------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        return self.driver.engine

    @property
    def healthy(self) -> bool:
        return not (self.faults.crash or self.driver.dead)

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def events_endpoint(self) -> str | None:
        return None if self.publisher is None else self.publisher.endpoint

    @property
    def replay_endpoint(self) -> str | None:
        return None if self.publisher is None else self.publisher.replay_endpoint

    def draw(self) -> float:
        """The error-rate fault's next uniform draw (seeded per replica, so runs repeat)."""
        return self._rng.random()

    async def wait_unhung(self) -> None:
        await self._unhung.wait()

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            if self.publisher is not None:
                self.publisher.start()
            self.driver.start()
            self._runner = web.AppRunner(
                build_app(self), handler_cancellation=True, access_log=None, shutdown_timeout=_SHUTDOWN_S
            )
            await self._runner.setup()
            await self._listen()
            await self.set_faults(self.config.faults, force=True)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        # Stop listening, then end in-flight requests (the driver aborts them and their handlers drop
        # their connections, as a stopping vLLM aborts its requests), so the runner's cleanup has no
        # long stream to wait for; hung handlers are let go for the same reason.
        if self._site is not None:
            await self._site.stop()
            self._site = None
        self._unhung.set()
        await self.driver.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.publisher is not None:
            await self.publisher.close()

    async def set_faults(self, faults: Faults, *, force: bool = False) -> None:
        """Apply a new fault set, acting on the transitions (listener, engine death and restart)."""
        old, self.faults = self.faults, faults
        if faults.hang:
            self._unhung.clear()
        else:
            self._unhung.set()
        if faults.refuse and (force or not old.refuse) and self._site is not None:
            await self._site.stop()
            self._site = None
        elif not faults.refuse and self._site is None and self._runner is not None:
            await self._listen()
        if faults.crash and (force or not old.crash):
            self.driver.kill()
        elif old.crash and not faults.crash:
            self._restart()
        if faults.drop_events and self.publisher is not None:
            self.publisher.drop_next(faults.drop_events)

    async def _listen(self) -> None:
        assert self._runner is not None
        # reuse_address: re-binding the same port after a `refuse` fault must not wait for TIME_WAIT.
        site = web.TCPSite(self._runner, self.config.host, self.port, reuse_address=True)
        await site.start()
        self._site = site
        if self.port == 0:  # remember the ephemeral port, so a re-listen takes the same one
            self.port = int(self._runner.addresses[0][1])

    def _restart(self) -> None:
        """Back from a crash as a fresh process: empty cache, zeroed metrics, event sequence from 0."""
        self.driver.stats = RequestStats()
        self.driver.replace_engine(self._new_engine())
        if self.publisher is not None:
            self.publisher.reset()

    def _new_engine(self) -> Engine:
        return Engine(
            self.config.preset,
            hash_algo=self.config.hash_algo,
            enable_kv_cache_events=self.config.kv_events,
            emit_token_ids=True,
        )

    def _metrics_source(self) -> tuple[EngineMetrics, RequestStats]:
        return self.driver.engine.metrics(), self.driver.stats
