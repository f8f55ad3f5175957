"""`make loadtest` (`python -m load.loadtest`): Locust against the router in front of an emulated fleet.

1. starts `kvrouter emulate --port 0` (ephemeral ports; the replicas' URLs are read from its output)
   and `kvrouter serve` on a free loopback port, each its own process, and waits until the replicas
   answer /health and the router answers /health and /ready;
2. runs Locust headless (load/locustfile.py, every user class) as its own process for `--duration`
   seconds, with `--csv` into `--out` (default reports/loadtest/: locust_stats.csv,
   locust_stats_history.csv, locust_failures.csv, locust_exceptions.csv, plus locust.html and
   the emulator's and router's logs); with `--workers N`, distributed: that process is the master
   and N `locust --worker` processes run the users; with `--shape step|ramp`, the locustfile's
   LoadTestShape sets the user count over the run instead of `-u`/`-r`/`-t`; `--fault` passes
   faults to the emulated fleet (`kvrouter emulate --fault`);
3. stops every process it started, whatever happened (finally, and on SIGTERM/SIGINT), and
4. checks the CSVs (load/check_locust.py): exit 1 on any failed request or without TTFT rows.

The fleet is fast (preset `llama-8b-h100` at its real speed, 16 output tokens) so the run measures the
router and the client, not a queue; everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import math
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
from load.locust_plan import ShapeKind
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


def shape_env(shape: ShapeKind, users: int, duration_s: float) -> dict[str, str]:
    """The KVROUTER_LOCUST_* settings (load/locust_plan.py) of a `shape` load up to `users` over
    `duration_s`: a step load adds a quarter of the users every quarter of the run (so the last quarter
    runs them all), a ramp climbs to them over the first half."""
    step_users = max(1, math.ceil(users / 4))
    return {
        "KVROUTER_LOCUST_SHAPE": shape,
        "KVROUTER_LOCUST_USERS": str(users),
        "KVROUTER_LOCUST_DURATION_S": f"{duration_s:g}",
        "KVROUTER_LOCUST_STEP_USERS": str(step_users),
        "KVROUTER_LOCUST_STEP_S": f"{duration_s / math.ceil(users / step_users):g}",
    }


def locust_argvs(
    router_url: str,
    prefix: Path,
    *,
    duration_s: float,
    users: int,
    spawn_rate: float,
    shape: ShapeKind | None,
    workers: int,
    master_port: int,
) -> tuple[list[str], list[list[str]]]:
    """(the headless Locust's argv, one argv per worker). With workers, the headless one is their
    master: it only coordinates, collects their stats and writes the CSVs; the users run in the
    workers, which take everything but the master's address from it."""
    locust = _bin("locust")
    load = [] if shape is not None else ["-u", str(users), "-r", f"{spawn_rate:g}", "-t", f"{duration_s:g}s"]
    master = (
        ["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(master_port),
         "--expect-workers", str(workers), "--expect-workers-max-wait", f"{READY_TIMEOUT_S:g}"]
        if workers else []
    )  # fmt: skip
    # A master logs at INFO: its log then says which workers connected and quit (one line each).
    headless = [
        locust, "-f", str(LOCUSTFILE), "--headless", "--only-summary", *load, "--stop-timeout", "5",
        "--host", router_url, "--csv", str(prefix), "--html", str(prefix.with_name("locust.html")),
        "--loglevel", "INFO" if workers else "WARNING", "--exit-code-on-error", "0", *master,
    ]  # fmt: skip
    worker = [locust, "-f", str(LOCUSTFILE), "--worker", "--master-host", "127.0.0.1",
              "--master-port", str(master_port), "--loglevel", "WARNING"]  # fmt: skip
    return headless, [list(worker) for _ in range(workers)]


def run_loadtest(
    out: Path,
    *,
    duration_s: float = 20.0,
    users: int = 10,
    spawn_rate: float = 5.0,
    replicas: int = 2,
    policy: str = "kvaware",
    preset: str = "llama-8b-h100",
    workers: int = 0,
    shape: ShapeKind | None = None,
    faults: Sequence[str] = (),
) -> int:
    """The whole run (module docstring); the exit code: 0 passed, 1 failed."""
    if users < 1 or workers < 0 or not duration_s > 0:
        raise ValueError("users must be >= 1, workers >= 0 and the duration positive")
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "locust"
    for stale in [*out.glob("locust_*.csv"), *out.glob("locust*.log")]:
        stale.unlink()
    procs = Processes()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally below

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    kvrouter = _bin("kvrouter")
    exit_codes: list[int] = []
    try:
        emulator_log = out / "emulator.log"
        with emulator_log.open("wb") as log:
            emulator = procs.start(
                [kvrouter, "emulate", "--replicas", str(replicas), "--port", "0", "--profile", preset,
                 *(arg for fault in faults for arg in ("--fault", fault))],
                log,
            )  # fmt: skip
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
        how = f"{shape} shape up to {users} users" if shape else f"{users} users"
        where = f", {workers} workers" if workers else ""
        print(f"loadtest: Locust headless, {how}, {duration_s:g} s{where} ...", flush=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("KVROUTER_LOCUST_SHAPE", None)  # -u/-r/-t unless a shape is asked for here
        if shape is not None:
            env.update(shape_env(shape, users, duration_s))
        headless, worker_argvs = locust_argvs(
            router_url, prefix, duration_s=duration_s, users=users, spawn_rate=spawn_rate, shape=shape,
            workers=workers, master_port=free_port(),
        )  # fmt: skip
        with (out / "locust.log").open("wb") as log:
            locust = procs.start(headless, log, env)
        running = [locust]
        for i, argv in enumerate(worker_argvs):
            with (out / f"locust-worker-{i}.log").open("wb") as log:
                running.append(procs.start(argv, log, env))
        # A master waits up to READY_TIMEOUT_S for its workers; workers quit when their master does.
        deadline = time.monotonic() + duration_s + 60 + (READY_TIMEOUT_S if workers else 0)
        for proc in running:
            try:
                exit_codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                print("loadtest: Locust did not finish in time", file=sys.stderr)
                return 1
        names = ["locust", *(f"locust-worker-{i}" for i in range(workers))]
        for name, code in zip(names, exit_codes, strict=True):
            if code != 0:
                print(f"loadtest: {name} exited {code}; see {out / (name + '.log')}", file=sys.stderr)
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
    return 0 if passed and all(code == 0 for code in exit_codes) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("reports/loadtest"), help="CSV folder")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    parser.add_argument("--users", type=int, default=10, help="Locust users (default 10)")
    parser.add_argument("--replicas", type=int, default=2, help="emulated replicas (default 2)")
    parser.add_argument("--policy", default="kvaware", help="router policy spec (default kvaware)")
    parser.add_argument(
        "--workers", type=int, default=0,
        help="run Locust distributed: a master and this many worker processes (default 0: one process)",
    )  # fmt: skip
    parser.add_argument(
        "--shape", choices=("step", "ramp"), default=None,
        help="a LoadTestShape up to --users over --duration instead of all users at once: step adds a "
        "quarter of them every quarter of the run, ramp climbs to them over the first half",
    )  # fmt: skip
    parser.add_argument(
        "--fault", action="append", default=[], metavar="[I:]K=V,...",
        help="inject a fault into the emulated fleet, as `kvrouter emulate --fault` (repeatable; e.g. "
        "error_rate=0.2, or 1:crash=1 for replica 1): the run then fails unless the router hides it",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.users < 1 or args.workers < 0 or not args.duration > 0:
        parser.error("--users must be >= 1, --workers >= 0 and --duration positive")
    return run_loadtest(
        args.out, duration_s=args.duration, users=args.users, replicas=args.replicas, policy=args.policy,
        workers=args.workers, shape=args.shape, faults=args.fault,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
