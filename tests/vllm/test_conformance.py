"""The emulator's conformance suite (tests/conformance), run against a real vLLM replica.

The suite switches from the emulator to a real server with KVROUTER_CONFORMANCE_* (its conftest); it
runs in a child pytest so that it keeps its own fixtures and its own verdict.
"""

from __future__ import annotations

import os
import subprocess
import sys

from vllm_tier import MODEL_NAME

from workers.vllm.launch import VLLMFleet


def test_conformance_suite_passes_against_real_vllm(vllm_fleet: VLLMFleet) -> None:
    spec = vllm_fleet.specs[0]
    assert spec.events_endpoint and spec.replay_endpoint
    env = {
        **os.environ,
        "KVROUTER_CONFORMANCE_URL": spec.url,
        "KVROUTER_CONFORMANCE_MODEL": MODEL_NAME,
        "KVROUTER_CONFORMANCE_EVENTS": spec.events_endpoint,
        "KVROUTER_CONFORMANCE_REPLAY": spec.replay_endpoint,
        "KVROUTER_CONFORMANCE_TOPIC": spec.topic,
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/conformance", "-rs", "-p", "no:cacheprovider"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
    assert result.returncode == 0, tail
    # Every test ran against the real server: only the emulator-only parametrisations may skip.
    assert " passed" in tail and " failed" not in tail, tail
