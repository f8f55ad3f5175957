"""The replica under test: an in-process emulated replica by default, or a real vLLM server.

Point the same tests at a running vLLM (see ../shared/design/vllm-interfaces.md for the CPU build):
    KVROUTER_CONFORMANCE_URL=http://127.0.0.1:8000      the server (required to switch)
    KVROUTER_CONFORMANCE_MODEL=NAME                      default: the first of /v1/models
    KVROUTER_CONFORMANCE_EVENTS=tcp://127.0.0.1:5557     its KV-event PUB endpoint (event tests skip without)
    KVROUTER_CONFORMANCE_REPLAY=tcp://127.0.0.1:5558     its replay endpoint (replay test skips without)
    KVROUTER_CONFORMANCE_TOPIC=kv                        its KV-event topic (default "")
The server must run with prefix caching and `--enable-prompt-tokens-details`. Tests use prompts made
unique per test (a random nonce first), so they do not depend on what the server cached before, and
read counters as deltas.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from router.index.kv_events import KVEventBatch, decode_batch, decode_seq
from workers.emulator import EmulatedFleet

ENV_URL = "KVROUTER_CONFORMANCE_URL"
_WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()
TIMEOUT = aiohttp.ClientTimeout(total=30)


@dataclass
class Target:
    """One replica to test, with the few wire helpers every test needs."""

    url: str
    model: str
    events_endpoint: str | None
    replay_endpoint: str | None
    topic: bytes
    session: aiohttp.ClientSession
    emulated: bool
    block_size: int = 0
    max_model_len: int = 0

    async def tokenize(self, text: str) -> list[int]:
        async with self.session.post(f"{self.url}/tokenize", json={"model": self.model, "prompt": text}) as r:
            assert r.status == 200, await r.text()
            tokens: list[int] = (await r.json())["tokens"]
            return tokens

    async def unique_prompt(self, num_tokens: int) -> list[int]:
        """Token ids of a prompt no earlier request shares a block with: a random nonce comes first."""
        rng = random.Random()
        words = [f"n{rng.getrandbits(64):x}"] + [rng.choice(_WORDS) for _ in range(num_tokens)]
        ids = await self.tokenize(" ".join(words))
        assert len(ids) >= num_tokens
        return ids[:num_tokens]

    async def complete(
        self, prompt: str | Sequence[int], max_tokens: int = 1, **extra: Any
    ) -> dict[str, Any]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, **extra}
        async with self.session.post(f"{self.url}/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            result: dict[str, Any] = await r.json()
            return result

    async def metrics(self) -> dict[str, float]:
        """This model's samples by name (labels other than finished_reason summed over)."""
        async with self.session.get(f"{self.url}/metrics") as r:
            assert r.status == 200
            text = await r.text()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.labels.get("model_name", self.model) != self.model:
                    continue
                key = s.name
                if "finished_reason" in s.labels:
                    key += "/" + s.labels["finished_reason"]
                out[key] = out.get(key, 0.0) + s.value
        return out

    async def cache_config(self) -> dict[str, str]:
        async with self.session.get(f"{self.url}/metrics") as r:
            text = await r.text()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "vllm:cache_config_info":
                    return dict(s.labels)
        raise AssertionError("no vllm:cache_config_info in /metrics")


class Subscriber:
    """A SUB socket on the replica's KV events, collecting (seq, raw payload, decoded batch)."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, topic: bytes) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.connect(endpoint)
        self.topic = topic
        self.received: list[tuple[int, bytes, KVEventBatch]] = []

    async def ready(self) -> None:
        # PUB drops messages until the subscription has reached it (ZMQ's "slow joiner"); on loopback
        # that takes milliseconds. vLLM's own answer to missed batches is the replay socket.
        await asyncio.sleep(0.3)

    async def receive_until(self, done: Any, timeout: float = 10.0) -> None:
        """Receive batches until `done(self.received)` is true; fail after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done(self.received):
            left = deadline - loop.time()
            assert left > 0, f"timed out waiting for KV events; got {len(self.received)} batches"
            if await self.sock.poll(timeout=int(left * 1000)):
                topic, seq, payload = await self.sock.recv_multipart()
                assert topic == self.topic
                self.received.append((decode_seq(seq), payload, decode_batch(payload)))

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    """The replica under test. Indirect parameter (emulator only): the KV-event encoding, map | array."""
    encoding = getattr(request, "param", "map")
    url = os.environ.get(ENV_URL)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        if url:
            if encoding != "map":
                pytest.skip("a real server speaks one encoding; the map run covers it")
            model = os.environ.get("KVROUTER_CONFORMANCE_MODEL")
            if not model:
                async with session.get(f"{url}/v1/models") as r:
                    model = (await r.json())["data"][0]["id"]
            t = Target(
                url.rstrip("/"),
                model,
                os.environ.get("KVROUTER_CONFORMANCE_EVENTS"),
                os.environ.get("KVROUTER_CONFORMANCE_REPLAY"),
                os.environ.get("KVROUTER_CONFORMANCE_TOPIC", "").encode(),
                session,
                emulated=False,
            )
            await _describe(t)
            yield t
            return
        async with EmulatedFleet(1, "tiny", kv_events=True, kv_events_encoding=encoding) as fleet:
            t = Target(
                fleet.urls[0],
                fleet.model,
                fleet.event_endpoints[0],
                fleet.replay_endpoints[0],
                b"",
                session,
                emulated=True,
            )
            await _describe(t)
            yield t


async def _describe(t: Target) -> None:
    t.block_size = int((await t.cache_config())["block_size"])
    async with t.session.get(f"{t.url}/v1/models") as r:
        t.max_model_len = int((await r.json())["data"][0]["max_model_len"])


@pytest.fixture
async def subscriber(target: Target) -> AsyncIterator[Subscriber]:
    if target.events_endpoint is None:
        pytest.skip(f"no KV-event endpoint (set {ENV_URL.replace('URL', 'EVENTS')})")
    ctx = zmq.asyncio.Context()
    sub = Subscriber(ctx, target.events_endpoint, target.topic)
    await sub.ready()
    try:
        yield sub
    finally:
        sub.close()
        ctx.term()
