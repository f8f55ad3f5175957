"""Fixtures of the integration tests: fake upstreams, routers in-process, an HTTP client.

The fake upstream lives in fake_upstream.py (a fake, not vLLM and not the emulator).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from fake_upstream import TEST_DEFAULTS, FakeFactory, FakeReplica, RouterFactory, backend_of

from router.config import BackendConfig, RouterConfig
from router.server import RouterServer


@pytest.fixture
async def fakes() -> AsyncIterator[FakeFactory]:
    """`await fakes("a", models=("m",), ...)`: a started FakeReplica, stopped after the test."""
    started: list[FakeReplica] = []

    async def make(name: str, **knobs: Any) -> FakeReplica:
        fake = await FakeReplica(name, **knobs).start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        if fake.gate is not None:
            fake.gate.set()
        await fake.stop()


@pytest.fixture
async def routers() -> AsyncIterator[RouterFactory]:
    """`await routers(fake_a, ("name", "http://..."), BackendConfig(...), policy="round_robin", ...)`: a
    started RouterServer."""
    started: list[RouterServer] = []

    async def make(*targets: FakeReplica | tuple[str, str] | BackendConfig, **overrides: Any) -> RouterServer:
        config = RouterConfig(
            backends=tuple(backend_of(t) for t in targets), **{**TEST_DEFAULTS, **overrides}
        )
        server = await RouterServer(config).start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session
