"""`make loadtest` (`python -m load.loadtest`): Locust against the router in front of an emulated fleet.

1. starts `kvrouter emulate --port 0` (ephemeral ports; the replicas' URLs are read from its output)
   and `kvrouter serve` on a free loopback port, each its own process, and waits until the replicas
   answer /health and the router answers /health and /ready;
2. runs Locust headless (load/locustfile.py, every user class) as its own process for `--duration`
   seconds, with `--csv` into `--out` (default reports/loadtest/: locust_stats.csv,
   locust_stats_history.csv, locust_failures.csv, locust_exceptions.csv, plus locust.html and
   the emulator's and router's logs);
3. stops every process it started, whatever happened (finally, and on SIGTERM/SIGINT), and
4. checks the CSVs (load/check_locust.py): exit 1 on any failed request or without TTFT rows.

The fleet is fast (preset `llama-8b-h100` at its real speed, 16 output tokens) so the run measures the
router and the client, not a queue; everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import IO

from load.check_locust import check
from workers.ports import free_port

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
READY_TIMEOUT_S = 30.0


def _bin(name: str) -> str:
    """The console script next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class Processes:
    """Child processes, each in its own process group, stopped together (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def start(
        self, argv: Sequence[str], log: IO[bytes], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.children.append(proc)
        return proc

    def stop(self, grace_s: float = 5.0) -> None:
        for proc in reversed(self.children):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in reversed(self.children):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.children.clear()


def _wait_for_emulator(log_path: Path, proc: subprocess.Popen[bytes], replicas: int) -> list[str]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        lines = log_path.read_text(errors="replace").splitlines()
        if any(line.startswith("ready") for line in lines):
            urls = [line.split()[2] for line in lines if line.startswith("replica ")]
            if len(urls) == replicas and all(_answers(u + "/health") for u in urls):
                return urls
        if proc.poll() is not None:
            raise RuntimeError(f"kvrouter emulate exited ({proc.returncode}); see {log_path}")
        time.sleep(0.2)
    raise RuntimeError(f"the emulated fleet was not ready in {READY_TIMEOUT_S:g} s; see {log_path}")


def _wait_for_router(url: str, log_path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if _answers(url + "/health") and _answers(url + "/ready"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"kvrouter serve exited ({proc.returncode}); see {log_path}")
        time.sleep(0.2)
    raise RuntimeError(f"the router was not ready in {READY_TIMEOUT_S:g} s; see {log_path}")


def run_loadtest(
    out: Path,
    *,
    duration_s: float = 20.0,
    users: int = 10,
    spawn_rate: float = 5.0,
    replicas: int = 2,
    policy: str = "kvaware",
    preset: str = "llama-8b-h100",
) -> int:
    """The whole run (module docstring); the exit code: 0 passed, 1 failed."""
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "locust"
    for stale in out.glob("locust_*.csv"):
        stale.unlink()
    procs = Processes()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally below

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    kvrouter = _bin("kvrouter")
    try:
        emulator_log = out / "emulator.log"
        with emulator_log.open("wb") as log:
            emulator = procs.start(
                [kvrouter, "emulate", "--replicas", str(replicas), "--port", "0", "--profile", preset], log
            )
        urls = _wait_for_emulator(emulator_log, emulator, replicas)
        router_url = f"http://127.0.0.1:{free_port()}"
        router_log = out / "router.log"
        with router_log.open("wb") as log:
            backends = [arg for u in urls for arg in ("--backend", u)]
            router = procs.start(
                [kvrouter, "serve", *backends, "--policy", policy, "--host", "127.0.0.1",
                 "--port", router_url.rsplit(":", 1)[1], "--log-level", "WARNING"],
                log,
            )  # fmt: skip
        _wait_for_router(router_url, router_log, router)
        print(f"loadtest: {replicas} x {preset} at {', '.join(urls)}; router {router_url} ({policy})")
        print(f"loadtest: Locust headless, {users} users, {duration_s:g} s ...", flush=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("KVROUTER_LOCUST_SHAPE", None)  # -u/-r/-t here, not a shape
        argv = [
            _bin("locust"), "-f", str(LOCUSTFILE), "--headless", "--only-summary",
            "-u", str(users), "-r", str(spawn_rate), "-t", f"{duration_s:g}s", "--stop-timeout", "5",
            "--host", router_url, "--csv", str(prefix), "--html", str(out / "locust.html"),
            "--loglevel", "WARNING", "--exit-code-on-error", "0",
        ]  # fmt: skip
        with (out / "locust.log").open("wb") as log:
            locust = procs.start(argv, log, env)
            try:
                locust.wait(timeout=duration_s + 60)
            except subprocess.TimeoutExpired:
                print("loadtest: Locust did not finish in time", file=sys.stderr)
                return 1
        if locust.returncode != 0:
            print(f"loadtest: Locust exited {locust.returncode}; see {out / 'locust.log'}", file=sys.stderr)
    except RuntimeError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    passed, lines = check(prefix)
    print("\n".join(lines))
    print(f"loadtest: {'passed' if passed else 'FAILED'}; CSVs in {out}/ ({prefix.name}_stats.csv, ...)")
    return 0 if passed and locust.returncode == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("reports/loadtest"), help="CSV folder")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    parser.add_argument("--users", type=int, default=10, help="Locust users (default 10)")
    parser.add_argument("--replicas", type=int, default=2, help="emulated replicas (default 2)")
    parser.add_argument("--policy", default="kvaware", help="router policy spec (default kvaware)")
    args = parser.parse_args(argv)
    return run_loadtest(
        args.out, duration_s=args.duration, users=args.users, replicas=args.replicas, policy=args.policy
    )


if __name__ == "__main__":
    sys.exit(main())
