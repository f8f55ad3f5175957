"""Where a replica's KV events come from: vLLM's GET /kv_event_sources answer, and the address the
router connects to for an endpoint a replica binds or reports. Pure (no sockets); router/kv_subscriber.py
is the I/O shell that uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from yarl import URL

_BIND_HOSTS = frozenset({"*", "0.0.0.0", "::", ""})
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True, slots=True)
class EventSource:
    endpoint: str  # where the SUB socket connects
    replay_endpoint: str | None
    topic: str
    origin: Literal["config", "discovered"]


def connect_address(endpoint: str, replica_url: str, *, reported: bool = True) -> str:
    """The address the router connects to for a replica's `endpoint`.

    A bind address (`*`, 0.0.0.0, `::`) means every interface of the replica's machine: its URL's host.
    A loopback address a replica `reported` (/kv_event_sources) is its own loopback, not ours; one
    configured here is taken as given (a forwarder on the router's machine, say)."""
    if not endpoint.startswith("tcp://"):
        return endpoint  # ipc:// reaches a publisher on this machine only, as given
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    host = host.strip("[]")
    replica_host = URL(replica_url).host or "127.0.0.1"
    if host in _BIND_HOSTS or (reported and host in _LOOPBACK_HOSTS and replica_host not in _LOOPBACK_HOSTS):
        host = replica_host
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def parse_event_sources(body: object, replica_url: str) -> tuple[EventSource | None, int]:
    """(the lowest data-parallel rank's source, number of usable ranks) from /kv_event_sources."""
    if not isinstance(body, Mapping):
        raise ValueError("/kv_event_sources must answer a JSON object")
    usable: list[tuple[int, Mapping[str, object]]] = []
    for key, cfg in body.items():
        if not (isinstance(key, str) and key.isdigit() and isinstance(cfg, Mapping)):
            continue
        endpoint = cfg.get("endpoint")
        enabled = cfg.get("enable_kv_cache_events") and cfg.get("publisher", "zmq") in (None, "zmq")
        if enabled and isinstance(endpoint, str) and endpoint.startswith(("tcp://", "ipc://")):
            usable.append((int(key), cfg))
    if not usable:
        return None, 0
    _, cfg = min(usable, key=lambda item: item[0])
    replay, topic = cfg.get("replay_endpoint"), cfg.get("topic")
    source = EventSource(
        endpoint=connect_address(str(cfg["endpoint"]), replica_url),
        replay_endpoint=connect_address(replay, replica_url) if isinstance(replay, str) else None,
        topic=topic if isinstance(topic, str) else "",
        origin="discovered",
    )
    return source, len(usable)
