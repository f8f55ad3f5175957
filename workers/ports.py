"""Loopback ports for the processes kvrouter starts (vLLM replicas, peer routers, the load-test router).

Rules:
- A port is chosen here and bound later by another process, sometimes a minute later: a vLLM replica
  binds its KV-event socket only after loading the model. A port the kernel picked (a bind to port 0)
  lies in its ephemeral range, the range it also hands to every port-0 bind and outgoing connection in
  the meantime, vLLM's own internal sockets included. Seen in CI: `ZMQError: Address already in use
  (addr='tcp://*:41405')` for a replica's KV-event endpoint, and the replica exited.
- So ports come from below the ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`; Linux's
  default starts at 32768), at random among those that bind now, never twice from one process.
  Another process choosing the same way can still collide; that is as unlikely as two random picks
  among about 12,000 ports meeting, not as likely as the kernel's next ephemeral port.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Linux's default ip_local_port_range starts here (Documentation/networking/ip-sysctl.rst).
DEFAULT_EPHEMERAL_LOW = 32768
# How far below the ephemeral range to choose: 12,000 ports, clear of the well-known and the
# commonly configured service ports under 20,000.
SPAN = 12_000
_ATTEMPTS = 200
_handed_out: set[int] = set()
_rng = random.Random()


def ephemeral_low(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> int:
    """The first port of the kernel's ephemeral range (the default where it cannot be read)."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_LOW


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that binds now, below the kernel's ephemeral range, not handed out before by this
    process (module docstring)."""
    high = ephemeral_low()
    low = max(1024, high - SPAN)
    for _ in range(_ATTEMPTS):
        port = _rng.randrange(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port on {host} in {low}-{high - 1} after {_ATTEMPTS} tries")
