"""An emulated vLLM replica (and fleets of them in one process) that behaves like vLLM on the wire.

The engine is `workers.engine.Engine`, the same pure model the simulator runs; this package is only
its live I/O shell:
- `fleet.EmulatedFleet`: N replicas in one process (the Python API; `kvrouter emulate` wraps it).
- `replica`: one replica's engine, driver, KV-event sockets and HTTP listener, and its config.
- `driver`: the asyncio task stepping the engine in real time, outputs to per-request queues.
- `server` + `protocol`: vLLM's OpenAI API, /metrics, /tokenize...; the pure request/response shapes.
- `metrics`: vLLM's Prometheus names on a per-replica registry.
- `kv_publisher`: vLLM's ZMQ KV-event PUB socket and replay ROUTER socket.
- `p2p`: KV export/import between replicas and the `transfer_prefix` helper.
- `faults`: injected latency, errors, hangs, refused connections and crashes.
- `cli`, `bench`: `kvrouter emulate` and `kvrouter bench emulator`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.emulator.faults import Faults
    from workers.emulator.fleet import EmulatedFleet
    from workers.emulator.p2p import TransferResult, transfer_prefix
    from workers.emulator.replica import DEFAULT_MODEL, Replica, ReplicaConfig

# Exports load lazily, so `kvrouter --help` (which registers `emulate` from this package) does not
# import aiohttp, pyzmq and prometheus_client.
_EXPORTS = {
    "DEFAULT_MODEL": "replica",
    "EmulatedFleet": "fleet",
    "Faults": "faults",
    "Replica": "replica",
    "ReplicaConfig": "replica",
    "TransferResult": "p2p",
    "transfer_prefix": "p2p",
}
__all__ = [
    "DEFAULT_MODEL",
    "EmulatedFleet",
    "Faults",
    "Replica",
    "ReplicaConfig",
    "TransferResult",
    "transfer_prefix",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'workers.emulator' has no attribute {name!r}")
    return getattr(importlib.import_module(f"workers.emulator.{module}"), name)
