"""A fleet of emulated replicas in one process: the Python API behind `kvrouter emulate`, tests and demos.

    async with EmulatedFleet(replicas=4, preset="tiny", kv_events=True) as fleet:
        fleet.urls              # ["http://127.0.0.1:PORT", ...]
        fleet.event_endpoints   # ["tcp://127.0.0.1:PORT", ...] (PUB), [] without kv_events
        fleet.replay_endpoints  # ["tcp://127.0.0.1:PORT", ...] (ROUTER)
        fleet.replicas[0]       # a Replica: .engine, .faults, await .set_faults(Faults(...))

Ports: `port=0` (the default) gives every replica an ephemeral port; `port=P` gives replica i port P+i.
Likewise `kv_events_port=Q` gives replica i the PUB port Q+i and the replay port Q+N+i; 0 ephemeral.
All replicas share one zmq.asyncio.Context; each has its own engine, registry and RNG seed (seed + i).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import TracebackType

import zmq.asyncio

from router.index.kv_events import Encoding
from workers.emulator.faults import Faults
from workers.emulator.replica import DEFAULT_MODEL, Replica, ReplicaConfig
from workers.engine import HashAlgo, Preset, get_preset


class EmulatedFleet:
    """N replicas started and stopped together. Use as an async context manager, or start()/stop()."""

    def __init__(
        self,
        replicas: int = 1,
        preset: str | Preset = "tiny",
        *,
        model: str = DEFAULT_MODEL,
        kv_events: bool = False,
        kv_events_encoding: Encoding = "map",
        kv_events_topic: str = "",
        hash_algo: HashAlgo = "mmh3",
        host: str = "127.0.0.1",
        port: int = 0,
        kv_events_port: int = 0,
        block_size: int | None = None,
        num_gpu_blocks: int | None = None,
        max_model_len: int | None = None,
        kv_bandwidth: float | None = None,
        faults: Faults | Mapping[int, Faults] | None = None,
        seed: int = 0,
    ) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        base = get_preset(preset) if isinstance(preset, str) else preset
        self.preset = replace(
            base,
            block_size=base.block_size if block_size is None else block_size,
            num_gpu_blocks=base.num_gpu_blocks if num_gpu_blocks is None else num_gpu_blocks,
            max_model_len=base.max_model_len if max_model_len is None else max_model_len,
        )
        self._configs: list[ReplicaConfig] = []
        for i in range(replicas):
            replica_faults = faults if isinstance(faults, Faults) else (faults or {}).get(i, Faults())
            self._configs.append(
                ReplicaConfig(
                    preset=self.preset,
                    model=model,
                    hash_algo=hash_algo,
                    host=host,
                    port=port + i if port else 0,
                    kv_events=kv_events,
                    kv_events_encoding=kv_events_encoding,
                    kv_events_topic=kv_events_topic,
                    events_port=kv_events_port + i if kv_events_port else 0,
                    replay_port=kv_events_port + replicas + i if kv_events_port else 0,
                    kv_bandwidth=kv_bandwidth,
                    faults=replica_faults,
                    seed=seed + i,
                )
            )
        self._ctx: zmq.asyncio.Context | None = None
        self.replicas: list[Replica] = []

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    @property
    def event_endpoints(self) -> list[str]:
        return [r.events_endpoint for r in self.replicas if r.events_endpoint is not None]

    @property
    def replay_endpoints(self) -> list[str]:
        return [r.replay_endpoint for r in self.replicas if r.replay_endpoint is not None]

    @property
    def model(self) -> str:
        return self._configs[0].model

    async def start(self) -> None:
        if self._configs[0].kv_events:
            self._ctx = zmq.asyncio.Context()
        try:
            for config in self._configs:
                replica = Replica(config, self._ctx)
                await replica.start()
                self.replicas.append(replica)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for replica in reversed(self.replicas):
            await replica.stop()
        self.replicas = []
        if self._ctx is not None:
            # destroy, not term: after a start that failed half-way a socket may still be open, and
            # term() would wait for it forever; linger 0 drops unsent events, as a stopped engine does.
            self._ctx.destroy(linger=0)
            self._ctx = None

    async def __aenter__(self) -> EmulatedFleet:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
