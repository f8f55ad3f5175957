"""`kvrouter emulate` as a subprocess: consecutive ports, answers on them, exits 0 on SIGTERM; and
`kvrouter bench emulator` end to end (a short run)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

KVROUTER = [sys.executable, "-m", "router.cli"]


def free_port_range(n: int) -> int:
    """A base port with the n ports from it free now (re-checked by the caller's bind)."""
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(20000, 60000 - n)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


async def start(*args: str) -> tuple[asyncio.subprocess.Process, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        *KVROUTER, "emulate", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    lines: list[str] = []
    while not (lines and lines[-1].startswith("ready")):
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line:
            assert proc.stderr is not None
            pytest.fail(f"emulate exited: {(await proc.stderr.read()).decode()}")
        lines.append(line.decode().strip())
    return proc, lines


async def test_emulate_serves_consecutive_ports_and_stops_on_sigterm() -> None:
    base = free_port_range(6)
    http, events = base, base + 2
    proc, lines = await start(
        "--replicas",
        "2",
        "--port",
        str(http),
        "--profile",
        "tiny",
        "--kv-events",
        "--kv-events-port",
        str(events),
    )
    try:
        assert lines[0] == (
            f"replica 0 http://127.0.0.1:{http} "
            f"events tcp://127.0.0.1:{events} replay tcp://127.0.0.1:{events + 2}"
        )
        assert lines[1].startswith(
            f"replica 1 http://127.0.0.1:{http + 1} events tcp://127.0.0.1:{events + 1}"
        )
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for port in (http, http + 1):
                async with session.get(f"http://127.0.0.1:{port}/health") as r:
                    assert r.status == 200
                body = {"prompt": "hello from the test", "max_tokens": 3}
                async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                    assert (await r.json())["usage"]["completion_tokens"] == 3
            async with session.get(f"http://127.0.0.1:{http}/kv_event_sources") as r:
                assert (await r.json())["0"]["endpoint"] == f"tcp://127.0.0.1:{events}"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_emulate_refuses_bad_faults_and_busy_ports() -> None:
    bad = subprocess.run(
        [*KVROUTER, "emulate", "--fault", "bogus=1"], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 2 and "unknown fault" in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run(
            [*KVROUTER, "emulate", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert busy.returncode == 1 and "kvrouter emulate" in busy.stderr


async def test_emulate_applies_fault_flags() -> None:
    proc, lines = await start("--replicas", "2", "--port", "0", "--fault", "1:crash=1")
    try:
        urls = [line.split()[2] for line in lines if line.startswith("replica ")]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            statuses = []
            for url in urls:
                async with session.get(f"{url}/health") as r:
                    statuses.append(r.status)
        assert statuses == [200, 503]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0


def test_bench_emulator_short_run(tmp_path: Path) -> None:
    out = tmp_path / "emulator.json"
    args = [
        "bench",
        "emulator",
        "--replicas",
        "2",
        "--concurrency",
        "4",
        "--duration",
        "1",
        "--json",
        str(out),
    ]
    result = subprocess.run([*KVROUTER, *args], capture_output=True, text=True, timeout=90, check=False)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["replicas"] == 2 and data["errors"] == 0 and data["requests_per_s"] > 0
    assert "requests_per_s" in result.stdout
