"""The pure engine model of one vLLM replica, shared by the live emulator and the simulator.

- `model.Engine`: continuous batching with chunked prefill and recompute preemption (the driver API).
- `kv_cache.BlockPool`: the paged prefix cache with LRU eviction and KV events.
- `hashing.BlockHasher`: chained block hashes (fast mmh3, or vLLM's exact sha256).
- `presets`: named, sourced replica shapes and step-time models.
- `tokenizer`: a deterministic 4-characters-a-token tokenizer and ChatML rendering.
"""

from router.index.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from workers.engine.hashing import BlockHasher, HashAlgo
from workers.engine.kv_cache import BlockPool
from workers.engine.model import Engine
from workers.engine.outputs import EngineMetrics, FinishedRequest, FirstToken, StepResult
from workers.engine.presets import PRESETS, Preset, get_preset

__all__ = [
    "PRESETS",
    "AllBlocksCleared",
    "BlockHasher",
    "BlockPool",
    "BlockRemoved",
    "BlockStored",
    "Engine",
    "EngineMetrics",
    "FinishedRequest",
    "FirstToken",
    "HashAlgo",
    "KVEvent",
    "Preset",
    "StepResult",
    "get_preset",
]
