"""Routers started as processes in front of a fleet, for the benchmarks that compare them side by side.

Shared by `kvrouter bench proxy` (proxy overhead), `kvrouter bench live` (routing quality on an emulated
fleet) and `kvrouter bench vllm` (physical hit rate on real vLLM replicas):
    kvrouter      `kvrouter serve --policy SPEC` (this venv's Python, `python -m router.cli`)
    smg           the SGLang model gateway, `smg launch --policy cache_aware`
    vllm-router   vLLM's router, `vllm-router --policy cache_aware|kv_aware`
The peers come from `make peers` (smg 1.13.0 and vllm-router 0.1.17 in .venv-peers, never the
project's venv). Flags, as checked against both binaries' `--help` (anchors.md, "Running the peers"):
- every listener binds loopback, and every instance gets its own `--prometheus-port` (both default to
  29000, so two peers at once would collide);
- smg's tokenizer download is off (`--disable-tokenizer-autoload`): nothing may leave the machine, and
  its cache_aware tree matches characters, not tokens;
- vllm-router's kv_aware subscribes to each replica's ZMQ KV events:
  `--kv-event-source WORKER_URL=ENDPOINT` (and `--kv-event-replay-source`) once per replica, with
  `--kv-event-model` and `--kv-event-block-size`. It scores only requests that carry token ids; on
  text prompts it balances by load. It saw no events from a publisher with a named topic (anchors.md):
  a fleet it follows publishes on the empty topic.

Rules:
- A `Target` that cannot run keeps its row, with the reason in `failure`: not installed, exited at
  start (a flag it lacks, a port it could not bind), refused the readiness request, or never answered.
  `kvrouter bench vllm` makes the readiness request the kind the row sends (`path`: a chat request
  to /v1/chat/completions, a token-id prompt to /v1/completions), so that a peer which refuses that
  kind of request says why in its row.
- `start_target` and `stop` block (subprocess waits, urllib): a caller whose fleet runs on its own
  event loop calls them through `asyncio.to_thread`, so the fleet keeps answering meanwhile.
- Whoever starts a target stops it (`stop`), on every path out, Ctrl-C included.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.ports import free_port

READY_TIMEOUT_S = 60.0
COMPLETIONS = "/v1/completions"
PEER_ROUTERS = ("smg", "vllm-router")
# The peer rows `kvrouter bench live --peers` adds: the routers users would pick instead.
PEER_SPECS = ("smg:cache_aware", "vllm-router:cache_aware", "vllm-router:kv_aware")
_POLICIES = {"smg": ("cache_aware",), "vllm-router": ("cache_aware", "kv_aware")}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Target:
    """One router process (or, with no command, an endpoint that is already there)."""

    name: str
    what: str
    url: str = ""
    command: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    failure: str | None = None  # why it has no figures (the row says so)
    metrics_url: str = ""  # a peer's own Prometheus page (its --prometheus-port), for diagnosis only
    mode_failures: dict[str, str] = field(default_factory=dict)
    samples: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class KvEventSources:
    """What vllm-router's kv_aware needs to follow the replicas' caches."""

    model: str
    block_size: int
    # (worker URL, PUB endpoint, replay endpoint or None), one per replica
    replicas: tuple[tuple[str, str, str | None], ...]


def add_peer_arguments(parser: Any, what: str | None = None) -> None:
    """`--peers` and `--peers-venv`, as every bench that can run the peers takes them."""
    parser.add_argument(
        "--peers", action="store_true", help=f"also run {what or ', '.join(PEER_SPECS)} (install: make peers)"
    )
    parser.add_argument(
        "--peers-venv",
        type=Path,
        default=Path(".venv-peers"),
        help="virtual environment holding the peers' binaries (default .venv-peers)",
    )


def last_line(log: Path | None) -> str:
    """The last non-empty line of a log, colours stripped (the reason a process gave for exiting)."""
    if log is None or not log.exists():
        return ""
    lines = [_ANSI.sub("", line).strip() for line in log.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:300] if lines else ""


def log_lines(log: Path | None, pattern: str) -> list[str]:
    """Lines of a log that contain `pattern`, colours stripped."""
    if log is None or not log.exists():
        return []
    lines = (_ANSI.sub("", line).strip() for line in log.read_text(errors="replace").splitlines())
    return [line for line in lines if pattern in line]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc; 0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime: fields 14 and 15 of stat


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 10 s; a no-op for a process that is gone."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def kvrouter_target(name: str, policy: str, backends: Sequence[str], *extra: str) -> Target:
    """`kvrouter serve --policy POLICY` over `backends` (each `[NAME=]URL`), on a free loopback port."""
    port = free_port()
    command = [sys.executable, "-m", "router.cli", "serve", *(a for b in backends for a in ("--backend", b))]
    command += ["--policy", policy, "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"]
    return Target(
        name, f"kvrouter serve --policy {policy}", url=f"http://127.0.0.1:{port}", command=[*command, *extra]
    )


def peer_target(
    name: str, spec: str, urls: Sequence[str], bin_dir: Path, kv_events: KvEventSources | None = None
) -> Target:
    """A peer router (`ROUTER:POLICY`, e.g. `smg:cache_aware`) over `urls`, binaries from `bin_dir`."""
    router, _, policy = spec.partition(":")
    if policy not in _POLICIES.get(router, ()):
        known = ", ".join(f"{r}:{p}" for r, ps in _POLICIES.items() for p in ps)
        raise ValueError(f"unknown peer {spec!r}; known: {known}")
    port, metrics_port = free_port(), free_port()
    binary = bin_dir / router
    launch = ["launch"] if router == "smg" else []
    target = Target(name, " ".join([router, *launch, "--policy", policy]), url=f"http://127.0.0.1:{port}")
    target.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    command = [str(binary), *launch, "--worker-urls", *urls]
    command += ["--policy", policy, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--log-level", "warn" if router == "smg" else "warning"]
    command += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    if router == "smg":
        # On SIGTERM smg waits up to this grace period (default 180 s) and took ~5 s to exit here with
        # nothing in flight; it is only ever stopped once its load has ended, so 1 s is plenty.
        command += ["--disable-tokenizer-autoload", "--shutdown-grace-period-secs", "1"]
    if policy == "kv_aware":
        if kv_events is None or not kv_events.replicas:
            target.failure = "kv_aware needs the replicas' KV event endpoints, and none were given"
        else:
            command += ["--kv-event-model", kv_events.model]
            command += ["--kv-event-block-size", str(kv_events.block_size)]
            for url, endpoint, replay in kv_events.replicas:
                command += ["--kv-event-source", f"{url}={endpoint}"]
                if replay is not None:
                    command += ["--kv-event-replay-source", f"{url}={replay}"]
    target.command = command
    if not binary.exists():
        target.failure = f"not installed: {binary} is missing (run `make peers`)"
    return target


def _post(url: str, body: bytes, timeout: float = 5.0, path: str = COMPLETIONS) -> tuple[int, bytes]:
    request = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def check_answers(
    url: str, body: bytes, stream: bool, path: str = COMPLETIONS
) -> tuple[int | None, str | None]:
    """(HTTP status or None, None if `url` answered the request at `path` as vLLM would, else why not)."""
    try:
        status, answer = _post(url, body, path=path)
    except OSError as exc:
        return None, f"request failed: {exc}"
    text = answer.decode(errors="replace")
    if status != 200:
        return status, f"refused the request: HTTP {status}: {text[:200]}"
    if stream and not text.rstrip().endswith("data: [DONE]"):
        return status, f"stream did not end with data: [DONE]: {text[-200:]!r}"
    if not stream and '"choices"' not in text:
        return status, f"answer has no choices: {text[:200]}"
    return status, None


def start_target(
    target: Target,
    logs: Path,
    body: bytes,
    give_up: threading.Event | None = None,
    path: str = COMPLETIONS,
) -> None:
    """Start the target's process (if any) and wait until it answers `body` (sent to `path`) with a 200.

    Connection errors and 5xx are waited out (a router may answer 503 until it has seen a healthy
    worker); a 4xx is final: the target is up and refuses this request. On failure the process is
    stopped and `target.failure` says why. `give_up` set (from another thread: Ctrl-C while this
    waits in a worker thread) ends the wait at once."""
    if target.failure is not None:
        return
    if target.command:
        target.log = logs / (re.sub(r"[^A-Za-z0-9._-]", "_", target.name) + ".log")
        with target.log.open("wb") as out:
            target.proc = subprocess.Popen(target.command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + READY_TIMEOUT_S
    problem: str | None = "no answer"
    while time.monotonic() < deadline:
        if give_up is not None and give_up.is_set():
            problem = "interrupted before it was ready"
            break
        if target.proc is not None and target.proc.poll() is not None:
            target.failure = f"exited with code {target.proc.returncode}: {last_line(target.log)}"
            return
        status, problem = check_answers(target.url, body, stream=False, path=path)
        if problem is None:
            return
        if status is not None and 400 <= status < 500:
            break
        time.sleep(0.5)
    else:
        problem = f"not ready within {READY_TIMEOUT_S:.0f}s: {problem}"
    target.failure = problem
    stop(target.proc)


def kv_aware_notes(target: Target) -> list[str]:
    """What vllm-router's kv_aware logged about the replicas' KV events that it could not use.

    It logs every batch of KV events it cannot decode (at warning level, the level `peer_target` runs
    it at); none logged means it decoded what it received."""
    bad = log_lines(target.log, "kv_index decode batch")
    return [f"{len(bad)} KV event batches not decoded, e.g. {bad[0][-160:]}"] if bad else []


def exit_problem(target: Target) -> str | None:
    """Why the target's process is no longer running (None while it runs, or if it never had one)."""
    if target.proc is None or target.proc.poll() is None:
        return None
    return f"exited with code {target.proc.returncode} during the run: {last_line(target.log)}"
