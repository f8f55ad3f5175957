"""`kvrouter bench emulator`: requests a second that ONE `kvrouter emulate` process sustains.

The emulator runs as its own process (`--replicas` replicas of the `--profile` preset, default 16 x
`instant`, whose steps take no time, so the figure is the HTTP + driver + engine bookkeeping cost); this
process drives it with `--concurrency` closed-loop aiohttp clients (default 64) spread round robin over the
replicas: short text prompts (about 16 tokens, a few distinct), `max_tokens` uniform in 1..16,
non-streaming. After a 1 s warm-up it counts for `--duration` seconds (default 10).

Printed: requests/s, generated tokens/s, latency p50/p99, errors, the CPU each process used in the
window (a share of one core), and the emulator's CPU per request with its inverse, requests per
emulator CPU-second. The machine has 2 cores: an emulator near 100% is the bottleneck measured; a load
generator near 100%, or other work on the machine, means requests/s understates the emulator, while the
per-CPU-second figure stays comparable across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from workers.engine import PRESETS

_WARMUP_S = 1.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "emulator",
        help="requests/s one emulator process sustains (16 instant replicas, 64 clients)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--replicas", type=int, default=16, help="replicas in the emulator (default 16)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    parser.add_argument(
        "--profile", default="instant", choices=sorted(PRESETS), help="preset (default instant)"
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens drawn from 1..N (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this path")
    parser.set_defaults(func=run)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime: fields 14 and 15 of stat


def _start_emulator(args: argparse.Namespace) -> tuple[subprocess.Popen[str], list[str]]:
    cmd = [sys.executable, "-m", "router.cli", "emulate", "--replicas", str(args.replicas), "--port", "0"]
    cmd += ["--profile", args.profile]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    urls: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the emulator prints one line per replica, then "ready"
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("replica "):
            urls.append(line.split()[2])
        if line.startswith("ready"):
            return proc, urls
    proc.kill()
    raise RuntimeError("the emulator did not become ready within 60 s")


async def _load(urls: list[str], args: argparse.Namespace, pid: int) -> dict[str, Any]:
    import aiohttp

    rng = random.Random(args.seed)
    prompts = [f"benchmark prompt number {i:02d}, short: about sixteen tokens long." for i in range(8)]
    latencies: list[float] = []
    counters = {"requests": 0, "errors": 0, "tokens": 0, "next": 0}
    loop = asyncio.get_running_loop()
    measuring = False
    stop_at = loop.time() + _WARMUP_S + args.duration

    async def client(session: aiohttp.ClientSession) -> None:
        while loop.time() < stop_at:
            counters["next"] += 1
            url = urls[counters["next"] % len(urls)]
            body = {"prompt": rng.choice(prompts), "max_tokens": rng.randint(1, args.max_tokens)}
            start = loop.time()
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                result = await resp.json()
            if not measuring:
                continue
            if resp.status != 200:
                counters["errors"] += 1
                continue
            latencies.append(loop.time() - start)
            counters["requests"] += 1
            counters["tokens"] += result["usage"]["completion_tokens"]

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(args.concurrency)]
        await asyncio.sleep(_WARMUP_S)
        measuring = True
        cpu_emulator, cpu_client, t0 = _cpu_seconds(pid), time.process_time(), loop.time()
        await asyncio.gather(*tasks)
        elapsed = loop.time() - t0
        cpu_emulator, cpu_client = _cpu_seconds(pid) - cpu_emulator, time.process_time() - cpu_client
    latencies.sort()
    n = len(latencies)
    return {
        "replicas": len(urls),
        "profile": args.profile,
        "concurrency": args.concurrency,
        "duration_s": round(elapsed, 3),
        "requests": counters["requests"],
        "errors": counters["errors"],
        "requests_per_s": round(counters["requests"] / elapsed, 1),
        "generated_tokens_per_s": round(counters["tokens"] / elapsed, 1),
        "latency_ms_p50": round(statistics.median(latencies) * 1000, 2) if n else None,
        "latency_ms_p99": round(latencies[min(n - 1, int(n * 0.99))] * 1000, 2) if n else None,
        "emulator_cpu_share": round(cpu_emulator / elapsed, 2),
        "load_generator_cpu_share": round(cpu_client / elapsed, 2),
        "emulator_cpu_us_per_request": round(cpu_emulator / max(1, counters["requests"]) * 1e6, 1),
        # What one fully busy core would serve at this CPU cost: the figure least moved by other load.
        "requests_per_emulator_cpu_s": round(counters["requests"] / cpu_emulator, 1)
        if cpu_emulator
        else None,
    }


def run(args: argparse.Namespace) -> int:
    if min(args.replicas, args.concurrency, args.max_tokens) < 1 or args.duration <= 0:
        print("--replicas, --concurrency, --max-tokens and --duration must be positive")
        return 2
    import uvloop

    proc, urls = _start_emulator(args)
    try:
        results = uvloop.run(_load(urls, args, proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    for key, value in results.items():
        print(f"{key:>26}: {value}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if results["requests"] > 0 and results["errors"] == 0 else 1
