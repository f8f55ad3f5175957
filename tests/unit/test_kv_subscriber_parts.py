"""The KV-event subscriber's pure parts: backend keys and their errors, endpoint addresses, discovery."""

from __future__ import annotations

import pytest

from router.breaker import Breaker
from router.config import BackendConfig, ConfigError, RouterConfig, backend_from_mapping
from router.kv_event_sources import EventSource, connect_address, parse_event_sources
from router.kv_subscriber import replica_model
from router.upstream import Replica

URL = "http://10.0.0.7:8000"


@pytest.mark.parametrize(
    "raw",
    [
        {"kv_events": "tcp://10.0.0.7:5557"},
        {"kv_events": "tcp://*:5557", "kv_events_replay": "tcp://*:5558", "kv_events_topic": "kv"},
        {"kv_events": "tcp://[::1]:5557"},
        {"kv_events": "ipc:///tmp/kv.sock"},
        {"kv_events": "auto", "kv_events_replay": "tcp://host-a:5558"},
        {"kv_events": "off"},
        {},
    ],
)
def test_valid_kv_event_keys(raw: dict[str, object]) -> None:
    backend = backend_from_mapping({"name": "a", "url": URL, **raw}, "backends[0]")
    assert backend.kv_events == raw.get("kv_events")
    assert backend.kv_events_topic == raw.get("kv_events_topic")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"kv_events": 5557}, "kv_events must be a string"),
        ({"kv_events": "10.0.0.7:5557"}, "must be tcp://HOST:PORT"),
        ({"kv_events": "tcp://10.0.0.7"}, "must be tcp://HOST:PORT"),
        ({"kv_events": "tcp://10.0.0.7:70000"}, "port 1-65535"),
        ({"kv_events": "inproc://kv"}, "must be tcp://HOST:PORT"),
        ({"kv_events_replay": "tcp://h:1", "kv_events": "off"}, "kv_events is off"),
        ({"kv_events_replay": "udp://h:1"}, "kv_events_replay 'udp://h:1' must be"),
        ({"kv_events_topic": 3}, "kv_events_topic must be a string"),
    ],
)
def test_bad_kv_event_keys_are_config_errors(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        backend_from_mapping({"name": "a", "url": URL, **raw}, "backends[0]")


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), "10"])
def test_the_silence_window_must_be_positive_seconds(value: object) -> None:
    with pytest.raises(ConfigError, match="kv_events_silence_s"):
        RouterConfig(kv_events_silence_s=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("endpoint", "url", "reported", "expected"),
    [
        ("tcp://*:5557", URL, True, "tcp://10.0.0.7:5557"),  # bound on the replica: its host
        ("tcp://0.0.0.0:5557", URL, False, "tcp://10.0.0.7:5557"),
        ("tcp://[::]:5557", "http://[fd00::7]:8000", True, "tcp://[fd00::7]:5557"),
        ("tcp://127.0.0.1:5557", URL, True, "tcp://10.0.0.7:5557"),  # the replica's own loopback
        ("tcp://127.0.0.1:5557", URL, False, "tcp://127.0.0.1:5557"),  # configured: as given
        ("tcp://127.0.0.1:5557", "http://127.0.0.1:8000", True, "tcp://127.0.0.1:5557"),
        ("tcp://kv-host:5557", URL, True, "tcp://kv-host:5557"),
        ("ipc:///tmp/kv.sock", URL, True, "ipc:///tmp/kv.sock"),
    ],
)
def test_connect_address(endpoint: str, url: str, reported: bool, expected: str) -> None:
    assert connect_address(endpoint, url, reported=reported) == expected


def test_parse_event_sources_takes_the_lowest_usable_rank() -> None:
    source = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv"}
    body = {
        "1": {**source, "endpoint": "tcp://*:5558", "replay_endpoint": "tcp://*:5560"},
        "0": {**source, "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5559"},
        "2": {**source, "enable_kv_cache_events": False, "endpoint": "tcp://*:5556"},
        "x": "ignored",
    }
    found, ranks = parse_event_sources(body, URL)
    assert ranks == 2
    assert found == EventSource("tcp://10.0.0.7:5557", "tcp://10.0.0.7:5559", "kv", "discovered")


@pytest.mark.parametrize(
    "body",
    [
        {},  # the emulator without events
        {"0": {"enable_kv_cache_events": False, "endpoint": "tcp://*:5557"}},
        {"0": {"enable_kv_cache_events": True, "publisher": "null", "endpoint": "tcp://*:5557"}},
        {"0": {"enable_kv_cache_events": True, "endpoint": "inproc://kv"}},
    ],
)
def test_parse_event_sources_without_a_usable_source(body: dict[str, object]) -> None:
    assert parse_event_sources(body, URL) == (None, 0)
    with pytest.raises(ValueError):
        parse_event_sources([body], URL)


def test_replica_model_prefers_the_configured_then_the_base_model() -> None:
    replica = Replica(BackendConfig("a", URL), Breaker(3, 1.0, 2.0))
    assert replica_model(replica) is None
    replica.discovered = ({"id": "adapter", "parent": "base"}, {"id": "base", "parent": None})
    assert replica_model(replica) == "base"
    replica.config = BackendConfig("a", URL, models=("served",))
    assert replica_model(replica) == "served"
