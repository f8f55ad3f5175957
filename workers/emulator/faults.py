"""Injected faults of one emulated replica, for tests of the router's failure handling. Pure data.

Set per replica by `kvrouter emulate --fault [INDEX:]key=value,...`, by `EmulatedFleet(faults=...)`, or
at run time by `POST /kvrouter/faults` with a JSON object; `GET /kvrouter/faults` returns the current set.
A POST *replaces* the whole set (missing keys take their defaults), so `POST {}` clears every fault.

What each fault does (the HTTP edge applies them; `/kvrouter/*` control endpoints are never faulted, so
a fault can always be cleared):
- `latency_s` (>= 0): added before the first byte of every response.
- `error_rate` (0..1): that fraction of generation requests (/v1/completions, /v1/chat/completions)
  answer HTTP 500 with a vLLM-like InternalServerError body, drawn from a seeded RNG per replica.
- `hang`: every request is accepted and never answered until the fault is cleared (it then proceeds)
  or the client goes away.
- `refuse`: the listening socket is closed, so new connections are refused; it re-opens on the same
  port when cleared. Connections already open keep being served.
- `crash`: the engine dies: /health answers 503, in-flight requests are aborted and their connections
  dropped mid-stream, new generation requests get a 500 EngineDeadError. Clearing it restarts the
  replica as a fresh vLLM process would come back: an empty cache, zeroed counters, and a KV-event
  sequence starting again at 0 with an empty replay buffer.
- `drop_events` (N >= 0): the KV-event publisher does not send the next N batches on its PUB socket but
  still numbers them and keeps them in its replay buffer — what a ZMQ PUB past its high-water mark
  does to a slow subscriber. Each POST (or start) with N > 0 arms N more drops; GET shows the N set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

_FIELDS = ("latency_s", "error_rate", "hang", "refuse", "crash", "drop_events")


@dataclass(frozen=True, slots=True)
class Faults:
    latency_s: float = 0.0
    error_rate: float = 0.0
    hang: bool = False
    refuse: bool = False
    crash: bool = False
    drop_events: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(f"latency_s must be a finite number >= 0, got {self.latency_s}")
        if not (0.0 <= self.error_rate <= 1.0):
            raise ValueError(f"error_rate must be within [0, 1], got {self.error_rate}")
        drops = self.drop_events
        if isinstance(drops, bool) or not isinstance(drops, int) or drops < 0:
            raise ValueError(f"drop_events must be an integer >= 0, got {self.drop_events!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, body: object) -> Faults:
        """Faults from a JSON object; ValueError naming the bad key for anything else."""
        if not isinstance(body, Mapping):
            raise ValueError("faults must be a JSON object")
        unknown = sorted(set(body) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown fault(s) {', '.join(map(str, unknown))}; known: {', '.join(_FIELDS)}")
        kwargs: dict[str, Any] = {}
        for key in ("latency_s", "error_rate"):
            if key in body:
                value = body[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{key} must be a number")
                kwargs[key] = float(value)
        for key in ("hang", "refuse", "crash"):
            if key in body:
                if not isinstance(body[key], bool):
                    raise ValueError(f"{key} must be a boolean")
                kwargs[key] = body[key]
        if "drop_events" in body:
            value = body["drop_events"]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError("drop_events must be an integer")
            kwargs["drop_events"] = value
        return cls(**kwargs)


def parse_fault_spec(spec: str) -> tuple[int | None, Faults]:
    """`[INDEX:]key=value,...` (the CLI's --fault) -> (replica index or None for all, Faults).

    Booleans are written `hang=1`/`hang=true`; e.g. `1:latency_s=0.2,error_rate=0.1` or `hang=1`."""
    index: int | None = None
    head, sep, rest = spec.partition(":")
    if sep and head.strip().isdigit():
        index, spec = int(head), rest
    values: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"fault {item!r}: expected key=value")
        if key in ("hang", "refuse", "crash"):
            values[key] = value.strip().lower() in ("1", "true", "yes", "on")
        elif key == "drop_events":
            try:
                values[key] = int(value)
            except ValueError:
                raise ValueError(f"fault {item!r}: drop_events must be an integer") from None
        else:
            try:
                values[key] = float(value)
            except ValueError:
                raise ValueError(f"fault {item!r}: {key} must be a number") from None
    return index, Faults.from_json(values)
