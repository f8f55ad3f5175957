"""`kvrouter bench proxy` end to end (a short run, the Python load generator forced), and the bare
forwarder it measures against: it must pass a stream through as it arrives, not buffer it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer
from fake_upstream import FakeFactory

from load.bare_forwarder import build_app

KVROUTER = [sys.executable, "-m", "router.cli"]


def test_bench_proxy_short_run(tmp_path: Path) -> None:
    out = tmp_path / "proxy.json"
    args = ["bench", "proxy", "--duration", "1", "--connections", "4", "--latency-duration", "0.5"]
    args += ["--load-generator", "python", "--json", str(out)]
    run = subprocess.run(KVROUTER + args, capture_output=True, text=True, timeout=90, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "throughput_ratio" in run.stdout  # the table
    results = json.loads(out.read_text())
    assert results["load_generator"].startswith("python")
    assert set(results["targets"]) == {"direct", "bare", "kvrouter"}
    for name, row in results["targets"].items():
        assert "error" not in row, (name, row)
        for mode in ("non_streaming", "streaming"):
            for phase in ("throughput", "latency"):
                figures = row[mode][phase]
                assert figures["requests"] > 0 and figures["errors"] == 0, (name, mode, phase, figures)
                assert figures["requests_per_s"] > 0
                assert 0 < figures["latency_ms_p50"] <= figures["latency_ms_p99"]
    headline = results["headline"]
    for key in ("throughput_ratio", "added_latency_p50_ms", "added_latency_p99_ms"):
        assert isinstance(headline[key], float), key
    assert "peer_throughput_ratio" not in headline  # no --peers
    goals = results["goals"]
    assert set(goals) == {"throughput_ratio", "added_latency_p50_ms"}
    assert all(isinstance(goal["met"], bool) for goal in goals.values())


async def test_bare_forwarder_streams_without_buffering(fakes: FakeFactory) -> None:
    gate = asyncio.Event()
    upstream = await fakes("a", gate=gate)  # sends one chunk, then waits for the gate
    forwarder = TestServer(build_app([upstream.url]), host="127.0.0.1")
    await forwarder.start_server()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            body = {"model": "fake-model", "prompt": "hello", "max_tokens": 3, "stream": True}
            async with session.post(forwarder.make_url("/v1/completions"), json=body) as resp:
                assert resp.status == 200
                assert resp.content_type == "text/event-stream"
                # The first chunk arrives while the upstream is still holding the rest back.
                first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=5)
                assert first.startswith(b"data: ") and b"tok0" in first
                gate.set()
                rest = await resp.read()
            assert rest.rstrip().endswith(b"data: [DONE]")
            body["stream"] = False
            async with session.post(forwarder.make_url("/v1/completions"), json=body) as resp:
                assert resp.status == 200
                assert (await resp.json())["choices"]
    finally:
        await forwarder.close()
