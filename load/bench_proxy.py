"""`kvrouter bench proxy`: what kvrouter costs as a proxy, side by side with a bare forwarder and a peer.

In one run, the same load goes to each target in turn, all in front of the SAME emulated replicas
(`kvrouter emulate --profile instant --replicas 4`, its own process; the instant preset's steps take
no time, so what is measured is HTTP, parsing, routing and bookkeeping):
    direct      replica 0 itself: the baseline that added latency is measured from
    bare        load/bare_forwarder.py, the simplest possible aiohttp forwarder (round robin)
    kvrouter    `kvrouter serve --policy kvaware` (uvloop)
  with --peers (binaries from `make peers`, in .venv-peers/bin or --peers-venv):
    smg         the SGLang model gateway, `smg launch --policy cache_aware`
    vllm-router vLLM's router, `vllm-router --policy cache_aware`
Each proxy is its own process. The load: /v1/completions with 16 distinct prompts of about 8 KB
(`--prompt-bytes`), `max_tokens` 8, first non-streaming, then streaming. For each mode and target:
a throughput phase (`--connections` closed-loop connections for `--duration` seconds) and a latency
phase (1 connection for `--latency-duration` seconds, so that added latency is the per-request
overhead, not queueing). Targets run in the same order within each phase, back to back, so slow
drift on the shared machine touches them alike; `--rounds R` repeats everything and reports medians.

The load generator is wrk (`apt-get install wrk`; a Lua script sends the POST bodies), the tool the
issue's reference figures came from. Without wrk on PATH (or with `--load-generator python`) a small
multi-process aiohttp client stands in, and the output says so (`load_generator` in the JSON).

Headline figures and goals:
    throughput_ratio        kvrouter / bare requests/s, non-streaming      goal >= 0.7
    added_latency_p50_ms    kvrouter p50 - direct p50, latency phase       goal <= 0.5
    added_latency_p99_ms    kvrouter p99 - direct p99, latency phase
    peer_throughput_ratio   kvrouter / smg requests/s (with --peers)       goal >= 0.5
    peer_added_latency_*    smg's own added latency (with --peers)
    cpu_ratio               bare / kvrouter CPU per request: the throughput ratio if each proxy
                            had a core of its own (peer_cpu_ratio: smg / kvrouter)
Per target and phase the JSON also has the proxy's CPU per request (`cpu_us_per_request`, from
/proc): on 2 shared cores the load generator, the emulator and the proxy compete, and CPU per request
is the figure least moved by that. A target that cannot run (not installed, crashed, refused the
request) keeps its row, with the reason.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from load.loadgen import WRK_SCRIPT, Load
from load.peers import (
    READY_TIMEOUT_S,
    Target,
    add_peer_arguments,
    check_answers,
    cpu_seconds,
    kvrouter_target,
    last_line,
    peer_target,
    start_target,
    stop,
)
from workers.ports import free_port

GOALS: dict[str, tuple[str, float]] = {
    "throughput_ratio": (">=", 0.7),
    "added_latency_p50_ms": ("<=", 0.5),
    "peer_throughput_ratio": (">=", 0.5),
}
MODES = ("non_streaming", "streaming")
MODEL = "kvrouter-emulated"  # the emulator's default served model name
PROMPTS = 16


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "proxy",
        help="kvrouter as a proxy vs a bare aiohttp forwarder, direct, and (--peers) smg: req/s, latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON to this path")
    add_peer_arguments(parser, "smg and vllm-router")
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds of each throughput phase (default 10)"
    )
    parser.add_argument(
        "--latency-duration",
        type=float,
        help="seconds of each 1-connection latency phase (default 3, or --duration if shorter)",
    )
    parser.add_argument(
        "--connections", type=int, default=64, help="connections in the throughput phase (default 64)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat every phase R times; medians (default 1)"
    )
    parser.add_argument("--replicas", type=int, default=4, help="emulated replicas (default 4)")
    parser.add_argument("--prompt-bytes", type=int, default=8192, help="prompt length (default 8192)")
    parser.add_argument("--max-tokens", type=int, default=8, help="max_tokens of each request (default 8)")
    parser.add_argument(
        "--load-generator",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="auto: wrk when on PATH (apt-get install wrk), else the Python client (default auto)",
    )
    parser.set_defaults(func=run)


# ---------------------------------------------------------------- processes


def start_emulator(replicas: int, log: Path) -> tuple[subprocess.Popen[bytes], list[str]]:
    """`kvrouter emulate --profile instant` on ephemeral ports; its replica URLs once it is ready."""
    cmd = [sys.executable, "-m", "router.cli", "emulate", "--replicas", str(replicas), "--port", "0"]
    cmd += ["--profile", "instant", "--model", MODEL]
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer = b""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:  # one line per replica, then "ready"
        readable, _, _ = select.select([fd], [], [], 0.5)
        if readable:
            data = os.read(fd, 65536)
            if not data:
                break
            buffer += data
            lines = buffer.decode(errors="replace").splitlines()
            if any(line.startswith("ready") for line in lines):
                return proc, [line.split()[2] for line in lines if line.startswith("replica ")]
        elif proc.poll() is not None:
            break
    stop(proc)
    raise RuntimeError(f"the emulator did not become ready: {last_line(log) or 'no output'}")


def proxy_targets(urls: list[str], peers: bool, peers_venv: Path) -> list[Target]:
    """The targets and the commands that start them (ports chosen now, free on loopback)."""
    backends = [arg for url in urls for arg in ("--backend", url)]
    targets = [Target("direct", f"replica 0 of {len(urls)} (no proxy)", url=urls[0])]
    port = free_port()
    targets.append(
        Target(
            "bare",
            "bare aiohttp forwarder (load/bare_forwarder.py)",
            url=f"http://127.0.0.1:{port}",
            command=[sys.executable, "-m", "load.bare_forwarder", "--port", str(port), *backends],
        )
    )
    targets.append(kvrouter_target("kvrouter", "kvaware", urls))
    if peers:
        bin_dir = peers_venv / "bin"
        targets.append(peer_target("smg", "smg:cache_aware", urls, bin_dir))
        targets.append(peer_target("vllm-router", "vllm-router:cache_aware", urls, bin_dir))
    return targets


# ---------------------------------------------------------------- the run


def make_bodies(prompt_bytes: int, max_tokens: int) -> dict[str, list[bytes]]:
    from load.workloads.text import text_from

    prompts = [text_from(f"bench-proxy-{i}", prompt_bytes) for i in range(PROMPTS)]
    return {
        mode: [
            json.dumps(
                {"model": MODEL, "prompt": p, "max_tokens": max_tokens, "stream": mode == "streaming"}
            ).encode()
            for p in prompts
        ]
        for mode in MODES
    }


def measure(targets: list[Target], load: Load, args: argparse.Namespace, emulator_pid: int) -> None:
    """Every phase of every mode, targets back to back in the same order; samples kept per round."""
    latency_s = args.latency_duration if args.latency_duration is not None else min(3.0, args.duration)
    for target in targets:  # warm-up: opens the proxies' upstream pools at full concurrency
        if target.failure is None:
            try:
                load.run(target.url, "non_streaming", args.connections, min(1.0, args.duration / 2))
            except (RuntimeError, subprocess.TimeoutExpired, multiprocessing.TimeoutError) as exc:
                target.failure = f"warm-up failed: {exc}"
    for round_ in range(args.rounds):
        for mode in MODES:
            for phase, connections, seconds in (
                ("throughput", args.connections, args.duration),
                ("latency", 1, latency_s),
            ):
                for target in targets:
                    if target.failure is not None or mode in target.mode_failures:
                        continue
                    pids = [emulator_pid] + ([target.proc.pid] if target.proc is not None else [])
                    before = [cpu_seconds(pid) for pid in pids]
                    try:
                        sample = load.run(target.url, mode, connections, seconds)
                    except (RuntimeError, subprocess.TimeoutExpired, multiprocessing.TimeoutError) as exc:
                        target.mode_failures[mode] = f"load failed: {exc}"
                        continue
                    n = sample["requests"]
                    used = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
                    sample["emulator_cpu_us_per_request"] = used[0] / n * 1e6 if n else None
                    sample["cpu_us_per_request"] = used[1] / n * 1e6 if n and len(used) > 1 else None
                    target.samples.setdefault(mode, {}).setdefault(phase, []).append(sample)
                    if target.proc is not None and target.proc.poll() is not None:
                        target.failure = (
                            f"exited with code {target.proc.returncode} during the run: "
                            f"{last_line(target.log)}"
                        )
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)


def _median(samples: list[dict[str, Any]], key: str) -> float | None:
    values = [s[key] for s in samples if s.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def summarize(target: Target) -> dict[str, Any]:
    row: dict[str, Any] = {"what": target.what, "url": target.url, "command": target.command or None}
    if target.failure is not None:
        row["error"] = target.failure
    for mode in MODES:
        if mode in target.mode_failures:
            row[mode] = {"error": target.mode_failures[mode]}
            continue
        phases = target.samples.get(mode, {})
        row[mode] = {
            phase: {
                "requests_per_s": _median(samples, "requests_per_s"),
                "latency_ms_p50": _median(samples, "latency_ms_p50"),
                "latency_ms_p99": _median(samples, "latency_ms_p99"),
                "errors": sum(s["errors"] for s in samples),
                "requests": sum(s["requests"] for s in samples),
                "cpu_us_per_request": _median(samples, "cpu_us_per_request"),
                "emulator_cpu_us_per_request": _median(samples, "emulator_cpu_us_per_request"),
            }
            for phase, samples in phases.items()
        }
    return row


def _figure(rows: dict[str, Any], name: str, mode: str, phase: str, key: str) -> float | None:
    value = rows.get(name, {}).get(mode, {}).get(phase, {}).get(key)
    return value if isinstance(value, int | float) else None


def headline(rows: dict[str, Any], peers: bool) -> dict[str, Any]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    def added(name: str, key: str) -> float | None:
        proxy = _figure(rows, name, "non_streaming", "latency", key)
        direct = _figure(rows, "direct", "non_streaming", "latency", key)
        return round(proxy - direct, 3) if proxy is not None and direct is not None else None

    def rps(name: str, mode: str = "non_streaming") -> float | None:
        return _figure(rows, name, mode, "throughput", "requests_per_s")

    def cpu(name: str) -> float | None:
        return _figure(rows, name, "non_streaming", "throughput", "cpu_us_per_request")

    out: dict[str, Any] = {
        "throughput_ratio": ratio(rps("kvrouter"), rps("bare")),
        "throughput_ratio_streaming": ratio(rps("kvrouter", "streaming"), rps("bare", "streaming")),
        "added_latency_p50_ms": added("kvrouter", "latency_ms_p50"),
        "added_latency_p99_ms": added("kvrouter", "latency_ms_p99"),
        "bare_added_latency_p50_ms": added("bare", "latency_ms_p50"),
        # The throughput ratio if each proxy had a core to itself: CPU per request, inverted.
        "cpu_ratio": ratio(cpu("bare"), cpu("kvrouter")),
    }
    if peers:
        out["peer"] = "smg"
        out["peer_throughput_ratio"] = ratio(rps("kvrouter"), rps("smg"))
        out["peer_throughput_ratio_streaming"] = ratio(rps("kvrouter", "streaming"), rps("smg", "streaming"))
        out["peer_added_latency_p50_ms"] = added("smg", "latency_ms_p50")
        out["peer_added_latency_p99_ms"] = added("smg", "latency_ms_p99")
        out["peer_cpu_ratio"] = ratio(cpu("smg"), cpu("kvrouter"))
    return out


def goals(figures: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (op, bound) in GOALS.items():
        if key not in figures:
            continue
        value = figures[key]
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[key] = {"goal": f"{op} {bound:g}", "value": value, "met": met}
    return out


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_table(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [
        f"load generator: {results['load_generator']}; {cfg['connections']} connections x "
        f"{cfg['duration_s']:g}s (throughput), 1 x {cfg['latency_duration_s']:g}s (latency); "
        f"prompts {cfg['prompt_bytes']} B, max_tokens {cfg['max_tokens']}"
    ]
    header = ("target", "req/s", "p50 ms", "p99 ms", "cpu us/req", "c=1 p50", "c=1 p99", "errors")
    for mode in MODES:
        rows: list[tuple[str, ...]] = [header]
        notes: list[str] = []
        for name, row in results["targets"].items():
            error = row.get("error") or row.get(mode, {}).get("error")
            if error:
                rows.append((name, "-", "-", "-", "-", "-", "-", "-"))
                notes.append(f"  {name}: {error}")
                continue
            t, lat = row[mode].get("throughput", {}), row[mode].get("latency", {})
            errors = t.get("errors", 0) + lat.get("errors", 0)
            cpu = t.get("cpu_us_per_request")
            rows.append(
                (
                    name,
                    _cell(t.get("requests_per_s"), 0),
                    _cell(t.get("latency_ms_p50"), 2),
                    _cell(t.get("latency_ms_p99"), 2),
                    _cell(cpu, 0),
                    _cell(lat.get("latency_ms_p50"), 3),
                    _cell(lat.get("latency_ms_p99"), 3),
                    str(errors),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines.append(f"\n{mode.replace('_', '-')}:")
        lines += [
            "  "
            + "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        ]
        lines += notes
    lines.append("")
    for key, value in results["headline"].items():
        goal = results["goals"].get(key)
        met = (
            ""
            if goal is None
            else f"   goal {goal['goal']}: " + {True: "met", False: "NOT met", None: "-"}[goal["met"]]
        )
        lines.append(f"{key:>34}: {value}{met}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if min(args.connections, args.rounds, args.replicas, args.prompt_bytes, args.max_tokens) < 1:
        print(
            "kvrouter bench proxy: --connections, --rounds, --replicas, --prompt-bytes and --max-tokens "
            "must be positive",
            file=sys.stderr,
        )
        return 2
    if args.duration <= 0 or (args.latency_duration is not None and args.latency_duration <= 0):
        print("kvrouter bench proxy: durations must be positive", file=sys.stderr)
        return 2
    generator = args.load_generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    elif generator == "wrk" and not shutil.which("wrk"):
        print("kvrouter bench proxy: wrk is not on PATH (apt-get install wrk)", file=sys.stderr)
        return 2
    described = (
        "wrk (-t1, Lua POST script)"
        if generator == "wrk"
        else "python (multi-process aiohttp client"
        + ("; wrk not found on PATH: apt-get install wrk)" if args.load_generator == "auto" else ")")
    )
    if generator == "python" and args.load_generator == "auto":
        print("kvrouter bench proxy: wrk not on PATH, using the Python load generator", file=sys.stderr)

    emulator: subprocess.Popen[bytes] | None = None
    targets: list[Target] = []
    with tempfile.TemporaryDirectory(prefix="kvrouter-bench-proxy-") as tmp:
        work = Path(tmp)
        bodies = make_bodies(args.prompt_bytes, args.max_tokens)
        files = {mode: work / f"bodies-{mode}.txt" for mode in MODES}
        for mode, path in files.items():
            path.write_bytes(b"\n".join(bodies[mode]) + b"\n")
        script = work / "post.lua"
        script.write_text(WRK_SCRIPT)
        load = Load(generator, bodies, files, script)
        try:
            emulator, urls = start_emulator(args.replicas, work / "emulator.log")
            targets = proxy_targets(urls, args.peers, args.peers_venv)
            for target in targets:
                start_target(target, work, bodies["non_streaming"][0])
                if target.failure is None:
                    _, problem = check_answers(target.url, bodies["streaming"][0], stream=True)
                    if problem:
                        target.mode_failures["streaming"] = problem
                print(f"{target.name}: {target.failure or 'ready'}", file=sys.stderr)
            measure(targets, load, args, emulator.pid)
        except RuntimeError as exc:
            print(f"kvrouter bench proxy: {exc}", file=sys.stderr)
            return 1
        finally:
            for target in targets:
                stop(target.proc)
            stop(emulator)

    rows = {target.name: summarize(target) for target in targets}
    figures = headline(rows, args.peers)
    results: dict[str, Any] = {
        "load_generator": described,
        "config": {
            "replicas": args.replicas,
            "profile": "instant",
            "connections": args.connections,
            "duration_s": args.duration,
            "latency_duration_s": args.latency_duration
            if args.latency_duration is not None
            else min(3.0, args.duration),
            "rounds": args.rounds,
            "prompt_bytes": args.prompt_bytes,
            "distinct_prompts": PROMPTS,
            "max_tokens": args.max_tokens,
            "cores": os.cpu_count(),
        },
        "targets": rows,
        "headline": figures,
        "goals": goals(figures),
    }
    print(format_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    ours = [rows[name] for name in ("direct", "bare", "kvrouter")]
    broken = any(
        "error" in row or any("error" in row[m] or any(p["errors"] for p in row[m].values()) for m in MODES)
        for row in ours
    )
    return 1 if broken else 0
