"""The configuration of hot-prefix migration (router/config.py): `migration_interval_s`, each backend's
`kv_transfer` and the keys its mechanisms need (`lmcache_instance_id`, `nixl_host`, `nixl_port`), and the
router's `lmcache_controller_url`. Every bad value is a ConfigError that names the key."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from router.config import (
    KV_TRANSFERS,
    BackendConfig,
    ConfigError,
    RouterConfig,
    backend_from_mapping,
    build_config,
)

URL = "http://10.0.0.1:8000"
CONTROLLER = "http://10.0.0.9:9000"


def lm(name: str, instance: str | None = None) -> BackendConfig:
    return BackendConfig(name, URL, kv_transfer="lmcache", lmcache_instance_id=instance or f"inst-{name}")


def nixl(name: str, host: str = "10.0.0.2", port: int = 5710) -> BackendConfig:
    return BackendConfig(name, URL, kv_transfer="nixl", nixl_host=host, nixl_port=port)


# -- migration_interval_s ------------------------------------------------------------------------------


def test_migration_interval_default_and_values() -> None:
    assert RouterConfig().migration_interval_s == 0.5
    assert RouterConfig(migration_interval_s=0.05).migration_interval_s == 0.05
    assert RouterConfig(migration_interval_s=2).migration_interval_s == 2


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "1", None, True])
def test_migration_interval_must_be_positive_seconds(bad: Any) -> None:
    with pytest.raises(ConfigError, match="migration_interval_s must be a positive number of seconds"):
        RouterConfig(migration_interval_s=bad)


def test_migration_interval_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("migration_interval_s: 0.2\n")
    assert build_config(config_path=path, environ={}).migration_interval_s == 0.2
    path.write_text("migration_interval_s: yes\n")  # YAML's true: not a number of seconds
    with pytest.raises(ConfigError, match="migration_interval_s"):
        build_config(config_path=path, environ={})


# -- kv_transfer and its keys --------------------------------------------------------------------------


def test_every_kv_transfer_is_accepted_with_its_keys() -> None:
    assert KV_TRANSFERS == ("p2p", "warmup", "lmcache", "nixl")
    backends = (
        BackendConfig("p", URL, kv_transfer="p2p"),
        BackendConfig("w", URL, kv_transfer="warmup"),
        BackendConfig("none", URL),
        lm("l"),
        nixl("n"),
    )
    cfg = RouterConfig(backends=backends, lmcache_controller_url=CONTROLLER)
    assert [b.kv_transfer for b in cfg.backends] == ["p2p", "warmup", None, "lmcache", "nixl"]


PORT = "kv_transfer nixl needs nixl_port, its P2P tier's port (1-65535), got"
BAD_BACKENDS: list[tuple[dict[str, Any], str]] = [
    (
        {"kv_transfer": "rdma"},
        "kv_transfer must be one of p2p, warmup, lmcache, nixl (or absent), got 'rdma'",
    ),
    ({"kv_transfer": "lmcache"}, "kv_transfer lmcache needs lmcache_instance_id"),
    ({"kv_transfer": "lmcache", "lmcache_instance_id": ""}, "kv_transfer lmcache needs lmcache_instance_id"),
    ({"lmcache_instance_id": "i"}, "lmcache_instance_id is set but kv_transfer is not lmcache"),
    ({"kv_transfer": "p2p", "lmcache_instance_id": "i"}, "lmcache_instance_id is set but kv_transfer is not"),
    ({"kv_transfer": "nixl", "nixl_port": 5710}, "kv_transfer nixl needs nixl_host"),
    ({"kv_transfer": "nixl", "nixl_host": "h"}, f"{PORT} None"),
    (
        {"kv_transfer": "nixl", "nixl_host": "h", "nixl_port": 0},
        f"{PORT} 0",
    ),
    ({"kv_transfer": "nixl", "nixl_host": "h", "nixl_port": 65536}, f"{PORT} 65536"),
    ({"kv_transfer": "nixl", "nixl_host": "h", "nixl_port": True}, f"{PORT} True"),
    ({"nixl_host": "h", "nixl_port": 5710}, "nixl_host and nixl_port are set but kv_transfer is not nixl"),
    ({"kv_transfer": "warmup", "nixl_port": 5710}, "nixl_host and nixl_port are set but kv_transfer is not"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_BACKENDS)
def test_bad_transfer_keys(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"backend 'a': {message}")):
        BackendConfig("a", URL, **fields)


def test_lmcache_needs_a_controller_url() -> None:
    with pytest.raises(
        ConfigError, match="backends l1, l2 have kv_transfer lmcache: set lmcache_controller_url"
    ):
        RouterConfig(backends=(lm("l1"), lm("l2"), nixl("n")))
    for bad, message in (
        ("10.0.0.9:9000", "must be an absolute http:// or https:// URL"),
        ("http://10.0.0.9:9000/?x=1", "must not have a query"),
        (9000, "lmcache_controller_url must be a URL string, got 9000"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            RouterConfig(backends=(lm("l1"),), lmcache_controller_url=bad)  # type: ignore[arg-type]
    # A controller without lmcache backends is allowed (replicas may be added at run time).
    assert RouterConfig(lmcache_controller_url=CONTROLLER).lmcache_controller_url == CONTROLLER


def test_two_backends_cannot_share_an_lmcache_instance_or_a_nixl_endpoint() -> None:
    with pytest.raises(ConfigError, match="lmcache_instance_id must differ between backends; repeated: same"):
        RouterConfig(backends=(lm("l1", "same"), lm("l2", "same")), lmcache_controller_url=CONTROLLER)
    with pytest.raises(
        ConfigError, match=re.escape("nixl_host:nixl_port must differ between backends; repeated: h:1")
    ):
        RouterConfig(backends=(nixl("n1", "h", 1), nixl("n2", "h", 1)))
    RouterConfig(backends=(nixl("n1", "h", 1), nixl("n2", "h", 2)))  # one host, two ports: fine


# -- from YAML and admin bodies ------------------------------------------------------------------------


def test_transfer_keys_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        f"lmcache_controller_url: {CONTROLLER}\n"
        "backends:\n"
        f"  - {{name: a, url: '{URL}', kv_transfer: lmcache, lmcache_instance_id: vllm-a}}\n"
        f"  - {{name: b, url: '{URL}', kv_transfer: nixl, nixl_host: 10.0.0.2, nixl_port: 5710}}\n"
        f"  - {{name: c, url: '{URL}'}}\n"
    )
    cfg = build_config(config_path=path, environ={})
    a, b, c = cfg.backends
    assert cfg.lmcache_controller_url == CONTROLLER
    assert (a.kv_transfer, a.lmcache_instance_id) == ("lmcache", "vllm-a")
    assert (b.kv_transfer, b.nixl_host, b.nixl_port) == ("nixl", "10.0.0.2", 5710)
    assert (c.kv_transfer, c.lmcache_instance_id, c.nixl_host, c.nixl_port) == (None, None, None, None)


BAD_MAPPINGS: list[tuple[dict[str, Any], str]] = [
    ({"kv_transfer": 1}, "kv_transfer must be one of p2p, warmup, lmcache, nixl"),
    ({"kv_transfer": "lmcache", "lmcache_instance_id": 7}, "lmcache_instance_id must be a string"),
    ({"kv_transfer": "nixl", "nixl_host": ["h"], "nixl_port": 1}, "nixl_host must be a string"),
    ({"kv_transfer": "nixl", "nixl_host": "h", "nixl_port": "5710"}, "nixl_port must be an integer"),
    ({"kv_transfer": "nixl", "nixl_host": "h", "nixl_port": 5710.0}, "nixl_port must be an integer"),
    ({"nixl": "h:1"}, "unknown key(s) nixl; known: name, url, models"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_MAPPINGS)
def test_bad_transfer_keys_in_a_mapping(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        backend_from_mapping({"name": "a", "url": URL, **fields}, "backends[0]")


def test_unknown_backend_key_lists_the_transfer_keys() -> None:
    with pytest.raises(ConfigError) as err:
        backend_from_mapping({"name": "a", "url": URL, "instance_id": "x"}, "backends[0]")
    for key in ("kv_transfer", "lmcache_instance_id", "nixl_host", "nixl_port"):
        assert key in str(err.value)
