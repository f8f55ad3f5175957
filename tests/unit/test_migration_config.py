"""The configuration of hot-prefix migration (router/config.py): `migration_interval_s`, the controller's
`hot_prefix` parameters (and their --help example), each backend's `kv_transfer` and the keys its
mechanisms need (`lmcache_instance_id`, `nixl_host`, `nixl_port`), which pairs of backends can copy
(router/migration.py `copy_kind`), the router's `lmcache_controller_url`, and `kvrouter serve
--kv-transfer`. Every bad value is a ConfigError that names the key."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.config import (
    KV_TRANSFERS,
    BackendConfig,
    ConfigError,
    RouterConfig,
    backend_from_mapping,
    build_config,
    check_hot_prefix,
)
from router.hot_prefix import RENAMED_PARAMS, TUNABLE_PARAMS, HotPrefixParams
from router.migration import copy_kind, hot_prefix_params
from router.policies.kvaware import KvAwareParams
from router.serve_cli import EPILOG, config_from_args, register

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


# -- hot_prefix -----------------------------------------------------------------------------------------


def test_hot_prefix_default_is_every_controller_default() -> None:
    assert RouterConfig().hot_prefix == {}
    assert check_hot_prefix({}) == HotPrefixParams()
    cfg = RouterConfig(hot_prefix={"cooldown_s": 0.5, "migration_timeout_s": 3, "max_concurrent": 0})
    p = check_hot_prefix(cfg.hot_prefix)
    assert (p.cooldown_s, p.migration_timeout_s, p.max_concurrent) == (0.5, 3, 0)
    assert p.hot_wait_steps == HotPrefixParams().hot_wait_steps  # the others keep their defaults


def test_hot_prefix_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        "hot_prefix:\n"
        "  cooldown_s: 0.4\n"
        "  migration_timeout_s: 5\n"
        "  hot_wait_steps: 8\n"
        "  cool_wait_steps: 3.5\n"
        "  copy_bytes_per_s: null\n"
        "  warmup: true\n"
    )
    cfg = build_config(config_path=path, environ={})
    assert cfg.hot_prefix == {
        "cooldown_s": 0.4,
        "migration_timeout_s": 5,
        "hot_wait_steps": 8,
        "cool_wait_steps": 3.5,
        "copy_bytes_per_s": None,
        "warmup": True,
    }
    path.write_text("hot_prefix:\n  # cooldown_s: 1\n")  # a section with every key commented out
    assert build_config(config_path=path, environ={}).hot_prefix == {}


def config_file_error(tmp_path: Path, text: str) -> str:
    """The ConfigError a router.yaml of `text` stops kvrouter serve with."""
    path = tmp_path / "router.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        build_config(config_path=path, environ={})
    return str(err.value)


def test_hot_prefix_unknown_key_lists_the_known_ones(tmp_path: Path) -> None:
    message = config_file_error(tmp_path, "hot_prefix: {cooldown: 1, timeout_s: 2}\n")
    assert message.startswith("hot_prefix: unknown key(s) cooldown, timeout_s; known: half_life_s, ")
    for key in TUNABLE_PARAMS:
        assert key in message
    # The two fields the kvaware policy owns are not hot_prefix keys; group_chunks says where it goes.
    with pytest.raises(ConfigError, match=re.escape("group_chunks is the kvaware policy's")):
        RouterConfig(hot_prefix={"group_chunks": 8})
    with pytest.raises(ConfigError, match="unknown key\\(s\\) step; known"):
        RouterConfig(hot_prefix={"step": {}})


BAD_HOT_PREFIX: list[tuple[Any, str]] = [
    ([1, 2], "hot_prefix must be a mapping of hot-prefix controller parameters (half_life_s, "),
    ("cooldown_s=1", "hot_prefix must be a mapping"),
    ({"cooldown_s": -1}, "hot_prefix: cooldown_s must be a finite number >= 0, got -1"),
    ({"cooldown_s": True}, "hot_prefix: cooldown_s must be a finite number >= 0, got True"),
    ({"migration_timeout_s": 0}, "hot_prefix: migration_timeout_s must be a finite number > 0, got 0"),
    ({"migration_timeout_s": "30"}, "hot_prefix: migration_timeout_s must be a finite number > 0, got '30'"),
    ({"max_concurrent": 2.5}, "hot_prefix: max_concurrent must be an integer >= 0, got 2.5"),
    ({"max_groups": 0}, "hot_prefix: max_groups must be an integer >= 1, got 0"),
    ({"warmup": "no"}, "hot_prefix: warmup must be true or false, got 'no'"),
    ({"copy_bytes_per_s": 0}, "hot_prefix: copy_bytes_per_s must be a finite number > 0 (or None"),
    # hysteresis: alone, a hot_wait_steps under the default cool_wait_steps (2.5) is refused too
    ({"hot_wait_steps": 2}, "hot_prefix: cool_wait_steps (2.5) must be below hot_wait_steps (2)"),
    ({"cool_wait_steps": 4, "hot_wait_steps": 4}, "cool_wait_steps (4) must be below hot_wait_steps (4)"),
    ({"headroom_wait_steps": 0}, "hot_prefix: headroom_wait_steps must be a finite number > 0, got 0"),
]


@pytest.mark.parametrize(("raw", "message"), BAD_HOT_PREFIX)
def test_bad_hot_prefix_values(raw: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        RouterConfig(hot_prefix=raw)


def test_the_former_thresholds_in_seconds_name_their_replacement(tmp_path: Path) -> None:
    """hot_wait_s, cool_wait_s and headroom_wait_s were seconds; now they are idle engine steps, so an old
    file must not start with the thresholds silently at their defaults nor read 0.03 as 0.03 steps."""
    message = config_file_error(tmp_path, "hot_prefix:\n  hot_wait_s: 0.03\n  cooldown_s: 1\n")
    assert message.startswith("hot_prefix: hot_wait_s is now hot_wait_steps: the thresholds are in idle ")
    assert "not seconds" in message and "0.03 s is 5 steps" in message
    with pytest.raises(ConfigError) as err:
        RouterConfig(hot_prefix={"headroom_wait_s": 0.015, "cool_wait_s": 0.015, "typo": 1})
    assert str(err.value).startswith(
        "hot_prefix: cool_wait_s is now cool_wait_steps, headroom_wait_s is now headroom_wait_steps: "
    )
    assert RENAMED_PARAMS == {
        "hot_wait_s": "hot_wait_steps",
        "cool_wait_s": "cool_wait_steps",
        "headroom_wait_s": "headroom_wait_steps",
    }


def test_a_number_yaml_kept_as_text_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("hot_prefix: {copy_bytes_per_s: 25e9}\n")  # PyYAML: the string '25e9'
    with pytest.raises(ConfigError, match=re.escape("got '25e9' (YAML reads 25e9 or 1e-3 as a string")):
        build_config(config_path=path, environ={})
    path.write_text("hot_prefix: {copy_bytes_per_s: 2.5e+10}\n")
    assert build_config(config_path=path, environ={}).hot_prefix == {"copy_bytes_per_s": 25e9}


def test_serve_help_shows_every_hot_prefix_key_at_its_default() -> None:
    """The `hot_prefix:` block of `kvrouter serve --help` is YAML that gives the defaults, all of them."""
    lines = EPILOG.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("  hot_prefix:")))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith("    ") and line.strip() and not line.lstrip().startswith("#"):
            break
        block.append(line)
    shown = yaml.safe_load("\n".join(block))["hot_prefix"]
    defaults = HotPrefixParams()
    assert list(shown) == list(TUNABLE_PARAMS)
    assert shown == {name: getattr(defaults, name) for name in TUNABLE_PARAMS}
    assert check_hot_prefix(shown) == defaults


def test_operations_doc_shows_every_hot_prefix_key_at_its_default() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "OPERATIONS.md").read_text(encoding="utf-8")
    block = doc.split("```yaml\nhot_prefix:\n", 1)[1].split("```", 1)[0]
    shown = yaml.safe_load("hot_prefix:\n" + block)["hot_prefix"]
    defaults = HotPrefixParams()
    assert shown == {name: getattr(defaults, name) for name in TUNABLE_PARAMS}


def test_the_runner_params_take_the_policys_group_and_step_model() -> None:
    policy = KvAwareParams(group_chunks=6, step_base_tokens=99.0)
    p = hot_prefix_params(policy, {"cooldown_s": 0.25})
    assert (p.group_chunks, p.step, p.cooldown_s) == (6, policy, 0.25)
    assert dataclasses.replace(p, cooldown_s=HotPrefixParams().cooldown_s) == hot_prefix_params(policy, {})


# -- which backends can copy to which ------------------------------------------------------------------

COPY_PAIRS: list[tuple[str | None, str | None, int, str | None]] = [
    ("p2p", "p2p", 16, "p2p"),
    ("nixl", "nixl", 16, "nixl"),
    ("lmcache", "lmcache", 256, "lmcache"),
    ("lmcache", "lmcache", 255, None),  # under one LMCache chunk nothing would move
    ("p2p", "nixl", 1000, None),  # different mechanisms cannot copy between them
    ("nixl", "p2p", 1000, None),
    ("warmup", "warmup", 1000, None),  # recompute-only backends
    (None, None, 1000, None),
    ("p2p", None, 1000, None),
]


@pytest.mark.parametrize(("source", "target", "tokens", "kind"), COPY_PAIRS)
def test_copy_kind(source: str | None, target: str | None, tokens: int, kind: str | None) -> None:
    def backend(name: str, transfer: str | None) -> BackendConfig:
        if transfer == "lmcache":
            return lm(name)
        if transfer == "nixl":
            return nixl(name, port=5710 if name == "s" else 5711)
        return BackendConfig(name, URL, kv_transfer=transfer)

    assert copy_kind(backend("s", source), backend("t", target), tokens) == kind
    assert copy_kind(None, backend("t", target), tokens) is None  # no source: a warm-up


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


# -- kvrouter serve --kv-transfer ----------------------------------------------------------------------


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    register(commands)
    return parser.parse_args(["serve", *argv])


def test_serve_kv_transfer_applies_to_the_flag_backends_only(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(f"backends:\n  - {{name: f, url: '{URL}', kv_transfer: warmup}}\n")
    flags = ("--backend", f"a={URL}", "--backend", URL, "--kv-transfer", "p2p")
    args = serve_args("--config", str(path), *flags)
    transfers = {b.name: b.kv_transfer for b in config_from_args(args).backends}
    assert transfers == {"f": "warmup", "a": "p2p", "10.0.0.1:8000": "p2p"}
    # Without the flag a flag backend has none, which means a warm-up (router/migration.py copy_kind).
    plain = config_from_args(serve_args("--backend", f"a={URL}"))
    assert [b.kv_transfer for b in plain.backends] == [None]


def test_serve_kv_transfer_refuses_kinds_that_need_their_own_keys(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        serve_args("--backend", URL, "--kv-transfer", "lmcache")
    assert "invalid choice: 'lmcache'" in capsys.readouterr().err
