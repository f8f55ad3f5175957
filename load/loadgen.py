"""The load generators of `kvrouter bench proxy`: wrk (preferred) and a multi-process aiohttp fallback.

Both run closed-loop connections against one URL for a number of seconds, cycling through a list of
request bodies, and return the same figures: requests, errors (connection errors, timeouts and any
non-2xx answer), requests_per_s and latency p50/p99 in milliseconds (a stream counts until its end).
wrk comes from `apt-get install wrk`; its durations are whole seconds.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# wrk: one pre-formatted request per body (read from the file named after `--`), sent in turn;
# `done` prints one JSON line that run_wrk parses. Latencies are in microseconds.
WRK_SCRIPT = """\
local requests, n, i = {}, 0, 0
function init(args)
  for line in io.lines(args[1]) do
    n = n + 1
    requests[n] = wrk.format("POST", nil, {["Content-Type"] = "application/json"}, line)
  end
end
function request()
  i = i % n + 1
  return requests[i]
end
function done(summary, latency, requests_)
  local e = summary.errors
  io.write(string.format('BENCH {"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(url: str, bodies_file: Path, script: Path, connections: int, seconds: float) -> dict[str, Any]:
    duration = max(1, round(seconds))  # wrk takes whole seconds
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "-s", str(script)]
    cmd += [url + "/v1/completions", "--", str(bodies_file)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()[-300:]}")
    raw = json.loads(line[len("BENCH ") :])
    elapsed = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "errors": raw["errors"],
        "requests_per_s": raw["requests"] / elapsed if elapsed else 0.0,
        "latency_ms_p50": raw["p50_us"] / 1000.0,
        "latency_ms_p99": raw["p99_us"] / 1000.0,
    }


def _python_worker(url: str, bodies: list[bytes], connections: int, seconds: float) -> dict[str, Any]:
    """One load process: `connections` closed-loop aiohttp clients for `seconds` (runs in a child)."""
    import asyncio

    import aiohttp
    import uvloop

    async def load() -> dict[str, Any]:
        latencies: list[float] = []
        errors = 0
        clock = time.perf_counter  # not loop.time(): uvloop's clock ticks in whole milliseconds
        stop_at = clock() + seconds
        timeout = aiohttp.ClientTimeout(total=10)
        headers = {"Content-Type": "application/json"}

        async def client(session: aiohttp.ClientSession, offset: int) -> None:
            nonlocal errors
            i = offset
            while clock() < stop_at:
                i += 1
                start = clock()
                try:
                    async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as resp:
                        async for _ in resp.content.iter_any():
                            pass
                        ok = resp.status == 200
                except (aiohttp.ClientError, OSError, TimeoutError):
                    ok = False
                    await asyncio.sleep(0.01)
                if ok:
                    latencies.append(clock() - start)
                else:
                    errors += 1

        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            start = clock()
            await asyncio.gather(*(client(session, k) for k in range(connections)))
            elapsed = clock() - start
        return {"latencies": latencies, "errors": errors, "elapsed": elapsed}

    return uvloop.run(load())


def run_python(url: str, bodies: list[bytes], connections: int, seconds: float) -> dict[str, Any]:
    """The fallback load generator: up to 2 processes (this machine's cores) sharing the connections."""
    procs = min(2, connections)
    shares = [connections // procs + (1 if k < connections % procs else 0) for k in range(procs)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(procs) as pool:
        jobs = [(url + "/v1/completions", bodies, share, seconds) for share in shares]
        parts = pool.starmap_async(_python_worker, jobs).get(timeout=seconds + 60)
    latencies = sorted(x for part in parts for x in part["latencies"])
    elapsed = max(part["elapsed"] for part in parts)
    n = len(latencies)
    return {
        "requests": n,
        "errors": sum(part["errors"] for part in parts),
        "requests_per_s": n / elapsed if elapsed else 0.0,
        "latency_ms_p50": statistics.median(latencies) * 1000 if n else None,
        "latency_ms_p99": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else None,
    }


@dataclass
class Load:
    """How each phase's load is generated, and the request bodies of both modes."""

    generator: str  # "wrk" | "python"
    bodies: dict[str, list[bytes]]
    files: dict[str, Path]
    script: Path

    def run(self, url: str, mode: str, connections: int, seconds: float) -> dict[str, Any]:
        if self.generator == "wrk":
            return run_wrk(url, self.files[mode], self.script, connections, seconds)
        return run_python(url, self.bodies[mode], connections, seconds)
