"""A per-replica circuit breaker: passive ejection after consecutive failures, half-open probes back.

Pure: time is an argument, no I/O. The driver (router/upstream.py) reports each outcome and mirrors
`available` into `Fleet.set_healthy`.

States and transitions (a transition table would be longer than this list):
- CLOSED: traffic flows. A failure (connection error, 5xx, timeout, failed /health probe) adds one to
  `failures`; any success resets it. `failure_threshold` consecutive failures → OPEN (an ejection).
- OPEN: no traffic for `cooldown_s`. Outcomes of requests sent before the ejection are ignored.
  `trip` also opens it at once (a replica that is down when the router first sees it).
- HALF_OPEN: the cool-down has passed; `probe_due` says so once, and the driver sends one active
  /health probe (never a user's request, so no client pays for the test). Success → CLOSED with the
  cool-down reset; failure → OPEN again with the cool-down doubled, up to `max_cooldown_s`, so a
  replica that stays down costs one probe per minute rather than one per interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class Breaker:
    failure_threshold: int = 3
    base_cooldown_s: float = 5.0
    max_cooldown_s: float = 60.0
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    cooldown_s: float = 0.0
    opened_at: float = 0.0
    ejections: int = 0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.base_cooldown_s <= 0 or self.max_cooldown_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and cool-downs positive")
        self.cooldown_s = self.base_cooldown_s

    @property
    def available(self) -> bool:
        return self.state is BreakerState.CLOSED

    def record_success(self, now: float) -> bool:
        """A request or probe succeeded; True if this closed the breaker (the replica is back)."""
        if self.state is BreakerState.OPEN:
            return False  # a late answer to a request sent before the ejection proves little
        recovered = self.state is BreakerState.HALF_OPEN
        self.state = BreakerState.CLOSED
        self.failures = 0
        if recovered:
            self.cooldown_s = self.base_cooldown_s
        return recovered

    def record_failure(self, now: float) -> bool:
        """A request or probe failed; True if this ejected the replica (CLOSED or HALF_OPEN → OPEN)."""
        if self.state is BreakerState.OPEN:
            return False
        if self.state is BreakerState.HALF_OPEN:
            self.cooldown_s = min(self.cooldown_s * 2, self.max_cooldown_s)
            return self._open(now)
        self.failures += 1
        if self.failures >= self.failure_threshold:
            return self._open(now)
        return False

    def trip(self, now: float) -> bool:
        """Open at once (e.g. the replica was down at its first probe); True if it was not open."""
        if self.state is BreakerState.OPEN:
            return False
        return self._open(now)

    def probe_due(self, now: float) -> bool:
        """True once per cool-down: the breaker is now HALF_OPEN and awaits one probe's outcome."""
        if self.state is BreakerState.OPEN and now >= self.opened_at + self.cooldown_s:
            self.state = BreakerState.HALF_OPEN
            return True
        return self.state is BreakerState.HALF_OPEN

    def _open(self, now: float) -> bool:
        self.state = BreakerState.OPEN
        self.opened_at = now
        self.failures = 0
        self.ejections += 1
        return True
