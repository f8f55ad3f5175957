"""KV-cache events of one emulated replica on ZMQ, published exactly as vLLM's ZmqEventPublisher does.

Wire (vllm-interfaces.md; payloads from `router.index.kv_events`, the one codec):
- PUB socket, one message per batch of 3 frames: topic bytes, seq as 8-byte big-endian (from 0 per
  publisher, +1 a batch), msgpack `[ts, events, data_parallel_rank]`. `encoding="map"` is vLLM 0.26+,
  `"array"` 0.11–0.24. PUB drops past `hwm` (100000) with no error, as vLLM's does.
- ROUTER replay socket: a DEALER sends `[b"", start_seq(8 bytes)]`; every buffered batch with
  seq >= start_seq comes back, then an end marker. 0.26+ ("map"): `[b"", topic, seq8, payload]` and
  `[b"", b"", encode_seq(-1), b""]`; up to 0.24 ("array"): `[b"", seq8, payload]` and
  `[b"", encode_seq(-1), b""]`. Malformed requests are ignored, as vLLM ignores them.
- The replay buffer keeps the last `buffer_steps` (10000) batches.
- Endpoints are bound (vLLM binds endpoints containing `*`): `tcp://127.0.0.1:PORT`, or port `*` for an
  ephemeral one; `endpoint`/`replay_endpoint` then name the address actually bound.
- `reset()` is a restart: the sequence starts again at 0 and the buffer empties (the gap a router's
  subscriber must treat as a resync).
- `drop_next(n)` (the `drop_events` fault): the next n batches are numbered and buffered for replay
  but not sent on the PUB socket, as a PUB past its high-water mark drops them; subscribers see a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.asyncio

from router.index.kv_events import REPLAY_END_SEQ, Encoding, KVEvent, encode_batch, encode_seq

logger = logging.getLogger(__name__)

DEFAULT_BUFFER_STEPS = 10_000  # vLLM KVEventsConfig.buffer_steps
DEFAULT_HWM = 100_000  # vLLM KVEventsConfig.hwm
DEFAULT_MAX_QUEUE_SIZE = 100_000  # vLLM KVEventsConfig.max_queue_size (reported; nothing queues here)
_END = encode_seq(REPLAY_END_SEQ)


class KVEventPublisher:
    """A replica's PUB socket and replay ROUTER socket on a shared zmq.asyncio.Context."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        *,
        endpoint: str,
        replay_endpoint: str | None,
        topic: str = "",
        encoding: Encoding = "map",
        buffer_steps: int = DEFAULT_BUFFER_STEPS,
        hwm: int = DEFAULT_HWM,
    ) -> None:
        self._ctx = ctx
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self._topic = topic.encode()
        self.encoding: Encoding = encoding
        self.buffer_steps = buffer_steps
        self.hwm = hwm
        self._seq = 0
        self._drops = 0  # batches still to drop (drop_next)
        self.dropped = 0  # batches dropped so far, for tests
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._pub: zmq.asyncio.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None

    @property
    def next_seq(self) -> int:
        return self._seq

    def start(self) -> None:
        """Bind both sockets. A taken address is an OSError, as for the HTTP listener, and leaves no
        socket open."""
        pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, self.hwm)
        pub.setsockopt(zmq.LINGER, 0)
        self._pub = pub
        _bind(pub, self.endpoint)
        self.endpoint = _last_endpoint(pub)
        if self.replay_endpoint is not None:
            replay = self._ctx.socket(zmq.ROUTER)
            replay.setsockopt(zmq.LINGER, 0)
            self._replay = replay
            _bind(replay, self.replay_endpoint)
            self.replay_endpoint = _last_endpoint(replay)
            self._replay_task = asyncio.create_task(self._serve_replay(replay), name="kv-replay")

    async def close(self) -> None:
        """Close the sockets (also after a `start` that failed half-way)."""
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._replay = None

    def reset(self) -> None:
        self._seq = 0
        self._buffer.clear()

    def drop_next(self, n: int) -> None:
        """Do not send the next `n` batches on the PUB socket (they still get a seq and a replay slot)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self._drops += n

    async def publish(self, events: Sequence[KVEvent]) -> None:
        """Publish one batch (one engine step's events) and keep it for replay."""
        payload = encode_batch(events, time.time(), data_parallel_rank=0, encoding=self.encoding)
        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))
        if self._drops:
            self._drops -= 1
            self.dropped += 1
            return
        if self._pub is not None:
            await self._pub.send_multipart((self._topic, encode_seq(seq), payload))

    def config(self) -> dict[str, Any]:
        """vLLM's KVEventsConfig fields, as `GET /kv_event_sources` reports them for dp rank 0."""
        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": self.endpoint,
            "replay_endpoint": self.replay_endpoint,
            "buffer_steps": self.buffer_steps,
            "hwm": self.hwm,
            "max_queue_size": DEFAULT_MAX_QUEUE_SIZE,
            "topic": self.topic,
        }

    async def _serve_replay(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                logger.warning("ignoring a malformed replay request of %d frames", len(frames))
                continue
            identity, start = frames[0], int.from_bytes(frames[2], "big")
            for seq, payload in list(self._buffer):  # a copy: publishing may append meanwhile
                if seq >= start:
                    if self.encoding == "map":
                        await sock.send_multipart((identity, b"", self._topic, encode_seq(seq), payload))
                    else:
                        await sock.send_multipart((identity, b"", encode_seq(seq), payload))
            if self.encoding == "map":
                await sock.send_multipart((identity, b"", b"", _END, b""))
            else:
                await sock.send_multipart((identity, b"", _END, b""))


def _last_endpoint(sock: zmq.asyncio.Socket) -> str:
    value = sock.getsockopt(zmq.LAST_ENDPOINT)
    return value.decode() if isinstance(value, bytes) else str(value)


def _bind(sock: zmq.asyncio.Socket, endpoint: str) -> None:
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise OSError(exc.errno, f"cannot bind {endpoint}: {exc.strerror}") from None
